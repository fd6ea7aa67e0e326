"""The distributor's blob store: bytes by digest, tree ingestion, cleanup."""

import hashlib

import pytest

from distributor.blobstore import BlobStore
from common.paths import PathRefused


def test_ingest_stores_by_digest_once(tmp_path):
    blobs = BlobStore(tmp_path / "blobs")
    (tmp_path / "a").write_bytes(b"same")
    (tmp_path / "b").write_bytes(b"same")
    first, second = blobs.ingest(tmp_path / "a"), blobs.ingest(tmp_path / "b")
    assert first == second == (hashlib.sha256(b"same").hexdigest(), 4)
    assert blobs.path(first[0]).read_bytes() == b"same"
    (tmp_path / "a").write_bytes(b"changed")  # the source may change; the stored version does not
    assert blobs.path(first[0]).read_bytes() == b"same"
    assert len(list((tmp_path / "blobs").glob("??/*"))) == 1
    with pytest.raises(KeyError):
        blobs.path("0" * 64)
    with pytest.raises(ValueError):
        blobs.path("../../etc/passwd")


def test_a_tree_is_ingested_with_managed_paths_and_no_symlinks(tmp_path):
    tree = tmp_path / "site"
    (tree / "docs").mkdir(parents=True)
    (tree / "index.html").write_bytes(b"<h1>hi</h1>")
    (tree / "docs" / "a.html").write_bytes(b"a")
    blobs = BlobStore(tmp_path / "blobs")
    found = blobs.ingest_tree(tree, prefix="v2/")
    assert [(p, s) for p, _, s in found] == [("v2/docs/a.html", 1), ("v2/index.html", 11)]
    (tree / "docs" / "escape").symlink_to("/etc")
    with pytest.raises(ValueError, match="symlink"):
        blobs.ingest_tree(tree)
    (tree / "docs" / "escape").unlink()
    with pytest.raises(PathRefused):
        blobs.ingest_tree(tree, prefix="/abs/")


def test_unused_blobs_are_removed(tmp_path):
    blobs = BlobStore(tmp_path / "blobs")
    for data in (b"keep", b"drop"):
        (tmp_path / "f").write_bytes(data)
        blobs.ingest(tmp_path / "f")
    keep = hashlib.sha256(b"keep").hexdigest()
    assert blobs.remove_unused([keep]) == 1 and blobs.path(keep).read_bytes() == b"keep"
