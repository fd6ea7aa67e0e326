"""distributorctl content and task: arguments, what is sent, exit codes (no distributor: a recording client)."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from distributor import ctl


class Recorded:
    """Answers the calls a scenario expects, and keeps what each upload sent."""

    def __init__(self, answers=None):
        self.calls: list[tuple] = []
        self.uploads: list[tuple] = []
        self.answers = list(answers or [])

    def call(self, method, path, body=None, query=None):
        self.calls.append((method, path, body, query))
        return self.answers.pop(0) if self.answers else {}

    def upload(self, method, path, source, size, content_type, query=None):
        data = source.read()
        assert len(data) == size
        self.uploads.append((method, path, content_type, query, data))
        if "check" in (query or {}):
            return {"ok": True}
        return {"ok": True, "version": 4, "versions": [4, 4], "paths": [query["path"] or "x"]}


def run(client, *argv) -> int:
    return ctl.run(client, ctl.build_parser().parse_args(list(argv)))


def test_a_file_is_pushed_after_a_preflight_by_its_name_or_as_a_destination(tmp_path, capsys):
    source = tmp_path / "new4m.bin"
    source.write_bytes(b"0123456789")
    client = Recorded()
    assert run(client, "content", "push", str(source)) == 0
    (_, _, type1, query1, body1), (_, _, type2, query2, body2) = client.uploads
    assert query1 == {"path": "new4m.bin", "check": 1, "size": 10} and body1 == b""
    assert (type2, query2, body2) == ("application/octet-stream", {"path": "new4m.bin"}, b"0123456789")
    assert "version 4" in capsys.readouterr().out
    client = Recorded()
    assert run(client, "content", "push", str(source), "--as", "pushed/x.bin") == 0
    assert client.uploads[-1][3] == {"path": "pushed/x.bin"}


def test_a_directory_goes_as_one_tar_stream_with_paths_relative_to_it_and_a_symlink_is_a_usage_error(tmp_path):
    site = tmp_path / "site"
    (site / "img").mkdir(parents=True)
    (site / "index.html").write_text("<h1>hi</h1>")
    (site / "img" / "logo.png").write_bytes(b"png")
    client = Recorded()
    assert run(client, "content", "push", str(site), "--as", "/") == 0
    _, _, content_type, query, data = client.uploads[-1]
    assert content_type == "application/x-tar" and query == {"path": ""}
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        assert sorted(m.name for m in archive.getmembers()) == ["img/logo.png", "index.html"]
    client = Recorded()
    assert run(client, "content", "push", str(site)) == 0 and client.uploads[-1][3] == {"path": "site"}
    (site / "up").symlink_to("/etc")
    with pytest.raises(ctl.UsageError, match="symlink"):
        run(Recorded(), "content", "push", str(site))


def test_usage_errors_exit_2_and_an_unreachable_distributor_3(tmp_path, capsys):
    assert ctl.main(["--url", "http://127.0.0.1:9", "content", "push", str(tmp_path / "missing.bin")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert ctl.main(["--url", "http://127.0.0.1:9", "content", "status"]) == 3
    with pytest.raises(SystemExit) as exited:
        ctl.main(["task", "run", "disk-usage", "--priority", "urgent"])
    assert exited.value.code == 2
    with pytest.raises(SystemExit):
        ctl.main(["content", "push"])


def test_wait_returns_once_every_live_node_holds_the_version(tmp_path, capsys):
    source = tmp_path / "a.bin"
    source.write_bytes(b"a")
    behind = {"nodes": [{"node": "web1", "alive": True, "state": "updating", "confirmed": 3},
                        {"node": "web3", "alive": False, "state": "behind", "confirmed": 3}]}
    done = {"nodes": [{"node": "web1", "alive": True, "state": "matches", "confirmed": 4},
                      {"node": "web3", "alive": False, "state": "behind", "confirmed": 3}]}
    client = Recorded([behind, done])
    assert run(client, "content", "push", str(source), "--wait") == 0
    out = capsys.readouterr().out
    assert "every live node holds version 4" in out and "web3 down" in out
    client = Recorded([{"ok": True, "version": 5, "versions": [5, 5], "paths": ["a.bin"]}, behind])
    assert run(client, "content", "delete", "a.bin", "--wait", "--timeout", "0") == 1
    assert client.calls[0] == ("DELETE", "/api/v1/content", None, {"path": "a.bin"})


def test_status_json_works_after_the_subcommand_and_before_it(capsys):
    status = {"version": 1, "active": True, "paths": {"a.bin": {"version": 1, "size": 1, "sha256": "ab" * 32}},
              "nodes": [{"node": "web1", "state": "matches", "held_out": False, "alive": True, "confirmed": 1,
                         "version": 1, "matches": True, "syncing": False, "error": None, "conflict": None,
                         "checked_ago": 2.0, "paths": {"a.bin": {"version": 1, "size": 1, "sha256": "ab" * 32}},
                         "differs": []},
                        {"node": "web2", "state": "behind", "held_out": True, "alive": True, "confirmed": 0,
                         "version": 0, "matches": False, "syncing": True, "error": None, "conflict": None,
                         "checked_ago": 1.0, "paths": {}, "differs": [{"path": "a.bin", "kind": "missing"}]}],
              "differing": ["web2"]}
    for argv in (["content", "status", "--json"], ["--json", "content", "status"]):
        assert ctl.run(Recorded([status]), ctl.build_parser().parse_args(argv)) == 0
        assert json.loads(capsys.readouterr().out) == status
    assert run(Recorded([status]), "content", "status") == 0
    table = capsys.readouterr().out
    assert "web2       behind" in table and "held out" in table and "missing a.bin" in table
    assert "a.bin" in table and "=" in table and "differ: web2" in table


def test_task_run_sends_name_nodes_priority_and_args_and_wait_exits_on_the_results(capsys):
    sent = {"task": {"id": "t1", "name": "scan-access-log", "nodes": {"web1": {"state": "sending"}}, "finished": False}}
    finished = {"id": "t1", "name": "scan-access-log", "priority": "low", "who": "ops", "requested": 0.0,
                "finished": True, "nodes": {"web1": {"state": "done", "exit_status": 0, "duration": 0.5,
                                                     "output": "{}\n"},
                                            "web2": {"state": "failed", "exit_status": 3, "duration": 0.1}}}
    client = Recorded([sent, finished])
    code = run(client, "task", "run", "scan-access-log", "--nodes", "web1,web2", "--priority", "low",
               "--arg", "top=5", "--wait")
    assert code == 1  # web2 failed
    assert client.calls[0] == ("POST", "/api/v1/tasks", {"name": "scan-access-log", "args": {"top": "5"},
                                                         "nodes": ["web1", "web2"], "priority": "low"}, None)
    out = capsys.readouterr().out
    assert "web1: done, exit 0, 0.500 s" in out and "web2: failed, exit 3" in out
    finished["nodes"]["web2"] = {"state": "done", "exit_status": 0, "duration": 0.1}
    assert run(Recorded([sent, finished]), "task", "run", "scan-access-log", "--wait") == 0
    with pytest.raises(ctl.UsageError):
        run(Recorded(), "task", "run", "disk-usage", "--arg", "novalue")


def test_task_list_and_show(capsys):
    tasks = [{"id": "t1", "name": "disk-usage", "priority": None, "who": "ops", "requested": 0.0, "finished": True,
              "nodes": {"web1": "done"}}]
    client = Recorded([tasks])
    assert run(client, "task", "list", "--limit", "5") == 0
    assert client.calls == [("GET", "/api/v1/tasks", None, {"limit": 5})]
    assert "web1:done" in capsys.readouterr().out
    client = Recorded([{"id": "t/1", "name": "x", "priority": "high", "who": "ops", "requested": 0.0, "finished": False,
                        "nodes": {"web1": {"state": "queued", "waiting": "node not idle"}}}])
    assert run(client, "task", "show", "t/1") == 0
    assert client.calls[0][1] == "/api/v1/tasks/t%2F1" and "(node not idle)" in capsys.readouterr().out


BUNDLE_REPLY = {"ok": True, "version": 3, "bundle": {"name": "clean-tmp", "version": 2, "priority": "low",
                                                     "key": "0123456789abcdef", "sha256": "ab" * 32}}


class RecordedBundles(Recorded):
    def upload(self, method, path, source, size, content_type, query=None):
        data = source.read()
        assert len(data) == size
        self.uploads.append((method, path, content_type, query, data))
        return self.answers.pop(0)


def test_task_add_uploads_the_bundle_file_as_it_is_and_wait_follows_the_bundles_version(tmp_path, capsys):
    bundle = tmp_path / "clean-tmp.bundle"
    bundle.write_bytes(b'{"format": "distributor-bundle/1"}')
    behind = {"nodes": [{"node": "web1", "alive": True, "state": "updating", "confirmed": 2},
                        {"node": "web3", "alive": False, "state": "behind", "confirmed": 1}]}
    done = {"nodes": [{"node": "web1", "alive": True, "state": "matches", "confirmed": 3},
                      {"node": "web3", "alive": False, "state": "behind", "confirmed": 1}]}
    client = RecordedBundles([BUNDLE_REPLY, behind, done])
    assert run(client, "task", "add", str(bundle), "--wait") == 0
    assert client.uploads == [("POST", "/api/v1/bundles", "application/octet-stream", None, bundle.read_bytes())]
    assert [c[:2] for c in client.calls] == [("GET", "/api/v1/bundles")] * 2
    out = capsys.readouterr().out
    assert "bundles version 3: added bundle clean-tmp version 2 (low priority at most, signed by key 0123456789abcdef)" \
        in out
    assert "every live node holds bundles version 3; web3 down: it gets it when it returns\n" in out
    client = RecordedBundles([{**BUNDLE_REPLY, "unchanged": True}])
    assert run(client, "task", "add", str(bundle)) == 0 and "unchanged" in capsys.readouterr().out
    with pytest.raises(ctl.UsageError, match="cannot read"):
        run(RecordedBundles(), "task", "add", str(tmp_path / "missing.bundle"))


def test_task_remove_and_bundles(capsys):
    client = Recorded([{"ok": True, "version": 4, "removed": "clean-tmp"},
                       {"nodes": [{"node": "web1", "alive": True, "state": "updating", "confirmed": 3, "error": None}]}])
    assert run(client, "task", "remove", "clean-tmp", "--wait", "--timeout", "0") == 1
    assert client.calls[0] == ("DELETE", "/api/v1/bundles/clean-tmp", None, None)
    assert "web1 (updating)" in capsys.readouterr().err
    status = {"version": 3, "active": True,
              "bundles": {"clean-tmp": {**BUNDLE_REPLY["bundle"], "time_limit": 60.0, "memory_limit": 64,
                                        "who": "operator", "change": 3, "size": 900}},
              "nodes": [{"node": "web1", "state": "matches", "alive": True, "confirmed": 3, "version": 3,
                         "matches": True, "syncing": False, "error": None, "conflict": None, "checked_ago": 1.0,
                         "bundles": {"clean-tmp": "ab" * 32}, "differs": []},
                        {"node": "web2", "state": "behind", "alive": True, "confirmed": 1, "version": 1,
                         "matches": False, "syncing": False, "error": "untrusted_key: not trusted", "conflict": None,
                         "checked_ago": 0.0, "bundles": {}, "differs": [{"path": "clean-tmp", "kind": "missing"}]}],
              "differing": ["web2"]}
    assert run(Recorded([status]), "task", "bundles") == 0
    table = capsys.readouterr().out
    assert "clean-tmp" in table and "operator" in table and "64MiB" in table and "differ: web2" in table
    assert "web2       behind              1   0s ago  missing clean-tmp  (untrusted_key: not trusted)" in table
    for argv in (["task", "bundles", "--json"], ["--json", "task", "bundles"]):
        assert run(Recorded([status]), *argv) == 0 and json.loads(capsys.readouterr().out) == status
