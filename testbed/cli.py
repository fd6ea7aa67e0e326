"""``cluster-testbed``: the namespace testbed with docker-compose-like verbs.

Contract: each verb acts on the run selected by ``-p NAME`` (default
``cluster``) and exits 0 on success, 1 with a one-line reason on failure, 2
on a usage error.  ``exec`` exits with the command's own status.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from distributor.balancer import Policy

from .runner import DEFAULT_PROJECT, Options, Testbed, TestbedError
from .topology import MAX_ACTIVE_ACTIVE, MAX_NODES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cluster-testbed",
        description="Run the distributor's cluster (client, dist1, dist2, web1..N; with up --active-active N: client, "
        "router, dist1..N, web1..N) in network namespaces on this machine. Needs root. Verbs mirror docker compose.",
    )
    parser.add_argument("-p", "--project", default=DEFAULT_PROJECT,
                        help=f"name of the run; prefixes every namespace (default: {DEFAULT_PROJECT})")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    up = verbs.add_parser("up", help="build the cluster, start every service, return when the VIP answers")
    up.add_argument("--nodes", type=int, default=3, help=f"number of web nodes, 1 to {MAX_NODES} (default: 3)")
    # --policy and --mode default to None, so that --active-active can tell a default from an explicit choice.
    up.add_argument("--policy", default=None,
                    choices=[p.value for p in Policy],
                    help="balancing policy of the distributor (default: round-robin; with --active-active: maglev, "
                         "the only one allowed)")
    up.add_argument("--capacity", type=int, default=262_144, help="connection table capacity (default: 262144)")
    up.add_argument("--mode", choices=["rewrite", "kernel", "dsr"], default=None,
                    help="the distributors' data path: rewrite every packet in user space, kernel-assisted, or dsr "
                         "(direct server return: the node answers the client itself; only with --active-active, "
                         "where it is the default and the only choice) (default: rewrite)")
    up.add_argument("--active-active", type=int, default=0, metavar="N",
                    help=f"N distributors (2 to {MAX_ACTIVE_ACTIVE}), all active behind a BGP router (BIRD) that "
                         "spreads the VIP's flows over them by ECMP, instead of a primary and a backup; "
                         "mode dsr, policy maglev")
    up.add_argument("--preempt", action="store_true", help="a returning dist1 takes the addresses back once caught up")
    up.add_argument("--monitor", action="store_true",
                    help="add a monitor host (198.51.100.9) running Prometheus (9090) and Alertmanager (9093) with "
                         "deploy/prometheus's files, scraping every distributor and every node agent")
    up.add_argument("--ipv6", action=argparse.BooleanOptionalAction, default=None,
                    help="the distributors also serve the VIP6 2001:db8:203::1 (service http6; the network is dual "
                         "stack either way; active-active is IPv4 only) (default: "
                         f"{'on' if Options().ipv6 else 'off'})")
    up.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the VIP (default: 60)")

    verbs.add_parser("down", help="stop everything and remove every namespace and file of the run")
    verbs.add_parser("ps", help="list hosts, addresses and services")
    run = verbs.add_parser("exec", help="run a command inside a host: exec HOST -- CMD...")
    run.add_argument("host")
    run.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    for verb, text in (
        ("kill", "SIGKILL every process of a host and take its links down"),
        ("stop", "stop a host's services (SIGTERM) and take its links down"),
        ("start", "bring a host's links up and start its services"),
    ):
        verbs.add_parser(verb, help=text).add_argument("host")
    ctl = verbs.add_parser("ctl", help="distributorctl against the active distributor (with --active-active: dist1) "
                                       "with this run's admin token: "
                                       "ctl [--host DIST] [--viewer] ARGS... (e.g. ctl nodes --json, ctl console-url)")
    ctl.add_argument("--host", help="a distributor other than the active one")
    ctl.add_argument("--viewer", action="store_true", help="use the run's viewer token instead of the admin one")
    ctl.add_argument("args", nargs=argparse.REMAINDER, help="distributorctl's arguments")
    logs = verbs.add_parser("logs", help="print the logs of a host's services")
    logs.add_argument("host")
    logs.add_argument("-n", "--lines", type=int, default=0, help="only the last N lines of each log")
    return parser


def check_up_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill in --mode and --policy, and refuse what --active-active does not run (exits 2, like argparse)."""
    count = args.active_active
    if not count:
        if args.mode == "dsr":
            parser.error("--mode dsr needs --active-active N: a primary and a backup run rewrite or kernel")
        args.mode = args.mode or "rewrite"
        args.policy = args.policy or "round-robin"
        return
    if not 2 <= count <= MAX_ACTIVE_ACTIVE:
        parser.error(f"--active-active {count}: use 2 to {MAX_ACTIVE_ACTIVE} distributors")
    if args.mode not in (None, "dsr"):
        parser.error(f"--mode {args.mode} cannot be used with --active-active: its distributors run dsr only "
                     "(the nodes answer the client directly)")
    if args.policy not in (None, "maglev"):
        parser.error(f"--policy {args.policy} cannot be used with --active-active: its distributors run maglev only "
                     "(every distributor must pick the same node for a flow)")
    if args.preempt:
        parser.error("--preempt is a failover option; --active-active has no primary to take addresses back")
    if args.ipv6:
        parser.error("--ipv6 cannot be used with --active-active: its testbed is IPv4 only")
    args.mode, args.policy = "dsr", "maglev"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb == "up":
        check_up_arguments(parser, args)
    logging.basicConfig(level=logging.INFO, format="cluster-testbed: %(message)s")
    if os.geteuid() != 0:
        print("cluster-testbed: needs root (network namespaces, iptables)", file=sys.stderr)
        return 1
    try:
        return _dispatch(args)
    except TestbedError as exc:
        print(f"cluster-testbed: {exc}", file=sys.stderr)
        return 1
    except KeyError as exc:
        print(f"cluster-testbed: {exc.args[0]}", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace) -> int:
    if args.verb == "up":
        try:
            ipv6 = {} if args.ipv6 is None else {"ipv6": args.ipv6}
            options = Options(nodes=args.nodes, policy=args.policy, capacity=args.capacity, mode=args.mode,
                              preempt=args.preempt, monitor=args.monitor, active_active=args.active_active, **ipv6)
            bed = Testbed(args.project, options)
        except ValueError as exc:
            raise TestbedError(str(exc)) from None
        bed.up(timeout=args.timeout)
        if args.active_active:
            print(f"{args.project}: up with {args.active_active} active distributor(s) and {args.nodes} web node(s); "
                  f"the router has {args.active_active} paths to the VIP, and http://{bed.vip}/ answers")
        else:
            vip6 = f"; VIP6 http://[{bed.vip6}]/ answers" if bed.dual_stack else ""
            print(f"{args.project}: up with {args.nodes} web node(s); VIP http://{bed.vip}/ answers{vip6}")
        if args.monitor:
            print(f"{args.project}: Prometheus on the monitor host: cluster-testbed -p {args.project} exec monitor -- "
                  "curl -s localhost:9090/api/v1/alerts")
        return 0
    if args.verb == "down":
        try:
            bed = Testbed.load(args.project)
        except TestbedError:
            bed = Testbed(args.project)  # no state: still sweep stale namespaces of this project
        removed = bed.down()
        print(f"{args.project}: removed {len(removed)} namespace(s)")
        return 0
    bed = Testbed.load(args.project)
    if args.verb == "ps":
        print(f"{'HOST':8} {'NETNS':20} {'SERVICE':12} {'PID':>7} {'STATE':8} ADDRESSES")
        for row in bed.ps():
            pid = str(row["pid"] or "-")
            print(f"{row['host']:8} {row['netns']:20} {row['service']:12} {pid:>7} {row['state']:8} {' '.join(row['addresses'])}")
        return 0
    if args.verb == "exec":
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        if not command:
            raise TestbedError("exec needs a command: cluster-testbed exec HOST -- CMD...")
        argv = bed.exec_argv(args.host, command)
        os.execvp(argv[0], argv)
    if args.verb == "ctl":
        ctl_args = args.args[1:] if args.args[:1] == ["--"] else args.args
        if not ctl_args:
            raise TestbedError("ctl needs distributorctl's arguments, e.g. cluster-testbed ctl nodes")
        # distributorctl's own --json goes after its command; accept it before too.
        if ctl_args[0] == "--json":
            ctl_args = ctl_args[1:] + ["--json"]
        if "--json" in ctl_args[1:]:
            ctl_args = ["--json"] + [a for a in ctl_args if a != "--json"]
        result = bed.ctl(ctl_args, host=args.host, role="viewer" if args.viewer else "admin")
        sys.stdout.write(result.stdout)
        sys.stderr.write(result.stderr)
        return result.returncode
    if args.verb in ("kill", "stop", "start"):
        getattr(bed, args.verb)(args.host)
        print(f"{args.project}: {args.verb} {args.host}: done")
        return 0
    if args.verb == "logs":
        host = bed.topology.host(args.host)
        if not host.services:
            print(f"{args.host} runs no services")
        for service in host.services:
            print(f"==> {args.host}/{service} <==")
            text = bed.log_path(args.host, service).read_text(errors="replace") if bed.log_path(args.host, service).exists() else ""
            lines = text.splitlines()
            print("\n".join(lines[-args.lines:] if args.lines else lines))
        return 0
    raise TestbedError(f"unknown verb {args.verb}")


if __name__ == "__main__":
    sys.exit(main())
