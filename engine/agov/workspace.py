"""A workspace on disk: config, an editable copy of the policies, keys, bundles and the store."""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from agov.config import Config, load_config
from agov.errors import WorkspaceError
from agov.resources import opa_config_template, policies_dir, regal_config
from agov.store import Store

CONFIG_FILE = "agov.yaml"
DB_FILE = "agov.db"
OPA_CONFIG_FILE = "opa-config.yaml"
REGAL_DIR = ".regal"  # Regal finds its config by looking up from the linted directory
ENTRIES = (
    CONFIG_FILE,
    "policies",
    "keys",
    "bundles",
    OPA_CONFIG_FILE,
    REGAL_DIR,
    DB_FILE,
    DB_FILE + "-wal",
    DB_FILE + "-shm",
    DB_FILE + ".audit-anchor",
)


def default_home() -> Path:
    return Path(os.environ.get("AGOV_HOME", ".agov"))


@dataclass(frozen=True)
class Workspace:
    """Paths of one workspace; :meth:`open` checks it exists and loads its config."""

    home: Path
    config: Config

    @property
    def policies(self) -> Path:
        return self.home / "policies"

    @property
    def keys(self) -> Path:
        return self.home / "keys"

    @property
    def bundles(self) -> Path:
        return self.home / "bundles"

    @property
    def db_path(self) -> Path:
        return self.home / DB_FILE

    @property
    def opa_config(self) -> Path:
        return self.home / OPA_CONFIG_FILE

    def store(self, *, check_anchor: bool = True) -> Store:
        return Store(self.db_path, check_anchor=check_anchor)

    @classmethod
    def open(cls, home: Path) -> Workspace:
        """Open an existing workspace.

        Raises:
            WorkspaceError: ``home`` is not an agov workspace.
        """
        present = [name for name in (CONFIG_FILE, DB_FILE) if (home / name).is_file()]
        if not present:
            raise WorkspaceError(
                f"no agov workspace at {home}",
                hint=f"run `agov init {home}` first, or pass --home / set AGOV_HOME",
            )
        if len(present) == 1:  # half a workspace: init would refuse to overwrite the other half
            missing = DB_FILE if present == [CONFIG_FILE] else CONFIG_FILE
            what = "is not a file" if (home / missing).exists() else "is missing"
            raise WorkspaceError(
                f"the agov workspace at {home} has {present[0]}, but its {missing} {what}",
                hint=f"restore {home / missing} from a backup; `agov init` does not overwrite a workspace",
            )
        return cls(home=home, config=load_config(home / CONFIG_FILE))


def collisions(home: Path) -> list[Path]:
    """What `agov init` would overwrite: it refuses to write anything if this is not empty."""
    return [home / name for name in ENTRIES if (home / name).exists()]


def create_layout(home: Path, config: Config) -> Workspace:
    """Write the workspace files (no keys, no bundle: the service layer adds those).

    Raises:
        WorkspaceError: any entry already exists (nothing is written then).
    """
    if home.exists() and not home.is_dir():
        raise WorkspaceError(
            f"{home} exists and is not a directory", hint="choose a directory for the workspace"
        )
    existing = collisions(home)
    if existing:
        listed = ", ".join(str(p) for p in existing)
        # a workspace's store, keys and audit log: never advise removing them
        held = (home / DB_FILE).exists()
        raise WorkspaceError(
            f"refusing to overwrite existing files: {listed}",
            hint=f"{home} holds an agov workspace: use it (--home / AGOV_HOME) or choose another directory;"
            " removing these files would lose its agents, proofs, keys and audit log"
            if held
            else "choose an empty directory, or move these away first",
        )
    created = not home.exists()
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WorkspaceError(
            f"cannot create the workspace directory {home}: {exc.strerror}",
            hint="choose a path whose parent is a directory you may write to",
        ) from exc
    try:
        source = policies_dir()
        shutil.copytree(source, home / "policies", ignore=shutil.ignore_patterns("__pycache__"))
        (home / "keys").mkdir(mode=0o700)
        (home / "bundles").mkdir()
        shutil.copyfile(opa_config_template(), home / OPA_CONFIG_FILE)
        (home / REGAL_DIR).mkdir()
        shutil.copyfile(regal_config(), home / REGAL_DIR / "config.yaml")
        tmp = home / (CONFIG_FILE + ".tmp")
        tmp.write_text(config.to_yaml())
        os.replace(tmp, home / CONFIG_FILE)
        Store(home / DB_FILE).close()
    except BaseException as exc:
        remove_layout(home)  # nothing was there before (checked above): leave nothing behind
        if created:
            with contextlib.suppress(OSError):
                home.rmdir()
        if isinstance(exc, OSError):
            raise WorkspaceError(
                f"cannot write the workspace in {home}: {exc}", hint="check that you may write there"
            ) from exc
        raise
    return Workspace(home=home, config=config)


def remove_layout(home: Path) -> None:
    """Undo :func:`create_layout` after a failed init, so that a retry is not refused."""
    for name in ENTRIES:
        path = home / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
