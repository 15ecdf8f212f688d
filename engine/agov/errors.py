"""One error base class, two families: bad evidence or input, and broken infrastructure.

Only the CLI turns these into exit codes (see ``EXIT_CODES`` there). In any decision path
every one of them ends in a deny.
"""

from __future__ import annotations


class AgovError(Exception):
    """Base of every error agov raises on purpose."""

    hint: str = ""
    # set on an error a reload or rollback raises once the active policy is the one it switches
    # to (its revalidation stopped, or another process activated the same version first): no
    # refusal
    policy_switched: bool = False

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        if hint:
            self.hint = hint

    def in_one_line(self) -> str:
        """The message with its hint, for the reason of a decision that failed closed."""
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message

    def diagnostics(self) -> str:
        """A message a user can act on: what went wrong, then what to do about it."""
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message


# --- bad input or bad evidence (exit 2 outside a decision, deny inside one) ---------------


class UsageError(AgovError):
    """The request itself is malformed: missing file, unknown id, bad option."""


class NotFoundError(UsageError):
    """An agent, version, key or policy that the request names does not exist."""


class WorkspaceError(UsageError):
    """The workspace is missing, or `init` would overwrite something."""


class ConfigError(WorkspaceError):
    """The workspace's agov.yaml cannot be read, or states bad values: in a decision, a deny."""


class SpecError(AgovError):
    """An agent spec that does not parse or does not match the schema."""

    def __init__(self, message: str, *, path: str = "", hint: str = "") -> None:
        super().__init__(f"{path}: {message}" if path else message, hint=hint)
        self.path = path


class ProofError(AgovError):
    """A proof bundle that is malformed or does not match what it claims."""


class SignatureError(ProofError):
    """No trusted key produced a valid signature over the envelope."""


class RevokedSignerError(ProofError):
    """The proof was signed by a key that has since been revoked."""


class ExpiredProofError(ProofError):
    """The proof, or its signer's validity window, has run out."""


class RollbackError(ProofError):
    """An older proof or policy version offered where a newer one is trusted."""


class KeyMaterialError(AgovError):
    """A signing key is missing, unreadable or of the wrong kind."""


class PolicyError(AgovError):
    """A policy that does not compile, fails its tests or cannot be built."""


# --- broken infrastructure (exit 3 outside a decision, deny inside one) --------------------


class InfrastructureError(AgovError):
    """Something agov depends on is broken; the request itself may be fine."""


class EngineUnavailableError(InfrastructureError):
    """OPA could not be reached or did not answer in time."""


class DecisionError(InfrastructureError):
    """OPA answered, but not with a usable decision (no result, wrong type, wrong revision)."""


class ConflictError(InfrastructureError):
    """Another process changed what this operation depends on, after it began: run it again."""


class StoreError(InfrastructureError):
    """The SQLite store failed or holds something it should not."""
