"""Key files: permissions, atomic writes, round trips, corrupt or exposed material, bundle key."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
    load_pem_public_key,
)

from agov import keys, proofs
from agov.errors import KeyMaterialError, RevokedSignerError
from agov.proofs import ProofClaims, sign_proof, verify_proof

T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
REPO = Path(__file__).resolve().parents[2]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(autouse=True)
def permissive_umask() -> Iterator[None]:
    # the modes written must not depend on the caller's umask
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    return tmp_path / "keys"


def claims() -> ProofClaims:
    h = hashlib.sha256(b"x").hexdigest()
    return ProofClaims("a1", "1", h, h, "d1", h, "alice", "approver", "GOVERNED_VALID", T0, None)


# --- generate, load, round trip ---------------------------------------------------------------


def test_generate_ed25519_modes_and_round_trip(keys_dir: Path) -> None:
    info = keys.generate_proof_key(keys_dir, now=T0)
    assert info.alg == "ed25519" and info.created_at == T0
    assert info.private_key_path == keys_dir / f"{info.keyid}.ed25519.key"
    assert info.public_key_path == keys_dir / f"{info.keyid}.ed25519.pub"
    modes = {"dir": mode(keys_dir), "key": mode(info.private_key_path), "pub": mode(info.public_key_path)}
    print(f"keys perms (ed25519): {', '.join(f'{k}={v:04o}' for k, v in modes.items())}")
    assert modes == {"dir": 0o700, "key": 0o600, "pub": 0o644}
    assert info.private_key_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert sorted(p.name for p in keys_dir.iterdir()) == sorted(
        [info.private_key_path.name, info.public_key_path.name]
    )  # no temp files left behind

    signer = keys.load_signer(keys_dir, info.keyid)
    trusted = keys.load_trusted_key(keys_dir, info.keyid, not_before=T0 - timedelta(days=1))
    assert signer.keyid == trusted.keyid == info.keyid
    assert trusted.alg == "ed25519" and trusted.not_before == T0 - timedelta(days=1)
    # the key id is SHA-256 of the raw public key
    public = load_pem_public_key(info.public_key_path.read_bytes())
    assert info.keyid == hashlib.sha256(public.public_bytes(Encoding.Raw, PublicFormat.Raw)).hexdigest()
    assert verify_proof(sign_proof(claims(), signer), {trusted.keyid: trusted}, T0).claims == claims()


def test_generate_hmac_modes_and_round_trip(keys_dir: Path) -> None:
    info = keys.generate_proof_key(keys_dir, "hmac-sha256")
    assert info.alg == "hmac-sha256" and info.public_key_path is None
    assert info.private_key_path.name == f"{info.keyid}.hmac.key"
    print(f"keys perms (hmac): dir={mode(keys_dir):04o}, key={mode(info.private_key_path):04o}")
    assert (mode(keys_dir), mode(info.private_key_path)) == (0o700, 0o600)
    secret_hex = info.private_key_path.read_text().strip()
    assert len(bytes.fromhex(secret_hex)) == 32
    assert secret_hex not in info.keyid  # the id is not the secret

    signer = keys.load_signer(keys_dir, info.keyid)
    trusted = keys.load_trusted_key(keys_dir, info.keyid, revoked_at=T0)
    envelope = sign_proof(claims(), signer)
    assert verify_proof(envelope, {trusted.keyid: trusted}, T0 - timedelta(seconds=1)).keyid == info.keyid
    with pytest.raises(RevokedSignerError):
        verify_proof(envelope, {trusted.keyid: trusted}, T0)


def test_generate_rejects_unknown_algorithm(keys_dir: Path) -> None:
    with pytest.raises(KeyMaterialError, match="unknown key algorithm 'rsa'"):
        keys.generate_proof_key(keys_dir, "rsa")
    assert not keys_dir.exists()


def test_generate_needs_the_workspace(tmp_path: Path) -> None:
    with pytest.raises(KeyMaterialError, match="cannot create key directory"):
        keys.generate_proof_key(tmp_path / "no-workspace" / "keys")


def test_list_key_files(keys_dir: Path) -> None:
    assert keys.list_key_files(keys_dir) == []
    a = keys.generate_proof_key(keys_dir)
    b = keys.generate_proof_key(keys_dir, "hmac-sha256")
    keys.ensure_bundle_signing_key(keys_dir)
    (keys_dir / "README").write_text("not a key")
    listed = keys.list_key_files(keys_dir)
    assert [(k.keyid, k.alg) for k in listed] == sorted([(a.keyid, a.alg), (b.keyid, b.alg)])
    assert {k.keyid: k.public_key_path for k in listed} == {a.keyid: a.public_key_path, b.keyid: None}
    assert all(k.created_at.tzinfo is UTC for k in listed)


def test_failed_write_leaves_nothing(keys_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(KeyMaterialError, match=r"cannot write key file .*No space left on device"):
        keys.generate_proof_key(keys_dir, "hmac-sha256")
    assert list(keys_dir.iterdir()) == []


# --- refused key material ---------------------------------------------------------------------


@pytest.fixture
def ed_key(keys_dir: Path) -> keys.KeyInfo:
    return keys.generate_proof_key(keys_dir)


@pytest.fixture
def hmac_key(keys_dir: Path) -> keys.KeyInfo:
    return keys.generate_proof_key(keys_dir, "hmac-sha256")


@pytest.mark.parametrize("perm", [0o640, 0o604, 0o660, 0o644, 0o666])
def test_group_or_other_readable_private_key_is_refused(
    perm: int, keys_dir: Path, ed_key: keys.KeyInfo, hmac_key: keys.KeyInfo
) -> None:
    for info in (ed_key, hmac_key):
        os.chmod(info.private_key_path, perm)
        expected = rf"accessible by group or others \(mode {perm:04o}\)"
        with pytest.raises(KeyMaterialError, match=expected) as exc:
            keys.load_signer(keys_dir, info.keyid)
        assert "chmod 600" in exc.value.diagnostics()
    # the HMAC secret is also what verifies, so its trust entry is refused the same way
    with pytest.raises(KeyMaterialError, match="accessible by group or others"):
        keys.load_trusted_key(keys_dir, hmac_key.keyid)
    # an Ed25519 trust entry needs only the public file
    assert keys.load_trusted_key(keys_dir, ed_key.keyid).keyid == ed_key.keyid


def _write(path: Path, data: bytes, perm: int = 0o600) -> None:
    path.write_bytes(data)
    os.chmod(path, perm)


def _replace_with_fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path, 0o600)


def _pub(info: keys.KeyInfo) -> Path:
    assert info.public_key_path is not None
    return info.public_key_path


def test_corrupt_and_mismatched_files(tmp_path: Path) -> None:
    ec_pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    Case = tuple[str, Callable[..., object], Callable[..., object], str]
    # each: (name, damage(d, ed, hm, other), load(d, ed, hm, other), expected message)
    cases: list[Case] = [
        (
            "garbage private key",
            lambda d, ed, hm, o: _write(ed.private_key_path, b"not a key"),
            lambda d, ed, hm, o: keys.load_signer(d, ed.keyid),
            "is not a readable unencrypted PEM private key",
        ),
        (
            "truncated private key",
            lambda d, ed, hm, o: _write(ed.private_key_path, ed.private_key_path.read_bytes()[:60]),
            lambda d, ed, hm, o: keys.load_signer(d, ed.keyid),
            "is not a readable unencrypted PEM private key",
        ),
        (
            "another key under this name",
            lambda d, ed, hm, o: _write(ed.private_key_path, o.private_key_path.read_bytes()),
            lambda d, ed, hm, o: keys.load_signer(d, ed.keyid),
            r"holds key [0-9a-f]{64}, not the",
        ),
        (
            "private file is a directory",
            lambda d, ed, hm, o: (ed.private_key_path.unlink(), ed.private_key_path.mkdir(mode=0o700)),
            lambda d, ed, hm, o: keys.load_signer(d, ed.keyid),
            "is not a regular file",
        ),
        (
            "private file is a FIFO",
            lambda d, ed, hm, o: _replace_with_fifo(ed.private_key_path),
            lambda d, ed, hm, o: keys.load_signer(d, ed.keyid),
            "is not a regular file",
        ),
        (
            "oversized key file",
            lambda d, ed, hm, o: _write(ed.private_key_path, b"A" * (keys.MAX_KEY_FILE_BYTES + 1)),
            lambda d, ed, hm, o: keys.load_signer(d, ed.keyid),
            "too large to be a key",
        ),
        (
            "hmac not hex",
            lambda d, ed, hm, o: _write(hm.private_key_path, b"zz" * 32),
            lambda d, ed, hm, o: keys.load_signer(d, hm.keyid),
            "is not a hex HMAC secret",
        ),
        (
            "hmac too short",
            lambda d, ed, hm, o: _write(hm.private_key_path, b"00" * 8),
            lambda d, ed, hm, o: keys.load_signer(d, hm.keyid),
            "8 bytes, shorter than 32",
        ),
        (
            "hmac secret changed",
            lambda d, ed, hm, o: _write(hm.private_key_path, b"11" * 32),
            lambda d, ed, hm, o: keys.load_trusted_key(d, hm.keyid),
            r"holds key [0-9a-f]{64}, not the",
        ),
        (
            "garbage public key",
            lambda d, ed, hm, o: _write(_pub(ed), b"junk", 0o644),
            lambda d, ed, hm, o: keys.load_trusted_key(d, ed.keyid),
            "is not a readable PEM public key",
        ),
        (
            "EC public key",
            lambda d, ed, hm, o: _write(_pub(ed), ec_pem, 0o644),
            lambda d, ed, hm, o: keys.load_trusted_key(d, ed.keyid),
            "holds a .*, not an Ed25519 key",
        ),
        (
            "another public key under this name",
            lambda d, ed, hm, o: _write(_pub(ed), _pub(o).read_bytes(), 0o644),
            lambda d, ed, hm, o: keys.load_trusted_key(d, ed.keyid),
            r"holds key [0-9a-f]{64}, not the",
        ),
        (
            "public key missing",
            lambda d, ed, hm, o: _pub(ed).unlink(),
            lambda d, ed, hm, o: keys.load_trusted_key(d, ed.keyid),
            r"public key file .*\.pub is missing",
        ),
        (
            "both algorithms under one id",
            lambda d, ed, hm, o: _write(d / f"{ed.keyid}.hmac.key", b"00" * 32),
            lambda d, ed, hm, o: keys.load_signer(d, ed.keyid),
            "both an Ed25519 and an HMAC file",
        ),
        (
            "private key deleted",
            lambda d, ed, hm, o: hm.private_key_path.unlink(),
            lambda d, ed, hm, o: keys.load_signer(d, hm.keyid),
            "no key [0-9a-f]{64} in",
        ),
        (
            "unknown key id",
            lambda d, ed, hm, o: None,
            lambda d, ed, hm, o: keys.load_signer(d, "0" * 64),
            "no key 0{64} in",
        ),
        (
            "path in key id",
            lambda d, ed, hm, o: None,
            lambda d, ed, hm, o: keys.load_signer(d, "../../etc/passwd"),
            "not a proof key id",
        ),
        (
            "uppercase key id",
            lambda d, ed, hm, o: None,
            lambda d, ed, hm, o: keys.load_trusted_key(d, ed.keyid.upper()),
            "not a proof key id",
        ),
    ]
    refused = 0
    for i, (name, damage, load, match) in enumerate(cases):
        d = tmp_path / f"keys{i}"
        ed, hm, other = (
            keys.generate_proof_key(d),
            keys.generate_proof_key(d, "hmac-sha256"),
            keys.generate_proof_key(d),
        )
        secret_hex = hm.private_key_path.read_text().strip()
        damage(d, ed, hm, other)
        with pytest.raises(KeyMaterialError, match=match) as exc:
            load(d, ed, hm, other)
        assert secret_hex not in exc.value.diagnostics(), name  # never echo a secret
        assert exc.value.__cause__ is None or secret_hex not in str(exc.value.__cause__), name
        assert exc.value.hint or "key id" in exc.value.message, name
        refused += 1
    print(f"keys: corrupt, mismatched or misnamed material refused {refused}/{len(cases)}")
    assert refused == len(cases)


# --- OPA bundle signing key -------------------------------------------------------------------


def test_bundle_signing_key_created_once(keys_dir: Path) -> None:
    bk = keys.ensure_bundle_signing_key(keys_dir)
    assert bk.private_pem_path == keys_dir / "bundle-signing.es256.key"
    assert bk.public_pem_path == keys_dir / "bundle-signing.es256.pub"
    assert (mode(keys_dir), mode(bk.private_pem_path), mode(bk.public_pem_path)) == (0o700, 0o600, 0o644)
    private = load_pem_private_key(bk.private_pem_path.read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP256R1)
    der = private.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    assert bk.keyid == "agov-bundle-" + hashlib.sha256(der).hexdigest()[:16]
    before = bk.private_pem_path.read_bytes()
    assert keys.ensure_bundle_signing_key(keys_dir) == bk
    assert bk.private_pem_path.read_bytes() == before
    # a lost public half is rewritten from the private key
    bk.public_pem_path.unlink()
    assert keys.ensure_bundle_signing_key(keys_dir) == bk
    assert (
        load_pem_public_key(bk.public_pem_path.read_bytes()).public_bytes(
            Encoding.DER, PublicFormat.SubjectPublicKeyInfo
        )
        == der
    )


def test_bundle_signing_key_refusals(keys_dir: Path) -> None:
    bk = keys.ensure_bundle_signing_key(keys_dir)
    os.chmod(bk.private_pem_path, 0o640)
    with pytest.raises(KeyMaterialError, match="accessible by group or others"):
        keys.ensure_bundle_signing_key(keys_dir)
    os.chmod(bk.private_pem_path, 0o600)

    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    _write(bk.public_pem_path, other.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo), 0o644)
    with pytest.raises(KeyMaterialError, match="does not match"):
        keys.ensure_bundle_signing_key(keys_dir)

    bk.private_pem_path.unlink()
    # a new private key would silently change the key every OPA trusts
    with pytest.raises(KeyMaterialError, match=r"exists but its private key .* is missing"):
        keys.ensure_bundle_signing_key(keys_dir)
    assert not bk.private_pem_path.exists()

    ed = keys.generate_proof_key(keys_dir)
    shutil.copy(ed.private_key_path, bk.private_pem_path)
    with pytest.raises(KeyMaterialError, match="not an EC P-256 key"):
        keys.ensure_bundle_signing_key(keys_dir)


def _opa() -> str | None:
    local = REPO / ".tools" / "bin" / "opa"
    return str(local) if local.exists() else shutil.which("opa")


@pytest.mark.integration
@pytest.mark.skipif(_opa() is None, reason="no opa binary")
def test_opa_signs_and_verifies_with_the_bundle_key(tmp_path: Path) -> None:
    opa = _opa()
    assert opa is not None
    bk = keys.ensure_bundle_signing_key(tmp_path / "keys")
    src = tmp_path / "policy"
    src.mkdir()
    (src / "x.rego").write_text("package x\n\nallow := true\n")
    out = tmp_path / "bundle.tar.gz"
    built = subprocess.run(
        [
            opa,
            "build",
            "-b",
            str(src),
            "--signing-key",
            str(bk.private_pem_path),
            "--signing-alg",
            "ES256",
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    verified = subprocess.run(
        [
            opa,
            "build",
            "-b",
            str(out),
            "--verification-key",
            str(bk.public_pem_path),
            "--signing-alg",
            "ES256",
            "-o",
            str(tmp_path / "again.tar.gz"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert verified.returncode == 0, verified.stderr


# --- proof seal key ---------------------------------------------------------------------------

SEALED_ROW: dict[str, Any] = {
    "agent_id": "a1",
    "version": 1,
    "policy_hash": "p" * 64,
    "spec_hash": "s" * 64,
    "keyid": "k" * 64,
    "governance_status": "GOVERNED_VALID",
    "issued_at": "2025-03-01T12:00:00Z",
    "expires_at": None,
}


def test_proof_seal_key_created_once_0600_and_reused(keys_dir: Path) -> None:
    first = keys.ensure_proof_seal(keys_dir)
    path = keys_dir / keys.PROOF_SEAL_KEY_NAME
    assert mode(path) == 0o600 and mode(keys_dir) == 0o700
    content = path.read_bytes()
    again = keys.ensure_proof_seal(keys_dir)
    assert path.read_bytes() == content
    assert again.seal(**SEALED_ROW) == first.seal(**SEALED_ROW)
    assert [p.name for p in keys_dir.iterdir()] == [keys.PROOF_SEAL_KEY_NAME], "no temp file is left"
    assert keys.list_key_files(keys_dir) == [], "it is not a proof signing key"


def test_a_seal_key_made_meanwhile_by_another_process_is_kept(
    keys_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two first uses at once: the one that links second uses the first one's key."""
    keys_dir.mkdir(mode=0o700)
    path = keys_dir / keys.PROOF_SEAL_KEY_NAME
    theirs = b"ab" * 32 + b"\n"
    real_link = os.link

    def link_after_the_other(src: str, dst: Path) -> None:
        path.write_bytes(theirs)
        path.chmod(0o600)
        real_link(src, dst)

    monkeypatch.setattr(os, "link", link_after_the_other)
    seal = keys.ensure_proof_seal(keys_dir)
    assert path.read_bytes() == theirs
    assert seal.seal(**SEALED_ROW) == proofs.ProofSeal(bytes.fromhex("ab" * 32)).seal(**SEALED_ROW)
    assert [p.name for p in keys_dir.iterdir()] == [keys.PROOF_SEAL_KEY_NAME]


def test_a_seal_key_is_made_without_hard_links_too(keys_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_hard_links(src: str, dst: Path) -> None:
        raise PermissionError(1, "Operation not permitted")  # as vfat or some FUSE mounts answer

    monkeypatch.setattr(os, "link", no_hard_links)
    first = keys.ensure_proof_seal(keys_dir)
    path = keys_dir / keys.PROOF_SEAL_KEY_NAME
    assert mode(path) == 0o600
    assert keys.ensure_proof_seal(keys_dir).seal(**SEALED_ROW) == first.seal(**SEALED_ROW)
    assert [p.name for p in keys_dir.iterdir()] == [keys.PROOF_SEAL_KEY_NAME]


@pytest.mark.parametrize(
    ("content", "file_mode", "message"),
    [
        (b"ab" * 32, 0o640, "accessible by group or others"),
        (b"not hex at all, not a key", 0o600, "not a hex secret"),
        (b"ab" * 16, 0o600, "not a hex secret of at least 32 bytes"),
        (b"\xff\xfe", 0o600, "not a hex secret"),
    ],
)
def test_proof_seal_key_refusals(keys_dir: Path, content: bytes, file_mode: int, message: str) -> None:
    keys_dir.mkdir(mode=0o700)
    path = keys_dir / keys.PROOF_SEAL_KEY_NAME
    path.write_bytes(content)
    path.chmod(file_mode)
    with pytest.raises(KeyMaterialError, match=message) as caught:
        keys.ensure_proof_seal(keys_dir)
    assert caught.value.hint
    assert path.read_bytes() == content, "a refused key file is left as it was"


def test_a_seal_covers_every_column_and_the_key() -> None:
    seal = proofs.ProofSeal(b"k" * 32)
    base = seal.seal(**SEALED_ROW)
    changed = {
        "agent_id": "a2",
        "version": 2,
        "policy_hash": "q" * 64,
        "spec_hash": "t" * 64,
        "keyid": "l" * 64,
        "governance_status": "GOVERNED_RESTRICTED",
        "issued_at": "2025-03-01T12:00:01Z",
        "expires_at": "2025-03-01T12:00:00Z",
    }
    for column, value in changed.items():
        assert seal.seal(**{**SEALED_ROW, column: value}) != base, column
    # a column's text cannot run on into the next one
    shifted = {**SEALED_ROW, "policy_hash": "ab", "spec_hash": "c"}
    assert seal.seal(**shifted) != seal.seal(**{**SEALED_ROW, "policy_hash": "a", "spec_hash": "bc"})
    assert proofs.ProofSeal(b"j" * 32).seal(**SEALED_ROW) != base
    with pytest.raises(KeyMaterialError, match="at least 32 bytes"):
        proofs.ProofSeal(b"k" * 31)
    assert "k" * 8 not in repr(seal)


# A key file that is a symbolic link pointing nowhere (a backup restored elsewhere, a secret
# mount gone) is a missing key to name as such, never a free name: before, the bundle and seal
# keys were generated anew at such a name, and a proof key was reported as "no key" at all.


def _dangle(path: Path) -> str:
    target = str(path.parent / "gone" / path.name)
    os.symlink(target, path)
    return target


def _assert_names_the_link(exc: pytest.ExceptionInfo[KeyMaterialError], path: Path, target: str) -> None:
    assert f"key file {path} is a symbolic link to {target}, which does not exist" in exc.value.message
    assert "restore the file it points to" in exc.value.hint
    assert os.readlink(path) == target, "the link is left as it was"


def test_a_dangling_proof_key_link_is_named(tmp_path: Path) -> None:
    info = keys.generate_proof_key(tmp_path)
    assert info.private_key_path is not None and info.public_key_path is not None
    info.private_key_path.unlink()
    target = _dangle(info.private_key_path)

    with pytest.raises(KeyMaterialError) as exc:
        keys.load_signer(tmp_path, info.keyid)
    _assert_names_the_link(exc, info.private_key_path, target)

    info.public_key_path.unlink()
    public_target = _dangle(info.public_key_path)
    with pytest.raises(KeyMaterialError) as exc:
        keys.load_trusted_key(tmp_path, info.keyid)
    _assert_names_the_link(exc, info.public_key_path, public_target)


@pytest.mark.parametrize("name", [keys.BUNDLE_KEY_NAME, keys.BUNDLE_PUB_NAME, keys.PROOF_SEAL_KEY_NAME])
def test_a_dangling_bundle_or_seal_key_link_is_not_replaced_by_a_new_key(tmp_path: Path, name: str) -> None:
    tmp_path.chmod(0o700)
    link = tmp_path / name
    target = _dangle(link)

    with pytest.raises(KeyMaterialError) as exc:
        if name == keys.PROOF_SEAL_KEY_NAME:
            keys.ensure_proof_seal(tmp_path)
        else:
            keys.ensure_bundle_signing_key(tmp_path)

    if name == keys.BUNDLE_PUB_NAME:  # the private key is missing: that is said first
        assert "exists but its private key" in exc.value.message
        assert not (tmp_path / keys.BUNDLE_KEY_NAME).exists()
    else:
        _assert_names_the_link(exc, link, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name], "no key written"


def test_a_key_directory_agov_may_not_search_is_not_taken_for_missing_keys(
    keys_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """lexists() says False on EACCES too, so a keys/ agov may not search read as "no key": a
    promotion then tried to write a new bundle key pair, and admission said a key was missing.
    (Simulated: the tests may run as root, for whom mode 000 is no obstacle.)"""
    real_lstat = os.lstat

    def denied(path: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(path).parent == keys_dir:
            raise PermissionError(13, "Permission denied", str(path))
        return real_lstat(path, *args, **kwargs)

    monkeypatch.setattr(os, "lstat", denied)
    with pytest.raises(KeyMaterialError, match=r"cannot look for key file .*: Permission denied") as info:
        keys.ensure_bundle_signing_key(keys_dir)
    assert str(keys_dir) in info.value.hint
    assert list(keys_dir.iterdir()) == []


def test_a_bundle_key_is_created_only_when_asked(keys_dir: Path) -> None:
    with pytest.raises(KeyMaterialError, match=r"bundle signing key .* are missing") as info:
        keys.ensure_bundle_signing_key(keys_dir, create=False)
    assert "agov policy build" in info.value.hint
    assert list(keys_dir.iterdir()) == []
    made = keys.ensure_bundle_signing_key(keys_dir)
    assert keys.ensure_bundle_signing_key(keys_dir, create=False) == made
