"""Child process for the R11 crash test: reload the workspace's edited policy, revalidating.

    python _reload_child.py HOME

It is what ``agov policy reload`` does, through the Python API. It prints one line per step,
flushed, so that the parent knows how far it got when it was killed: ``start``; then, at the
first committed revalidation chunk, ``opa PID`` (the managed sidecar, so the parent can check
it died with us); ``chunk N SIZE`` after each committed chunk; ``done TOTAL`` at the end.
"""

from __future__ import annotations

import sys

from agov.engine import Engine


def main(home: str) -> None:
    print("start", flush=True)
    with Engine.open(home) as engine:
        chunks = 0

        def progress(count: int) -> None:
            nonlocal chunks
            if chunks == 0:
                print(f"opa {getattr(engine.evaluator(), 'pid', None)}", flush=True)
            chunks += 1
            print(f"chunk {chunks} {count}", flush=True)

        result = engine.reload_policy(actor="r11-child", reason="R11 crash test", progress=progress)
        report = result["revalidation"] or {}
        print(f"done {report.get('total')}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
