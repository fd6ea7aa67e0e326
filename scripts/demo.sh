#!/usr/bin/env bash
# Installs what is needed, stands the cluster up in network namespaces, sends traffic
# through the VIP, prints what each node served, and tears everything down (also on failure).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
tb() { .venv/bin/cluster-testbed -p demo "$@"; }
trap 'tb down >/dev/null' EXIT

echo "== cluster-testbed up --monitor: client, dist1, dist2, web1..web3, monitor (Prometheus, Alertmanager) =="
tb up --nodes 3 --monitor
tb ps
echo
echo "== 300 requests through the VIP 203.0.113.1, a new connection each =="
tb exec client -- .venv/bin/python -m testbed.traffic --requests 300 --concurrency 6
echo
echo "== 60 requests through the VIP6 2001:db8:203::1 (the same nodes, service http6) =="
tb exec client -- .venv/bin/python -m testbed.traffic --host 2001:db8:203::1 --requests 60 --concurrency 6
echo
echo "== Prometheus on the monitor host: requests per node over the last minute (both VIPs) =="
echo "   (the distributor counts connections; the traffic above opens one per request. increase()"
echo "   would extrapolate to the window's edges, so the exact difference of the samples is asked for)"
tb exec monitor -- .venv/bin/python -m testbed.monitoring query --at-least 360 \
  'sum by (node) (max_over_time(distributor_backend_connections_total[1m]) - min_over_time(distributor_backend_connections_total[1m]))'
echo
echo "== wrk, 3 s keep-alive, then 3 s Connection: close =="
tb exec client -- wrk -t2 -c20 -d3s http://203.0.113.1/1k.bin | grep -E "requests in|Requests/sec|Socket errors|Non-2xx" || true
tb exec client -- wrk -t2 -c20 -d3s -H "Connection: close" http://203.0.113.1/1k.bin | grep -E "requests in|Requests/sec|Socket errors|Non-2xx" || true
echo
echo "== takeover: kill the primary (dist1) while wrk runs 6 s of keep-alive traffic =="
tb exec client -- wrk -t2 -c16 -d6s --timeout 5s http://203.0.113.1/1k.bin > /tmp/distributor-demo-wrk.$$ &
wrk_pid=$!
sleep 2
tb kill dist1
wait "$wrk_pid"
echo "what the client saw:"
grep -E "requests in|Requests/sec|Latency|Socket errors|Non-2xx" /tmp/distributor-demo-wrk.$$ || true
grep -q "Socket errors" /tmp/distributor-demo-wrk.$$ || echo "  no socket errors, no failed requests"
rm -f /tmp/distributor-demo-wrk.$$
echo "what dist2 did:"
tb logs dist2 | grep -E "took over|takeover timeline" | sed 's/^/  /'
tb ps | grep -E "^(HOST|dist)"
echo

echo "== the distributor's view (Prometheus metrics of dist2, now active) =="
tb exec dist2 -- curl -s http://198.51.100.3:9110/metrics | grep -E '^distributor_(packets_total|backend_connections_open|connection_table_entries|failover_role|failover_takeovers_total|failover_takeover_duration_seconds_sum)' | grep -v ' 0.0$' || true
echo
echo "== alerts in Prometheus (cluster-testbed exec monitor -- curl -s localhost:9090/api/v1/alerts) =="
tb exec monitor -- .venv/bin/python -m testbed.monitoring alerts
echo
echo "== cluster-testbed down =="
