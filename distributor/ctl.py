"""``distributorctl``: the control API from a shell (program).

Contract: ``distributorctl [--url URL] [--token TOKEN | --token-file FILE] COMMAND ...`` talks to a
distributor's control API (``$DISTRIBUTOR_URL``, ``$DISTRIBUTOR_TOKEN`` by default).  Reads print a
table, or JSON with ``--json``.  Exit codes scripts can rely on: 0 done, 1 the distributor refused
(the message says why: 400 bad value, 401/403 token, 404 unknown name, 409 conflict), 2 usage
error, 3 the distributor could not be reached.  ``drain NODE --wait`` returns when the node's last
connection has ended (or exits 1 after ``--timeout`` seconds).

Content and tasks on the nodes (docs/administration.md)::

    content push PATH [--as DEST] [--wait]     a file, or a directory's tree (sent as a tar stream built
                                               in a temporary file, never in memory); DEST "/" is the root
    content delete DEST [--wait]               a managed path, or every managed path under it
    content status [--json]                    per node: state, version, what differs; every path's digests
    task run NAME [--nodes a,b] [--priority high|normal|low] [--arg KEY=VALUE]... [--wait]
    task list, task show ID
    task add BUNDLE_FILE [--wait]              a signed task bundle (distributor-sign sign ...) to every node
    task remove NAME [--wait]                  a bundle, from every node
    task bundles [--json]                      the bundles, and per node its bundles version and what differs

``content push|delete --wait`` returns 0 once every live node holds the new version (a dead node gets it
when it returns, and takes no connection until then), 1 after ``--timeout``; ``task add|remove --wait``
likewise for the bundles' version (a bundle never keeps a node out of service).  ``task run --wait``
returns 0 when every node finished the task with exit status 0, 1 otherwise.  A local file that cannot
be read is a usage error (2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, BinaryIO

__all__ = ["main"]

DEFAULT_URL = "http://127.0.0.1:8410"
UPLOAD_TIMEOUT = 600.0  # seconds a socket operation of a push may take (the reply comes after the blob is stored)
FINISHED_TASK_STATES = {"done", "failed", "timed_out", "expired", "interrupted", "refused", "abandoned"}


class UsageError(Exception):
    pass


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
        data = json.dumps(body).encode() if body is not None else None
        return self._send(method, path, data, query, {"Content-Type": "application/json"} if data is not None else {},
                          self.timeout)

    def upload(self, method: str, path: str, source: BinaryIO, size: int, content_type: str,
               query: dict | None = None) -> Any:
        """Send an open file as the body, streamed (urllib reads it in blocks)."""
        return self._send(method, path, source, query, {"Content-Type": content_type, "Content-Length": str(size)},
                          max(self.timeout, UPLOAD_TIMEOUT))

    def _send(self, method: str, path: str, data: Any, query: dict | None, headers: dict, timeout: float) -> Any:
        url = f"{self.url}{path}"
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        request = urllib.request.Request(url, data=data, method=method)
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        for name, value in headers.items():
            request.add_header(name, value)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
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
    parser.add_argument("--url", action="append",
                        help="the control API (default: $DISTRIBUTOR_URL or " + DEFAULT_URL + "); repeat it to run "
                        "the command on each distributor in turn (active-active: a node-set change must be made on "
                        "every one); $DISTRIBUTOR_URL may list several, separated by commas")
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
    add = verbs.add_parser("add", help="add a node: add NODE ADDRESS SERVICE[:PORT[:WEIGHT]]... "
                                       "(PORT defaults to 80, WEIGHT to 1)")
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
    for reader in ("nodes", "node", "services", "explain", "connections", "failover", "events", "status"):
        _json_argument(verbs.choices[reader])  # "distributorctl nodes --json" as well as "distributorctl --json nodes"
    _content_parser(verbs)
    _task_parser(verbs)
    return parser


def _wait_arguments(parser, until: str) -> None:
    parser.add_argument("--wait", action="store_true", help=until)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds --wait waits at most (default: 600)")


def _json_argument(parser) -> None:
    # SUPPRESS: a subcommand's default must not undo "distributorctl --json content status".
    parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")


def _content_parser(verbs) -> None:
    content = verbs.add_parser("content", help="content on every node's document root: push, delete, status")
    actions = content.add_subparsers(dest="content_verb", required=True, metavar="ACTION")
    push = actions.add_parser("push", help="push a file, or a directory's tree, to every node")
    push.add_argument("path", help="a file, or a directory (every regular file under it)")
    push.add_argument("--as", dest="dest", help="where, relative to the document root (default: the file's or the "
                      "directory's own name; for a directory \"/\" is the root itself)")
    _wait_arguments(push, "return once every live node holds it")
    delete = actions.add_parser("delete", help="delete a managed path (or everything managed under it) everywhere")
    delete.add_argument("dest")
    _wait_arguments(delete, "return once every live node has it deleted")
    status = actions.add_parser("status", help="per node: content version, every managed path's digest, what differs")
    _json_argument(status)


def _task_parser(verbs) -> None:
    task = verbs.add_parser("task", help="administration tasks on the nodes: run, list, show; signed bundles: add, "
                                         "remove, bundles")
    actions = task.add_subparsers(dest="task_verb", required=True, metavar="ACTION")
    run = actions.add_parser("run", help="run a task (an allowlisted built-in or a signed bundle) on the nodes")
    run.add_argument("name")
    run.add_argument("--nodes", help="comma-separated node names (default: every node)")
    run.add_argument("--priority", choices=["high", "normal", "low"], help="default: the task's own")
    run.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE", help="an argument (repeatable)")
    _wait_arguments(run, "return when every node finished it")
    listing = actions.add_parser("list", help="recent task requests and their state on each node")
    listing.add_argument("--limit", type=int, default=20)
    _json_argument(listing)
    show = actions.add_parser("show", help="one request: each node's state, exit status, duration and output")
    show.add_argument("id")
    _json_argument(show)
    add = actions.add_parser("add", help="add a signed task bundle (made by distributor-sign sign) to every node; "
                             "a node runs it only if it trusts the key that signed it")
    add.add_argument("bundle", metavar="BUNDLE_FILE")
    _wait_arguments(add, "return once every live node holds it")
    remove = actions.add_parser("remove", help="remove a bundle from every node")
    remove.add_argument("name")
    _wait_arguments(remove, "return once every live node has it removed")
    listed = actions.add_parser("bundles", help="the bundles every node must hold, and each node's bundles version")
    _json_argument(listed)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    token = args.token
    if args.token_file:
        try:
            with open(args.token_file, encoding="ascii") as f:
                token = f.readline().strip()
        except OSError as exc:
            print(f"distributorctl: cannot read {args.token_file}: {exc.strerror}", file=sys.stderr)
            return 2
        except UnicodeDecodeError:
            print(f"distributorctl: {args.token_file} does not hold a token (expected one line of ASCII text)",
                  file=sys.stderr)
            return 2
    if token is not None and (not token.isascii() or not token.isprintable() or " " in token):
        print("distributorctl: the token is not valid: expected printable ASCII with no spaces", file=sys.stderr)
        return 2
    urls = args.url or [u.strip() for u in os.environ.get("DISTRIBUTOR_URL", DEFAULT_URL).split(",") if u.strip()]
    for url in urls:
        problem = _url_problem(url)
        if problem is not None:
            print(f"distributorctl: --url {url!r} is not valid: {problem}; expected e.g. {DEFAULT_URL}", file=sys.stderr)
            return 2
    worst = 0
    try:
        for url in urls:
            if len(urls) > 1:
                print(f"== {url} ==", flush=True)
            code = _run_one(Client(url, token), args)
            if code == 2:
                return 2  # a usage error is the same everywhere: said once
            worst = max(worst, code)
    except KeyboardInterrupt:
        return 0
    return worst


def _run_one(client: Client, args: argparse.Namespace) -> int:
    """The command against one distributor: its exit status (0, 1 refused, 2 usage, 3 unreachable)."""
    try:
        return run(client, args)
    except UsageError as exc:
        print(f"distributorctl: {exc}", file=sys.stderr)
        return 2
    except Refused as exc:
        print(f"distributorctl: refused ({exc.status}): {exc}", file=sys.stderr)
        return 1
    except Unreachable as exc:
        print(f"distributorctl: {exc}", file=sys.stderr)
        return 3


def _url_problem(url: str) -> str | None:
    """Why ``url`` cannot name the control API, or None."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # raises ValueError for a port out of range or not a number
    except ValueError as exc:
        return str(exc)
    if parts.scheme not in ("http", "https"):
        return "it must start with http:// or https://"
    if not parts.hostname:
        return "it names no host"
    return None


def run(client: Client, args: argparse.Namespace) -> int:
    verb = args.verb
    if verb == "content":
        return run_content(client, args)
    if verb == "task":
        return run_task(client, args)
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
        if not 0 < args.timeout < float("inf"):  # checked before the drain: a refused command changes nothing
            raise UsageError(f"--timeout {args.timeout:g} is not valid; expected seconds > 0")
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
            if name in services:
                print(f"distributorctl: service {name!r} is named twice; a node has one port per service",
                      file=sys.stderr)
                return 2
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


# -- content -----------------------------------------------------------------------------------------------
def run_content(client: Client, args: argparse.Namespace) -> int:
    action = args.content_verb
    if action == "status":
        status = client.call("GET", "/api/v1/content")
        print(json.dumps(status, indent=2) if args.json else format_status(status))
        return 0
    if action == "delete":
        reply = client.call("DELETE", "/api/v1/content", query={"path": args.dest})
    else:
        reply = push(client, args.path, args.dest)
    _say(args, reply, f"version {reply['version']}: {_described(reply['paths'], action)}")
    if not args.wait:
        return 0
    return wait_for_version(client, reply["version"], args.timeout, args)


def destination(source: str, dest: str | None) -> tuple[str, bool]:
    """Where a push of ``source`` goes (the API's path) and whether it is a tree; UsageError when unreadable."""
    if not os.path.exists(source):
        raise UsageError(f"{source}: no such file or directory")
    tree = os.path.isdir(source)
    if not tree and not os.path.isfile(source):
        raise UsageError(f"{source} is not a regular file or a directory")
    name = os.path.basename(os.path.normpath(source))
    if dest is None:
        return name, tree
    return (dest.strip("/") if tree else dest), tree


def push(client: Client, source: str, dest: str | None) -> dict:
    """Push a file or a tree.  A preflight (``check=1``) asks first whether the push would be taken, so a refusal
    (role, path, size) is answered before the body is sent, not in the middle of it."""
    path, tree = destination(source, dest)
    if not tree:
        try:
            with open(source, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                _preflight(client, path, size, "application/octet-stream")
                return client.upload("PUT", "/api/v1/content", f, size, "application/octet-stream", {"path": path})
        except OSError as exc:
            raise UsageError(f"cannot read {source}: {exc.strerror}") from None
    with tempfile.TemporaryFile(prefix="distributorctl-") as spool:
        write_tree(source, spool)
        size = spool.tell()
        spool.seek(0)
        _preflight(client, path, size, "application/x-tar")
        return client.upload("PUT", "/api/v1/content", spool, size, "application/x-tar", {"path": path})


def _preflight(client: Client, path: str, size: int, content_type: str) -> None:
    client.upload("PUT", "/api/v1/content", _Empty(), 0, content_type, {"path": path, "check": 1, "size": size})


class _Empty:
    """An empty body for a preflight that must carry the tar content type."""

    def read(self, _size: int = -1) -> bytes:
        return b""


def write_tree(directory: str, out: BinaryIO) -> None:
    """A tar stream of every regular file under ``directory`` (paths relative to it); a symlink is refused."""
    files = []
    for folder, dirs, names in os.walk(directory):
        for name in sorted(dirs + names):
            full = os.path.join(folder, name)
            if os.path.islink(full):
                raise UsageError(f"{full} is a symlink; a pushed tree holds regular files and directories only")
        files += [os.path.join(folder, name) for name in sorted(names)]
    if not files:
        raise UsageError(f"{directory} holds no file to push")
    try:
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
            for full in files:
                if not os.path.isfile(full):
                    raise UsageError(f"{full} is not a regular file")
                archive.add(full, arcname=os.path.relpath(full, directory), recursive=False)
    except OSError as exc:
        raise UsageError(f"cannot read {exc.filename}: {exc.strerror}") from None


def _described(paths: list[str], action: str) -> str:
    verb = "deleted" if action == "delete" else "pushed"
    shown = ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
    return f"{verb} {shown}"


def wait_for_version(client: Client, version: int, timeout: float, args: argparse.Namespace,
                     path: str = "/api/v1/content", what: str = "version") -> int:
    """Until every live node was confirmed at ``version`` (or a later one) of ``path``'s status (the content's,
    or the bundles'): 0; 1 after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        status = client.call("GET", path)
        behind = [n for n in status["nodes"] if n["alive"] and not (n["state"] == "matches" and (n["confirmed"] or 0) >= version)]
        down = [n["node"] for n in status["nodes"] if not n["alive"]]
        if not behind:
            note = f"; {', '.join(down)} down: it gets it when it returns" if down else ""
            if note and what == "version":
                note += ", and takes no connection until then"
            if not args.json:
                print(f"every live node holds {what} {version}{note}")
            return 0
        if time.monotonic() >= deadline:
            print("distributorctl: still behind after {:g} s: {}".format(timeout, "; ".join(
                f"{n['node']} ({n['state']}{', ' + n['error'] if n.get('error') else ''})" for n in behind)),
                file=sys.stderr)
            return 1
        time.sleep(0.2)


def _node_columns(node: dict) -> tuple[str, str | None, str, object]:
    """A node's row in the content and bundle status: (what differs, its problem, when checked, its version)."""
    differs = ", ".join(f"{d['kind']} {d['path']}" for d in node["differs"][:4])
    if len(node["differs"]) > 4:
        differs += f" and {len(node['differs']) - 4} more"
    checked = "-" if node["checked_ago"] is None else f"{node['checked_ago']:.0f}s ago"
    return differs, node.get("conflict") or node.get("error"), checked, "-" if node["version"] is None else node["version"]


def format_status(status: dict) -> str:
    paths = status["paths"]
    total = sum(entry["size"] for entry in paths.values())
    lines = [f"content version {status['version']}: {len(paths)} managed path(s), {total} bytes"
             + ("" if status.get("active", True) else " (this distributor is not the active one: not checking)")]
    lines.append(f"{'NODE':10} {'STATE':9} {'VERSION':>7} {'SERVING':8} {'CHECKED':>8}  DIFFERS")
    for node in status["nodes"]:
        differs, problem, checked, version = _node_columns(node)
        serving = "held out" if node["held_out"] else ("yes" if node["alive"] else "down")
        lines.append(f"{node['node']:10} {node['state']:9} {version!s:>7} {serving:8} {checked:>8}  "
                     f"{differs or '-'}{'  (' + problem + ')' if problem else ''}")
    if paths:
        names = [node["node"] for node in status["nodes"]]
        lines.append("")
        lines.append(f"{'PATH':40} {'VERSION':>7} {'SIZE':>10} SHA256        " + " ".join(f"{n:>8}" for n in names))
        for path, entry in paths.items():
            marks = []
            for node in status["nodes"]:
                held = (node["paths"] or {}).get(path) if node["paths"] is not None else None
                marks.append("?" if node["paths"] is None else "-" if held is None else
                             "=" if held["sha256"] == entry["sha256"] else held["sha256"][:8])
            lines.append(f"{path:40} {entry['version']:>7} {entry['size']:>10} {entry['sha256'][:12]}  "
                         + " ".join(f"{m:>8}" for m in marks))
        lines.append("(= same bytes as desired, - missing, ? not checked yet, else the first digits of what it holds)")
    if status["differing"]:
        lines.append(f"differ: {', '.join(status['differing'])}")
    return "\n".join(lines)


# -- tasks -------------------------------------------------------------------------------------------------
def run_task(client: Client, args: argparse.Namespace) -> int:
    action = args.task_verb
    if action in ("add", "remove", "bundles"):
        return run_bundle(client, args)
    if action == "list":
        tasks = client.call("GET", "/api/v1/tasks", query={"limit": args.limit})
        if args.json:
            print(json.dumps(tasks, indent=2))
            return 0
        print(f"{'ID':16} {'NAME':18} {'PRIORITY':8} {'WHO':10} {'REQUESTED':19}  NODES")
        for task in tasks:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(task["requested"]))
            nodes = " ".join(f"{n}:{state}" for n, state in task["nodes"].items())
            print(f"{task['id']:16} {task['name']:18} {task['priority'] or '-':8} {task['who']:10} {when}  {nodes}")
        return 0
    if action == "show":
        task = client.call("GET", f"/api/v1/tasks/{_q(args.id)}")
        print(json.dumps(task, indent=2) if args.json else format_task(task))
        return 0
    body: dict[str, Any] = {"name": args.name, "args": parse_task_args(args.arg)}
    if args.nodes:
        body["nodes"] = [n for n in args.nodes.split(",") if n]
    if args.priority:
        body["priority"] = args.priority
    task = client.call("POST", "/api/v1/tasks", body)["task"]
    if not args.wait:
        _say(args, task, f"task {task['id']}: {task['name']} on {', '.join(task['nodes'])}")
        return 0
    deadline = time.monotonic() + args.timeout
    while not task["finished"] and time.monotonic() < deadline:
        time.sleep(0.2)
        task = client.call("GET", f"/api/v1/tasks/{_q(task['id'])}")
    print(json.dumps(task, indent=2) if args.json else format_task(task))
    if not task["finished"]:
        print(f"distributorctl: task {task['id']} not finished on every node after {args.timeout:g} s", file=sys.stderr)
        return 1
    good = all(part["state"] == "done" and part.get("exit_status") == 0 for part in task["nodes"].values())
    return 0 if good else 1


def run_bundle(client: Client, args: argparse.Namespace) -> int:
    action = args.task_verb
    if action == "bundles":
        status = client.call("GET", "/api/v1/bundles")
        print(json.dumps(status, indent=2) if args.json else format_bundles(status))
        return 0
    if action == "remove":
        reply = client.call("DELETE", f"/api/v1/bundles/{_q(args.name)}")
        _say(args, reply, f"bundles version {reply['version']}: removed {reply['removed']}")
    else:
        try:
            with open(args.bundle, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                reply = client.upload("POST", "/api/v1/bundles", f, size, "application/octet-stream")
        except OSError as exc:
            raise UsageError(f"cannot read {args.bundle}: {exc.strerror}") from None
        bundle = reply["bundle"]
        what = (f"bundle {bundle['name']} version {bundle['version']} ({bundle['priority']} priority at most, signed by "
                f"key {bundle['key']})")
        _say(args, reply, f"{what}: unchanged, every node is given these bytes already" if reply.get("unchanged")
             else f"bundles version {reply['version']}: added {what}")
    if not args.wait:
        return 0
    return wait_for_version(client, reply["version"], args.timeout, args, "/api/v1/bundles", "bundles version")


def format_bundles(status: dict) -> str:
    found = status["bundles"]
    lines = [f"bundles version {status['version']}: {len(found)} bundle(s)"
             + ("" if status.get("active", True) else " (this distributor is not the active one: not checking)")]
    if found:
        lines.append(f"{'NAME':20} {'VERSION':>7} {'PRIORITY':8} {'TIME':>7} {'MEMORY':>7} {'KEY':16}  {'ADDED BY':10} "
                     "SHA256")
        for name, b in found.items():
            lines.append(f"{name:20} {b.get('version', '-')!s:>7} {b.get('priority', '-'):8} "
                         f"{b.get('time_limit', 0):>6g}s {b.get('memory_limit', 0):>4}MiB {b.get('key', '-'):16}  "
                         f"{b.get('who', '-'):10} {b['sha256'][:12]}")
    lines.append(f"{'NODE':10} {'STATE':13} {'VERSION':>7} {'CHECKED':>8}  DIFFERS")
    for node in status["nodes"]:
        differs, problem, checked, version = _node_columns(node)
        state = node["state"] if node["alive"] else f"{node['state']}, down"
        lines.append(f"{node['node']:10} {state:13} {version!s:>7} {checked:>8}  {differs or '-'}"
                     + (f"  ({problem})" if problem else ""))
    if status["differing"]:
        lines.append(f"differ: {', '.join(status['differing'])}")
    return "\n".join(lines)


def parse_task_args(items: list[str]) -> dict[str, str]:
    values = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--arg {item!r} is not KEY=VALUE")
        values[key] = value
    return values


def format_task(task: dict) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(task["requested"]))
    lines = [f"task {task['id']}: {task['name']} ({task['priority'] or 'its own'} priority), asked by {task['who']} "
             f"at {when}{'' if task['finished'] else ', not finished'}"]
    for node, part in task["nodes"].items():
        duration = part.get("duration")
        exit_status = part.get("exit_status")
        extra = part.get("waiting") or part.get("error") or part.get("node_error") or ""
        lines.append(f"  {node}: {part['state']}"
                     + (f", exit {exit_status}" if exit_status is not None else "")
                     + (f", {duration:.3f} s" if duration is not None else "")
                     + (f" ({extra})" if extra else ""))
        output = part.get("output")
        if output:
            lines += [f"    | {line}" for line in output.rstrip("\n").splitlines()]
            if part.get("output_truncated"):
                lines.append(f"    | ... {part['output_truncated']} more bytes not kept")
    return "\n".join(lines)


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
