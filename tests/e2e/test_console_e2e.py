"""The web console in a real browser: Debian's chromium, driven by Playwright, on the cluster LAN.

Chromium runs inside the testbed's dist2 namespace (a host on the management side, as an
operator's browser would be; the client side cannot reach the API, by design) through an
``executable_path`` wrapper that does ``ip netns exec``.  No browser is downloaded: Playwright's
Python package drives ``/usr/bin/chromium`` over its pipe, with a fresh profile per test.

``CONSOLE_SCREENSHOT=docs/console.png`` makes the drain test save a screenshot of the console
(web2 drained, wrk still running) for the README.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from testbed import wrk
from testbed.runner import wait_until

sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs Playwright's Python package "
                               "(pip install -e '.[test]')")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
BROWSER_HOST = "dist2"
NODES = ("web1", "web2", "web3")
WRK_SECONDS = 20.0  # long enough to drain web2 and see the rest still served, all while wrk runs
SHOT_SAMPLES = 8  # seconds of chart before the drain in the screenshot
UI_TIMEOUT_MS = 15_000  # the page updates once a second; this is load headroom, not an expected time

pytestmark = pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                                reason=f"the browser test needs Debian's chromium at {CHROMIUM} (scripts/install.sh "
                                       "installs it)")


@pytest.fixture(scope="module")
def bed(make_testbed):
    return make_testbed("wcon", nodes=3)


@pytest.fixture
def browser(bed, tmp_path):
    """open(url) -> a page in a fresh chromium inside BROWSER_HOST; everything is closed after the test."""
    wrapper = tmp_path / "chromium-in-netns"
    # exec: no shell stays between Playwright and chromium; its pipe (fds 3 and 4) passes through.
    wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {bed.ns(BROWSER_HOST)} {CHROMIUM} "$@"\n')
    wrapper.chmod(0o755)
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(wrapper), args=CHROMIUM_ARGS, headless=True,
            viewport={"width": 1280, "height": 760}, timeout=60_000)
        errors: list[str] = []

        def open_page(url: str):
            page = context.new_page()
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(url)
            return page

        try:
            yield open_page
        finally:
            context.close()
        assert not errors, f"the console raised in the browser: {errors}"


def login_url(bed, role: str = "admin") -> str:
    return bed.ctl(["console-url", "--role", role], check=True).stdout.strip()


def cell(page, node: str, field: str):
    return page.locator(f'tr[data-node="{node}"] [data-field="{field}"]')


def number(page, node: str, field: str) -> int:
    return int(cell(page, node, field).inner_text())


def chart_samples(page, node: str) -> int:
    points = page.locator(f'#chart polyline[data-node="{node}"]').get_attribute("points") or ""
    return len(points.split())


def state(page, node: str):
    return cell(page, node, "state").locator(".badge")


def test_the_console_drains_web2_under_load_and_shows_its_connections_fall_to_zero(bed, browser):
    expect = sync_api.expect
    page = browser(login_url(bed))
    for node in NODES:
        expect(state(page, node)).to_have_text("up", timeout=UI_TIMEOUT_MS)
    expect(page.locator('[data-field="own-role"]')).to_have_text("active", timeout=UI_TIMEOUT_MS)
    expect(page.locator('[data-field="live"]')).to_have_text("live")

    # A new connection per request: the drained node's open connections can reach zero while wrk runs.
    load = bed.popen("client", wrk.command(f"http://{bed.vip}/1k.bin", duration=WRK_SECONDS, connections=16,
                                           close=True, timeout=5),
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    started = time.monotonic()
    try:
        before = number(page, "web2", "total")
        wait_until(lambda: number(page, "web2", "total") > before + 100, 10, "web2 to serve through the VIP (page)")
        shot = os.environ.get("CONSOLE_SCREENSHOT")
        if shot:  # a chart with some history under load before the drain, for the picture
            wait_until(lambda: chart_samples(page, "web2") >= SHOT_SAMPLES, 20, f"{SHOT_SAMPLES} samples in the chart")
        page.locator('tr[data-node="web2"] button[data-action="drain"]').click()
        expect(state(page, "web2")).to_have_text("drain", timeout=UI_TIMEOUT_MS)
        expect(cell(page, "web2", "connections")).to_have_text("0", timeout=UI_TIMEOUT_MS)
        expect(cell(page, "web2", "drain")).to_contain_text("drained after", timeout=UI_TIMEOUT_MS)
        expect(page.locator('[data-field="message"]')).to_contain_text("drain web2: done")
        drained_total = number(page, "web2", "total")
        others = {n: number(page, n, "total") for n in ("web1", "web3")}
        # The others keep taking new connections and web2 none, as the page shows it.
        wait_until(lambda: all(number(page, n, "total") > others[n] + 100 for n in others), 10,
                   "web1 and web3 to take new connections after the drain (page)")
        assert number(page, "web2", "total") == drained_total
        assert page.locator('#events [data-kind="alert"]', has_text="web2: drain → drained").count() == 1
        assert load.poll() is None, f"wrk ended before the drain was seen through ({time.monotonic() - started:.1f} s)"
        if shot:
            page.screenshot(path=shot, full_page=True)
    finally:
        output = load.communicate(timeout=WRK_SECONDS + 30)[0]
    result = wrk.parse(output)
    assert result.requests > 1000 and result.errors == 0, output

    # The page told the truth: the distributor agrees.
    view = json.loads(bed.ctl(["--json", "node", "web2"], check=True).stdout)
    assert view["admin"] == "drain" and view["connections"] == 0 and view["drain"]["drained"]
    page.locator('tr[data-node="web2"] button[data-action="ready"]').click()
    expect(state(page, "web2")).to_have_text("up", timeout=UI_TIMEOUT_MS)
    expect(page.locator('tr[data-node="web2"] button[data-action="ready"]')).to_be_disabled()


def test_a_viewer_sees_no_actions_and_its_changes_are_refused(bed, browser):
    expect = sync_api.expect
    page = browser(login_url(bed, "viewer"))
    for node in NODES:
        expect(state(page, node)).to_have_text("up", timeout=UI_TIMEOUT_MS)
    assert page.locator("[data-action]").count() == 0
    # What a viewer's session could still try by hand, with the console's header:
    status = page.evaluate("""async () => (await fetch("/api/v1/nodes/web2/drain",
        {method: "POST", headers: {"X-Requested-With": "distributor-console"}})).status""")
    assert status == 403
    assert json.loads(bed.ctl(["--json", "node", "web2"], check=True).stdout)["admin"] == "ready"


def test_a_login_link_works_once(bed, browser):
    url = login_url(bed)
    page = browser(url)
    sync_api.expect(state(page, "web1")).to_have_text("up", timeout=UI_TIMEOUT_MS)
    again = page.context.new_page()
    answer = again.goto(url)
    assert answer.status == 401 and "unknown, used or expired" in again.inner_text("body")
