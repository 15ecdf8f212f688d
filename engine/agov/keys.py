"""Key files in a workspace's ``keys/`` directory: proof keys and the OPA bundle signing key.

This is the file adapter for :mod:`agov.proofs`. Private material is written 0600 into a
0700 directory, atomically (temp file, fsync, ``os.replace``), and refused on load when the
group or others can read it. Nothing here logs key material.

Layout::

    <keyid>.ed25519.key        PKCS#8 PEM Ed25519 private key   (0600)
    <keyid>.ed25519.pub        SubjectPublicKeyInfo PEM         (0644)
    <keyid>.hmac.key           hex HMAC-SHA256 secret           (0600)
    bundle-signing.es256.key   PKCS#8 PEM EC P-256 private key  (0600), for `opa build --signing-key`
    bundle-signing.es256.pub   SubjectPublicKeyInfo PEM         (0644), for OPA's `verification-key`
    proof-seal.key             hex HMAC-SHA256 secret           (0600), seals stored proof rows
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import stat
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
    load_pem_public_key,
)

from agov.errors import KeyMaterialError
from agov.proofs import (
    ALGORITHMS,
    HMAC_MIN_SECRET_BYTES,
    Alg,
    ProofSeal,
    ProofSigner,
    TrustedKey,
    ed25519_keyid,
    hmac_keyid,
)

BUNDLE_KEY_NAME = "bundle-signing.es256.key"
BUNDLE_PUB_NAME = "bundle-signing.es256.pub"
PROOF_SEAL_KEY_NAME = "proof-seal.key"
# key files are a few hundred bytes; a cap keeps a stray huge file from being read whole
MAX_KEY_FILE_BYTES = 16 * 1024

_SUFFIX: dict[Alg, str] = {"ed25519": ".ed25519.key", "hmac-sha256": ".hmac.key"}
_KEYID = re.compile(r"[0-9a-f]{64}")
_KEY_FILE = re.compile(r"([0-9a-f]{64})\.(ed25519|hmac)\.key")
_GENERATE_HINT = "generate a new key with `agov keys generate`, or restore the file from backup"


@dataclass(frozen=True)
class KeyInfo:
    """A proof key on disk. ``public_key_path`` is None for HMAC keys, which have no public half."""

    keyid: str
    alg: Alg
    created_at: datetime
    private_key_path: Path
    public_key_path: Path | None


@dataclass(frozen=True)
class BundleKey:
    """The ES256 key pair OPA uses to sign and verify policy bundles."""

    private_pem_path: Path
    public_pem_path: Path
    keyid: str
    alg: str = "ES256"


# --- file primitives --------------------------------------------------------------------------


def _ensure_dir(keys_dir: Path) -> None:
    try:
        if not keys_dir.is_dir():
            keys_dir.mkdir(mode=0o700)
            # mkdir's mode is filtered by the umask; set it outright
            os.chmod(keys_dir, 0o700)
    except OSError as exc:
        raise KeyMaterialError(
            f"cannot create key directory {keys_dir}: {exc.strerror}",
            hint="check that the workspace exists and is writable",
        ) from exc


def _write_atomic(path: Path, data: bytes, mode: int, *, replace: bool = True) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory, then ``os.replace`` it;
    with ``replace=False``, link it into place unless ``path`` exists by then (a second writer
    then keeps the first one's file)."""
    # mkstemp creates the file 0600, so private bytes are never readable by others, even briefly
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise _write_error(path, exc) from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        if replace:
            os.replace(tmp, path)
        else:
            _link_unless_present(tmp, path, data, mode)
    except OSError as exc:
        raise _write_error(path, exc) from exc
    finally:
        with contextlib.suppress(OSError):  # gone already once replaced
            os.unlink(tmp)
    _fsync_dir(path.parent)


def _link_unless_present(tmp: str, path: Path, data: bytes, mode: int) -> None:
    try:
        os.link(tmp, path)
    except FileExistsError:  # another process made it first: use theirs
        pass
    except OSError:  # a filesystem without hard links: O_EXCL, with a moment half-written
        with contextlib.suppress(FileExistsError):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())


def _write_error(path: Path, exc: OSError) -> KeyMaterialError:
    return KeyMaterialError(
        f"cannot write key file {path}: {exc.strerror}",
        hint="check free space and permissions of the key directory",
    )


def _fsync_dir(directory: Path) -> None:
    # makes the rename durable; some filesystems refuse to open a directory, which is harmless
    with contextlib.suppress(OSError):
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _read(path: Path, *, private: bool) -> bytes:
    """Read a key file; a private one must be a regular file that only its owner can read."""
    try:
        # O_NONBLOCK so that a FIFO planted at the path cannot hang the open
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        if path.is_symlink():
            raise KeyMaterialError(
                f"key file {path} is a symbolic link to {os.readlink(path)}, which does not exist",
                hint="restore the file it points to (from your backup of keys/), or replace the link with"
                " the key file",
            ) from exc
        raise KeyMaterialError(f"key file {path} does not exist", hint=_GENERATE_HINT) from exc
    except OSError as exc:
        raise KeyMaterialError(
            f"cannot open key file {path}: {exc.strerror}", hint="check the file's owner and permissions"
        ) from exc
    try:
        # stat the open descriptor, not the path, so the file checked is the file read
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyMaterialError(
                f"key file {path} is not a regular file",
                hint="move whatever is at that path aside and restore the key file",
            )
        if private and st.st_mode & 0o077:
            raise KeyMaterialError(
                f"private key file {path} is accessible by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o})",
                hint=f"run `chmod 600 {path}`, and rotate the key if anyone else could have read it",
            )
        if st.st_size > MAX_KEY_FILE_BYTES:
            raise KeyMaterialError(
                f"key file {path} is {st.st_size} bytes, too large to be a key", hint=_GENERATE_HINT
            )
        with os.fdopen(os.dup(fd), "rb") as fh:
            return fh.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise KeyMaterialError(
            f"cannot read key file {path}: {exc.strerror}", hint="check the file's owner and permissions"
        ) from exc
    finally:
        os.close(fd)


def _present(path: Path) -> bool:
    """Something is at ``path``, a symbolic link that points nowhere included: such a link is a
    key file gone missing (reported when it is read), never a free name to write a new key to.

    Raises:
        KeyMaterialError: whether anything is there cannot be known (no permission on the key
            directory): neither "missing" nor a free name to write a new key to.
    """
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    except NotADirectoryError:
        return False
    except OSError as exc:
        raise KeyMaterialError(
            f"cannot look for key file {path}: {exc.strerror or exc}",
            hint=f"check the owner and permissions of {path.parent} (agov needs to read it)",
        ) from exc
    return True


def _check_keyid(keyid: str) -> None:
    # key ids become file names: only the exact hex form, so no path can be smuggled in
    if not isinstance(keyid, str) or not _KEYID.fullmatch(keyid):
        raise KeyMaterialError(
            f"not a proof key id: {keyid!r}",
            hint="a key id is 64 lowercase hex characters; see `agov keys list`",
        )


def _find_private(keys_dir: Path, keyid: str) -> tuple[Alg, Path]:
    _check_keyid(keyid)
    found = [
        (alg, keys_dir / f"{keyid}{suffix}")
        for alg, suffix in _SUFFIX.items()
        if _present(keys_dir / f"{keyid}{suffix}")
    ]
    if not found:
        raise KeyMaterialError(
            f"no key {keyid} in {keys_dir}", hint="see `agov keys list` for the keys in this workspace"
        )
    if len(found) > 1:
        raise KeyMaterialError(
            f"key {keyid} has both an Ed25519 and an HMAC file in {keys_dir}",
            hint="remove the file that does not belong",
        )
    return found[0]


# --- parsing ----------------------------------------------------------------------------------


def _load_ed25519_private(path: Path, data: bytes) -> Ed25519PrivateKey:
    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # no chained cause: a parser's message could quote bytes of the secret
        raise KeyMaterialError(
            f"key file {path} is not a readable unencrypted PEM private key", hint=_GENERATE_HINT
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyMaterialError(
            f"key file {path} holds a {type(key).__name__}, not an Ed25519 key", hint=_GENERATE_HINT
        )
    return key


def _load_hmac_secret(path: Path, data: bytes) -> bytes:
    try:
        secret = bytes.fromhex(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        # no chained cause: UnicodeDecodeError quotes the offending byte of the secret
        raise KeyMaterialError(f"key file {path} is not a hex HMAC secret", hint=_GENERATE_HINT) from None
    if len(secret) < HMAC_MIN_SECRET_BYTES:
        raise KeyMaterialError(
            f"HMAC secret in {path} is {len(secret)} bytes, shorter than {HMAC_MIN_SECRET_BYTES}",
            hint=_GENERATE_HINT,
        )
    return secret


def _pkcs8(key: Ed25519PrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _expect_keyid(path: Path, keyid: str, derived: str) -> None:
    if derived != keyid:
        raise KeyMaterialError(
            f"key file {path} holds key {derived}, not the {keyid} its name says",
            hint="rename or remove the file; never edit key files by hand",
        )


# --- proof keys -------------------------------------------------------------------------------


def generate_proof_key(keys_dir: Path, alg: str = "ed25519", *, now: datetime | None = None) -> KeyInfo:
    """Create a new proof signing key in ``keys_dir``.

    Args:
        keys_dir: the workspace's ``keys/`` directory; created 0700 if missing.
        alg: ``"ed25519"`` (default) or ``"hmac-sha256"``.
        now: creation time to report; defaults to the current UTC time.

    Returns:
        The new key's id, algorithm, creation time and file paths.

    Raises:
        KeyMaterialError: unknown algorithm, or the files cannot be written.
    """
    if alg not in ALGORITHMS:
        raise KeyMaterialError(f"unknown key algorithm {alg!r}", hint=f"use one of {', '.join(ALGORITHMS)}")
    created_at = now if now is not None else datetime.now(UTC)
    _ensure_dir(keys_dir)
    if alg == "ed25519":
        private = Ed25519PrivateKey.generate()
        keyid = ed25519_keyid(_raw_public(private.public_key()))
        key_path = keys_dir / f"{keyid}.ed25519.key"
        pub_path = keys_dir / f"{keyid}.ed25519.pub"
        # the public half first: a .key file on disk then always has its .pub beside it
        public_pem = private.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
        _write_atomic(pub_path, public_pem, 0o644)
        _write_atomic(key_path, _pkcs8(private), 0o600)
        return KeyInfo(
            keyid=keyid,
            alg="ed25519",
            created_at=created_at,
            private_key_path=key_path,
            public_key_path=pub_path,
        )
    secret = secrets.token_bytes(HMAC_MIN_SECRET_BYTES)
    keyid = hmac_keyid(secret)
    key_path = keys_dir / f"{keyid}.hmac.key"
    _write_atomic(key_path, secret.hex().encode("ascii") + b"\n", 0o600)
    return KeyInfo(
        keyid=keyid, alg="hmac-sha256", created_at=created_at, private_key_path=key_path, public_key_path=None
    )


def load_signer(keys_dir: Path, keyid: str) -> ProofSigner:
    """Load the signer for ``keyid`` from ``keys_dir``.

    Raises:
        KeyMaterialError: the key id is malformed, the file is missing, unreadable, readable
            by group or others, corrupt, or holds a different key than its name says; or the
            public file of an Ed25519 key is (admission verifies with it).
    """
    alg, path = _find_private(keys_dir, keyid)
    data = _read(path, private=True)
    if alg == "ed25519":
        private = _load_ed25519_private(path, data)
        _expect_keyid(path, keyid, ed25519_keyid(_raw_public(private.public_key())))
        try:  # admission verifies with the public file: a proof nothing can verify is no proof
            load_trusted_key(keys_dir, keyid)
        except KeyMaterialError as exc:
            raise KeyMaterialError(
                f"the signing key {keyid[:12]} may not sign: admission could not verify what it "
                f"signs, because {exc.message}",
                hint=exc.hint,
            ) from exc
        return ProofSigner.ed25519(private)
    secret = _load_hmac_secret(path, data)
    _expect_keyid(path, keyid, hmac_keyid(secret))
    return ProofSigner.hmac(secret)


def load_trusted_key(
    keys_dir: Path,
    keyid: str,
    *,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    revoked_at: datetime | None = None,
) -> TrustedKey:
    """Load the verifying half of ``keyid``: the public key for Ed25519, the secret for HMAC.

    Args:
        keys_dir: the workspace's ``keys/`` directory.
        keyid: the key to load.
        not_before: start of the window in which the key may sign (inclusive), or None.
        not_after: end of that window (inclusive), or None.
        revoked_at: when the key was revoked, or None; proofs are refused from that time on.

    Raises:
        KeyMaterialError: the key id is malformed, no file for it exists, or a file is
            unreadable, corrupt, too permissive (HMAC secrets) or holds another key.
        ProofError: a datetime is not timezone-aware.
    """
    _check_keyid(keyid)
    pub_path = keys_dir / f"{keyid}.ed25519.pub"
    if _present(pub_path):
        data = _read(pub_path, private=False)
        try:
            public = load_pem_public_key(data)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise KeyMaterialError(
                f"key file {pub_path} is not a readable PEM public key", hint=_GENERATE_HINT
            ) from exc
        if not isinstance(public, Ed25519PublicKey):
            raise KeyMaterialError(
                f"key file {pub_path} holds a {type(public).__name__}, not an Ed25519 key",
                hint=_GENERATE_HINT,
            )
        raw = _raw_public(public)
        _expect_keyid(pub_path, keyid, ed25519_keyid(raw))
        return TrustedKey(
            keyid, "ed25519", raw, not_before=not_before, not_after=not_after, revoked_at=revoked_at
        )
    alg, path = _find_private(keys_dir, keyid)
    if alg == "ed25519":
        raise KeyMaterialError(
            f"public key file {pub_path} is missing",
            hint=f"export it again from {path} or restore it from backup",
        )
    secret = _load_hmac_secret(path, _read(path, private=True))
    _expect_keyid(path, keyid, hmac_keyid(secret))
    return TrustedKey(
        keyid, "hmac-sha256", secret, not_before=not_before, not_after=not_after, revoked_at=revoked_at
    )


def list_key_files(keys_dir: Path) -> list[KeyInfo]:
    """The proof keys in ``keys_dir``, sorted by key id; empty if the directory does not exist.

    Files are recognized by name only; contents are checked when a key is loaded.
    ``created_at`` is the private file's modification time.

    Raises:
        KeyMaterialError: the directory exists but cannot be listed.
    """
    try:
        names = sorted(os.listdir(keys_dir))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise KeyMaterialError(
            f"cannot list key directory {keys_dir}: {exc.strerror}",
            hint="check the directory's owner and permissions (0700)",
        ) from exc
    out: list[KeyInfo] = []
    for name in names:
        match = _KEY_FILE.fullmatch(name)
        if match is None:
            continue
        keyid, kind = match.groups()
        alg: Alg = "ed25519" if kind == "ed25519" else "hmac-sha256"
        path = keys_dir / name
        try:
            mtime = path.stat().st_mtime
        except OSError:
            continue  # removed while listing
        pub = keys_dir / f"{keyid}.ed25519.pub" if alg == "ed25519" else None
        out.append(
            KeyInfo(
                keyid=keyid,
                alg=alg,
                created_at=datetime.fromtimestamp(mtime, UTC),
                private_key_path=path,
                public_key_path=pub,
            )
        )
    return out


# --- OPA bundle signing key -------------------------------------------------------------------


def bundle_keyid(public_der: bytes) -> str:
    """``agov-bundle-`` and the first 16 hex digits of SHA-256 over the public key's DER."""
    return "agov-bundle-" + hashlib.sha256(public_der).hexdigest()[:16]


def ensure_bundle_signing_key(keys_dir: Path, *, create: bool = True) -> BundleKey:
    """Return the ES256 bundle signing key pair, creating it when there is none (and ``create``:
    a bundle already built needs the key that signed it, and a new one would only make OPA
    refuse it).

    OPA signs bundles with JWS and has no EdDSA there, hence P-256. The private key is
    PKCS#8 PEM, which ``opa build --signing-key ... --signing-alg ES256`` accepts (checked
    with OPA 1.x, as is SEC1). A missing public file is rewritten from the private key.

    Raises:
        KeyMaterialError: the private key is unreadable, corrupt, not P-256, too permissive,
            or missing while its public key exists (which would silently change the key
            OPA trusts).
    """
    key_path = keys_dir / BUNDLE_KEY_NAME
    pub_path = keys_dir / BUNDLE_PUB_NAME
    _ensure_dir(keys_dir)
    if _present(key_path):
        data = _read(key_path, private=True)
        try:
            private = load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise KeyMaterialError(
                f"key file {key_path} is not a readable unencrypted PEM private key",
                hint=f"remove {key_path} and {pub_path} to generate a new pair, then "
                "redistribute the public key to every OPA",
            ) from None
        if not isinstance(private, ec.EllipticCurvePrivateKey) or not isinstance(private.curve, ec.SECP256R1):
            raise KeyMaterialError(
                f"key file {key_path} is not an EC P-256 key, which ES256 needs",
                hint=f"remove {key_path} and {pub_path} to generate a new pair",
            )
    elif _present(pub_path):
        raise KeyMaterialError(
            f"bundle public key {pub_path} exists but its private key {key_path} is missing",
            hint="restore the private key, or remove the public key to start a new pair "
            "and redistribute it to every OPA",
        )
    elif not create:
        raise KeyMaterialError(
            f"the bundle signing key {key_path} and its public key are missing, so no OPA can "
            "verify the policy bundles signed with them",
            hint="restore keys/ from a backup of the workspace, or run `agov policy build` to "
            "make a new pair and sign the active policy's bundle with it",
        )
    else:
        private = ec.generate_private_key(ec.SECP256R1())
        _write_atomic(key_path, _pkcs8(private), 0o600)
    public = private.public_key()
    der = public.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    if _present(pub_path):
        data = _read(pub_path, private=False)
        try:
            on_disk = load_pem_public_key(data).public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise KeyMaterialError(
                f"bundle public key {pub_path} is not a readable PEM public key",
                hint=f"remove {pub_path} to rewrite it from the private key",
            ) from exc
        if on_disk != der:
            raise KeyMaterialError(
                f"bundle public key {pub_path} does not match {key_path}",
                hint=f"remove {pub_path} to rewrite it from the private key",
            )
    else:
        _write_atomic(pub_path, public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo), 0o644)
    return BundleKey(private_pem_path=key_path, public_pem_path=pub_path, keyid=bundle_keyid(der))


# --- proof seal key ---------------------------------------------------------------------------


def existing_proof_seal(keys_dir: Path) -> ProofSeal:
    """The workspace's proof seal, whose key must exist already: for a start that renews its
    proof ahead of a revalidation run, which writes no key material.

    Raises:
        KeyMaterialError: the key file is missing, or as :func:`ensure_proof_seal`.
    """
    path = keys_dir / PROOF_SEAL_KEY_NAME
    if not _present(path):
        raise KeyMaterialError(
            f"the proof seal key {path} is missing", hint="`agov revalidate` writes a new one"
        )
    return ensure_proof_seal(keys_dir, create=False)


def ensure_proof_seal(keys_dir: Path, *, create: bool = True) -> ProofSeal:
    """The workspace's proof seal (see :class:`agov.proofs.ProofSeal`), its key created when there
    is none. Two processes that create it at once end with the one key the first one linked into
    place: the file is never replaced once it exists. With ``create=False`` (a dry run, which
    writes nothing) a missing key gives a throwaway seal, which no stored row carries, as a new
    key would not.

    Raises:
        KeyMaterialError: the key file is unreadable, readable by others, or not a hex secret of
            at least 32 bytes.
    """
    path = keys_dir / PROOF_SEAL_KEY_NAME
    if not _present(path):
        if not create:
            return ProofSeal(secrets.token_bytes(32))
        _ensure_dir(keys_dir)
        _write_atomic(path, secrets.token_hex(32).encode() + b"\n", 0o600, replace=False)
    data = _read(path, private=True)
    try:
        secret = bytes.fromhex(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        secret = b""
    if len(secret) < HMAC_MIN_SECRET_BYTES:
        raise KeyMaterialError(
            f"proof seal key {path} is not a hex secret of at least {HMAC_MIN_SECRET_BYTES} bytes",
            hint=f"remove {path}: agov writes a new one, and verifies each stored proof in full once"
            " before sealing it again",
        )
    return ProofSeal(secret)
