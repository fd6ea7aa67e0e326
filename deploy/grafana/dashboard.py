"""The distributor cluster's Grafana dashboard, generated as code with grafana-foundation-sdk.

``python deploy/grafana/dashboard.py`` writes ``deploy/grafana/dashboards/distributor.json``, the
file Grafana's provisioning loads (provisioning/dashboards/distributor.yml); ``--check`` exits 1
when that file differs from what this script builds (tests/unit/test_dashboard.py runs it).  One
row per concern: overview, traffic and connections per node, node health, failover and
replication, the data path and its drops, the processes.  Every query reads the Prometheus of
deploy/prometheus (datasource uid ``distributor-prometheus``), mostly through its recording rules,
and returns data in the testbed (tests/e2e/test_monitoring_e2e.py asks the real Prometheus).

grafana-foundation-sdk, not grafanalib: it is Grafana Labs' own, generated from Grafana's
schemas (a panel option that does not exist does not type-check), released with Grafana (10.1
schema here), and has no dependencies; grafanalib's last release is from January 2024.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableRefresh, VariableSort

OUTPUT = Path(__file__).resolve().parent / "dashboards" / "distributor.json"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="distributor-prometheus")
SERVICE = 'service=~"$service"'
NODE = 'node=~"$node"'
SERVICE_NODE = f"{SERVICE}, {NODE}"


def query(expr: str, legend: str = "", ref: str = "A") -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(DATASOURCE)


def targets(panel, queries: list[tuple[str, str]]):
    for i, (expr, legend) in enumerate(queries):
        panel = panel.with_target(query(expr, legend, chr(ord("A") + i)))
    return panel


def graph(title: str, description: str, unit: str, queries: list[tuple[str, str]], width: int = 8,
          stacked: bool = False) -> timeseries.Panel:
    panel = (timeseries.Panel().title(title).description(description).unit(unit).span(width).height(8)
             .datasource(DATASOURCE).fill_opacity(10).line_width(1).show_points("never"))
    if stacked:
        from grafana_foundation_sdk.builders.common import StackingConfig
        from grafana_foundation_sdk.models.common import StackingMode

        panel = panel.stacking(StackingConfig().mode(StackingMode.NORMAL))
    return targets(panel, queries)


def single(title: str, description: str, unit: str, queries: list[tuple[str, str]], width: int = 4) -> stat.Panel:
    panel = stat.Panel().title(title).description(description).unit(unit).span(width).height(4).datasource(DATASOURCE)
    return targets(panel, queries)


def variable(name: str, label: str, metric: str) -> dashboard.QueryVariable:
    return (dashboard.QueryVariable(name).label(label).datasource(DATASOURCE)
            .query({"query": f"label_values({metric}, {name})", "refId": "PrometheusVariableQueryEditor-VariableQuery"})
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC)
            .multi(True).include_all(True).all_value(".*"))


def build() -> dict:
    board = (dashboard.Dashboard("Distributor cluster").uid("distributor-cluster")
             .description("One VIP, many web nodes: traffic per node, health, failover, the data path (issue 13)")
             .tags(["distributor"]).refresh("10s").time("now-30m", "now").timezone("browser").editable()
             .with_variable(variable("service", "Service", "distributor_backend_connections_total"))
             .with_variable(variable("node", "Node", "distributor_node_state")))

    board = (board.with_row(dashboard.Row("Overview"))
             .with_panel(single("Active distributors", "Distributors in the active role (1 is right)", "short",
                                [("cluster:distributor_active:count", "active")]))
             .with_panel(single("Caught-up standbys", "Backups whose replica is complete and current", "short",
                                [("cluster:distributor_standby_caught_up:count", "standbys")]))
             .with_panel(single("Healthy nodes", "Nodes each service may send new connections to", "short",
                                [(f"service:distributor_backends_eligible:max{{{SERVICE}}}", "{{service}}")]))
             .with_panel(single("Connections per second", "New connections placed on the nodes", "cps",
                                [(f"sum(service_node:distributor_backend_connections:rate1m{{{SERVICE_NODE}}})",
                                  "new")]))
             .with_panel(single("Table usage", "Connection table entries over capacity, fullest distributor",
                                "percentunit", [("max(instance:distributor_connection_table_usage:ratio)", "used")]))
             .with_panel(single("Alerts firing", "Alerts of deploy/prometheus firing now", "short",
                                [('count(ALERTS{alertstate="firing"}) or vector(0)', "firing")])))

    board = (board.with_row(dashboard.Row("Traffic and connections per node"))
             .with_panel(graph("New connections per node", "Connections per second placed on each node, over every "
                               "distributor", "cps",
                               [(f"service_node:distributor_backend_connections:rate1m{{{SERVICE_NODE}}}",
                                 "{{service}} {{node}}")], stacked=True))
             .with_panel(graph("Open connections per node", "The active distributor's open connections per node",
                               "short", [(f"service_node:distributor_backend_connections_open:sum{{{SERVICE_NODE}}}",
                                          "{{service}} {{node}}")], stacked=True))
             .with_panel(graph("Throughput per node", "IP bytes per second through each node, both directions "
                               "(rewrite mode; kernel mode counts none)", "Bps",
                               [(f"service_node:distributor_backend_bytes_out:rate1m{{{SERVICE_NODE}}}",
                                 "{{node}} to clients"),
                                (f"service_node:distributor_backend_bytes_in:rate1m{{{SERVICE_NODE}}}",
                                 "{{node}} from clients")]))
             .with_panel(graph("Weight and slow start", "Configured weight, and the share of it a node gets while "
                               "it ramps up after returning", "short",
                               [(f"max by (service, node) (distributor_backend_weight{{{SERVICE_NODE}}})",
                                 "{{node}} weight"),
                                (f"min by (service, node) (distributor_backend_ramp_ratio{{{SERVICE_NODE}}})",
                                 "{{node}} ramp")], width=12))
             .with_panel(graph("Connections table", "Entries per distributor, and its capacity", "short",
                               [("distributor_connection_table_entries", "{{distributor}} entries"),
                                ("distributor_connection_table_capacity", "{{distributor}} capacity")], width=12)))

    board = (board.with_row(dashboard.Row("Node health"))
             .with_panel(graph("Node state", "1 for each node's state in each distributor's view", "short",
                               [(f"max by (node, state) (distributor_node_state{{{NODE}}}) == 1",
                                 "{{node}} {{state}}")]))
             .with_panel(graph("Administrative state", "1 for each node's state an operator set (ready, drain, "
                               "maint), and 1 while it serves new connections", "short",
                               [(f"max by (node, state) (distributor_node_admin_state{{{NODE}}}) == 1",
                                 "{{node}} {{state}}"),
                                (f"min by (node) (distributor_node_serving{{{NODE}}})", "{{node}} serving")]))
             .with_panel(graph("Time since the last heartbeat", "Seconds since each node's last valid heartbeat "
                               "(warning after 1 s, dead after 2.25 s at the defaults)", "s",
                               [(f"max by (node) (distributor_node_heartbeat_age_seconds{{{NODE}}})", "{{node}}")]))
             .with_panel(graph("Heartbeat failures and state changes", "Per minute: heartbeats later than their "
                               "allowance, and state changes", "short",
                               [(f"sum by (node) (increase(distributor_node_heartbeat_failures_total{{{NODE}}}[1m]))",
                                 "{{node}} late"),
                                (f"sum by (node) (increase(distributor_node_transitions_total{{{NODE}}}[1m]))",
                                 "{{node}} changes")]))
             .with_panel(graph("Probe response time", "90th percentile of each agent's probe of its web server",
                               "s", [(f"histogram_quantile(0.9, sum by (node, le) (rate("
                                      f"distributor_agent_probe_duration_seconds_bucket{{{NODE}}}[$__rate_interval])))",
                                      "{{node}} p90")]))
             .with_panel(graph("Probe interval and load", "The agents' adaptive probe interval, and their load "
                               "average", "short",
                               [(f"distributor_agent_probe_interval_seconds{{{NODE}}}", "{{node}} interval (s)"),
                                (f"distributor_agent_load1{{{NODE}}}", "{{node}} load1")]))
             .with_panel(graph("Administration tasks", "Task records each agent holds, queued and running (its "
                               "broker, docs/administration.md)", "short",
                               [(f'sum by (node, state) (distributor_agent_tasks{{{NODE}, state=~"queued|running"}})',
                                 "{{node}} {{state}}")]))
             .with_panel(graph("Probes and rejected heartbeats", "Per second: probes that failed, by outcome, and "
                               "heartbeats the distributors rejected, by reason", "short",
                               [(f'sum by (node, result) (rate(distributor_agent_probes_total{{{NODE}, result!="ok"}}'
                                 '[$__rate_interval]))', "{{node}} {{result}}"),
                                ("sum by (reason) (rate(distributor_heartbeats_rejected_total[$__rate_interval]))",
                                 "rejected {{reason}}")])))

    board = (board.with_row(dashboard.Row("Failover and replication"))
             .with_panel(graph("Roles", "1 for each distributor's role", "short",
                               [("distributor_failover_role == 1", "{{distributor}} {{role}}")]))
             .with_panel(graph("Takeovers", "Takeovers per distributor over the last hour, and its term", "short",
                               [("increase(distributor_failover_takeovers_total[1h])", "{{distributor}} takeovers"),
                                ("distributor_failover_term", "{{distributor}} term")]))
             .with_panel(graph("Takeover duration", "90th percentile over the last hour, by phase: decided (from "
                               "the old active's last heartbeat), claimed and first_forward (from the decision)",
                               "s", [("phase:distributor_failover_takeover_duration_seconds:p90_1h", "{{phase}}")]))
             .with_panel(graph("Replication lag", "A standby's seconds behind the active's stream, and the records "
                               "each standby has yet to apply (the active's view)", "short",
                               [("distributor_sync_lag_seconds", "{{distributor}} behind (s)"),
                                ("distributor_sync_peer_lag_records", "{{peer}} records behind")]))
             .with_panel(graph("Replication stream", "Records per second sent by the active and applied by the "
                               "standbys, and the gaps they found", "short",
                               [("rate(distributor_sync_records_sent_total[$__rate_interval])", "{{distributor}} sent"),
                                ("rate(distributor_sync_records_applied_total[$__rate_interval])",
                                 "{{distributor}} applied"),
                                ("increase(distributor_sync_gaps_total[$__rate_interval])", "{{distributor}} gaps")]))
             .with_panel(graph("Peers", "1 while each distributor hears its peer's heartbeats", "short",
                               [("distributor_failover_peer_up", "{{distributor}} hears {{peer}}")])))

    board = (board.with_row(dashboard.Row("Data path and drops"))
             .with_panel(graph("Packets", "Queued packets per second that got an accept verdict, by reason",
                               "pps", [('sum by (reason) (rate(distributor_packets_total{verdict="accept"}'
                                        '[$__rate_interval]))', "{{reason}}")]))
             .with_panel(graph("Drops", "Packets per second dropped on purpose, by reason (instance:...:rate1m)",
                               "pps", [("sum by (reason) (instance_reason:distributor_packets_dropped:rate1m)",
                                        "{{reason}}")]))
             .with_panel(graph("Refusals and kernel drops", "New connections refused per second, and packets the "
                               "kernel dropped at the queue", "pps",
                               [("sum by (reason) (rate(distributor_connections_refused_total[$__rate_interval]))",
                                 "refused {{reason}}"),
                                ("sum by (cause) (rate(distributor_nfqueue_dropped_packets_total[$__rate_interval]))",
                                 "queue {{cause}}"),
                                ("sum(rate(distributor_handler_errors_total[$__rate_interval]))", "handler errors")]))
             .with_panel(graph("Queue", "Packets waiting in the kernel queue, and packets read per wake-up",
                               "short",
                               [("distributor_nfqueue_waiting_packets", "{{distributor}} waiting"),
                                ("rate(distributor_nfqueue_packets_read_total[$__rate_interval]) / "
                                 "rate(distributor_nfqueue_wakeups_total[$__rate_interval])",
                                 "{{distributor}} per wake-up")], width=12))
             .with_panel(graph("Guard and timers", "Packets the guard refused per second, and the event loop's "
                               "worst timer delay", "short",
                               [("sum by (what) (rate(distributor_guard_dropped_packets_total[$__rate_interval]))",
                                 "guard {{what}}"),
                                ("distributor_timer_lateness_max_seconds", "{{distributor}} timer lateness (s)")],
                               width=12)))

    board = (board.with_row(dashboard.Row("Processes"))
             .with_panel(graph("CPU", "CPU seconds per second of each daemon and agent", "percentunit",
                               [('rate(process_cpu_seconds_total{job=~"distributor|node-agent"}[$__rate_interval])',
                                 "{{job}} {{instance}}")], width=12))
             .with_panel(graph("Memory", "Resident memory of each daemon and agent", "bytes",
                               [('process_resident_memory_bytes{job=~"distributor|node-agent"}',
                                 "{{job}} {{instance}}")], width=12)))
    return json.loads(json.dumps(board.build(), cls=JSONEncoder))


# What Grafana puts in for the dashboard's variables when every value is selected, and for its
# interval macros at this dashboard's scale (5 s scrapes): what a query test sends to Prometheus.
SUBSTITUTIONS = {"$service": ".*", "$node": ".*", "$__rate_interval": "1m", "$__interval": "15s", "$__range": "30m"}


def queries(board: dict | None = None) -> list[tuple[str, str]]:
    """(panel title, PromQL with the variables substituted) of every target of every panel."""
    found = []
    for panel in (board or build())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in SUBSTITUTIONS.items():
                expr = expr.replace(variable, value)
            found.append((panel["title"], expr))
    return found


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help=f"exit 1 when {OUTPUT.name} is not what this builds")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUTPUT.read_text() if OUTPUT.exists() else ""
        if current != text:
            print(f"{OUTPUT} is out of date: run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
