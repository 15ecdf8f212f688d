"""Policy versions: build, activate, history, diff and rollback (service layer).

The store's active ``policy_versions`` row is the hash every decision must be produced by; the
sidecar is switched to a bundle before the row is, and each decision checks the revision OPA
reports against it, so no decision is ever recorded under a hash that did not produce it.
"""

from __future__ import annotations

import difflib
import io
import json
import re
import tarfile
import zlib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from agov import keys
from agov.admission import ADMISSION_PATH
from agov.bundle import BuiltBundle, Trial, check_and_build, compute_policy_hash
from agov.decisions import Code
from agov.errors import ConflictError, NotFoundError, PolicyError
from agov.promotion import PROMOTION_PATH
from agov.revalidation import REVALIDATION_PATH, RunOrg, audit_org_change, org_digest
from agov.store import Store
from agov.store.sqlite import iso, utcnow


@dataclass(frozen=True)
class PolicyVersion:
    seq: int
    hash: str
    bundle_path: str
    actor: str
    reason: str
    created_at: str
    active: bool

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _version(row: Any) -> PolicyVersion:
    return PolicyVersion(
        row["seq"],
        row["hash"],
        row["bundle_path"],
        row["actor"],
        row["reason"],
        row["created_at"],
        bool(row["active"]),
    )


def active_version(store: Store) -> PolicyVersion | None:
    row = store.query_one("SELECT * FROM policy_versions WHERE active = 1")
    return _version(row) if row else None


def require_active(store: Store) -> PolicyVersion:
    """Raises: PolicyError: no policy has been built and activated yet."""
    version = active_version(store)
    if version is None:
        raise PolicyError("no active policy", hint="run `agov policy build`")
    return version


def find_version(store: Store, prefix: str) -> PolicyVersion:
    """A version by its hash or a unique prefix of it (at least 8 characters).

    Raises:
        NotFoundError: no version, or the prefix is ambiguous.
    """
    if len(prefix) < 8:
        raise NotFoundError(f"policy hash prefix {prefix!r} is too short", hint="give at least 8 characters")
    if not _HASH_PREFIX.fullmatch(prefix):  # and never a LIKE pattern: `________` matched any hash
        raise NotFoundError(
            f"policy hash prefix {prefix!r} is not hexadecimal",
            hint="`agov policy history` lists the versions",
        )
    rows = store.query(
        "SELECT * FROM policy_versions WHERE substr(hash, 1, ?) = ? ORDER BY seq",
        (len(prefix), prefix.lower()),
    )
    if len(rows) != 1:
        raise NotFoundError(
            f"{'no' if not rows else 'more than one'} policy version matches {prefix!r}",
            hint="`agov policy history` lists the versions",
        )
    return _version(rows[0])


def history(store: Store) -> list[PolicyVersion]:
    return [_version(r) for r in store.query("SELECT * FROM policy_versions ORDER BY seq")]


@dataclass(frozen=True)
class Activation:
    """One switch of the active version, as the audit event written with it records it
    (``audit_seq`` is that event's sequence number: the order of all switches).

    ``event`` is ``POLICY_HOTRELOAD`` (init, a build or reload that activated) or
    ``POLICY_ROLLBACK``; ``previous_hash`` is the version it replaced (None for the first).
    """

    audit_seq: int
    time: str
    event: str
    policy_hash: str
    actor: str | None
    reason: str | None
    previous_hash: str | None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# the audit events written with a switch of the active version, in its transaction
ACTIVATION_EVENTS = (Code.POLICY_HOTRELOAD.value, Code.POLICY_ROLLBACK.value)


def activations(store: Store) -> list[Activation]:
    """Every activation, oldest first: what was active when, and who switched it.

    Raises:
        StoreError: an activation event is not as agov writes it (named by its sequence number).
    """

    def text(value: Any) -> str | None:
        return value if isinstance(value, str) else None

    return [
        Activation(
            audit_seq=event.seq,
            time=event.time,
            event=event.type,
            policy_hash=event.policy_hash,
            actor=event.actor,
            reason=text(event.payload.get("reason")),
            previous_hash=text(event.payload.get("previous_hash")),
        )
        for event in store.audit_events(types=ACTIVATION_EVENTS)
        if event.policy_hash is not None  # agov writes one with each; an event without names none
    ]


def build(
    opa: Path, policies: Path, bundles: Path, keys_dir: Path, *, trial: Trial | None = None
) -> BuiltBundle:
    """Check (``opa check --strict`` and ``opa test``, and ``trial`` when given), then build and
    sign the bundle.

    Raises:
        PolicyError: the policy does not compile, a test fails, the trial failed, or the build
            failed.
    """
    bundle_key = keys.ensure_bundle_signing_key(keys_dir)
    return check_and_build(
        opa, policies, bundles, signing_key=bundle_key.private_pem_path, entrypoints=ENTRYPOINTS, trial=trial
    )


_HASH_PREFIX = re.compile(r"[0-9a-fA-F]{8,64}")

# What agov asks OPA: a tree that does not define each of them is refused.
ENTRYPOINTS = (PROMOTION_PATH, ADMISSION_PATH, REVALIDATION_PATH)


def record(
    store: Store, built: BuiltBundle, *, actor: str, reason: str, now: datetime | None = None
) -> PolicyVersion:
    """Record a built bundle as a known (not yet active) version, with its audit event; a hash
    already recorded is left as it is.

    The bundle is recorded by file name: it lives in the workspace's ``bundles/``, so a
    workspace keeps working when it is moved or opened from another directory.
    """
    now = now or utcnow()
    with store.transaction() as tx:
        inserted = tx.execute(
            "INSERT INTO policy_versions (hash, bundle_path, actor, reason, created_at) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT(hash) DO NOTHING",
            (built.policy_hash, built.path.name, actor, reason, iso(now)),
        ).rowcount
        if inserted:
            tx.audit(
                Code.POLICY_BUILT,
                actor=actor,
                policy_hash=built.policy_hash,
                now=now,
                payload={"reason": reason, "bundle": built.path.name},
            )
    row = store.query_one("SELECT * FROM policy_versions WHERE hash = ?", (built.policy_hash,))
    assert row is not None
    return _version(row)


def candidate(built: BuiltBundle, *, actor: str, reason: str, now: datetime | None = None) -> PolicyVersion:
    """A built bundle as the version it will be once recorded (not recorded yet: ``seq`` 0)."""
    created_at = iso(now or utcnow()) or ""
    return PolicyVersion(0, built.policy_hash, built.path.name, actor, reason, created_at, False)


class _Unchecked:
    """The default of ``mark_active(expected_active=...)``: switch whatever is active."""


_UNCHECKED = _Unchecked()


def mark_active(
    store: Store,
    policy_hash: str,
    *,
    event: Code,
    actor: str,
    reason: str,
    now: datetime | None = None,
    extra: dict[str, Any] | None = None,
    open_run: bool = True,
    expected_active: str | _Unchecked | None = _UNCHECKED,
    run_org: RunOrg | None = None,
) -> PolicyVersion:
    """Flip the active row and write the audit event, in one transaction.

    Unfinished revalidation runs of every other hash are closed then: once another policy has
    judged the agents, resuming such a run from its cursor would skip the agents before it (a
    later activation of that hash starts a run of its own). The event lists the closed runs.
    With ``open_run`` the new hash's run is opened in the same transaction, so a process that
    dies right after the switch leaves a run that the next reload, ``serve`` or ``revalidate``
    finishes, rather than agents bound to a policy nothing will revalidate them under.

    With ``run_org`` (the org limits the switching process will judge with) the run opened here
    records them, and a change of them is audited with it: a start during the run can then be
    judged ahead of it at once, even should this process die before it begins the run.

    With ``expected_active`` (a hash, or None for none) the switch happens only if that is still
    the active version when the transaction holds the write lock: two reloads of one tree must
    not both switch (and both revalidate, into one run).

    Raises:
        ConflictError: another process switched the active version since the caller looked.
        NotFoundError: ``policy_hash`` is not recorded.
    """
    now = now or utcnow()
    previous = active_version(store)
    with store.transaction() as tx:
        row = tx.execute("SELECT hash FROM policy_versions WHERE active = 1").fetchone()
        current = row[0] if row else None
        if not isinstance(expected_active, _Unchecked) and current != expected_active:
            raise ConflictError(
                f"another process activated policy {str(current)[:12]} while this one was switching to "
                f"{policy_hash[:12]}; that process revalidates the agents under it",
                hint="see `agov policy history`; "
                + (
                    "nothing was changed here: this policy is active"
                    if current == policy_hash
                    else "run the command again if this policy should be active"
                ),
            )
        tx.execute("UPDATE policy_versions SET active = 0 WHERE active = 1")
        if tx.execute("UPDATE policy_versions SET active = 1 WHERE hash = ?", (policy_hash,)).rowcount != 1:
            raise NotFoundError(f"policy version {policy_hash} is not recorded")
        closed = [
            int(row[0])
            for row in tx.execute(
                "SELECT id FROM revalidation_runs WHERE finished_at IS NULL AND policy_hash != ? ORDER BY id",
                (policy_hash,),
            )
        ]
        tx.executemany(
            "UPDATE revalidation_runs SET finished_at = ? WHERE id = ?", [(iso(now), i) for i in closed]
        )
        payload = {"previous_hash": previous.hash if previous else None, "reason": reason, **(extra or {})}
        if closed:
            payload["abandoned_revalidation_runs"] = closed
        if (
            open_run
            and not tx.execute(
                "SELECT 1 FROM revalidation_runs WHERE finished_at IS NULL AND policy_hash = ?",
                (policy_hash,),
            ).fetchone()
        ):
            opened = tx.execute(
                "INSERT INTO revalidation_runs (policy_hash, previous_hash, started_at, org_digest)"
                " VALUES (?, ?, ?, ?)",
                (
                    policy_hash,
                    previous.hash if previous else None,
                    iso(now),
                    None if run_org is None else org_digest(run_org.canonical),
                ),
            )
            tx.audit(event, actor=actor, policy_hash=policy_hash, now=now, payload=payload)
            if run_org is not None and run_org.change is not None:
                audit_org_change(tx, run_org, int(opened.lastrowid or 0), policy_hash, now)
        else:
            tx.audit(event, actor=actor, policy_hash=policy_hash, now=now, payload=payload)
    return require_active(store)


def bundle_file(bundles: Path, version: PolicyVersion) -> Path:
    return bundles / Path(version.bundle_path).name


def bundle_bytes(bundles: Path, version: PolicyVersion) -> bytes:
    """Raises: PolicyError: the bundle file of a recorded version is gone."""
    try:
        content = bundle_file(bundles, version).read_bytes()
    except OSError as exc:
        raise PolicyError(
            f"bundle of policy {version.hash[:12]} is unreadable: {exc}", hint=_REBUILD_HINT
        ) from exc
    if not content:
        raise PolicyError(f"bundle of policy {version.hash[:12]} is an empty file", hint=_REBUILD_HINT)
    revision = _manifest_revision(content)
    if revision is not None and revision != version.hash:
        # another validly signed bundle under this name: OPA would load it and never report the
        # revision asked for, so every wait would run out
        raise PolicyError(
            f"bundle file {bundle_file(bundles, version).name} holds policy revision {revision[:12]!r}, "
            f"not {version.hash[:12]}: the file was replaced",
            hint=_REBUILD_HINT,
        )
    return content


# `agov policy build` builds whatever policies/ holds now: only that version's own files rebuild it
_REBUILD_HINT = (
    "restore the file from a backup of the workspace, or put that version's policy files back in "
    "policies/ and run `agov policy build` (the same files give the same hash)"
)


def _manifest_revision(content: bytes) -> str | None:
    """The revision in a bundle's .manifest, or None when it cannot be read (OPA, which verifies
    the signature over it, then refuses the bundle with its own reason)."""
    try:
        with tarfile.open(fileobj=io.BytesIO(content), mode="r:gz") as tar:
            for member in tar.getmembers():
                if member.name.lstrip("/") == ".manifest" and member.isfile():
                    extracted = tar.extractfile(member)
                    manifest = json.loads(extracted.read(1 << 20)) if extracted is not None else None
                    revision = manifest.get("revision") if isinstance(manifest, dict) else None
                    return revision if isinstance(revision, str) else None
    except (tarfile.TarError, OSError, EOFError, ValueError, zlib.error):
        return None
    return None


def bundle_sources(content: bytes) -> dict[str, str]:
    """The policy and data files in a bundle tarball (no signatures, no manifest)."""
    sources: dict[str, str] = {}
    with tarfile.open(fileobj=io.BytesIO(content), mode="r:gz") as tar:
        for member in tar.getmembers():
            name = member.name.lstrip("/")
            if member.isfile() and not name.startswith("."):
                extracted = tar.extractfile(member)
                if extracted is not None:
                    sources[name] = extracted.read().decode("utf-8", errors="replace")
    return sources


def diff(store: Store, bundles: Path, a: str, b: str) -> str:
    """A unified diff of the policy files of two recorded versions.

    Raises:
        NotFoundError: either version is unknown.
    """
    va, vb = find_version(store, a), find_version(store, b)
    sa, sb = _sources(bundles, va), _sources(bundles, vb)
    sa, sb = ({name: _readable(name, text) for name, text in s.items()} for s in (sa, sb))
    out: list[str] = []
    for name in sorted(set(sa) | set(sb)):
        out.extend(
            difflib.unified_diff(
                sa.get(name, "").splitlines(keepends=True),
                sb.get(name, "").splitlines(keepends=True),
                fromfile=f"{va.hash[:12]}/{name}",
                tofile=f"{vb.hash[:12]}/{name}",
            )
        )
    return "".join(out)


def _readable(name: str, text: str) -> str:
    """A JSON data file one value per line: `opa build` writes a bundle's data.json on one line,
    so a changed limit would show as the whole file changed."""
    if not name.endswith(".json"):
        return text
    try:
        return json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    except ValueError:
        return text


def _sources(bundles: Path, version: PolicyVersion) -> dict[str, str]:
    try:
        return bundle_sources(bundle_bytes(bundles, version))
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise PolicyError(
            f"bundle of policy {version.hash[:12]} is not a readable tarball: {exc}",
            hint="it was damaged after it was built; `agov policy build` rebuilds the active one",
        ) from exc


def current_tree_hash(policies: Path) -> str:
    return compute_policy_hash(policies)
