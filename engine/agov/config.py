"""Workspace configuration (``agov.yaml``): a frozen dataclass with explicit limits."""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from agov.errors import ConfigError

MAX_TIMEOUT_S = 300.0  # the longest deadline any one call to OPA may have
# The spec bytes one revalidation query carries at most (half of the evaluator's 8 MiB request
# limit): no stored spec may be larger, or no query could judge it.
MAX_SPEC_BYTES = 4 * 1024 * 1024
_MAX_COUNT = 2**31 - 1
_MAX_TTL_DAYS = 36_500  # a century: far from datetime's year 9999
# libyaml's parser where PyYAML has it (its wheels do): the same documents, about 7x faster
# than the pure-Python one, and agov.yaml is read on every command and judged start.
_YAML_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True)
class Limits:
    """Bounds on work and input sizes; every one of them is enforced, none is advisory."""

    max_spec_bytes: int = 256 * 1024
    max_proof_bytes: int = 64 * 1024
    opa_timeout_s: float = 2.0  # one decision: admission, promotion
    opa_start_timeout_s: float = 20.0
    revalidation_chunk_size: int = 1000
    # one revalidation chunk query (up to revalidation_chunk_size agents in one evaluation)
    revalidation_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        """Every limit is a positive finite number (a whole one where it counts things or bytes),
        however the config was made: a chunk size of 0 would revalidate nobody.

        Raises:
            ValueError: naming the limit (``load_config`` reports it as a ``ConfigError``).
        """
        hints = get_type_hints(Limits)
        for f in fields(self):
            value = getattr(self, f.name)
            whole = hints[f.name] is int
            if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)):
                raise ValueError(f"{f.name} must be a {'whole ' if whole else ''}number, not {value!r}")
            if not (value > 0 and (isinstance(value, int) or math.isfinite(value))):
                raise ValueError(f"{f.name} must be positive, not {value!r}")
            if whole and value > _MAX_COUNT:  # far inside what SQLite (64-bit) and Python sizes take
                raise ValueError(f"{f.name} must be at most {_MAX_COUNT}")
        for name in ("opa_timeout_s", "revalidation_timeout_s"):
            if getattr(self, name) > MAX_TIMEOUT_S:
                raise ValueError(f"{name} must be at most {MAX_TIMEOUT_S:g} s")
        if self.max_spec_bytes > MAX_SPEC_BYTES:
            raise ValueError(
                f"max_spec_bytes must be at most {MAX_SPEC_BYTES} (what one revalidation query carries)"
            )


@dataclass(frozen=True)
class OrgLimits:
    """Organisation limits passed to the promotion policy as ``input.org``."""

    max_monthly_budget_usd: float = 1000.0

    def __post_init__(self) -> None:
        """Raises: ValueError: not a finite number >= 0 (a typo would otherwise deny everyone)."""
        value = self.max_monthly_budget_usd
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < 0
        ):
            raise ValueError(f"max_monthly_budget_usd must be a number >= 0, not {value!r}")


@dataclass(frozen=True)
class Config:
    """What ``agov.yaml`` holds. Unknown keys are refused so that typos do not pass silently."""

    workspace: str = "default"
    runtime: str = "managed"  # managed | external
    opa_url: str | None = None
    opa_token: str | None = None
    opa_ca_file: str | None = None
    opa_client_cert: str | None = None
    opa_client_key: str | None = None
    sandbox_ttl_days: int = 30
    proof_ttl_days: int | None = 365
    org: OrgLimits = field(default_factory=OrgLimits)
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        """Raises: ValueError: a lifetime that is not a whole number of days in range; for
        ``proof_ttl_days``, None (not 0) is the way to say that proofs do not expire."""
        for name in ("sandbox_ttl_days", "proof_ttl_days"):
            value = getattr(self, name)
            if value is None and name == "proof_ttl_days":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= _MAX_TTL_DAYS:
                never = " (or null: proofs never expire)" if name == "proof_ttl_days" else ""
                raise ValueError(
                    f"{name} must be a whole number of days in 1..{_MAX_TTL_DAYS}{never}, not {value!r}"
                )

    def to_yaml(self) -> str:
        return yaml.safe_dump(asdict(self), sort_keys=False)


def _build(cls: type[Any], raw: Any, where: str) -> Any:
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}", hint=f"known: {', '.join(known)}")
    values: dict[str, Any] = {}
    for name, value in raw.items():
        nested = {"org": OrgLimits, "limits": Limits}.get(name) if cls is Config else None
        values[name] = _build(nested, value, f"{where}.{name}") if nested else value
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def load_config(path: Path, *, require_org: bool = False) -> Config:
    """Read ``agov.yaml``.

    ``require_org``: the file must state the org limits itself. Limits that judge agents are
    never taken from the defaults of an empty or half-written file.

    Raises:
        ConfigError: unreadable, unparseable, or holding unknown keys or bad values; or, with
            ``require_org``, stating no org limits.
    """
    try:
        text = path.read_text(encoding="utf-8") if path.exists() else None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    return _parsed(text, path, require_org=require_org)


@functools.lru_cache(maxsize=8)  # keyed by the text itself: an edit is never served stale
def _parsed(text: str | None, path: Path, *, require_org: bool) -> Config:
    """The frozen Config that ``text`` (agov.yaml at ``path``) states; see load_config."""
    try:
        raw = None if text is None else yaml.load(text, Loader=_YAML_LOADER)
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    if require_org and not (isinstance(raw, dict) and isinstance(raw.get("org"), dict) and raw["org"]):
        raise ConfigError(
            f"{path} states no org limits (empty, or caught mid-save?): agents are not judged with defaults",
            hint="write the org section (max_monthly_budget_usd) back, then retry",
        )
    config: Config = _build(Config, raw, str(path.name))
    if config.runtime not in ("managed", "external"):
        raise ConfigError(f"{path.name}: runtime must be 'managed' or 'external', not {config.runtime!r}")
    return config
