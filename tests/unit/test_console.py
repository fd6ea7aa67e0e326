"""The web console and the API paths it uses, on loopback (no root): the page, its login, its changes.

The real :class:`~distributor.api.ControlApi` serves a real :class:`~distributor.core.DistributorCore`
on 127.0.0.1; a few lines stand in for the runtime (feed an event, hand the AdminReply back).  What
a browser does with the page is tests/e2e/test_console_e2e.py's part.
"""

from __future__ import annotations

import asyncio
import json
import re
import tomllib
from pathlib import Path

import aiohttp

from backup.failover import ClaimAddresses, FirstForward
from common.sansio import CommandDone
from distributor import api as api_module
from distributor.admin import AdminReply
from distributor.api import ApiToken, ControlApi, EventLog
from distributor.core import DistributorCore
from distributor.metrics import takeover_phases
from distributor.reroute import Mode
from tests.packets import CLIENT, VIP, tcp
from tests.unit.test_admin_core import Pair
from tests.unit.test_reroute import service_spec

ROOT = Path(__file__).resolve().parents[2]
ADMIN = ApiToken("alice", "admin", "a" * 24)
VIEWER = ApiToken("<b>bob</b>", "viewer", "v" * 24)
CONSOLE_HEADER = {"X-Requested-With": "distributor-console"}


def serve(scenario, core: DistributorCore | None = None):
    """Run ``scenario(base_url, api, core)`` against a ControlApi on a free loopback port.

    ``core``: a started core to serve; by default one without failover, serving web1 to web3.
    """

    async def main():
        nonlocal core
        if core is None:
            core = DistributorCore("dist1", Mode.REWRITE, [service_spec(nodes=("web1", "web2", "web3"))], 100)
            core.start(0.0, 0.0)
        api: ControlApi

        def feed(event):
            for command in core.handle(event):
                if isinstance(command, AdminReply):
                    api.reply(command)

        api = ControlApi(core, feed, [ADMIN, VIEWER], EventLog(), role=lambda: "active", mode="rewrite", name="dist1")
        await api.start("127.0.0.1", 0)
        port = api._runner.addresses[0][1]
        try:
            await scenario(f"http://127.0.0.1:{port}", api, core)
        finally:
            await api.stop()

    asyncio.run(main())


async def login(session: aiohttp.ClientSession, base: str, token: ApiToken, role: str | None = None) -> str:
    """Sign in the way the console's user does: a one-time link, then the page; returns the page."""
    body = {"role": role} if role else {}
    async with session.post(f"{base}/api/v1/login-links", json=body,
                            headers={"Authorization": f"Bearer {token.token}"}) as reply:
        assert reply.status == 200, await reply.text()
        url = (await reply.json())["url"]
    path = url[url.index("/login"):]
    async with session.get(f"{base}{path}") as page:
        assert page.status == 200 and str(page.url).endswith("/")
        return await page.text()


def session() -> aiohttp.ClientSession:
    # unsafe=True: aiohttp keeps no cookies for a bare IP address otherwise.
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


def test_the_console_is_package_data_and_fetches_nothing_but_its_own_api():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "console.html" in config["tool"]["setuptools"]["package-data"]["distributor"]
    page = api_module.CONSOLE.read_text()
    assert api_module.CONSOLE.parent.name == "distributor"
    # The only absolute URL is the SVG namespace (a name, never fetched): no CDN, no font, no script src.
    assert set(re.findall(r"https?://[^\s\"'`)]+", page)) == {"http://www.w3.org/2000/svg"}
    assert not re.search(r"<script[^>]+src|<link[^>]+stylesheet|@import|url\(", page)
    assert "{{ROLE}}" in page and "{{USER}}" in page


def test_every_api_path_the_console_calls_is_served():
    page = api_module.CONSOLE.read_text()
    for path in ('"/api/v1/status"', "`/api/v1/events?since=", '"/api/v1/events/stream"'):
        assert path in page, path

    async def scenario(base, api, core):
        headers = {"Authorization": f"Bearer {ADMIN.token}"}
        async with session() as s:
            for path in ("/api/v1/status", "/api/v1/events", "/api/v1/nodes/web2"):
                async with s.get(f"{base}{path}", headers=headers) as reply:
                    assert reply.status == 200, path
            for action in ("drain", "ready"):
                assert f"/api/v1/nodes/${{quoted}}/{action}" in page
                async with s.post(f"{base}/api/v1/nodes/web2/{action}", headers=headers) as reply:
                    assert reply.status == 200, action
            assert "/api/v1/nodes/${quoted}/weight" in page
            async with s.put(f"{base}/api/v1/nodes/web2/weight", json={"weight": 3}, headers=headers) as reply:
                assert reply.status == 200 and (await reply.json())["node"]["weight"] == 3

    serve(scenario)


def test_the_page_carries_the_sessions_role_and_an_escaped_name():
    async def scenario(base, api, core):
        async with session() as s:
            async with s.get(f"{base}/") as reply:
                assert reply.status == 401  # no session, no page
            page = await login(s, base, ADMIN)
            assert 'data-role="admin"' in page and 'data-user="alice"' in page
        async with session() as s:
            page = await login(s, base, ADMIN, role="viewer")
            assert 'data-role="viewer"' in page
        api._tokens[VIEWER.token] = VIEWER
        async with session() as s:
            async with s.post(f"{base}/api/v1/login-links",
                              headers={"Authorization": f"Bearer {VIEWER.token}"}) as reply:
                assert reply.status == 403  # a viewer cannot mint links
        # A name with markup in the token file stays text on the page.
        api._tokens[ADMIN.token] = ApiToken("<b>eve</b>", "admin", ADMIN.token)
        async with session() as s:
            page = await login(s, base, ADMIN)
            assert "&lt;b&gt;eve&lt;/b&gt;" in page and "<b>eve</b>" not in page

    serve(scenario)


def test_a_login_link_works_once():
    async def scenario(base, api, core):
        async with session() as s:
            async with s.post(f"{base}/api/v1/login-links",
                              headers={"Authorization": f"Bearer {ADMIN.token}"}) as reply:
                url = (await reply.json())["url"]
            path = url[url.index("/login"):]
            async with s.get(f"{base}{path}", allow_redirects=False) as first:
                assert first.status == 302
        async with session() as s:
            async with s.get(f"{base}{path}", allow_redirects=False) as second:
                assert second.status == 401

    serve(scenario)


def test_console_changes_need_the_console_header_and_the_admin_role():
    async def scenario(base, api, core):
        async with session() as s:
            await login(s, base, ADMIN)
            async with s.post(f"{base}/api/v1/nodes/web2/drain") as reply:
                assert reply.status == 403  # the cookie alone: another site's form could send it
            async with s.post(f"{base}/api/v1/nodes/web2/drain", headers={"Authorization": "x"}) as reply:
                assert reply.status == 403  # nor the cookie with an Authorization header that matches no token
            assert core.node_view("web2", 0.0)["admin"] == "ready"
            async with s.post(f"{base}/api/v1/nodes/web2/drain", headers=CONSOLE_HEADER) as reply:
                assert reply.status == 200
                assert (await reply.json())["node"]["state"] == "drain"
        async with session() as s:
            await login(s, base, ADMIN, role="viewer")
            async with s.post(f"{base}/api/v1/nodes/web2/ready", headers=CONSOLE_HEADER) as reply:
                assert reply.status == 403
            async with s.get(f"{base}/api/v1/nodes/web2") as reply:
                assert reply.status == 200  # viewers read
        assert core.node_view("web2", 0.0)["admin"] == "drain"

    serve(scenario)


def test_the_stream_opens_with_a_nodes_event_of_the_one_shape():
    async def scenario(base, api, core):
        async with session() as s:
            await login(s, base, ADMIN)
            async with s.get(f"{base}/api/v1/events/stream", timeout=aiohttp.ClientTimeout(total=10)) as stream:
                assert stream.headers["Content-Type"].startswith("text/event-stream")
                buffer = b""
                while b"\n\n" not in buffer:
                    buffer += await stream.content.readany()
        name, data = buffer.split(b"\n\n", 1)[0].decode().split("\n", 1)
        assert name == "event: nodes"
        snapshot = json.loads(data.removeprefix("data: "))
        # The periodic events are made by the same method (api._snapshot); the console parses one shape.
        assert snapshot.keys() == api._snapshot().keys() == {"nodes", "role", "failover"}
        assert [n["name"] for n in snapshot["nodes"]] == ["web1", "web2", "web3"]
        assert snapshot["role"] == "active" and snapshot["failover"] == {"role": "alone", "peers": []}

    serve(scenario)


def test_a_change_on_the_standby_is_a_409_naming_the_active_and_changes_nothing():
    pair = Pair()
    pair.step(1.0)
    standby = pair.cores["dist2"]

    async def scenario(base, api, core):
        async with session() as s:
            async with s.post(f"{base}/api/v1/nodes/web2/drain",
                              headers={"Authorization": f"Bearer {ADMIN.token}"}) as reply:
                assert reply.status == 409
                body = await reply.json()
        assert body["error"] == "dist2 is the backup; make changes on the active (dist1)"
        assert core.node_view("web2", 0.0)["admin"] == "ready"
        assert not [e for e in api.events.since(0) if e["kind"] == "change"]  # no change to report

    serve(scenario, standby)


class SnapshotsOnly:
    """The core as an observer may see it: its snapshot and view methods; reading any part of it fails."""

    VIEWS = {"stats", "nodes", "node_view", "service_views", "connections", "explain"}

    def __init__(self, core: DistributorCore):
        self._core = core

    def __getattr__(self, name: str):
        if name not in self.VIEWS:
            raise AttributeError(f"observers read snapshots: core.{name} is none")
        return getattr(self._core, name)


def test_services_connections_and_failover_read_views_and_keep_their_json():
    core = DistributorCore("dist1", Mode.REWRITE, [service_spec(nodes=("web1", "web2", "web3"))], 100)
    core.start(0.0, 0.0)
    for port in (40000, 40001):  # round-robin: web1, web2
        core.interposer.decide(tcp(CLIENT, VIP, port, 80, "S"), 0.0)

    async def scenario(base, api, _core):
        headers = {"Authorization": f"Bearer {ADMIN.token}"}
        async with session() as s:
            async with s.get(f"{base}/api/v1/services", headers=headers) as reply:
                assert reply.status == 200
                assert await reply.json() == [{"name": "web", "vip": VIP, "port": 80, "policy": "round-robin",
                                               "nodes": ["web1", "web2", "web3"]}]
            async with s.get(f"{base}/api/v1/connections?node=web2", headers=headers) as reply:
                assert reply.status == 200
                (row,) = await reply.json()
                assert row == {"client": f"{CLIENT}:40001", "vip": f"{VIP}:80", "service": "web", "node": "web2",
                               "state": "syn_seen", "idle": row["idle"]} and row["idle"] >= 0
            async with s.get(f"{base}/api/v1/failover", headers=headers) as reply:
                assert await reply.json() == {"role": "alone", "peers": []}

    serve(scenario, SnapshotsOnly(core))  # type: ignore[arg-type]


def test_the_failover_view_has_the_metrics_takeover_phases_without_idle_time():
    pair = Pair()
    pair.step(1.0)
    pair.crash("dist1")
    pair.step(1.0)
    core = pair.cores["dist2"]
    takeover = core.stats(pair.now).failover.last_takeover
    started, last_heartbeat = takeover.started, takeover.last_heartbeat
    core.handle(CommandDone(ClaimAddresses(None), started + 0.010))
    # No client sent anything for 5 s after the addresses were claimed; then it took 20 ms to forward.
    core.handle(FirstForward(at=started + 5.030, arrived=started + 5.010))

    async def scenario(base, api, _core):
        async with session() as s:
            async with s.get(f"{base}/api/v1/failover", headers={"Authorization": f"Bearer {ADMIN.token}"}) as reply:
                view = await reply.json()
        assert view["role"] == "active" and list(view["last_takeover"]) == ["term", "decided", "claimed",
                                                                             "first_forward"]
        expected = takeover_phases(core.stats(pair.now).failover.last_takeover)
        assert view["last_takeover"] == {"term": takeover.term, **{k: round(v, 4) for k, v in expected.items()}}
        assert view["last_takeover"]["decided"] == round(started - last_heartbeat, 4)
        assert view["last_takeover"]["claimed"] == 0.01
        assert view["last_takeover"]["first_forward"] == 0.03  # 5.03 s from the decision, 5 s of it idle

    serve(scenario, core)
