"""What a policy tree's bundle (and so its hash) is made of, and what is refused because
``opa test`` would judge a file the sidecar never loads. No OPA needed."""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from agov import bundle
from agov.bundle import bundle_files, compute_policy_hash
from agov.errors import PolicyError


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "policies"
    (root / "agov" / "promotion").mkdir(parents=True)
    (root / "agov" / "promotion" / "promotion.rego").write_text("package agov.promotion\n\nallow := false\n")
    (root / "agov" / "promotion" / "promotion_test.rego").write_text("package agov.promotion_test\n")
    (root / "agov" / "config").mkdir()
    (root / "agov" / "config" / "data.json").write_text('{"limit": 1}\n')
    (root / "schemas").mkdir()
    (root / "schemas" / "input.json").write_text("{}\n")
    return root


def test_the_bundle_is_the_policy_and_data_files_under_agov(tree: Path) -> None:
    (tree / "README.md").write_text("notes\n")  # OPA loads no .md file
    assert [rel for rel, _ in bundle_files(tree)] == [
        "agov/config/data.json",
        "agov/promotion/promotion.rego",
    ]


def test_hidden_entries_and_pycache_change_nothing(tree: Path) -> None:
    """As the build's snapshot skips them, so does the hash of the live tree (the rollback note)."""
    before = compute_policy_hash(tree)
    (tree / "agov" / ".wip").mkdir()
    (tree / "agov" / ".wip" / "draft.rego").write_text("package agov.wip\n")
    (tree / "agov" / "promotion" / ".promotion.rego.swp").write_bytes(b"\0swap")
    (tree / "agov" / "__pycache__").mkdir()
    (tree / "agov" / "__pycache__" / "x.json").write_text("{}")
    assert compute_policy_hash(tree) == before


def test_a_symlinked_directory_counts_with_its_content(tree: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared" / "util"
    shared.mkdir(parents=True)
    (shared / "util.rego").write_text("package agov.util\n\nx := 1\n")
    (tree / "agov" / "util").symlink_to(shared, target_is_directory=True)
    copy = tmp_path / "copy"
    bundle._stable_copy(tree, copy)  # copytree follows the link: the copy must match the source
    assert "agov/util/util.rego" in [rel for rel, _ in bundle_files(tree)]
    assert compute_policy_hash(copy) == compute_policy_hash(tree)


@pytest.mark.parametrize(
    ("rel", "why"),
    [
        ("agov/config/blocked.json", "a bundle takes data only from files named data.json or data.yaml"),
        ("agov/promotion/fixtures.yaml", "a bundle takes data only from files named data.json or data.yaml"),
        ("lib/helpers.rego", "outside agov/, the bundle's only root"),
        ("agov/promotion/schemas/extra.rego", "in a directory named schemas"),
        ("extra.json", "outside agov/, the bundle's only root"),
    ],
)
def test_a_file_opa_test_would_load_but_the_bundle_would_not_is_refused(
    tree: Path, rel: str, why: str
) -> None:
    path = tree / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{}\n")
    with pytest.raises(PolicyError) as refused:
        bundle_files(tree)
    assert refused.value.message.startswith(f"{path}: {why}")
    assert "opa test" in refused.value.hint


@pytest.mark.parametrize(
    "content",
    [
        'package agov.lists\n\nforbidden_ids := ["mcp-two"]\n\ntest_listed if count(forbidden_ids) > 0\n',
        "# METADATA\n# title: package agov.x_test in a comment\npackage agov.lists\n",
    ],
    ids=["rules", "comment"],
)
def test_a_test_file_outside_a_test_package_is_refused(tree: Path, content: str) -> None:
    """Before: rules in `lists/forbidden_ids_test.rego` (package agov.lists) were what `opa test`
    judged the promotion rules with, while the bundle left the file out, so the deny they fed
    never fired in the sidecar."""
    path = tree / "agov" / "lists" / "forbidden_ids_test.rego"
    path.parent.mkdir()
    path.write_text(content)
    with pytest.raises(PolicyError) as refused:
        bundle_files(tree)
    assert refused.value.message.startswith(f"{path}: a *_test.rego file in package agov.lists, which is not")
    assert "name the package agov.lists_test" in refused.value.message
    path.write_text(content.replace("package agov.lists", "package agov.lists_test"))
    assert "agov/lists/forbidden_ids_test.rego" not in [rel for rel, _ in bundle_files(tree)]


def test_a_copy_that_fails_while_an_editor_saves_is_tried_again(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_copytree = shutil.copytree
    failures = [shutil.Error([("a.rego", "b.rego", "[Errno 2] No such file or directory")])]

    def flaky(*args: Any, **kwargs: Any) -> Any:
        if failures:
            raise failures.pop()
        return real_copytree(*args, **kwargs)

    monkeypatch.setattr(shutil, "copytree", flaky)
    bundle._stable_copy(tree, tmp_path / "copy")
    assert compute_policy_hash(tmp_path / "copy") == compute_policy_hash(tree)


def test_a_copy_that_keeps_failing_is_a_refused_policy_that_says_why(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def always(*args: Any, **kwargs: Any) -> Any:
        raise shutil.Error([("a.rego", "b.rego", "[Errno 2] No such file or directory")])

    monkeypatch.setattr(shutil, "copytree", always)
    monkeypatch.setattr(bundle.time, "sleep", lambda _s: None)
    with pytest.raises(PolicyError, match=r"kept changing while it was read: .*No such file"):
        bundle._stable_copy(tree, tmp_path / "copy")


@pytest.mark.parametrize(
    "failure",
    [
        PermissionError(13, "Permission denied", "policies"),
        shutil.Error([("a.rego", "b.rego", "[Errno 13] Permission denied: 'a.rego'")]),
    ],
    ids=["directory", "file"],
)
def test_a_tree_this_user_may_not_read_is_said_to_be_so_at_once(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: OSError
) -> None:
    """Before: tried 5 times, then "kept changing while it was read", hint "save the files"."""
    calls: list[object] = []

    def denied(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        raise failure

    monkeypatch.setattr(shutil, "copytree", denied)
    with pytest.raises(PolicyError, match=r"cannot read the policy tree .*Permission denied") as refused:
        bundle._stable_copy(tree, tmp_path / "copy")
    assert "let the user agov runs as read" in refused.value.hint
    assert len(calls) == 1


def test_a_missing_tree_is_named(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"policies does not exist"):
        bundle._stable_copy(tmp_path / "policies", tmp_path / "copy")


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("data.json", b'{"limits": {"a": 0.4, "a": 0.9}}', "the key 'a' appears twice in one object"),
        # Go reads both keys as U+FFFD: one key, the last value
        ("data.json", b'{"k": {"\\ud800": 1, "\\udbff": 2}}', "escapes a lone surrogate"),
        ("data.json", b'{"k": {"\xff": 1, "\xfe": 2}}', "is not UTF-8"),
        ("data.yaml", b"limits:\n  a: 0.4\n  a: 0.9\n", "the key 'a' appears twice in one mapping (line 3)"),
        ("data.yml", b"base: &b {a: 0.4}\nlimits: *b\n", "uses a YAML alias (*b)"),
        ("data.yaml", b"limits:\n  <<: {a: 0.4}\n  a: 0.9\n", "a YAML merge key (<<) on line 2"),
    ],
    ids=["json-repeated", "json-surrogates", "json-not-utf8", "yaml-repeated", "yaml-alias", "yaml-merge"],
)
def test_a_data_file_a_reviewer_and_opa_would_read_two_ways_is_refused(
    tree: Path, name: str, content: bytes, problem: str
) -> None:
    (tree / "agov" / "config" / "data.json").unlink()
    (tree / "agov" / "config" / name).write_bytes(content)
    with pytest.raises(PolicyError, match=re.escape(problem)) as refused:
        bundle_files(tree)
    assert str(tree / "agov" / "config" / name) in refused.value.message


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("data.json", b'{"limits": {"a": 0.4}, "other": {"a": 0.9}}'),  # the same key in two objects
        ("data.yaml", b"limits:\n  a: 0.4\nother:\n  a: 0.9\n"),
        ("data.json", b'{"limits": '),  # malformed: left to `opa test`, which names the fault
    ],
    ids=["json", "yaml", "malformed-json"],
)
def test_data_files_read_one_way_are_left_to_opa(tree: Path, name: str, content: bytes) -> None:
    (tree / "agov" / "config" / "data.json").unlink()
    (tree / "agov" / "config" / name).write_bytes(content)
    assert f"agov/config/{name}" in [rel for rel, _ in bundle_files(tree)]


@pytest.mark.parametrize(
    ("errno_", "raised"), [(errno.EINVAL, False), (errno.ENOTSUP, False), (errno.EIO, True)]
)
def test_a_directory_sync_the_file_system_cannot_make_is_skipped_not_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, errno_: int, raised: bool
) -> None:
    def refuse(_fd: int) -> None:
        raise OSError(errno_, os.strerror(errno_))

    monkeypatch.setattr(os, "fsync", refuse)
    if raised:
        with pytest.raises(OSError):
            bundle._sync_directory(tmp_path)
    else:
        bundle._sync_directory(tmp_path)
