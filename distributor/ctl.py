"""``distributorctl``: the control API from a shell (program).

Contract: ``distributorctl [--url URL] [--token TOKEN | --token-file FILE] COMMAND ...`` talks to a
distributor's control API (``$DISTRIBUTOR_URL``, ``$DISTRIBUTOR_TOKEN`` by default).  Reads print a
table, or JSON with ``--json``.  Exit codes scripts can rely on: 0 done, 1 the distributor refused
(the message says why: 400 bad value, 401/403 token, 404 unknown name, 409 conflict), 2 usage
error, 3 the distributor could not be reached.  ``drain NODE --wait`` returns when the node's last
connection has ended (or exits 1 after ``--timeout`` seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

__all__ = ["main"]

DEFAULT_URL = "http://127.0.0.1:8410"


class Unreachable(Exception):
    pass


class Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Client:
    def __init__(self, url: str, token: str | None, timeout: float = 10.0):
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def call(self, method: str, path: str, body: Any = None, query: dict | None = None) -> Any:
        url = f"{self.url}{path}"
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method)
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read()).get("error", exc.reason)
            except (ValueError, AttributeError):
                message = str(exc.reason)
            raise Refused(exc.code, message) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise Unreachable(f"cannot reach the distributor at {self.url}: {reason}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distributorctl", description="Operate a running distributor through its "
                                     "control API: nodes, drains, weights, policies, explain, failover, events.")
    parser.add_argument("--url", default=os.environ.get("DISTRIBUTOR_URL", DEFAULT_URL),
                        help="the control API (default: $DISTRIBUTOR_URL or %(default)s)")
    parser.add_argument("--token", default=os.environ.get("DISTRIBUTOR_TOKEN"),
                        help="bearer token (default: $DISTRIBUTOR_TOKEN)")
    parser.add_argument("--token-file", help="read the token from this file (its first line)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table (every read)")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="COMMAND")
    verbs.add_parser("nodes", help="every node: state, counter, weight, connections (like ipvsadm -Ln --stats)")
    node = verbs.add_parser("node", help="one node in detail")
    node.add_argument("node")
    drain = verbs.add_parser("drain", help="no new connections; the open ones finish")
    drain.add_argument("node")
    drain.add_argument("--wait", action="store_true", help="return when its last connection has ended")
    drain.add_argument("--timeout", type=float, default=600.0, help="seconds --wait waits at most (default: 600)")
    for verb, text in (("ready", "back in service"), ("maint", "out at once; its connections are reset")):
        verbs.add_parser(verb, help=text).add_argument("node")
    weight = verbs.add_parser("weight", help="set a node's weight (0 quiesces it)")
    weight.add_argument("node")
    weight.add_argument("weight", type=int)
    weight.add_argument("--service", help="only in this service (default: every service of the node)")
    add = verbs.add_parser("add", help="add a node: add NODE ADDRESS SERVICE[:PORT[:WEIGHT]]...")
    add.add_argument("node")
    add.add_argument("address")
    add.add_argument("services", nargs="+", metavar="SERVICE[:PORT[:WEIGHT]]")
    verbs.add_parser("remove", help="take a node out of every service (its connections finish)").add_argument("node")
    policy = verbs.add_parser("policy", help="set a service's balancing policy")
    policy.add_argument("service")
    policy.add_argument("policy")
    verbs.add_parser("services", help="services, their VIPs, policies and nodes")
    explain = verbs.add_parser("explain", help="where a new connection from CLIENT[:PORT] would go, and why")
    explain.add_argument("client", metavar="CLIENT[:PORT]")
    explain.add_argument("--service")
    connections = verbs.add_parser("connections", help="table entries")
    connections.add_argument("--node")
    connections.add_argument("--limit", type=int, default=100)
    verbs.add_parser("failover", help="role, term, peers, replication lag, last takeover")
    events = verbs.add_parser("events", help="recent events")
    events.add_argument("--follow", "-f", action="store_true", help="keep printing new events (Ctrl-C ends)")
    verbs.add_parser("status", help="the distributor at a glance")
    link = verbs.add_parser("console-url", help="a one-time login link for the web console")
    link.add_argument("--role", choices=["viewer", "admin"], help="the console session's role (default: yours)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    token = args.token
    if args.token_file:
        try:
            token = open(args.token_file).readline().strip()
        except OSError as exc:
            print(f"distributorctl: cannot read {args.token_file}: {exc.strerror}", file=sys.stderr)
            return 2
    client = Client(args.url, token)
    try:
        return run(client, args)
    except Refused as exc:
        print(f"distributorctl: refused ({exc.status}): {exc}", file=sys.stderr)
        return 1
    except Unreachable as exc:
        print(f"distributorctl: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 0


def run(client: Client, args: argparse.Namespace) -> int:
    verb = args.verb
    if verb == "nodes":
        nodes = client.call("GET", "/api/v1/nodes")
        if args.json:
            print(json.dumps(nodes, indent=2))
        else:
            print(f"{'NODE':10} {'ADDRESS':16} {'STATE':11} {'ADMIN':6} {'COUNTER':>7} {'WEIGHT':>6} {'CONNS':>6} "
                  f"{'TOTAL':>9} {'NEW/S':>7}")
            for n in nodes:
                total = sum(s["connections_total"] for s in n["services"])
                print(f"{n['name']:10} {n['address'] or '-':16} {n['state']:11} {n['admin']:6} "
                      f"{n.get('heartbeat_counter', '-')!s:>7} {n['weight']:>6} {n['connections']:>6} {total:>9} "
                      f"{n.get('new_per_second', 0):>7}")
        return 0
    if verb == "node":
        return _show(client.call("GET", f"/api/v1/nodes/{_q(args.node)}"), args)
    if verb == "drain":
        reply = client.call("POST", f"/api/v1/nodes/{_q(args.node)}/drain")
        if not args.wait:
            return _show(reply, args)
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            node = client.call("GET", f"/api/v1/nodes/{_q(args.node)}")
            if node.get("drain") and node["drain"]["drained"]:
                _say(args, node, f"{args.node} drained: its last connection ended "
                                 f"{node['drain']['drained_after']:.1f} s after the drain began")
                return 0
            time.sleep(0.2)
        print(f"distributorctl: {args.node} still has open connections after {args.timeout:g} s", file=sys.stderr)
        return 1
    if verb in ("ready", "maint"):
        return _show(client.call("POST", f"/api/v1/nodes/{_q(args.node)}/{verb}"), args)
    if verb == "weight":
        body = {"weight": args.weight, **({"service": args.service} if args.service else {})}
        return _show(client.call("PUT", f"/api/v1/nodes/{_q(args.node)}/weight", body), args)
    if verb == "add":
        services = {}
        for item in args.services:
            name, _, rest = item.partition(":")
            port, _, weight = rest.partition(":")
            try:
                services[name] = {"port": int(port) if port else 80, "weight": int(weight) if weight else 1}
            except ValueError:
                print(f"distributorctl: {item!r} is not SERVICE[:PORT[:WEIGHT]]", file=sys.stderr)
                return 2
        return _show(client.call("POST", "/api/v1/nodes", {"name": args.node, "address": args.address,
                                                            "services": services}), args)
    if verb == "remove":
        return _show(client.call("DELETE", f"/api/v1/nodes/{_q(args.node)}"), args)
    if verb == "policy":
        return _show(client.call("PUT", f"/api/v1/services/{_q(args.service)}/policy", {"policy": args.policy}), args)
    if verb == "services":
        return _show(client.call("GET", "/api/v1/services"), args)
    if verb == "explain":
        answer = client.call("GET", "/api/v1/explain", query={"client": args.client, "service": args.service})
        if args.json:
            print(json.dumps(answer, indent=2))
            return 0
        for s in answer["services"]:
            print(f"{s['service']} ({s['vip']}, {s['policy']}): next connection from {answer['client']} -> "
                  f"{s['next'] or 'refused'}: {s['why']}")
            print(f"  candidates: {', '.join(s['candidates']) or 'none'}")
            for x in s["excluded"]:
                print(f"  excluded: {x['node']}: {x['reason']}")
            if s["existing"]:
                print(f"  existing connection: {s['existing']['node']} ({s['existing']['state']})")
        return 0
    if verb == "connections":
        return _show(client.call("GET", "/api/v1/connections", query={"node": args.node, "limit": args.limit}), args)
    if verb == "failover":
        return _show(client.call("GET", "/api/v1/failover"), args)
    if verb == "status":
        return _show(client.call("GET", "/api/v1/status"), args)
    if verb == "console-url":
        reply = client.call("POST", "/api/v1/login-links", {"role": args.role} if args.role else {})
        _say(args, reply, reply["url"])
        return 0
    if verb == "events":
        last = 0
        while True:
            for event in client.call("GET", "/api/v1/events", query={"since": last}):
                last = max(last, event["id"])
                if args.json:
                    print(json.dumps(event), flush=True)
                else:
                    stamp = time.strftime("%H:%M:%S", time.localtime(event["time"]))
                    if event["kind"] == "alert":
                        detail = f"{event['subject']}: {event['old']} -> {event['new']} ({event['reason']})"
                    elif event["kind"] == "change":  # who made it, and what
                        changed = " ".join(f"{k}={v}" for k, v in (event.get("args") or {}).items())
                        detail = f"{event.get('who')}: {event.get('op')} {changed}"
                    else:
                        detail = event.get("message") or json.dumps(event)
                    print(f"{stamp} {event['kind']:6} {detail}", flush=True)
            if not args.follow:
                return 0
            time.sleep(1.0)
    raise AssertionError(verb)


def _q(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def _show(body: Any, args: argparse.Namespace) -> int:
    print(json.dumps(body, indent=None if not args.json else 2) if args.json else _plain(body))
    return 0


def _say(args: argparse.Namespace, body: Any, text: str) -> None:
    print(json.dumps(body) if args.json else text)


def _plain(body: Any) -> str:
    if isinstance(body, dict) and "node" in body and isinstance(body["node"], dict):
        n = body["node"]
        return f"{n['name']}: {n['state']} (admin {n['admin']}), {n['connections']} open connection(s)"
    return json.dumps(body, indent=2)


if __name__ == "__main__":
    sys.exit(main())
