"""The node's content store: atomic publish, confinement to the root, versions that never go back."""

import hashlib
import os

import pytest

from common.paths import TEMP_PREFIX
from node.store import ContentStore, StoreRefused

DATA = b"new content\n" * 1000
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def store(tmp_path):
    (tmp_path / "www").mkdir()
    (tmp_path / "outside").mkdir()
    return ContentStore("content", tmp_path / "www", tmp_path / "state" / "manifest.json", min_free=0)


def put(store, path, data=DATA, version=1, sha=None):
    upload = store.begin_put(path, version, len(data), sha or hashlib.sha256(data).hexdigest())
    for offset in range(0, len(data), 4096):
        upload.write(data[offset:offset + 4096])
    upload.finish()


def refused(reason, fn, *args):
    with pytest.raises(StoreRefused) as caught:
        fn(*args)
    assert caught.value.reason == reason, caught.value
    return caught.value


def listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_a_file_appears_whole_only_after_its_digest_matched(store):
    (store.root / "page.html").write_bytes(b"old")
    upload = store.begin_put("page.html", 1, len(DATA), SHA)
    upload.write(DATA[:5000])
    assert (store.root / "page.html").read_bytes() == b"old"  # readers still get the old file
    upload.write(DATA[5000:])
    assert (store.root / "page.html").read_bytes() == b"old"
    upload.finish()
    assert (store.root / "page.html").read_bytes() == DATA
    assert oct((store.root / "page.html").stat().st_mode & 0o777) == "0o644"
    assert listing(store.root) == ["page.html"]  # no temporary file left


def test_a_wrong_digest_or_size_publishes_nothing_and_leaves_nothing(store):
    (store.root / "page.html").write_bytes(b"old")
    upload = store.begin_put("page.html", 1, len(DATA), "0" * 64)
    upload.write(DATA)
    refused("bad_digest", upload.finish)
    upload = store.begin_put("page.html", 1, len(DATA), SHA)
    upload.write(DATA[:-1])
    refused("bad_size", upload.finish)
    upload = store.begin_put("page.html", 1, 3, SHA)
    refused("bad_size", upload.write, DATA)
    upload.abort()
    assert (store.root / "page.html").read_bytes() == b"old" and listing(store.root) == ["page.html"]
    assert store.manifest()["paths"] == {}


def test_the_manifest_is_persisted_and_survives_a_restart(store, tmp_path):
    put(store, "docs/a.html", version=3)
    store.commit(3)
    again = ContentStore("content", store.root, store.manifest_file, min_free=0)
    assert again.manifest() == {"area": "content", "version": 3,
                                "paths": {"docs/a.html": {"version": 3, "size": len(DATA), "sha256": SHA}}}


@pytest.mark.parametrize("path,reason", [("../outside/x", "traversal"), ("/etc/passwd", "absolute"),
                                         ("a\0b", "nul"), (f"{TEMP_PREFIX}x", "reserved"), ("a//b", "bad_path")])
def test_lexically_bad_paths_are_refused_before_anything_is_touched(store, tmp_path, path, reason):
    refused(reason, store.begin_put, path, 1, 1, SHA)
    refused(reason, store.delete, path, 1)
    assert listing(store.root) == [] and listing(tmp_path / "outside") == []


def test_symlinks_are_never_followed(store, tmp_path):
    outside = tmp_path / "outside"
    (store.root / "escape").symlink_to(outside)
    (store.root / "link.html").symlink_to(outside / "target.html")
    (outside / "target.html").write_bytes(b"precious")
    refused("symlink", store.begin_put, "escape/evil.html", 1, 1, SHA)
    refused("symlink", store.begin_put, "escape/new/dir/evil.html", 1, 1, SHA)
    refused("symlink", store.begin_put, "link.html", 1, 1, SHA)
    refused("symlink", store.delete, "link.html", 1)
    refused("symlink", store.delete, "escape/target.html", 1)
    assert sorted(os.listdir(outside)) == ["target.html"] and (outside / "target.html").read_bytes() == b"precious"


def test_a_directory_swapped_for_a_symlink_mid_upload_cannot_redirect_the_file(store, tmp_path):
    upload = store.begin_put("docs/page.html", 1, len(DATA), SHA)  # creates docs/, holds its descriptor
    upload.write(DATA)
    os.rename(store.root / "docs", tmp_path / "moved")
    (store.root / "docs").symlink_to(tmp_path / "outside")
    upload.finish()
    # The file went where the directory descriptor points (the real directory), never through the link.
    assert listing(tmp_path / "outside") == []
    assert (tmp_path / "moved" / "page.html").read_bytes() == DATA


def test_parents_are_created_and_a_file_in_the_way_is_refused(store):
    put(store, "new/deep/dir/x.bin")
    assert (store.root / "new/deep/dir/x.bin").read_bytes() == DATA
    (store.root / "plain").write_bytes(b"x")
    refused("not_directory", store.begin_put, "plain/x", 1, 1, SHA)
    (store.root / "adir").mkdir()
    refused("not_file", store.begin_put, "adir", 1, 1, SHA)


def test_versions_never_go_back(store):
    put(store, "a.html", version=5)
    refused("stale_version", store.begin_put, "a.html", 4, 1, SHA)
    refused("stale_version", store.delete, "a.html", 4)
    refused("stale_version", store.commit, 4)  # a path already holds version 5
    store.commit(5)
    refused("stale_version", store.commit, 4)
    put(store, "a.html", version=5)  # the same version again: a retry
    store.commit(5)


def test_one_upload_per_path_at_a_time(store):
    first = store.begin_put("a.html", 1, len(DATA), SHA)
    refused("busy", store.begin_put, "a.html", 2, 1, SHA)
    first.abort()
    put(store, "a.html", version=2)


def test_delete_removes_the_file_and_the_entry(store):
    put(store, "docs/a.html")
    assert store.delete("docs/a.html", 2) is True
    assert not (store.root / "docs/a.html").exists() and store.manifest()["paths"] == {}
    assert store.delete("docs/a.html", 2) is False  # already gone: nothing to do
    assert store.delete("never/there.html", 2) is False


def test_size_limit_and_leftovers(store):
    small = ContentStore("content", store.root, store.manifest_file, max_size=10, min_free=0)
    refused("too_large", small.begin_put, "big.bin", 1, 11, SHA)
    (store.root / "d").mkdir()
    (store.root / "d" / f"{TEMP_PREFIX}crashed").write_bytes(b"half")
    assert store.remove_leftovers() == 1 and listing(store.root) == ["d"]


def test_not_enough_space_is_refused(store):
    greedy = ContentStore("content", store.root, store.manifest_file, min_free=1 << 62)
    refused("no_space", greedy.begin_put, "a.bin", 1, 1, SHA)


def test_a_refused_upload_leaves_no_directory_it_made_and_a_second_abort_frees_nobody_elses_path(store):
    upload = store.begin_put("new/sub/x.txt", 1, len(DATA), "0" * 64)
    upload.write(DATA)
    refused("bad_digest", upload.finish)
    assert not (store.root / "new").exists()  # the directories were made for it alone
    (store.root / "kept").mkdir()
    upload = store.begin_put("kept/deeper/y.txt", 1, 3, SHA)
    upload.abort()
    assert (store.root / "kept").is_dir() and not (store.root / "kept" / "deeper").exists()
    # The broker aborts again after a failed finish: that must not release a newer upload's mark.
    first = store.begin_put("page.html", 1, len(DATA), "0" * 64)
    first.write(DATA)
    refused("bad_digest", first.finish)
    second = store.begin_put("page.html", 1, len(DATA), SHA)
    first.abort()
    refused("busy", store.begin_put, "page.html", 1, len(DATA), SHA)
    second.abort()
