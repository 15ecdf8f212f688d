"""The ``agov`` command. Ctrl-C while Python still imports the CLI (its first quarter second)
exits 130 as an interrupted agov does, with no traceback: nothing has been done yet."""

from __future__ import annotations

import json
import os
import signal
import sys

_HINT = "nothing was done: agov had not started yet"
_TRUE = frozenset({"1", "true", "t", "yes", "y", "on"})  # as agov.cli reads AGOV_JSON


def main() -> None:
    try:
        from agov.cli import main as cli
    except KeyboardInterrupt:
        code = 128 + signal.SIGINT
        if "--json" in sys.argv[1:] or os.environ.get("AGOV_JSON", "").strip().lower() in _TRUE:
            error = {"type": "Interrupted", "message": "interrupted", "hint": _HINT}
            print(json.dumps({"error": error, "exit_code": code}, sort_keys=True))
        else:
            print(f"error: interrupted\n  hint: {_HINT}", file=sys.stderr)
        sys.exit(code)
    cli()
