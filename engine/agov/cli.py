"""The ``agov`` command line: thin. Parse, call the engine, print text or ``--json``.

Only this module exits, and errors map to exit codes in one place (:data:`EXIT_CODES`):
0 success or allowed, 1 denied by policy (including a fail-closed deny), 2 bad usage or bad
input (nothing changed but an audit event), 3 an internal or infrastructure error in a command
that is not a decision (``admit`` and ``promote`` answer such an error with a deny, exit 1).
"""

from __future__ import annotations

import contextlib
import functools
import getpass
import json
import os
import select
import signal
import sys
import threading
import time
import unicodedata
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from agov import interrupts
from agov.config import Config
from agov.errors import AgovError, ConfigError, InfrastructureError, NotFoundError, SpecError, UsageError
from agov.registry import CreationMode

EXIT_OK, EXIT_DENIED, EXIT_BAD_INPUT, EXIT_INFRA = 0, 1, 2, 3
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (InfrastructureError, EXIT_INFRA),
    (AgovError, EXIT_BAD_INPUT),
)

F = TypeVar("F", bound=Callable[..., Any])


class Ctx:
    """Per-invocation options shared by every command."""

    def __init__(
        self, home: Path, as_json: bool, actor: str, opa_url: str | None = None, *, home_given: bool = False
    ) -> None:
        self.home = home
        self.home_given = home_given  # by --home (before the command or after it) or AGOV_HOME
        self.as_json = as_json
        self._actor = actor
        self.opa_url = opa_url

    @property
    def actor(self) -> str:
        """Checked where it is used (recorded), so a command that records no actor, such as
        `admit`, never fails over it.

        Raises:
            UsageError: it holds a control or line-breaking character.
        """
        _check_actor(self._actor)
        return self._actor


def _default_actor() -> str:
    try:
        return os.environ.get("AGOV_ACTOR") or getpass.getuser()
    except Exception:
        return "unknown"


def _active_hash_or_none(engine: Any) -> str | None:
    try:
        return str(engine.active_policy().hash)
    except Exception:
        return None


_JOINERS = frozenset("\u200c\u200d")  # format characters that names written in some scripts need


def _one_line(text: object) -> str:
    """Free text (a reason, notes, a source) as one line: a line break or control character in
    it is shown escaped, so that it cannot draw a line of its own (a forged history entry)."""
    return "".join(
        ascii(c)[1:-1] if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") and c not in _JOINERS else c
        for c in str(text)
    )


def _check_actor(actor: str) -> None:
    """The actor is signed into proofs and shown in audit lines: one printable line, with no
    invisible format character (a bidi override can make it read as another name)."""
    if not actor.strip():  # `--actor ''` once fell back to AGOV_ACTOR or the user, silently
        raise UsageError("the actor is empty", hint="give --actor (or AGOV_ACTOR) the name of who is acting")
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") and c not in _JOINERS for c in actor):
        raise UsageError(
            f"the actor {actor!r} holds a control or line-breaking character",
            hint="give --actor (or AGOV_ACTOR) as one printable line",
        )


def _exit_for(exc: BaseException) -> int:
    for kind, code in EXIT_CODES:
        if isinstance(exc, kind):
            return code
    return EXIT_INFRA


def fail(exc: BaseException, as_json: bool) -> NoReturn:
    """Print an error a user can act on and exit with its documented code."""
    code = _exit_for(exc)
    if isinstance(exc, AgovError):
        message, hint = exc.message, exc.hint
    else:
        message, hint = (
            f"internal error: {type(exc).__name__}: {exc}",
            "please report this with the command you ran",
        )
    _report(type(exc).__name__, message, hint, code, as_json)


def _report(kind: str, message: str, hint: str, code: int, as_json: bool) -> NoReturn:
    if as_json:
        click.echo(
            json.dumps(
                {"error": {"type": kind, "message": message, "hint": hint}, "exit_code": code}, sort_keys=True
            )
        )
    else:
        click.echo(f"error: {message}" + (f"\n  hint: {hint}" if hint else ""), err=True)
    sys.exit(code)


def _interrupted(as_json: bool, by: KeyboardInterrupt | None = None) -> NoReturn:
    """Ctrl-C or SIGTERM is not a deny (exit 1 is one): exit as a process stopped by that
    signal would."""
    terminated = isinstance(by, interrupts.Terminated)
    _report(
        "Terminated" if terminated else "Interrupted",
        "terminated (SIGTERM)" if terminated else "interrupted",
        "what was committed stays committed; a reload or revalidation cut short is finished by"
        " `agov revalidate` (or the next reload, or `agov serve`)",
        128 + (signal.SIGTERM if terminated else signal.SIGINT),
        as_json,
    )


def emit(ctx: Ctx, payload: Any, text: str | Callable[[], str]) -> None:
    if ctx.as_json:
        click.echo(json.dumps(payload, sort_keys=True, default=str))
    else:
        click.echo(text() if callable(text) else text)


_COMMANDLINE = click.core.ParameterSource.COMMANDLINE
_DEFAULT = click.core.ParameterSource.DEFAULT


def common(func: F) -> F:
    """--home, --json, --actor and --opa-url on every command; errors mapped to exit codes here."""

    @click.option(
        "--home",
        type=click.Path(path_type=Path),
        envvar="AGOV_HOME",
        default=Path(".agov"),
        show_default=True,
        help="Workspace directory (env AGOV_HOME).",
    )
    @click.option("--json", "as_json", is_flag=True, envvar="AGOV_JSON", help="Machine-readable output.")
    @click.option(
        "--actor", envvar="AGOV_ACTOR", default=None, help="Who is acting (env AGOV_ACTOR; default: $USER)."
    )
    @click.option(
        "--opa-url",
        default=None,
        metavar="URL",
        help="Decide with the OPA sidecar at URL (the external runtime), whatever agov.yaml says: "
        "http(s)://host:port, or unix:///path/to/opa.sock for one listening on a Unix socket.",
    )
    @functools.wraps(func)
    def wrapper(home: Path, as_json: bool, actor: str | None, opa_url: str | None, **kwargs: Any) -> Any:
        context = click.get_current_context()
        as_json = as_json or bool(context.meta.get(_JSON_META))  # `agov --json X`
        typed = context.meta.get(_GROUP_META, {})  # `agov --home W X`, unless X has its own
        mine = {n for n in _GROUP_OPTION_NAMES if context.get_parameter_source(n) is _COMMANDLINE}
        home = home if "home" in mine else typed.get("home", home)
        actor = actor if "actor" in mine else typed.get("actor", actor)
        opa_url = opa_url if "opa_url" in mine else typed.get("opa_url", opa_url)
        ctx = Ctx(
            home=home,
            as_json=as_json,
            actor=_default_actor() if actor is None else actor,
            opa_url=opa_url,
            home_given="home" in typed or context.get_parameter_source("home") not in (None, _DEFAULT),
        )
        # SIGTERM unwinds as Ctrl-C does: a transaction rolls back, a build's copy of the tree
        # is removed, the managed OPA stopped (`serve` sets its own handlers)
        main_thread = threading.current_thread() is threading.main_thread()
        with interrupts.stop_signals_unwind() if main_thread else contextlib.nullcontext():
            return _run(func, ctx, as_json, kwargs)

    return wrapper  # type: ignore[return-value]


def _run(func: Callable[..., Any], ctx: Ctx, as_json: bool, kwargs: dict[str, Any]) -> Any:
    """Run one command; errors and interrupts end in a message and the documented exit code."""
    try:
        return func(ctx, **kwargs)
    except click.exceptions.Abort as exc:  # click.prompt turns Ctrl-C into Abort
        if interrupt := _interrupt_behind(exc):
            _interrupted(as_json, interrupt)
        fail(UsageError("aborted: no answer to a prompt (stdin closed?)"), as_json)
    except click.exceptions.Exit:
        raise
    except click.ClickException:
        raise
    except BrokenPipeError as exc:
        if _stdout_reader_gone():
            _stdout_closed()
        fail(exc, as_json)  # another pipe or socket broke: an error to report, not a quiet stop
    except KeyboardInterrupt as exc:
        _interrupted(as_json, exc)
    except (AgovError, Exception) as exc:
        fail(exc, as_json)


def _stdout_reader_gone() -> bool:
    """Standard output is a pipe whose reader has closed it (the kernel reports an error
    condition on the write end)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a file: a test runner's buffer
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & select.POLLERR for _, events in poller.poll(0))


def _stdout_closed() -> NoReturn:
    """The reader went away (``agov audit export | head``): stop quietly, as a process killed by
    SIGPIPE would, instead of reporting an internal error."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush must not fail again
    sys.exit(128 + 13)


def _engine(ctx: Ctx, *, for_audit: bool = False) -> Any:
    from agov.engine import Engine

    return Engine.open(ctx.home, opa_url=ctx.opa_url, for_audit=for_audit)


def _managed_only(ctx: Ctx, command: str) -> None:
    """A command that builds its own policy and sidecar cannot use another OPA: say so rather
    than ignore the option."""
    if ctx.opa_url is not None:
        raise UsageError(
            f"{command} runs its own managed OPA; --opa-url does not apply to it",
            hint="drop --opa-url; use it with the commands that ask the sidecar (promote, admit, revalidate)",
        )


def _cause(exc: BaseException) -> str:
    """What broke, for the reason of a decision that failed closed."""
    if isinstance(exc, AgovError):
        return exc.in_one_line()
    return f"internal error: {type(exc).__name__}: {exc}"


def _read_file(path: Path, limit: int) -> bytes:
    try:
        size = path.stat().st_size
        if size > limit:
            raise SpecError(f"{path} is {size} bytes, over the {limit}-byte limit")
        with path.open("rb") as stream:  # a pipe or a device has no size: never read past the limit
            raw = stream.read(limit + 1)
        if len(raw) > limit:
            raise SpecError(f"{path} holds more than the {limit}-byte limit")
        return raw
    except FileNotFoundError as exc:
        raise UsageError(f"file not found: {path}") from exc
    except IsADirectoryError as exc:
        raise UsageError(f"{path} is a directory, not a file") from exc
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from exc


_TRUE = frozenset({"1", "true", "t", "yes", "y", "on"})


_JSON_META = "agov.json"


def _json_requested(argv: list[str]) -> bool:
    return "--json" in argv or os.environ.get("AGOV_JSON", "").strip().lower() in _TRUE


class _Agov(click.Group):
    """click's own errors (a missing argument, an unknown option or command) answer in JSON too
    under ``--json``, with the same exit code 2: a script reads every answer the same way."""

    def main(  # type: ignore[override]
        self,
        args: list[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        argv = list(sys.argv[1:] if args is None else args)
        try:
            code = super().main(argv, prog_name, complete_var, False, **extra)
        except click.ClickException as exc:
            if not _json_requested(argv):
                exc.show()
                sys.exit(exc.exit_code)
            hint = "`agov --help` lists the commands; `agov <command> --help` shows one's usage"
            _report(type(exc).__name__, exc.format_message(), hint, exc.exit_code, as_json=True)
        except click.exceptions.Abort as exc:  # not 1, which is a deny
            if interrupt := _interrupt_behind(exc):
                _interrupted(_json_requested(argv), interrupt)
            fail(UsageError("aborted"), _json_requested(argv))
        sys.exit(code if isinstance(code, int) else 0)


_GROUP_META = "agov.group-options"
_GROUP_OPTION_NAMES = ("home", "actor", "opa_url")


def _options_here(as_json: bool, **given: Any) -> None:
    """Keep a group's options for the command that follows (`agov --home W admit X`): its
    context shares this one's meta. Only those typed on the command line count: the command's
    own option, typed there, wins, and reads the environment and its default itself."""
    ctx = click.get_current_context()
    if as_json:
        ctx.meta[_JSON_META] = True
    typed = ctx.meta.setdefault(_GROUP_META, {})
    for name, value in given.items():
        if ctx.get_parameter_source(name) is _COMMANDLINE:
            typed[name] = value


def _group_options(func: F) -> F:
    """--json, --home, --actor and --opa-url on every group too: `agov --json agent list`,
    `agov --home W agent list` and `agov agent --home W list` all work."""
    for option in reversed(
        [
            click.option(
                "--json",
                "as_json",
                is_flag=True,
                help="Machine-readable output from the command that follows.",
            ),
            click.option(
                "--home",
                type=click.Path(path_type=Path),
                default=None,
                help="Workspace directory (env AGOV_HOME).",
            ),
            click.option("--actor", default=None, help="Who is acting (env AGOV_ACTOR; default: $USER)."),
            click.option("--opa-url", default=None, metavar="URL", help="As the command's --opa-url."),
        ]
    ):
        func = option(func)
    return func


@click.group(
    cls=_Agov, context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "AGOV"}
)
@click.version_option(package_name="agov")
@_group_options
def main(as_json: bool, **given: Any) -> None:
    """agov: govern AI agents with OPA policies: promote, admit, revalidate."""
    _options_here(as_json, **given)


def _interrupt_behind(exc: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C (or SIGTERM) that click turned into ``exc``, if one did."""
    cause = exc.__cause__ or exc.__context__
    return cause if isinstance(cause, KeyboardInterrupt) else None


# -- init ---------------------------------------------------------------------------------------


@main.command()
@click.argument("directory", required=False, type=click.Path(path_type=Path))
@common
def init(ctx: Ctx, directory: Path | None) -> None:
    """Create a workspace (refuses to overwrite anything)."""
    from agov.engine import Engine

    _managed_only(ctx, "init")
    if (
        directory is not None and ctx.home_given and not _same_place(directory, ctx.home)
    ):  # the workspace made would not be the one the next command opens
        raise UsageError(
            f"init {directory} names another workspace than --home/AGOV_HOME ({ctx.home}), which the"
            " commands after it would use",
            hint="give the directory once (as DIR, or as --home/AGOV_HOME)",
        )
    home = directory or ctx.home
    with Engine.init(home, Config(), actor=ctx.actor) as engine:
        active = engine.active_policy()
        keys = engine.list_keys()
    emit(
        ctx,
        {"home": str(home), "policy_hash": active.hash, "keyid": keys[-1].keyid},
        f"initialised workspace {home}\n  policy {active.hash}\n  proof key {keys[-1].keyid}",
    )


def _same_place(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except (OSError, RuntimeError):  # a symlink loop, say: Engine.init names the problem
        return os.path.abspath(a) == os.path.abspath(b)


# -- agents -------------------------------------------------------------------------------------


@main.group()
@_group_options
def agent(as_json: bool, **given: Any) -> None:
    """Create and inspect agents."""
    _options_here(as_json, **given)


def _interactive_answers() -> dict[str, Any]:
    def listing(prompt: str, default: str = "") -> list[str]:
        raw = click.prompt(err=True, text=prompt, default=default, show_default=bool(default))
        return [part.strip() for part in str(raw).split(",") if part.strip()]

    click.echo("Let's describe the agent. Press Enter to accept a default.", err=True)
    answers: dict[str, Any] = {"name": click.prompt(err=True, text="Name")}
    answers["id"] = click.prompt(
        err=True, text="Id", default=answers["name"].strip().lower().replace(" ", "-")
    )
    answers["owner"] = click.prompt(err=True, text="Owner (email)", default="", show_default=False)
    answers["agent_type"] = click.prompt(
        err=True,
        text="Type",
        type=click.Choice(["autonomous", "supervised", "advisory", "mcp_server", "custom"]),
        default="supervised",
    )
    answers["role_class"] = click.prompt(
        err=True,
        text="Role class",
        type=click.Choice(["compliance", "analysis", "ideation"]),
        default="analysis",
    )
    answers["model"] = click.prompt(err=True, text="Model", default="general-purpose-llm")
    answers["temperature"] = click.prompt(err=True, text="Temperature", type=float, default=0.2)
    answers["inputs"] = listing("Inputs it reads (comma separated)")
    answers["classification"] = click.prompt(
        err=True,
        text="Their data classification",
        type=click.Choice(["public", "internal", "confidential", "restricted"]),
        default="internal",
    )
    answers["actions"] = listing("Actions it takes (comma separated)")
    answers["capabilities"] = listing("Capabilities (comma separated)", ",".join(answers["actions"]))
    answers["memory"] = click.prompt(
        err=True, text="Memory", type=click.Choice(["none", "session", "persistent"]), default="none"
    )
    answers["monthly_budget_usd"] = click.prompt(
        err=True, text="Monthly budget (USD)", type=float, default=100.0
    )
    return answers


@agent.command("create")
@click.option(
    "--from-file", "from_file", type=click.Path(path_type=Path), help="Import a spec (YAML or JSON)."
)
@click.option("--template", help="Start from a shipped template (see `agov agent templates`).")
@click.option("--clone", "clone_id", help="Copy an existing agent's current spec.")
@click.option(
    "--from-workflow",
    "workflow",
    type=click.Path(path_type=Path),
    help="Derive capabilities and actions from a workflow file.",
)
@click.option(
    "--from-event", "event", type=click.Path(path_type=Path), help="A registry webhook payload (JSON)."
)
@click.option("--interactive", is_flag=True, help="A guided question-and-answer wizard.")
@click.option("--name", help="Scratch: a minimal skeleton with this name (or the new name with other modes).")
@click.option("--id", "agent_id", help="The new agent's id (template, clone, scratch, workflow).")
@click.option("--notes", default="", help="Notes stored with the version.")
@common
def agent_create(
    ctx: Ctx,
    from_file: Path | None,
    template: str | None,
    clone_id: str | None,
    workflow: Path | None,
    event: Path | None,
    interactive: bool,
    name: str | None,
    agent_id: str | None,
    notes: str,
) -> None:
    """Create an agent in SANDBOX (exactly one mode)."""
    from agov import registry
    from agov.spec import parse_spec_bytes

    modes = [
        m
        for m, on in (
            ("--from-file", from_file),
            ("--template", template),
            ("--clone", clone_id),
            ("--from-workflow", workflow),
            ("--from-event", event),
            ("--interactive", interactive),
        )
        if on
    ]
    if len(modes) > 1:
        raise UsageError(f"choose one creation mode, not {' and '.join(modes)}")
    if not modes and not name:
        raise UsageError(
            "say how to create the agent",
            hint="--from-file F | --template T | --clone ID | --from-workflow F | --from-event F"
            " | --interactive | --name N",
        )
    with _engine(ctx) as engine:
        try:
            if agent_id is not None and not agent_id.strip():
                # not a default: each mode would fall back to its own id without a word
                raise UsageError("--id is empty", hint="give the new agent's id, or leave --id out")
            limit = engine.config.limits.max_spec_bytes
            source: str
            if from_file:
                mode, source = CreationMode.IMPORT, str(from_file)
                document = parse_spec_bytes(
                    _read_file(from_file, limit), source=str(from_file), max_bytes=limit
                )
            elif template:
                mode, source = CreationMode.TEMPLATE, template
                document = registry.from_template(template, agent_id=agent_id, display_name=name)
            elif clone_id:
                mode, source = CreationMode.CLONE, clone_id
                original = engine.get_agent(clone_id)
                document = json.loads(original.spec.canonical)
                document["metadata"]["id"] = agent_id or f"{clone_id}-clone"
                if name:
                    document["metadata"]["name"] = name
                source = f"{clone_id}@{original.version}"
            elif workflow:
                mode, source = CreationMode.WORKFLOW, str(workflow)
                document = registry.from_workflow(
                    parse_spec_bytes(_read_file(workflow, limit), source=str(workflow)), agent_id=agent_id
                )
            elif event:
                mode = CreationMode.EVENT
                document, source = registry.from_event(
                    parse_spec_bytes(_read_file(event, limit), source=str(event))
                )
            elif interactive:
                mode, source = CreationMode.CONVERSATION, "interactive"
                document = registry.from_answers(_interactive_answers())
            else:
                assert name is not None
                mode, source = CreationMode.SCRATCH, "scratch"
                document = registry.skeleton(name, agent_id=agent_id)
        except AgovError as exc:  # audited as create's own rejections are: one REQUEST_REJECTED
            engine.reject_request("create", exc, actor=ctx.actor)
            raise
        record = engine.create_agent(document, mode=mode, source=source, actor=ctx.actor, notes=notes)
    emit(
        ctx,
        record.summary(),
        f"created {record.id} (version {record.version}, {record.status.value}, mode {mode.value})\n"
        f"  spec hash {record.spec.hash}\n  sandbox expires {record.sandbox_expires_at}",
    )


@agent.command("templates")
@common
def agent_templates(ctx: Ctx) -> None:
    """List the shipped templates."""
    from agov.registry import list_templates

    names = list_templates()
    emit(ctx, names, "\n".join(names))


@agent.command("list")
@click.option("--status", help="Only agents with this status (any case).")
@click.option("--type", "agent_type", help="Only agents of this type (any case).")
@click.option("--limit", type=click.IntRange(1, 100_000), default=100, show_default=True)
@click.option("--offset", type=click.IntRange(0, 2**62), default=0)  # SQLite integers are 64-bit
@common
def agent_list(ctx: Ctx, status: str | None, agent_type: str | None, limit: int, offset: int) -> None:
    """List agents."""
    with _engine(ctx) as engine:
        records = engine.list_agents(
            status=status and status.upper(),
            agent_type=agent_type and agent_type.lower(),
            limit=limit + 1,  # one more tells the text whether the page is the last
            offset=offset,
        )
    rows = [r.summary() for r in records[:limit]]

    def text() -> str:
        if not rows:
            return "no agents" if offset == 0 else f"no agents from offset {offset}"
        lines = [_agent_row("ID", "STATUS", "VERSION", "TYPE", "ROLE CLASS")]
        lines += [
            _agent_row(r["id"], r["status"], f"v{r['version']}", r["type"], r["role_class"]) for r in rows
        ]
        if len(records) > limit:
            lines.append(f"(more agents follow: --offset {offset + limit})")
        return "\n".join(lines)

    emit(ctx, rows, text)


def _agent_row(agent_id: str, status: str, version: str, agent_type: str, role_class: object) -> str:
    return f"{agent_id:<32} {status:<21} {version:<7} {agent_type:<11} {role_class}"


@agent.command("show")
@click.argument("agent_id")
@common
def agent_show(ctx: Ctx, agent_id: str) -> None:
    """Show an agent and its current spec."""
    from agov.registry import dump_yaml

    with _engine(ctx) as engine:
        record = engine.get_agent(agent_id)
        proof = engine.current_proof(agent_id)
        active = _active_hash_or_none(engine)
    payload = {**record.summary(), "proof": proof, "spec": record.spec.document}
    emit(
        ctx,
        payload,
        lambda: "\n".join(
            [_summary_line(k, v) for k, v in record.summary().items()]
            + [_proof_line(proof, active), "spec:", dump_yaml(record.spec.document)]
        ),
    )


def _proof_line(proof: dict[str, Any] | None, active: str | None) -> str:
    """The current proof as recorded (admission verifies it at each start)."""
    if proof is None:
        return "proof: none"
    shown = {k: _one_line(v) for k, v in proof.items()}  # as stored: one line each, whatever is there
    bound = "the active policy" if proof["policy_hash"] == active else "not the active policy"
    expires = f", expires {shown['expires_at']}" if proof["expires_at"] else ""
    return (
        f"proof: v{shown['version']} {shown['governance_status']} under policy {shown['policy_hash'][:12]}"
        f" ({bound}), issued {shown['issued_at']}{expires}, key {shown['keyid'][:12]}"
    )


def _summary_line(key: str, value: Any) -> str:
    if key == "reasons" and isinstance(value, list) and value:  # one finding per line
        return "\n".join(
            ["reasons:"]
            + [f"  {r.get('code')}: {r.get('message')}" if isinstance(r, dict) else f"  {r}" for r in value]
        )
    return f"{key}: {'-' if value is None else value}"


@agent.command("update")
@click.argument("agent_id")
@click.option("--from-file", "from_file", type=click.Path(path_type=Path), required=True)
@click.option("--notes", default="", help="What changed and why.")
@common
def agent_update(ctx: Ctx, agent_id: str, from_file: Path, notes: str) -> None:
    """Store a new version (a governed agent returns to SANDBOX until promoted again)."""
    from agov.spec import parse_spec_bytes

    with _engine(ctx) as engine:
        limit = engine.config.limits.max_spec_bytes
        try:
            document = parse_spec_bytes(_read_file(from_file, limit), source=str(from_file), max_bytes=limit)
        except AgovError as exc:
            engine.reject_request("update", exc, actor=ctx.actor, agent_id=agent_id)
            raise
        record = engine.update_agent(agent_id, document, actor=ctx.actor, notes=notes)
    emit(ctx, record.summary(), f"updated {record.id} to version {record.version} ({record.status.value})")


@agent.command("history")
@click.argument("agent_id")
@common
def agent_history(ctx: Ctx, agent_id: str) -> None:
    """Versions, proofs and audit events of an agent."""
    with _engine(ctx) as engine:
        data = engine.history(agent_id)

    def text() -> str:
        lines = [f"versions of {agent_id}:"]
        lines += [
            f"  v{v['version']} {v['created_at']} {v['creation_mode']} ({_one_line(v['source'])})"
            f" by {_one_line(v['created_by'])}{' - ' + _one_line(v['notes']) if v['notes'] else ''}"
            for v in data["versions"]
        ]
        lines.append("proofs:")
        lines += [
            f"  v{p['version']} policy {p['policy_hash'][:12]} {p['governance_status']} issued {p['issued_at']}"
            f"{' (superseded)' if p['superseded_at'] else ''}"
            for p in data["proofs"]
        ] or ["  none"]
        lines.append("events:")
        lines += [f"  #{e['seq']} {e['time']} {e['type']}" for e in data["events"]]
        return "\n".join(lines)

    emit(ctx, data, text)


# -- decisions ----------------------------------------------------------------------------------


@main.command()
@click.argument("agent_id")
@click.option(
    "--role", required=True, envvar="AGOV_ROLE", help="The actor's role (e.g. agent_admin; env AGOV_ROLE)."
)
@common
def promote(ctx: Ctx, agent_id: str, role: str) -> None:
    """Ask the promotion policy; on allow, sign a proof and govern the agent."""
    from agov.decisions import Reason
    from agov.promotion import PROMOTION_DENY_ENGINE_UNAVAILABLE, PromotionResult

    def denied(exc: BaseException) -> PromotionResult:  # a decision that cannot be made is a deny
        reason = Reason(PROMOTION_DENY_ENGINE_UNAVAILABLE, _cause(exc))
        return PromotionResult(agent_id, False, "unknown", (reason,), (), None, None)

    # only opening the workspace and the decision itself: an error in close() after a
    # committed promotion must not be reported as a deny
    try:
        engine = _engine(ctx)
    except UsageError as exc:
        if not isinstance(exc, ConfigError):  # a damaged agov.yaml is a deny, not bad usage
            raise
        result = denied(exc)
    except Exception as exc:
        result = denied(exc)
    else:
        with engine:
            try:
                result = engine.promote(agent_id, actor=ctx.actor, role=role)
            except UsageError:
                raise
            except Exception as exc:
                result = denied(exc)

    def text() -> str:
        if result.allow:
            lines = [
                f"promoted {agent_id}: {result.status} (policy {result.policy_hash[:12] if result.policy_hash else '-'})"
            ]
        else:
            lines = [f"promotion of {agent_id} denied:"]
        lines += [f"  deny {r.code}: {r.message}" for r in result.deny]
        lines += [f"  warn {r.code}: {r.message}" for r in result.warn]
        return "\n".join(lines)

    emit(ctx, result.as_dict(), text)
    sys.exit(EXIT_OK if result.allow else EXIT_DENIED)


@main.command()
@click.argument("agent_id")
@common
def admit(ctx: Ctx, agent_id: str) -> None:
    """Fail-closed admission: may this agent start now?"""
    from agov.admission import deny_unavailable

    try:
        engine = _engine(ctx)
    except UsageError as exc:
        if not isinstance(exc, ConfigError):  # a damaged agov.yaml is a deny, not bad usage
            raise
        decision = deny_unavailable(agent_id, exc, None)
    except Exception as exc:  # the store or the workspace cannot be read: a fail-closed deny
        decision = deny_unavailable(agent_id, AgovError(_cause(exc)), None)
    else:
        with engine:  # admit itself turns every failure but an unknown agent into a deny
            decision = engine.admit(agent_id)

    def text() -> str:
        head = f"{decision.decision} {agent_id}: {decision.code}"
        if decision.allow:
            head += f" (as {decision.status})"
        return "\n".join([head] + [f"  {r.code}: {r.message}" for r in decision.reasons])

    emit(ctx, decision.as_dict(), text)
    sys.exit(EXIT_OK if decision.allow else EXIT_DENIED)


def _progress_runner(ctx: Ctx, total: int) -> tuple[Any, Callable[[int], None] | None]:
    if ctx.as_json or not sys.stderr.isatty() or total < 1000:
        return None, None
    bar = click.progressbar(length=total, label="revalidating", file=sys.stderr)
    bar.__enter__()
    return bar, bar.update


def _revalidation_text(report: dict[str, Any]) -> str:
    lines = [
        f"{'dry run: ' if report['dry_run'] else ''}revalidated {report['total']} governed"
        f" agent{'' if report['total'] == 1 else 's'} under "
        f"{report['policy_hash'][:12]}: valid {report['valid']}, restricted {report['restricted']}, "
        f"invalidated {report['invalidated']} ({report['newly_invalidated']} new), restored {report['restored']}"
    ]
    for change in report.get("changes", []):
        lines.append(f"  {change['agent_id']}: {change['from']} -> {change['to']}")
        lines += [f"    {r['code']}: {r['message']}" for r in change["deny"] + change["warn"]]
    if report.get("changes_omitted"):
        lines.append(
            f"  ... and {report['changes_omitted']} more changes"
            " (`agov agent list --status STATUS --limit N` lists the agents by status)"
        )
    if report.get("resumed") and not report["dry_run"]:
        lines.append("  (changes made before the interruption are not listed: `agov audit export` has them)")
    return "\n".join(lines)


@main.command()
@click.option("--dry-run", is_flag=True, help="Show who would change; change nothing.")
@common
def revalidate(ctx: Ctx, dry_run: bool) -> None:
    """Re-evaluate every governed agent under the active policy (resumes an interrupted run).

    With --dry-run, judge the workspace's policy files as they are now (even if not yet
    reloaded) and show who would be invalidated, restricted or restored; nothing changes.
    """
    with _engine(ctx) as engine:
        if dry_run:
            # Who would fall under the policy tree as it is now, before it is activated.
            report = engine.reload_policy(actor=ctx.actor, reason="revalidate --dry-run", dry_run=True)[
                "revalidation"
            ]
        else:
            bar, progress = _progress_runner(ctx, engine.count_governed())
            try:
                report = engine.revalidate(progress=progress).as_dict()
            finally:
                if bar is not None:
                    bar.__exit__(None, None, None)
    emit(
        ctx,
        report,
        lambda: (
            ("resumed an interrupted run\n" if report.get("resumed") else "") + _revalidation_text(report)
        ),
    )


# -- policy -------------------------------------------------------------------------------------


@main.group("policy")
@_group_options
def policy_group(as_json: bool, **given: Any) -> None:
    """Build, reload, inspect and roll back policy versions."""
    _options_here(as_json, **given)


@policy_group.command("build")
@click.option("--reason", default="policy build", show_default=True)
@common
def policy_build(ctx: Ctx, reason: str) -> None:
    """Check, test, build and sign the workspace's policies; record the version."""
    with _engine(ctx) as engine:
        version = engine.build_policy(actor=ctx.actor, reason=reason)
        bundle = engine.workspace.bundles / version.bundle_path
    emit(
        ctx,
        {**version.as_dict(), "bundle_path": str(bundle.resolve())},
        f"policy {version.hash}\n  bundle {bundle}" + (" (active)" if version.active else ""),
    )


@policy_group.command("reload")
@click.option("--reason", default="policy reload", show_default=True)
@click.option("--dry-run", is_flag=True, help="Show who would be invalidated; activate nothing.")
@common
def policy_reload(ctx: Ctx, reason: str, dry_run: bool) -> None:
    """Rebuild; if the hash changed, activate it and revalidate every agent (also, under the same
    hash, when the org limits in agov.yaml changed since the last revalidation)."""
    with _engine(ctx) as engine:
        result = engine.reload_policy(actor=ctx.actor, reason=reason, dry_run=dry_run)

    def text() -> str:
        if not result["changed"] and result["org_changed"]:
            judged = "would judge" if dry_run else "judged"
            return (
                f"policy unchanged ({result['policy_hash'][:12]}), but the org limits in agov.yaml changed:"
                f" {judged} every governed agent again\n" + _revalidation_text(result["revalidation"])
            )
        if not result["changed"] and result["revalidation"] is not None and not dry_run:
            return (
                f"policy unchanged ({result['policy_hash'][:12]}); finished an interrupted run\n"
                + _revalidation_text(result["revalidation"])
            )
        if not result["changed"]:
            return f"policy unchanged ({result['policy_hash'][:12]})"
        head = f"{'would activate' if dry_run else 'activated'} policy {result['policy_hash'][:12]}"
        if result["org_changed"]:
            head += "; the org limits in agov.yaml changed as well since the last revalidation"
        return head + "\n" + _revalidation_text(result["revalidation"])

    emit(ctx, result, text)


@policy_group.command("history")
@common
def policy_history(ctx: Ctx) -> None:
    """Every recorded policy version, and when each was activated and by whom."""
    with _engine(ctx) as engine:
        versions = [v.as_dict() for v in engine.policy_history()]
        activations = [a.as_dict() for a in engine.policy_activations()]
    for version in versions:
        version["activations"] = [a for a in activations if a["policy_hash"] == version["hash"]]

    def activated(a: dict[str, Any]) -> str:
        how = ["rollback"] if a["event"] == "POLICY_ROLLBACK" else []
        how += [f"replacing {_one_line(a['previous_hash'][:16])}"] if a["previous_hash"] else []
        return (
            f"    activated {_one_line(a['time'])} by {_one_line(a['actor'] or '?')}"
            f"{' (' + ', '.join(how) + ')' if how else ''}: {_one_line(a['reason'] or '')}"
        )

    def text() -> str:
        lines = []
        for v in versions:
            lines.append(
                f"{'*' if v['active'] else ' '} {v['hash'][:16]} built {_one_line(v['created_at'])} by"
                f" {_one_line(v['actor'])}: {_one_line(v['reason'])}"
            )
            lines += [activated(a) for a in v["activations"]]
        return "\n".join(lines)

    emit(ctx, versions, text)


@policy_group.command("diff")
@click.argument("a")
@click.argument("b")
@common
def policy_diff(ctx: Ctx, a: str, b: str) -> None:
    """Unified diff of the policy files of two versions."""
    with _engine(ctx) as engine:
        diff = engine.policy_diff(a, b)
    emit(ctx, {"a": a, "b": b, "diff": diff}, diff or "no differences")


@policy_group.command("rollback")
@click.argument("policy_hash")
@click.option("--reason", default="rollback", show_default=True)
@common
def policy_rollback(ctx: Ctx, policy_hash: str, reason: str) -> None:
    """Re-activate an earlier signed bundle and revalidate."""
    with _engine(ctx) as engine:
        result = engine.rollback_policy(policy_hash, actor=ctx.actor, reason=reason)

    def text() -> str:
        head = f"rolled back to {result['policy_hash'][:12]}"
        if result["org_changed"]:
            head += "; the org limits in agov.yaml changed as well since the last revalidation"
        lines = [head, _revalidation_text(result["revalidation"])]
        if result["workspace_policy_hash"] not in (None, result["policy_hash"]):
            lines.append(
                f"note: the files under policies/ still hash to {result['workspace_policy_hash'][:12]}; the next"
                " `agov policy reload` (or a change seen by `serve --watch`) builds them and, if they pass,"
                " activates them again: edit them back to keep this rollback"
            )
        return "\n".join(lines)

    emit(ctx, result, text)


# -- keys ---------------------------------------------------------------------------------------


@main.group("keys")
@_group_options
def keys_group(as_json: bool, **given: Any) -> None:
    """Proof signing keys."""
    _options_here(as_json, **given)


def _when(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise UsageError(f"not an ISO 8601 time: {value!r}") from exc
    if parsed.tzinfo is None:
        raise UsageError(f"give a time zone in {value!r} (e.g. 2026-01-01T00:00:00+00:00)")
    try:
        parsed.astimezone(UTC)  # as it is stored
    except OverflowError as exc:
        raise UsageError(f"{value!r} has no UTC time (past year 9999)") from exc
    return parsed


@keys_group.command("generate")
@click.option("--alg", type=click.Choice(["ed25519", "hmac-sha256"]), default="ed25519", show_default=True)
@click.option(
    "--not-before",
    help="Start of the validity window (ISO 8601 with zone). A later time stages the key: the key"
    " signing now keeps signing until then.",
)
@click.option("--not-after", help="End of the validity window (ISO 8601 with zone).")
@common
def keys_generate(ctx: Ctx, alg: str, not_before: str | None, not_after: str | None) -> None:
    """Generate a proof key and make it the signer, now or from --not-before on."""
    with _engine(ctx) as engine:
        state = engine.generate_key(
            alg=alg, actor=ctx.actor, not_before=_when(not_before), not_after=_when(not_after)
        )
        staged = [k for k in engine.list_keys() if k.state == "staged" and k.keyid != state.keyid]
    when = f"staged: it signs from {state.not_before} on" if state.state == "staged" else state.state
    if state.state == "signing":
        when += "".join(f"; the staged key {k.keyid} takes over at {k.not_before}" for k in staged)
    emit(ctx, state.as_dict(), f"generated {alg} key {state.keyid} ({when})")


@keys_group.command("list")
@common
def keys_list(ctx: Ctx) -> None:
    """List proof keys with their state."""
    with _engine(ctx) as engine:
        states = [k.as_dict() for k in engine.list_keys()]
    emit(
        ctx,
        states,
        lambda: "\n".join(
            f"{k['keyid'][:16]} {k['alg']:<11} {k['state']:<9}"
            f"{' from ' + k['not_before'] if k['state'] == 'staged' else ''}"
            f"{' at ' + k['revoked_at'] if k['revoked_at'] else ''}".rstrip()
            + (f"\n  problem: {k['problem']}" if k["problem"] else "")
            for k in states
        ),
    )


@keys_group.command("revoke")
@click.argument("keyid")
@click.option("--reason", required=True, help="Why (kept in the audit log).")
@common
def keys_revoke(ctx: Ctx, keyid: str, reason: str) -> None:
    """Revoke a key: proofs it signed stop admitting at once; run `agov revalidate` to re-sign."""
    if not reason.strip():
        raise UsageError("--reason is empty", hint="say why the key is revoked: it is kept in the audit log")
    prefix = keyid.lower()  # key ids are lowercase hex; a prefix copied in capitals is the same key
    with _engine(ctx) as engine:
        keys = engine.list_keys()
        matches = [k for k in keys if k.keyid.startswith(prefix)] if len(prefix) >= 8 else []
        if len(matches) != 1:
            raise NotFoundError(
                f"{'no' if not matches else 'more than one'} key matches {keyid!r}",
                hint="`agov keys list` shows the keys (give at least 8 characters)",
            )
        was = matches[0].state
        state = engine.revoke_key(matches[0].keyid, reason=reason, actor=ctx.actor)
        try:  # the key is revoked whatever happens here: only the hint may be lost
            signer = next((k.keyid for k in engine.list_keys() if k.state == "signing"), None)
        except Exception:
            signer = ""
    if signer == "":
        hint = "`agov keys list` shows which key signs now; `agov revalidate` re-signs valid agents"
    elif signer is None:
        hint = "no key signs now: `agov keys generate`, then `agov revalidate` to re-sign valid agents"
    elif was == "staged":  # it signed nothing yet
        hint = f"the rotation to it is cancelled; {signer[:16]} keeps signing"
    else:
        hint = f"`agov revalidate` re-signs, with {signer[:16]}, the valid agents whose proofs it signed"
    emit(ctx, state.as_dict(), f"revoked {state.keyid} at {state.revoked_at}\n  hint: {hint}")


# -- audit --------------------------------------------------------------------------------------


@main.group("audit")
@_group_options
def audit_group(as_json: bool, **given: Any) -> None:
    """The hash-chained audit log."""
    _options_here(as_json, **given)


@audit_group.command("verify")
@common
def audit_verify(ctx: Ctx) -> None:
    """Check the chain; report the first bad sequence number."""
    with _engine(ctx, for_audit=True) as engine:
        report = engine.verify_audit()
    emit(
        ctx,
        report.as_dict(),
        f"audit log ok ({report.events} events)"
        if report.ok
        else f"audit log TAMPERED at sequence {report.first_bad_seq}: {report.problem}"
        if report.first_bad_seq is not None
        else f"audit log NOT VERIFIED ({report.events} events): {report.problem}",
    )
    sys.exit(EXIT_OK if report.ok else EXIT_DENIED)


@audit_group.command("export")
@common
def audit_export(ctx: Ctx) -> None:
    """Write every event as JSON lines."""
    with _engine(ctx, for_audit=True) as engine:
        for line in engine.export_audit():
            click.echo(line)


# -- demo and serve -----------------------------------------------------------------------------


@main.command()
@click.option("--keep", is_flag=True, help="Keep the temporary workspace and print its path.")
@common
def demo(ctx: Ctx, keep: bool) -> None:
    """The whole loop in a temporary workspace, told as a story."""
    from agov.demo import run_demo

    _managed_only(ctx, "demo")
    story: list[str] = []
    seen = run_demo(keep=keep, echo=story.append if ctx.as_json else click.echo)
    if ctx.as_json:  # the story's lines, and what each chapter's admission and audit check gave
        emit(ctx, {"story": [line for line in story if line], "seen": seen}, "")


class _StopRequest:
    """serve's stop, requested from a signal handler: a plain attribute, because
    ``threading.Event.set()`` takes a lock the interrupted main thread may hold (a deadlock)."""

    def __init__(self) -> None:
        self.requested = False


class _ServeStopping(Exception):
    """serve was asked to stop during a reload (raised before its switch, or between chunks)."""

    def __init__(self, switched: bool) -> None:
        super().__init__("serve is stopping")
        self.switched = switched


# How long serve, asked to stop, waits for a reload in progress: its revalidation stops at the
# next chunk, but building and testing a bundle, and loading it into OPA, run to their end. Well
# inside Kubernetes' default 30 s grace period.
_STOP_WAIT_S = 10.0
_FINISH_RUN = "the next `agov serve` or `agov revalidate` finishes its revalidation run"
_FINISH_RELOAD = "`agov policy reload` applies the change and finishes revalidating the agents"


@main.command()
@click.option(
    "--watch", is_flag=True, help="Reload the policy when a file under policies/, or agov.yaml, changes."
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=9464,
    show_default=True,
    help="Port of the Prometheus /metrics endpoint (0 picks a free one).",
)
@click.option("--metrics-addr", default="127.0.0.1", show_default=True)
@common
def serve(ctx: Ctx, watch: bool, metrics_port: int, metrics_addr: str) -> None:
    """Run the managed OPA, the metrics endpoint and (with --watch) the policy watcher."""
    stop = _StopRequest()

    def on_stop_signal(signum: int, _frame: object) -> None:
        if signum == signal.SIGINT and stop.requested:
            raise KeyboardInterrupt  # a second Ctrl-C: stop at once
        stop.requested = True

    # SIGTERM and Ctrl-C are serve's normal stop, at a safe point: between two chunks of a
    # revalidation, or before a reload switches anything (set first: SIGTERM during the import
    # below is a stop too). One ignored from the start stays ignored: a shell script's
    # background job ignores Ctrl-C, which is meant for the script's foreground.
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        if signal.getsignal(stop_signal) != signal.SIG_IGN:
            signal.signal(stop_signal, on_stop_signal)
    from prometheus_client import start_http_server

    closing_under_reload = threading.Event()  # serve closes the engine while a reload still runs

    def stop_before_switch() -> None:
        if stop.requested:
            raise _ServeStopping(switched=False)

    def stop_between_chunks(_judged: int) -> None:
        if stop.requested:
            raise _ServeStopping(switched=True)

    with _engine(ctx) as engine:
        try:  # first: a port in use is said at once, not after a catch-up that may take a while
            server, _thread = start_http_server(
                metrics_port, addr=metrics_addr, registry=engine.metrics.registry
            )
        except OSError as exc:
            raise UsageError(
                f"cannot serve metrics on {metrics_addr}:{metrics_port}: {exc.strerror or exc}",
                hint="choose another --metrics-port or --metrics-addr, or stop what listens there",
            ) from exc
        try:
            if not stop.requested:
                engine.evaluator()
            # with --watch and a changed tree, the start reload's run judges every agent (and the
            # switch closes an unfinished run): no catch-up before it
            reload_first = watch and _tree_to_apply(engine, say=False) is not None
            if not stop.requested and not reload_first:  # a stop while OPA started: no run begins
                _catch_up_at_start(ctx, engine, stop_between_chunks)
            if not stop.requested:
                _serve_until_stopped(
                    ctx,
                    engine,
                    stop,
                    closing_under_reload,
                    watch,
                    f"{metrics_addr}:{server.server_port}",
                    stop_before_switch,
                    stop_between_chunks,
                    caught_up=not reload_first,
                )
        finally:
            server.shutdown()
    click.echo("serve stopped", err=True)


_TREE_UNREADABLE = "(the tree does not read as a policy)"


def _tree_to_apply(engine: Any, *, say: bool) -> str | None:
    """The policy tree's hash when serve --watch should activate it at start: it differs from
    the active policy (an edit saved while serve was down, or one it was stopped under), and is
    not the version the latest rollback replaced (a restart must not undo a rollback)."""
    tree = engine.tree_hash_or_none() or _TREE_UNREADABLE  # unreadable: the reload says why
    active = _active_hash_or_none(engine)
    if tree == active:
        return None
    if tree == engine.rolled_back_from():
        if say:
            click.echo(
                f"policies/ holds policy {tree[:12]}, which the latest `agov policy rollback` replaced:"
                f" serving {str(active)[:12]} still; save a change, or run `agov policy reload`, to"
                " activate the files",
                err=True,
            )
        return None
    return tree


def _catch_up_at_start(ctx: Ctx, engine: Any, stop_between_chunks: Callable[[int], None]) -> None:
    """Finish an interrupted run, or judge every agent again under changed org limits; serve
    goes on whatever comes of it (an agent not yet re-judged under a new policy is denied)."""
    try:
        caught_up = engine.catch_up(actor=ctx.actor, reason="serve: start", progress=stop_between_chunks)
    except _ServeStopping:
        click.echo(f"bringing the agents up to date interrupted: serve is stopping; {_FINISH_RUN}", err=True)
    except AgovError as exc:
        click.echo(f"could not bring the agents up to date: {exc.diagnostics()}", err=True)
    else:
        if caught_up["revalidation"] is not None:
            why = (
                "org limits in agov.yaml changed"
                if caught_up["org_changed"]
                else "finished an interrupted run"
            )
            click.echo(f"{why}: " + _revalidation_text(caught_up["revalidation"]), err=True)


def _serve_until_stopped(
    ctx: Ctx,
    engine: Any,
    stop: _StopRequest,
    closing_under_reload: threading.Event,
    watch: bool,
    metrics_at: str,
    stop_before_switch: Callable[[], None],
    stop_between_chunks: Callable[[int], None],
    *,
    caught_up: bool,
) -> None:
    """Watch (with ``--watch``) and reload on change until a stop is requested; then stop the
    watch, waiting up to ``_STOP_WAIT_S`` for a reload in progress."""
    from agov.watch import PolicyWatcher
    from agov.workspace import CONFIG_FILE

    lock = threading.Lock()
    said_limits_pending = threading.Event()  # said once per change, not at every save after it

    def reload(reason: str = "watch: policy files or agov.yaml changed") -> None:
        with lock:
            if stop.requested:
                return
            try:
                result = engine.reload_policy(
                    actor=ctx.actor,
                    reason=reason,
                    progress=stop_between_chunks,
                    before_switch=stop_before_switch,
                )
            except _ServeStopping as stopping:
                done = (
                    _FINISH_RUN
                    if stopping.switched
                    else "the new policy was not activated; " + _FINISH_RELOAD
                )
                click.echo(f"reload interrupted: serve is stopping; {done}", err=True)
                return
            except Exception as exc:
                if closing_under_reload.is_set():  # serve stopped the sidecar under it: not OPA's fault
                    click.echo(f"reload interrupted: serve stopped during it; {_FINISH_RELOAD}", err=True)
                elif isinstance(exc, AgovError):
                    # a switch that stood, with its run stopped, is no refusal: the message says so
                    # (even if another process has since moved the active policy on, or back)
                    switched = exc.policy_switched
                    click.echo(
                        f"reload {'stopped' if switched else 'refused'}: {exc.diagnostics()}"
                        # nothing else wakes the watch: a new key, say, is not a file it watches
                        + ("" if switched else "\n  the next save, or `agov policy reload`, tries again"),
                        err=True,
                    )
                else:  # the watch goes on: the next save tries again
                    click.echo(f"reload failed: internal error: {type(exc).__name__}: {exc}", err=True)
                return
            if result["changed"]:
                click.echo(f"activated policy {result['policy_hash'][:12]}", err=True)
            if result["revalidation"] is not None:  # a new policy, changed org limits, or a resumed run
                click.echo(_revalidation_text(result["revalidation"]), err=True)
            limits_pending = engine.limits_changed_on_disk()
            if limits_pending and not said_limits_pending.is_set():
                click.echo(
                    "agov.yaml's limits changed: they take effect when serve restarts"
                    " (org limits take effect at once)",
                    err=True,
                )
            (said_limits_pending.set if limits_pending else said_limits_pending.clear)()

    watcher = (
        PolicyWatcher(engine.workspace.policies, reload, config_file=engine.workspace.home / CONFIG_FILE)
        if watch
        else None
    )
    if watcher is not None:
        watcher.start()
        # the tree as it is now (read once the watcher runs, so no edit falls between): an edit
        # saved while serve was down, or one it was stopped under, is applied too
        before = _active_hash_or_none(engine)
        if _tree_to_apply(engine, say=True) is not None:
            reload("serve --watch: start")
            # switched: its run judges every agent; refused (or the tree put back meanwhile):
            # the active policy's agents still want the catch-up skipped before
            caught_up = caught_up or _active_hash_or_none(engine) != before
        if not caught_up and not stop.requested:
            _catch_up_at_start(ctx, engine, stop_between_chunks)
    serving = _active_hash_or_none(engine) or "(none)"
    if not stop.requested:  # said once the watcher runs: an edit made after this line is seen
        click.echo(
            f"serving: policy {serving[:12]}, metrics on http://{metrics_at}/metrics"
            + (", watching policies/ and agov.yaml" if watcher is not None else ""),
            err=True,
        )
    try:
        while not stop.requested:
            time.sleep(0.2)
    finally:
        stop.requested = True
        if watcher is not None:
            try:
                idle = watcher.stop(wait_s=_STOP_WAIT_S)
            except BaseException:  # a second Ctrl-C: the engine closes under the reload now
                closing_under_reload.set()
                raise
            if not idle:
                closing_under_reload.set()
                click.echo(
                    f"stopping with a reload still in progress after {_STOP_WAIT_S:.0f} s; {_FINISH_RELOAD}",
                    err=True,
                )


if __name__ == "__main__":  # pragma: no cover
    main()
