"""The tasks every agent ships, called directly (no nginx needed: pid files point at other processes)."""

import os

import pytest

from node.builtin_tasks import TaskError, disk_usage, reload_nginx, rotate_logs


def test_reload_nginx_refuses_a_pid_file_naming_another_process(tmp_path):
    pid_file = tmp_path / "nginx.pid"
    pid_file.write_text(str(os.getpid()))  # this is python, not nginx: a stale pid file
    with pytest.raises(TaskError, match="not nginx"):
        reload_nginx({"nginx_pid_file": str(pid_file)}, {})
    with pytest.raises(TaskError, match="cannot read"):
        reload_nginx({"nginx_pid_file": str(tmp_path / "missing.pid")}, {})


def test_rotate_logs_shifts_generations_and_keeps_a_bounded_number(tmp_path):
    log = tmp_path / "access.log"
    for generation, text in [(None, "now"), (1, "one"), (2, "two")]:
        (tmp_path / (f"access.log.{generation}" if generation else "access.log")).write_text(text)
    result = rotate_logs({"logs": [str(log), str(tmp_path / "absent.log")], "rotate_keep": 2}, {})
    assert result["rotated"] == [str(log)] and result["nginx_reopened"] is None
    assert not log.exists()
    assert (tmp_path / "access.log.1").read_text() == "now" and (tmp_path / "access.log.2").read_text() == "one"
    assert not (tmp_path / "access.log.3").exists()  # "two" was the oldest beyond keep=2


def test_disk_usage_counts_the_root_without_following_links(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 100)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.bin").write_bytes(b"y" * 50)
    (tmp_path / "link").symlink_to("/usr")
    result = disk_usage({"document_root": str(tmp_path)}, {})
    assert result["files"] == 2 and result["bytes"] == 150  # /usr behind the link is not walked
    assert 0 <= result["filesystem"]["used_fraction"] <= 1
