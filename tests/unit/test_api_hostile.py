"""The control API under hostile and careless input (no root): a clear 4xx naming the bad value, nothing changed.

Found by a hostile review: each case once answered 500, left a request waiting for ever, or took a change
no node could carry out.  The server is the real ControlApi over a real core (tests.unit.test_content_api.serve).
"""

from __future__ import annotations

from distributor import ctl
from tests.unit.test_content_api import AS_ADMIN, serve


def test_a_policy_or_service_of_the_wrong_json_type_and_bodies_that_are_no_json_object_get_a_4xx_not_a_500(tmp_path):
    async def scenario(s, base, core, blobs, commands):
        cases = [("PUT", "/api/v1/services/web/policy", {"policy": ["round-robin"]}, 400, "policy"),
                 ("PUT", "/api/v1/services/web/policy", {"policy": {"a": 1}}, 400, "policy"),
                 ("PUT", "/api/v1/nodes/web1/weight", {"weight": 5, "service": ["web"]}, 404, "service")]
        version = core.runtime.version
        for method, path, body, status, named in cases:
            async with s.request(method, base + path, json=body, headers=AS_ADMIN) as r:
                answer = await r.json()
                assert r.status == status and named in answer["error"], (body, r.status, answer)
        async with s.post(base + "/api/v1/nodes", data="[" * 100_000,
                          headers={**AS_ADMIN, "Content-Type": "application/json"}) as r:
            assert r.status == 400 and "nested" in (await r.json())["error"]
        async with s.post(base + "/api/v1/nodes", data=b"\xff\xfe",
                          headers={**AS_ADMIN, "Content-Type": "application/json"}) as r:
            assert r.status == 400 and "UTF-8" in (await r.json())["error"]
        async with s.get(base + "/api/v1/nodes", headers={"Authorization": "Bearer caf\u00e9".encode().decode("latin-1")}) as r:
            assert r.status == 401
        assert core.runtime.version == version  # nothing refused changed anything
    serve(tmp_path, scenario)


def test_node_addresses_are_ascii_dotted_decimal_unicast_and_not_a_vip(tmp_path):
    async def scenario(s, base, core, blobs, commands):
        version = core.runtime.version
        for address, named in [("\u0661\u0669\u0668.51.100.99", "not valid"), ("198.51.100.\u00b2", "not valid"),
                               ("0.0.0.0", "unspecified"), ("255.255.255.255", "broadcast"), ("127.0.0.1", "loopback"),
                               ("224.0.0.5", "multicast"), ("203.0.113.1", "VIP")]:
            body = {"name": "web9", "address": address, "services": {"web": {"port": 80}}}
            async with s.post(base + "/api/v1/nodes", json=body, headers=AS_ADMIN) as r:
                answer = await r.json()
                assert r.status == 400 and named in answer["error"] and repr(address)[1:-1] in repr(answer["error"]), \
                    (address, answer)
        assert core.runtime.version == version and "web9" not in core.nodes()
    serve(tmp_path, scenario)


def test_a_push_no_node_could_hold_is_refused_whole(tmp_path):
    async def scenario(s, base, core, blobs, commands):
        async with s.put(base + "/api/v1/content?path=sub/index.html", data=b"one", headers=AS_ADMIN) as r:
            assert r.status == 200
        version = core.content.desired.version
        for path, named in [("sub", "needs a directory"), ("sub/index.html/deeper", "is a managed file")]:
            async with s.put(base + f"/api/v1/content?path={path}", data=b"two", headers=AS_ADMIN) as r:
                answer = await r.json()
                assert r.status == 409 and named in answer["error"], (path, answer)
        assert core.content.desired.version == version and set(core.content.desired.entries) == {"sub/index.html"}
    serve(tmp_path, scenario)


def test_distributorctl_refuses_a_bad_url_or_token_with_exit_2_and_says_why(capsys, tmp_path):
    binary = tmp_path / "token"
    binary.write_bytes(b"\xff\xfe\x00")
    for argv, named in [(["--url", "notaurl", "nodes"], "--url 'notaurl' is not valid"),
                        (["--url", "http://[::1", "nodes"], "--url 'http://[::1' is not valid"),
                        (["--token", "a\nb", "nodes"], "token is not valid"),
                        (["--token-file", str(binary), "nodes"], "does not hold a token")]:
        assert ctl.main(argv) == 2, argv
        assert named in capsys.readouterr().err, argv


def test_query_numbers_that_are_not_whole_numbers_are_refused_by_name(tmp_path):
    async def scenario(s, base, core, blobs, commands):
        for path, named in [("/api/v1/connections?limit=abc", "limit='abc'"), ("/api/v1/connections?limit=-5", "limit='-5'"),
                            ("/api/v1/events?since=abc", "since='abc'"), ("/api/v1/events?since=\u0661", "since=")]:
            async with s.get(base + path, headers=AS_ADMIN) as r:
                answer = await r.json()
                assert r.status == 400 and named in answer["error"], (path, answer)
    serve(tmp_path, scenario)


def test_distributorctl_reads_take_json_after_the_verb_and_refuses_contradictions(capsys):
    for argv in (["nodes", "--json"], ["--json", "nodes"], ["explain", "192.0.2.7", "--json"], ["status", "--json"]):
        assert ctl.build_parser().parse_args(argv).json, argv
    assert ctl.main(["--url", "http://127.0.0.1:9", "add", "web4", "198.51.100.14", "web:80", "web:81"]) == 2
    assert "named twice" in capsys.readouterr().err
    assert ctl.main(["--url", "http://127.0.0.1:9", "drain", "web1", "--wait", "--timeout", "-5"]) == 2
    assert "--timeout -5 is not valid" in capsys.readouterr().err


def test_node_names_that_would_break_a_url_a_log_line_or_a_terminal_are_refused(tmp_path):
    from distributor.config import ConfigError, parse
    from tests.unit.test_config import MINIMAL

    bad = ["a/b", "..", "x..y", "x y", "web\n1", "\x1b[31mred", "-web", "w" * 17, ""]

    async def scenario(s, base, core, blobs, commands):
        for name in bad:
            body = {"name": name, "address": "198.51.100.60", "services": {"web": {"port": 80}}}
            async with s.post(base + "/api/v1/nodes", json=body, headers=AS_ADMIN) as r:
                answer = await r.json()
                assert r.status == 400 and "letters, digits" in answer["error"], (name, answer)
        async with s.post(base + "/api/v1/nodes", json={"name": "web-9.a_b", "address": "198.51.100.60",
                                                        "services": {"web": {"port": 80}}}, headers=AS_ADMIN) as r:
            assert r.status == 200
    serve(tmp_path, scenario)
    for name in ("a/b", "x y"):
        try:
            parse(MINIMAL.replace("[nodes.web1]", f'[nodes."{name}"]').replace('backends = ["web1"]',
                                                                             f'backends = ["{name}"]'))
        except ConfigError as exc:
            assert "letters, digits" in str(exc) and repr(name) in str(exc)
        else:
            raise AssertionError(f"the config took the node name {name!r}")


def test_explain_names_a_bad_port_apart_from_a_bad_client_and_lists_the_services(tmp_path):
    async def scenario(s, base, core, blobs, commands):
        for query, status, named in [("client=192.0.2.7:99999", 400, "port '99999'"),
                                     ("client=192.0.2.7:%2B80", 400, "port '+80'"),
                                     ("client=192.0.2.7&port=1_000", 400, "port '1_000'"),
                                     ("client=example.org", 400, "client 'example.org'"),
                                     ("client=192.0.2.7&service=nope", 404, "services: web")]:
            async with s.get(base + "/api/v1/explain?" + query, headers=AS_ADMIN) as r:
                answer = await r.json()
                assert r.status == status and named in answer["error"], (query, answer)
        async with s.get(base + "/api/v1/explain?client=192.0.2.7:8080", headers=AS_ADMIN) as r:
            assert r.status == 200 and (await r.json())["client"] == "192.0.2.7:8080"
    serve(tmp_path, scenario)
