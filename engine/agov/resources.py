"""Where the files that ship with agov live: the default policies, schemas and templates.

In a source checkout (editable install) they are the repository's ``policies/``; in a wheel they
are packaged as ``agov/_policies``.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def policies_dir() -> Path:
    """The default policy tree (``agov/…`` packages plus ``schemas/``)."""
    packaged = _PACKAGE_DIR / "_policies"
    if packaged.is_dir():
        return packaged
    return _PACKAGE_DIR.parents[1] / "policies"


def schema_path(name: str) -> Path:
    return policies_dir() / "schemas" / name


def templates_dir() -> Path:
    return _PACKAGE_DIR / "templates"


def opa_config_template() -> Path:
    """The sidecar config a deployment starts from (``opa-config.yaml`` at the repository root)."""
    packaged = _PACKAGE_DIR / "_opa-config.yaml"
    return packaged if packaged.is_file() else _PACKAGE_DIR.parents[1] / "opa-config.yaml"


def regal_config() -> Path:
    """The Regal config agov's own policies are linted with (``.regal/config.yaml``), which a
    workspace's copy of them needs too: `regal lint $AGOV_HOME/policies` finds it above them."""
    packaged = _PACKAGE_DIR / "_regal-config.yaml"
    return packaged if packaged.is_file() else _PACKAGE_DIR.parents[1] / ".regal" / "config.yaml"
