"""The Python API: one :class:`Engine` per workspace, the same operations as the CLI.

from agov.engine import Engine

with Engine.open("./.agov") as engine:
    decision = engine.admit("finance-reconciler")
    if not decision.allow:
        raise SystemExit(f"refused: {decision.code}")
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, cast

from agov import admission, audit, keyring, keys, policy, promotion, registry, revalidation
from agov.bundle import Trial
from agov.config import Config, load_config
from agov.decisions import AdmissionDecision, Code, Reason
from agov.errors import (
    AgovError,
    ConflictError,
    EngineUnavailableError,
    InfrastructureError,
    KeyMaterialError,
    NotFoundError,
    PolicyError,
    StoreError,
    UsageError,
    WorkspaceError,
)
from agov.hashing import canonical_json
from agov.observability import Metrics, engine_log, log_decision
from agov.opa.binary import find_opa
from agov.opa.evaluator import Evaluator, EvaluatorConfig
from agov.policy import PolicyVersion
from agov.proofs import SignatureCache, TrustedKey
from agov.registry import AgentRecord, CreationMode
from agov.revalidation import RevalidationReport
from agov.store.sqlite import ReadMemo, blob_text, parse_iso, utcnow
from agov.tempdirs import claimed_tempdir
from agov.workspace import CONFIG_FILE, Workspace, create_layout, remove_layout

if TYPE_CHECKING:  # the managed sidecar's module is imported when a sidecar is started
    from agov.opa.managed import ManagedConfig

SYSTEM_ACTOR = "agov"
# after a managed OPA died and starting it again failed, the next attempt waits this long
_RESTART_BACKOFF_S = 5.0


class Engine:
    """A workspace with its store, keys and (lazily started) OPA evaluator.

    Only one thing is started on demand: the OPA sidecar, on the first decision. ``close()`` (or
    leaving the ``with`` block) stops it.
    """

    def __init__(
        self,
        workspace: Workspace,
        *,
        evaluator: Evaluator | None = None,
        clock: Callable[[], datetime] = utcnow,
        metrics: Metrics | None = None,
        opa_url: str | None = None,
        managed: ManagedConfig | None = None,
        for_audit: bool = False,
    ) -> None:
        """``opa_url``: decide with the OPA sidecar at this URL (the external runtime), whatever
        ``agov.yaml`` says; it wins over ``opa_url`` there and over ``AGOV_OPA_URL``. Its token
        and TLS files then come from ``AGOV_OPA_*`` only, never from ``agov.yaml``.
        ``managed``: how the managed sidecar runs (the benchmarks ask it to listen on TCP too).
        ``for_audit``: open a store that lost what its audit anchor records, to verify or export
        its log; any other engine refuses it (``Store``)."""
        self.workspace = workspace
        self.config: Config = workspace.config
        if opa_url is not None:
            # agov.yaml's token and TLS files belong to its own opa_url: never sent elsewhere
            self.config = dataclasses.replace(
                self.config,
                runtime="external",
                opa_url=opa_url,
                opa_token=None,
                opa_ca_file=None,
                opa_client_cert=None,
                opa_client_key=None,
            )
        self._opa_url = opa_url
        self._managed = managed
        self.store = workspace.store(check_anchor=not for_audit)
        self.clock = clock
        self.metrics = metrics or Metrics()
        self._evaluator = evaluator
        self._owns_evaluator = evaluator is None
        # when starting a managed OPA again after it died last failed, and why: decisions deny at
        # once until _RESTART_BACKOFF_S later, rather than each waiting out a start that hangs
        self._restart_failed: tuple[float, str] | None = None
        self._sidecar_died = False
        self._warned_sidecar_url = False
        self._evaluator_lock = threading.Lock()
        self._switch_lock = threading.Lock()  # held while this engine switches policies
        self._signatures = SignatureCache()
        self._admission_reads = ReadMemo(self.store)
        self._key_material: dict[str, TrustedKey] = {}
        self._trusted_keys: dict[tuple[str, str | None, str | None, str | None], TrustedKey] = {}

    # -- lifecycle ------------------------------------------------------------------------------

    @classmethod
    def open(cls, home: str | Path, **kwargs: Any) -> Engine:
        """Raises: WorkspaceError: no workspace at ``home``."""
        return cls(Workspace.open(Path(home)), **kwargs)

    @classmethod
    def init(cls, home: str | Path, config: Config | None = None, *, actor: str = SYSTEM_ACTOR) -> Engine:
        """Create a workspace: files, a proof key, the bundle key, and the first active policy.

        Raises:
            WorkspaceError: something would be overwritten (nothing is written then).
            PolicyError: the shipped policies failed to build.
        """
        home = Path(home)
        workspace = create_layout(home, config or Config())
        engine = cls(workspace)
        try:
            keyring.generate(engine.store, workspace.keys, actor=actor)
            built = policy.build(find_opa(), workspace.policies, workspace.bundles, workspace.keys)
            policy.record(engine.store, built, actor=actor, reason="initial policy")
            policy.mark_active(
                engine.store,
                built.policy_hash,
                event=Code.POLICY_HOTRELOAD,
                actor=actor,
                reason="initial policy",
                open_run=False,  # no agent to revalidate yet
            )
            with engine.store.transaction() as tx:
                # what the first policy and org limits judged: no agent, so a reload re-judges
                # only when agov.yaml's org limits change later
                revalidation.record_empty_run(
                    tx,
                    built.policy_hash,
                    canonical_json(dataclasses.asdict(engine.config.org)),
                    engine.clock(),
                )
                tx.audit(
                    Code.WORKSPACE_INIT,
                    actor=actor,
                    policy_hash=built.policy_hash,
                    payload={"home": str(home)},
                )
        except BaseException:
            engine.close()
            remove_layout(home)  # init checked that none of these existed: they are all ours
            raise
        return engine

    def close(self) -> None:
        if self._evaluator is not None and self._owns_evaluator:
            self._evaluator.close()
            self._evaluator = None
        self.store.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- OPA -------------------------------------------------------------------------------------

    def _judging_config(self) -> Config:
        """The config, with the org limits ``agov.yaml`` holds now: a long-lived engine (``serve``)
        judges promotions and revalidations with the limits in force, not those it started with.

        Raises:
            WorkspaceError: agov.yaml cannot be read now.
        """
        path = self.workspace.home / CONFIG_FILE
        if not path.is_file():  # load_config would give the default limits: never judge with those
            raise WorkspaceError(f"{path} is gone: the org limits cannot be read", hint="restore it")
        return dataclasses.replace(self.config, org=load_config(path, require_org=True).org)

    def limits_changed_on_disk(self) -> bool:
        """Whether agov.yaml's ``limits`` now differ from those this engine runs with: they take
        effect when the engine is opened again (the org limits, by contrast, at once). False
        when agov.yaml cannot be read (a reload says why)."""
        try:
            return load_config(self.workspace.home / CONFIG_FILE).limits != self.config.limits
        except AgovError:
            return False

    def _evaluator_config(self) -> EvaluatorConfig:
        return EvaluatorConfig(timeout_s=self.config.limits.opa_timeout_s)

    def _start_managed(self, version: PolicyVersion) -> Evaluator:
        from agov.opa.managed import ManagedSidecar

        self._warn_if_sidecar_url_ignored()
        bundle_key = keys.ensure_bundle_signing_key(self.workspace.keys, create=False)
        sidecar = ManagedSidecar(
            bundle_bytes=policy.bundle_bytes(self.workspace.bundles, version),
            revision=version.hash,
            verification_public_key_pem=bundle_key.public_pem_path.read_bytes(),
            keyid=bundle_key.keyid,
            config=self._evaluator_config(),
            start_timeout_s=self.config.limits.opa_start_timeout_s,
            managed=self._managed,
        )
        sidecar.start()
        return sidecar

    def evaluator(self) -> Evaluator:
        """The evaluator for the active policy, started on first use.

        Raises:
            EngineUnavailableError: OPA could not be started or reached.
            PolicyError: there is no active policy.
        """
        with self._evaluator_lock:
            return self._evaluator_locked()

    def _drop_dead_sidecar_locked(self) -> None:
        """Forget a managed OPA that died (killed, out of memory), so that the caller starts a
        new one: else every later decision of this engine, and every reload of a long-running
        serve, failed closed until the process restarted."""
        if not self._owns_evaluator:  # a caller's sidecar: the caller restarts it, if anyone
            return
        exit_note = getattr(self._evaluator, "exit_note", None)
        note = exit_note() if exit_note is not None else None
        if note is not None and self._evaluator is not None:
            dead, self._evaluator = self._evaluator, None
            dead.close()
            self._sidecar_died = True
            engine_log.warning("the managed OPA exited (%s): starting a new one", note)

    def _evaluator_locked(self) -> Evaluator:
        self._drop_dead_sidecar_locked()
        if self._evaluator is None:
            if self.config.runtime == "external":
                from agov.opa.external import ENV_OPA_URL, ExternalSidecar

                environ = dict(os.environ)
                if self._opa_url is not None:
                    environ[ENV_OPA_URL] = self._opa_url  # the command line wins over the environment
                self._evaluator = ExternalSidecar.from_config(self.config, self._evaluator_config(), environ)
            else:
                self._evaluator = self._restart_managed() if self._sidecar_died else None
                if self._evaluator is None:
                    self._evaluator = self._start_managed(policy.require_active(self.store))
        return self._evaluator

    def _warn_if_sidecar_url_ignored(self) -> None:
        """Say so, once per engine, when ``AGOV_OPA_URL`` is set but agov runs its own OPA: an
        operator who set it alone expects decisions (and reloads) to reach that sidecar; only
        ``runtime: external`` reads it."""
        from agov.opa.external import ENV_OPA_URL

        url = os.environ.get(ENV_OPA_URL, "").strip()
        if url and not self._warned_sidecar_url:
            self._warned_sidecar_url = True
            engine_log.warning(
                "%s is set (%s) but agov.yaml says runtime: managed, so agov decides with an OPA "
                "of its own; set runtime: external to ask that sidecar, or pass --opa-url",
                ENV_OPA_URL,
                url,
            )

    def _restart_managed(self) -> Evaluator:
        """Start the managed OPA again after it died, at most once per ``_RESTART_BACKOFF_S``
        while that fails.

        Raises:
            EngineUnavailableError: the last attempt failed less than that ago (at once), or
                this one failed.
        """
        if self._restart_failed is not None:
            failed_at, why = self._restart_failed
            wait_s = failed_at + _RESTART_BACKOFF_S - time.monotonic()
            if wait_s > 0:
                raise EngineUnavailableError(
                    f"the managed OPA died, and starting it again failed: {why}",
                    hint=f"the next attempt comes with a decision in {wait_s:.1f} s or later",
                )
        try:
            evaluator = self._start_managed(policy.require_active(self.store))
        except AgovError as exc:
            self._restart_failed = (time.monotonic(), exc.message)
            raise
        self._restart_failed, self._sidecar_died = None, False
        return evaluator

    def _evaluator_for(self, policy_hash: str) -> Evaluator:
        """The evaluator, with the managed sidecar moved to ``policy_hash`` first when the store
        names another active policy than it serves: another process reloaded or rolled back.
        Without this, every decision of a long-lived engine failed closed until it restarted.
        While this engine is switching policies itself it does not interfere (decisions fail
        closed for that moment, as designed)."""
        evaluator = self.evaluator()
        serving = getattr(evaluator, "active_revision", policy_hash)
        if serving == policy_hash or not policy_hash or not hasattr(evaluator, "activate"):
            return evaluator
        if self._switch_lock.acquire(blocking=False):
            try:
                # ``policy_hash`` may be a read from before this engine's own switch: follow only
                # what the store says now, never move the sidecar back
                version = policy.require_active(self.store)
                if version.hash != getattr(evaluator, "active_revision", version.hash):
                    evaluator.activate(policy.bundle_bytes(self.workspace.bundles, version), version.hash)
            finally:
                self._switch_lock.release()
        return evaluator

    # -- agents ----------------------------------------------------------------------------------

    def create_agent(
        self, document: Mapping[str, Any], *, mode: CreationMode, source: str, actor: str, notes: str = ""
    ) -> AgentRecord:
        """Raises: SpecError, UsageError (see :func:`agov.registry.create_agent`)."""
        try:
            return registry.create_agent(
                self.store,
                self.config,
                document,
                mode=mode,
                source=source,
                actor=actor,
                notes=notes,
                now=self.clock(),
            )
        except AgovError as exc:
            self.reject_request("create", exc, actor=actor)
            raise

    def update_agent(
        self, agent_id: str, document: Mapping[str, Any], *, actor: str, notes: str = ""
    ) -> AgentRecord:
        """Raises: NotFoundError, SpecError, UsageError."""
        try:
            return registry.update_agent(
                self.store, self.config, agent_id, document, actor=actor, notes=notes, now=self.clock()
            )
        except AgovError as exc:
            self.reject_request("update", exc, actor=actor, agent_id=agent_id)
            raise

    def reject_request(
        self, operation: str, exc: AgovError, *, actor: str, agent_id: str | None = None
    ) -> None:
        """The one row a rejected request leaves: its audit event (also for input refused before it
        reached the engine: a file that is missing or does not parse)."""
        self.store.record_rejection(
            Code.REQUEST_REJECTED,
            actor=actor,
            agent_id=None if agent_id is None else (agent_id if self._agent_exists(agent_id) else None),
            payload={
                "operation": operation,
                "error": type(exc).__name__,
                "message": exc.message,
                "agent_ref": agent_id,
            },
        )

    def _agent_exists(self, agent_id: str) -> bool:
        return self.store.query_one("SELECT 1 FROM agents WHERE id = ?", (agent_id,)) is not None

    def get_agent(self, agent_id: str) -> AgentRecord:
        return registry.get_agent(self.store, agent_id)

    def list_agents(self, **filters: Any) -> list[AgentRecord]:
        return registry.list_agents(self.store, **filters)

    def count_governed(self) -> int:
        row = self.store.query_one(
            "SELECT COUNT(*) AS n FROM agents WHERE status IN (?, ?, ?)",
            ("GOVERNED_VALID", "GOVERNED_RESTRICTED", "GOVERNED_INVALIDATED"),
        )
        return int(row["n"]) if row is not None else 0

    def history(self, agent_id: str) -> dict[str, Any]:
        return registry.history(self.store, agent_id)

    def current_proof(self, agent_id: str) -> dict[str, Any] | None:
        return registry.current_proof(self.store, agent_id)

    # -- decisions --------------------------------------------------------------------------------

    def promote(self, agent_id: str, *, actor: str, role: str) -> promotion.PromotionResult:
        """Evaluate promotion; on allow sign a proof. Errors on the way become a deny.

        Raises:
            NotFoundError: no such agent.
            UsageError: a concurrent change to the agent won.
        """
        try:
            agent = registry.get_agent(self.store, agent_id)
        except NotFoundError as exc:  # audited as every rejected promote request is
            self.reject_request("promote", exc, actor=actor, agent_id=agent_id)
            raise
        self.metrics.promotion_attempts.inc()
        started = time.perf_counter()
        active = policy.active_version(self.store)
        policy_hash = active.hash if active is not None else ""

        def evaluator() -> Evaluator:
            if active is None:  # no policy: promotion denies (and is audited) like any other failure
                policy.require_active(self.store)
            return self._evaluator_for(policy_hash)

        now = self.clock()  # the proof's issue time: its signer is the key whose turn it is then
        result = promotion.promote(
            self.store,
            self._judging_config,
            agent,
            evaluator,
            lambda: keyring.active_signer(self.store, self.workspace.keys, now),
            lambda: keys.ensure_proof_seal(self.workspace.keys),
            actor=actor,
            role=role,
            policy_hash=policy_hash,
            now=now,
        )
        self.metrics.decision_latency.labels("promotion").observe(time.perf_counter() - started)
        for reason in result.deny:
            self.metrics.promotion_denies.labels(reason.code).inc()
        log_decision(
            "promotion",
            Code.PROMOTION_SUCCESS if result.allow else Code.PROMOTION_DENIED,
            agent_id=agent_id,
            actor=actor,
            policy_hash=policy_hash,
            decision_id=result.decision_id,
            deny=[r.code for r in result.deny],
        )
        return result

    def _trusted_key(self, keyid: str) -> TrustedKey | None:
        """The key with its window and revocation read from the store now; the key file is read
        once per engine (its id is derived from its material, so a swapped file cannot pass)."""
        # read as BLOB (see blob_text): one damaged key row must not stop a revalidation run
        state = self.store.query_one(
            "SELECT CAST(not_before AS BLOB) AS not_before, CAST(not_after AS BLOB) AS not_after,"
            " CAST(revoked_at AS BLOB) AS revoked_at FROM signing_keys WHERE keyid = ?",
            (keyid,),
        )
        if state is None:
            return None
        window = (keyid, *(blob_text(state[name]) for name in ("not_before", "not_after", "revoked_at")))
        known = self._trusted_keys.get(window)
        if known is None:  # first use, or the key's window or revocation changed
            material = self._key_material.get(keyid)
            if material is None:
                material = self._key_material[keyid] = keys.load_trusted_key(self.workspace.keys, keyid)
            known = self._trusted_keys[window] = dataclasses.replace(
                material,
                not_before=parse_iso(window[1]),
                not_after=parse_iso(window[2]),
                revoked_at=parse_iso(window[3]),
            )
        return known

    def _current_proof(self, agent_id: str) -> tuple[Any | None, datetime | None]:
        row = self.store.query_one(
            # the envelope as BLOB whatever its storage class: a sqlite3 shell edit stores TEXT,
            # which must fail as a signature, not as a type error
            "SELECT p.keyid, p.issued_at, CAST(p.envelope AS BLOB) AS envelope,"
            " (SELECT MAX(issued_at) FROM agent_proofs WHERE agent_id = p.agent_id) AS newest"
            " FROM agent_proofs p WHERE p.agent_id = ? AND p.superseded_at IS NULL",
            (agent_id,),
        )
        return row, parse_iso(row["newest"]) if row is not None else None

    def admit(self, agent_id: str) -> AdmissionDecision:
        """Fail-closed admission of one start. An agent a revalidation run has not reached yet is
        judged and re-signed first (see ``_renew_then_admit``): the one case where admission
        writes, and may wait for the store's write lock.

        Raises:
            NotFoundError: no such agent (bad input; every other failure is a deny).
        """
        started = time.perf_counter()
        decision = self._admit_once(agent_id)
        if decision.code in (Code.ADMISSION_DENY_POLICY_HASH_MISMATCH, Code.ADMISSION_DENY_INVALIDATED):
            decision = self._renew_then_admit(agent_id, decision)
        self.metrics.admission_latency.observe(time.perf_counter() - started)
        if decision.allow:
            self.metrics.starts_allowed.inc()
        else:
            self.metrics.starts_denied.labels(decision.code).inc()
        log_decision(
            "admission",
            decision.code,
            agent_id=agent_id,
            policy_hash=decision.policy_hash,
            decision_id=decision.decision_id,
        )
        return decision

    def _admit_once(self, agent_id: str) -> AdmissionDecision:
        try:
            reads = self._admission_reads.view()
        except Exception:  # a cache that fails is no cache: the loaders below read the store,
            reads = {}  # inside admission.admit, where any failure is a deny

        def active_hash() -> str:
            return _memo(reads, "policy", lambda: policy.require_active(self.store).hash)

        def agent() -> AgentRecord:
            return _memo(reads, ("agent", agent_id), lambda: registry.get_agent(self.store, agent_id))

        decision = admission.admit(
            agent,
            lambda aid: _memo(reads, ("proof", aid), lambda: self._current_proof(aid)),
            lambda keyid: _memo(reads, ("key", keyid), lambda: self._trusted_key(keyid)),
            active_hash,
            lambda: self._evaluator_for(active_hash()),
            self.clock(),
            max_proof_bytes=self.config.limits.max_proof_bytes,
            cache=self._signatures,
            agent_id=agent_id,
        )
        if decision.code == Code.ADMISSION_DENY_INVALIDATED:
            try:  # why, as the run (or promotion) recorded it: the deny alone says only "fix it"
                why = [Reason(decision.code, f"why: {r['code']}: {r['message']}") for r in agent().reasons]
            except Exception:  # the deny stands without them
                why = []
            decision = dataclasses.replace(decision, reasons=(*decision.reasons, *why))
        return decision

    def _renew_then_admit(self, agent_id: str, denied: AdmissionDecision) -> AdmissionDecision:
        """An agent whose proof is bound to an earlier policy, or an invalidated one, while the run
        of the active policy has not reached it: judge it now, as the run would, and decide its
        start again. Any failure leaves ``denied`` in force, with why. The renewal writes, so it
        may wait for SQLite's write lock (a chunk the run commits), at most
        ``limits.opa_timeout_s`` each time (twice, should another key take over signing
        meanwhile)."""
        try:
            active = policy.require_active(self.store).hash
            if denied.code == Code.ADMISSION_DENY_INVALIDATED and not revalidation.ahead_of_run(
                self.store, active, agent_id
            ):
                return denied  # no open run has yet to judge it: the deny's advice stands as it is
            renewal = revalidation.renew_at_start(
                self.store,
                self._evaluator_for(active),
                lambda: keyring.active_signer(self.store, self.workspace.keys, self.clock()),
                revalidation.ProofVouching(keys.existing_proof_seal(self.workspace.keys), self._trusted_key),
                agent_id=agent_id,
                org_canonical=canonical_json(dataclasses.asdict(self._judging_config().org)),
                policy_hash=active,
                now_fn=self.clock,
                timeout_s=self.config.limits.opa_timeout_s,
            )
        except AgovError as exc:
            note = f"not judged ahead of the revalidation run: {exc.in_one_line()}"
        except Exception as exc:  # fail closed: the deny stands
            note = f"not judged ahead of the revalidation run: internal error: {type(exc).__name__}: {exc}"
        else:
            note = renewal.note
            if renewal.renewed:
                self.metrics.starts_renewed.inc()
            if renewal.decide_again:
                trigger, denied = denied.code, self._admit_once(agent_id)
                if denied.code != trigger:
                    return denied
                if trigger == Code.ADMISSION_DENY_INVALIDATED:
                    if not (note or renewal.renewed):
                        return denied  # the run judged it meanwhile, and invalidated it
                    note = note or "it was restored, but invalidated again before its start was decided again"
                # its proof is now bound to a policy that is no longer the active one
                note = note or (
                    "its proof was renewed under the policy then active, but another policy became"
                    " active before its start was decided again"
                )
        return dataclasses.replace(denied, reasons=(*denied.reasons, Reason(denied.code, note)))

    # -- policy ----------------------------------------------------------------------------------

    def active_policy(self) -> PolicyVersion:
        return policy.require_active(self.store)

    def build_policy(self, *, actor: str, reason: str) -> PolicyVersion:
        """Check, build, sign and record the workspace's policy (activates it only if none is).

        Raises:
            PolicyError: check, test or build failed.
        """
        built = policy.build(find_opa(), self.workspace.policies, self.workspace.bundles, self.workspace.keys)
        version = policy.record(self.store, built, actor=actor, reason=reason)
        if policy.active_version(self.store) is None:
            version = policy.mark_active(
                self.store, built.policy_hash, event=Code.POLICY_HOTRELOAD, actor=actor, reason=reason
            )
        return version

    def revalidate(
        self,
        *,
        dry_run: bool = False,
        progress: Callable[[int], None] | None = None,
        evaluator: Evaluator | None = None,
        policy_hash: str | None = None,
        previous_hash: str | None = None,
        org_change: revalidation.OrgChange | None = None,
        config: Config | None = None,
    ) -> RevalidationReport:
        """Re-evaluate every governed agent under the active policy (or ``policy_hash`` in a dry run),
        with ``config`` when the caller has just read it (else agov.yaml is read now).

        Raises:
            EngineUnavailableError, DecisionError: OPA failed; rerun to resume.
            KeyMaterialError: no active signing key, or the proof seal key is unusable.
        """
        target = policy_hash or policy.require_active(self.store).hash
        try:
            report = revalidation.revalidate(
                self.store,
                config or self._judging_config(),
                evaluator or self._evaluator_for(target),
                lambda: keyring.active_signer(self.store, self.workspace.keys, self.clock()),
                revalidation.ProofVouching(
                    keys.ensure_proof_seal(self.workspace.keys, create=not dry_run), self._trusted_key
                ),
                policy_hash=target,
                now_fn=self.clock,
                dry_run=dry_run,
                previous_hash=previous_hash,
                progress=progress,
                org_change=org_change,
            )
        except AgovError as exc:
            # a ConflictError: another process works the run, or closed it; it is not left stopped
            if not dry_run and not isinstance(exc, ConflictError) and self._run_left_open(target):
                self.metrics.revalidation_stopped.inc()
            raise
        if not dry_run:
            self.metrics.invalidations.inc(report.newly_invalidated)
        return report

    def _run_left_open(self, policy_hash: str) -> bool:
        """Whether a run of ``policy_hash`` is unfinished, as one an error stopped is; a failure
        before any run was opened (no key may sign, say) stops none. An unreadable store may have
        left one: counted, for an alert to look."""
        try:
            return revalidation.unfinished_run(self.store, policy_hash)
        except Exception:
            return True

    def reload_policy(
        self,
        *,
        actor: str,
        reason: str,
        dry_run: bool = False,
        progress: Callable[[int], None] | None = None,
        before_switch: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        """Rebuild the policy; if its hash changed, activate it and revalidate every agent. With
        the same hash, revalidate every agent when the org limits in agov.yaml differ from those
        the last run judged with (``org_changed``).

        A policy that does not compile or whose tests fail is refused and the old one stays.
        With ``dry_run`` the candidate is built in a temporary directory and judged by a
        throwaway sidecar: nothing is written, nothing is activated.

        ``before_switch`` is called once the new policy is built and checked, before anything
        is recorded or switched: an exception it raises leaves everything as it was (``serve``
        stopping). ``progress`` is called after each committed revalidation chunk.

        Raises:
            PolicyError: refused (counted in ``policy_reload_failure_total`` and audited).
        """
        active = policy.active_version(self.store)
        if dry_run:
            return self._dry_run_reload(active)
        try:
            built = policy.build(
                find_opa(),
                self.workspace.policies,
                self.workspace.bundles,
                self.workspace.keys,
                trial=self._trial(active),
            )
        # KeyMaterialError: the bundle signing key; EngineUnavailableError: no opa binary that
        # runs; StoreError: the governed agents could not be read for the trial run
        except (PolicyError, KeyMaterialError, EngineUnavailableError, StoreError) as exc:
            self._refuse_reload(exc, actor=actor, reason=reason, active=active)
            raise
        if active is not None and built.policy_hash == active.hash:
            try:
                caught_up = self.catch_up(actor=actor, reason=reason, progress=progress)
            except (KeyMaterialError, WorkspaceError) as exc:  # no key to sign, no limits to judge with
                self._refuse_reload(exc, actor=actor, reason=reason, active=active)
                raise
            if caught_up["org_changed"]:  # new limits now judge every agent, as a new policy would
                self.metrics.reload_success.inc()
            return caught_up
        try:
            config = self._ready_to_switch()  # before the new version is even recorded
        except (KeyMaterialError, WorkspaceError) as exc:
            self._refuse_reload(exc, actor=actor, reason=reason, active=active)
            raise
        if before_switch is not None:
            before_switch()
        version = policy.candidate(built, actor=actor, reason=reason)
        try:
            report, org_changed = self._switch(
                version,
                config,
                event=Code.POLICY_HOTRELOAD,
                actor=actor,
                reason=reason,
                progress=progress,
                # once OPA has taken the bundle: one it refuses leaves no version row behind
                record=lambda: policy.record(self.store, built, actor=actor, reason=reason),
            )
        # refused by OPA, OPA did not load it in time, no key to re-sign with, or no org limits to
        # judge with: refused and the old one stays, unless this call had switched the store
        # already (then the revalidation stopped, and its run is finished later)
        except AgovError as exc:
            if exc.policy_switched:  # in force: its run stopped (counted there) and resumes later
                self.metrics.reload_success.inc()
            elif isinstance(exc, ConflictError) and self._activated_elsewhere(version):
                # another process activated this same tree first, and revalidates: not refused
                exc.policy_switched = True
            else:
                self._refuse_reload(exc, actor=actor, reason=reason, active=active)
            raise
        self.metrics.reload_success.inc()
        return {
            "changed": True,
            "org_changed": org_changed,
            "policy_hash": version.hash,
            "previous_hash": active.hash if active else None,
            "revalidation": report.as_dict(),
        }

    def _trial(self, active: PolicyVersion | None) -> Trial:
        """What a reload runs the candidate on before it switches: the first
        limits.revalidation_chunk_size governed agents, as its revalidation would send them.
        Nothing to try for the active tree itself, an empty fleet, or org limits that cannot be
        read (the reload is refused for those before it switches)."""

        def first_chunk(candidate_hash: str) -> bytes | None:
            if active is not None and candidate_hash == active.hash:
                return None
            try:
                org = self._judging_config().org
            except WorkspaceError:
                return None
            size = self.config.limits.revalidation_chunk_size
            return revalidation.trial_input(
                self.store, size, canonical_json(dataclasses.asdict(org)), candidate_hash, self.clock()
            )

        return Trial(
            "the first chunk of governed agents",
            revalidation.REVALIDATION_PATH,
            first_chunk,
            timeout_s=self.config.limits.revalidation_timeout_s,
            failures_rule=revalidation.TRIAL_FAILURES_PATH,
        )

    def _activated_elsewhere(self, version: PolicyVersion) -> bool:
        won = policy.active_version(self.store)
        return won is not None and won.hash == version.hash

    def catch_up(
        self, *, actor: str, reason: str, progress: Callable[[int], None] | None = None
    ) -> dict[str, Any]:
        """Bring every governed agent's judgement up to date under the active policy: finish an
        interrupted run, then, when the org limits in agov.yaml differ from those the last run
        judged with, judge every agent again (the limits judge agents too, but are not part of the
        policy hash). A reload of an unchanged tree does this, and ``serve`` at start.

        Raises:
            PolicyError: there is no active policy.
            WorkspaceError: agov.yaml cannot be read (nothing is changed then).
            KeyMaterialError: no key may sign (nothing is changed then).
            EngineUnavailableError, DecisionError: OPA failed; the run resumes at the next call.
        """
        active = policy.require_active(self.store)
        config, digest, judged = self._org_state(active.hash)
        change = revalidation.OrgChange(actor=actor, reason=reason, previous_digest=judged)
        report: RevalidationReport | None = None
        org_changed = False
        pending, pending_digest = revalidation.unfinished_run_digest(self.store, active.hash)
        if pending:
            # a run interrupted under other limits starts again with these: that is the change
            org_changed = pending_digest is not None and pending_digest != digest
            # the previous limits are those the run judged with so far
            since_run = dataclasses.replace(change, previous_digest=pending_digest)
            report = self.revalidate(
                progress=progress, org_change=since_run if org_changed else None, config=config
            )
        if revalidation.judged_org(self.store, active.hash) != digest:
            org_changed = True
            report = self.revalidate(
                previous_hash=active.hash, progress=progress, org_change=change, config=config
            )
        return {
            "changed": False,
            "org_changed": org_changed,
            "policy_hash": active.hash,
            "revalidation": report.as_dict() if report else None,
        }

    def _org_state(self, policy_hash: str) -> tuple[Config, str, str | None]:
        """The config with agov.yaml's org limits (read once, for whatever judges next), their
        digest, and the digest of those the last run under ``policy_hash`` judged every governed
        agent with."""
        config = self._judging_config()
        digest = revalidation.org_digest(canonical_json(dataclasses.asdict(config.org)))
        return config, digest, revalidation.judged_org(self.store, policy_hash)

    def resume_revalidation(
        self, *, progress: Callable[[int], None] | None = None
    ) -> RevalidationReport | None:
        """Finish a revalidation run of the active policy that was interrupted, if there is one."""
        active = policy.active_version(self.store)
        if active is None or not revalidation.unfinished_run(self.store, active.hash):
            return None
        return self.revalidate(progress=progress)

    def _refuse_reload(
        self,
        exc: AgovError,
        *,
        actor: str,
        reason: str,
        active: PolicyVersion | None,
        rollback_to: str | None = None,
    ) -> None:
        self.metrics.reload_failure.inc()
        payload = {"reason": reason, "error": exc.message[:4000]}
        if rollback_to is not None:
            payload["rollback_to"] = rollback_to
        self.store.record_rejection(
            Code.POLICY_RELOAD_REFUSED,
            actor=actor,
            policy_hash=active.hash if active else None,
            payload=payload,
        )

    def _dry_run_reload(self, active: PolicyVersion | None) -> dict[str, Any]:
        """Judge the workspace's policy tree as it is now, without recording or activating it.

        Raises:
            PolicyError: the tree does not compile, its tests fail, or it fails on the governed
                agents (the trial run a reload makes).
        """
        with claimed_tempdir("agov-dry-run-") as tmp:  # a killed dry run's bundle: swept by the next
            built = policy.build(
                find_opa(), self.workspace.policies, tmp, self.workspace.keys, trial=self._trial(active)
            )
            report = self._dry_run_on(built.content, built.policy_hash)
        changed = active is None or built.policy_hash != active.hash
        org_changed = False
        if active is not None:
            _config, digest, judged = self._org_state(active.hash)
            pending, pending_digest = revalidation.unfinished_run_digest(self.store, active.hash)
            if changed:  # as the reload would tell: a switch reports a change it can name (_switch)
                org_changed = judged is not None and judged != digest
            elif pending:  # as catch_up tells: the unfinished run judges with the limits it began with
                org_changed = pending_digest is not None and pending_digest != digest
            else:
                org_changed = judged != digest
        return {
            "changed": changed,
            "org_changed": org_changed,
            "dry_run": True,
            "policy_hash": built.policy_hash,
            "previous_hash": active.hash if active else None,
            "revalidation": report.as_dict(),
        }

    def rollback_policy(
        self, hash_prefix: str, *, actor: str, reason: str, progress: Callable[[int], None] | None = None
    ) -> dict[str, Any]:
        """Re-activate an earlier signed bundle and revalidate.

        Raises:
            NotFoundError: unknown or ambiguous hash.
            UsageError: that version is already active.
        """
        target = policy.find_version(self.store, hash_prefix)
        active = policy.active_version(self.store)
        if active is not None and active.hash == target.hash:
            raise UsageError(f"policy {target.hash[:12]} is already active")
        try:
            report, org_changed = self._switch(
                target,
                self._ready_to_switch(),
                event=Code.POLICY_ROLLBACK,
                actor=actor,
                reason=reason,
                progress=progress,
            )
        except AgovError as exc:  # a bundle gone, altered or refused by OPA; no key; no limits
            if isinstance(exc, ConflictError) and self._activated_elsewhere(target):
                exc.policy_switched = True  # another process rolled back to it first: not refused
            if not exc.policy_switched:  # refused: the active version stays, and the log says so
                self._refuse_reload(exc, actor=actor, reason=reason, active=active, rollback_to=target.hash)
            raise
        return {
            "policy_hash": target.hash,
            "org_changed": org_changed,
            "previous_hash": active.hash if active else None,
            # the files under policies/ are not rolled back: a later reload activates them again
            "workspace_policy_hash": self.tree_hash_or_none(),
            "revalidation": report.as_dict(),
        }

    def rolled_back_from(self) -> str | None:
        """The hash the latest activation replaced, if that activation was a rollback (the files
        under policies/ may still hold the version rolled back from)."""
        row = self.store.query_one(
            "SELECT type, payload FROM audit_events WHERE type IN (?, ?) ORDER BY seq DESC LIMIT 1",
            policy.ACTIVATION_EVENTS,
        )
        if row is None or row["type"] != Code.POLICY_ROLLBACK:
            return None
        try:
            previous = json.loads(row["payload"]).get("previous_hash")
        except (ValueError, TypeError, AttributeError):
            return None
        return previous if isinstance(previous, str) else None

    def tree_hash_or_none(self) -> str | None:
        """The hash of the files under policies/, or None when they cannot be read as a policy
        tree: the rollback has happened by then, and reporting it matters more."""
        try:
            return policy.current_tree_hash(self.workspace.policies)
        except (AgovError, OSError):
            return None

    def _ready_to_switch(self) -> Config:
        """The config to judge with, once a key may sign: checked before anything changes, since
        a switch whose revalidation cannot sign would leave every agent bound to the old policy,
        so denied, until someone revalidates.

        Raises:
            KeyMaterialError: no key may sign, or the proof seal key is unusable.
            WorkspaceError: agov.yaml states no readable org limits.
        """
        keyring.active_signer(self.store, self.workspace.keys, self.clock())
        keys.ensure_proof_seal(self.workspace.keys)
        return self._judging_config()

    def _switch(
        self,
        version: PolicyVersion,
        config: Config,
        *,
        event: Code,
        actor: str,
        reason: str,
        progress: Callable[[int], None] | None,
        record: Callable[[], object] | None = None,
    ) -> tuple[RevalidationReport, bool]:
        """Activate in OPA first, then in the store, then revalidate with ``config`` (from
        ``_ready_to_switch``). Between the two steps every decision fails closed, because OPA's
        revision no longer matches the store's. ``record`` (a new version's) is called once OPA
        has loaded the bundle, just before the store switches.

        Returns the run's report, and whether the org limits in agov.yaml differ from those the
        previous policy's last run judged with (audited as ``ORG_LIMITS_CHANGED`` with the run:
        the new policy is not the only thing that judges the agents differently)."""
        previous = policy.active_version(self.store)
        if previous is not None and previous.hash == version.hash:
            # the caller saw another version active: another process has switched meanwhile
            raise ConflictError(
                f"another process activated policy {version.hash[:12]} meanwhile; that process "
                "revalidates the agents under it",
                hint="see `agov policy history`; nothing was changed here",
            )
        org_canonical = canonical_json(dataclasses.asdict(config.org))
        digest = revalidation.org_digest(org_canonical)
        judged = revalidation.judged_org(self.store, previous.hash) if previous else None
        org_changed = judged is not None and judged != digest
        change = revalidation.OrgChange(actor=actor, reason=reason, previous_digest=judged)
        content = policy.bundle_bytes(self.workspace.bundles, version)  # gone: refused, nothing changed
        with self._switch_lock:  # no decision moves the sidecar back to the store's hash meanwhile
            with self._evaluator_lock:
                self._drop_dead_sidecar_locked()
                started = self._evaluator is None and self.config.runtime != "external"
                if started:
                    # no sidecar yet (a CLI process): start one on the new bundle, so that OPA
                    # verifies and loads it before the store names it active
                    self._evaluator = self._start_managed(version)
                # this one, even if a decision drops it meanwhile (it died): activating a dead
                # sidecar fails, and so refuses the switch before the store names the version
                evaluator = self._evaluator
            if not started and evaluator is not None and hasattr(evaluator, "activate"):
                evaluator.activate(content, version.hash)
            elif not started and evaluator is not None:
                evaluator.close()
                with self._evaluator_lock:
                    if self._evaluator is evaluator:
                        self._evaluator = None
            if record is not None:
                record()
            policy.mark_active(
                self.store,
                version.hash,
                event=event,
                actor=actor,
                reason=reason,
                expected_active=previous.hash if previous else None,
                # the run opens with the org limits it judges with: recorded with the switch, so
                # that a start during the run is judged ahead of it even if this process dies now
                run_org=revalidation.RunOrg(org_canonical, change if org_changed else None),
            )
        try:
            report = self.revalidate(
                previous_hash=previous.hash if previous else None,
                progress=progress,
                config=config,
                org_change=None,  # audited with the run it opened, by the switch (mark_active)
            )
        except AgovError as exc:
            # the switch stands (an external OPA fetches bundles itself, so nothing refused it
            # here): say so, or the error reads as a refusal
            message = (
                f"policy {version.hash[:12]} was activated, but revalidating the agents under it stopped: "
                f"{exc.message}"
            )
            finish = ("" if "agov revalidate" in exc.hint else "`agov revalidate` finishes the run; ") + (
                "until then an agent not yet re-signed under the new policy is judged when it starts,"
                " if OPA answers and a key may sign"
            )
            # the way back, should the new policy be what stopped it (not after a rollback: that
            # would name the version just left)
            if previous is not None and event != Code.POLICY_ROLLBACK:
                finish += f"; `agov policy rollback {previous.hash[:12]}` re-activates the previous policy"
            if isinstance(exc, ConflictError):  # another process took over (maybe with another policy)
                finish = ""
            hint = "; ".join(part for part in (exc.hint, finish) if part)
            if not isinstance(exc, InfrastructureError):
                # e.g. the signing key revoked meanwhile: not bad input (the switch changed the
                # store), but something changed under the run
                stopped = ConflictError(message, hint=hint)
                stopped.policy_switched = True
                raise stopped from exc
            exc.message, exc.args, exc.hint = message, (message,), hint
            exc.policy_switched = True
            raise
        return report, org_changed

    def _dry_run_on(self, content: bytes, policy_hash: str) -> RevalidationReport:
        """Evaluate a candidate bundle in a throwaway sidecar: nothing is activated or written."""
        from agov.opa.managed import ManagedSidecar

        bundle_key = keys.ensure_bundle_signing_key(self.workspace.keys)
        with ManagedSidecar(
            bundle_bytes=content,
            revision=policy_hash,
            verification_public_key_pem=bundle_key.public_pem_path.read_bytes(),
            keyid=bundle_key.keyid,
            config=self._evaluator_config(),
            start_timeout_s=self.config.limits.opa_start_timeout_s,
        ) as candidate:
            return self.revalidate(dry_run=True, evaluator=candidate, policy_hash=policy_hash)

    def policy_history(self) -> list[PolicyVersion]:
        return policy.history(self.store)

    def policy_activations(self) -> list[policy.Activation]:
        return policy.activations(self.store)

    def policy_diff(self, a: str, b: str) -> str:
        return policy.diff(self.store, self.workspace.bundles, a, b)

    # -- keys and audit -------------------------------------------------------------------------

    def generate_key(
        self, *, alg: str, actor: str, not_before: datetime | None = None, not_after: datetime | None = None
    ) -> keyring.KeyState:
        return keyring.generate(
            self.store,
            self.workspace.keys,
            alg=alg,
            actor=actor,
            not_before=not_before,
            not_after=not_after,
            now=self.clock(),
        )

    def list_keys(self) -> list[keyring.KeyState]:
        """Every key with its state, and a problem named where its files cannot do what that state
        needs: a signing or staged key must sign (and its proofs verify), a verifying key verify."""
        return [
            dataclasses.replace(state, problem=self._key_files_problem(state))
            for state in keyring.list_keys(self.store, self.clock())
        ]

    def _key_files_problem(self, state: keyring.KeyState) -> str | None:
        try:
            if state.state in ("signing", "staged"):
                keys.load_signer(self.workspace.keys, state.keyid)  # checks the public file too
            elif state.state == "verifying":
                keys.load_trusted_key(self.workspace.keys, state.keyid)
        except KeyMaterialError as exc:
            return exc.message
        return None

    def revoke_key(self, keyid: str, *, reason: str, actor: str) -> keyring.KeyState:
        return keyring.revoke(self.store, keyid, reason=reason, actor=actor, now=self.clock())

    def verify_audit(self) -> audit.AuditReport:
        return audit.verify_chain(self.store)

    def export_audit(self) -> Iterator[str]:
        return audit.export_lines(self.store)


_T = TypeVar("_T")


def _memo(reads: dict[Any, Any], key: Any, load: Callable[[], _T]) -> _T:
    """``load()``, or what it gave under the same store version (failures are never kept)."""
    if key in reads:
        return cast(_T, reads[key])
    value = reads[key] = load()
    return value
