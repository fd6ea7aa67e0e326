"""Managed paths and bundle names: the rule both the distributor and the node apply (pure)."""

import pytest

from common.paths import TEMP_PREFIX, PathRefused, check_bundle_name, check_path


@pytest.mark.parametrize("path", ["index.html", "docs/a b.html", "deep/er/x.bin", ".well-known/x", "ü.txt", "a..b"])
def test_valid_paths(path):
    assert check_path(path) == path


@pytest.mark.parametrize("path,reason", [
    ("../etc/passwd", "traversal"),
    ("docs/../../x", "traversal"),
    ("a/..", "traversal"),
    ("/etc/passwd", "absolute"),
    ("a\0b", "nul"),
    ("", "bad_path"),
    (None, "bad_path"),
    ("a//b", "bad_path"),
    ("a/./b", "bad_path"),
    ("dir/", "bad_path"),
    ("a\\..\\b", "bad_path"),
    ("line\nbreak", "bad_path"),
    ("x" * 256, "bad_path"),
    ("/".join(["d"] * 600), "bad_path"),
    (f"{TEMP_PREFIX}1234", "reserved"),
])
def test_refused_paths_name_their_reason(path, reason):
    with pytest.raises(PathRefused) as caught:
        check_path(path)
    assert caught.value.reason == reason


@pytest.mark.parametrize("name,ok", [("clean-tmp", True), ("a_1", True), ("Upper", False), ("a/b", False),
                                     ("-x", False), ("x" * 65, False), ("..", False)])
def test_bundle_names(name, ok):
    if ok:
        assert check_bundle_name(name) == name
    else:
        with pytest.raises(PathRefused):
            check_bundle_name(name)
