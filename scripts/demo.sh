#!/usr/bin/env bash
# Installs what is needed, stands the cluster up in network namespaces, sends traffic
# through the VIP, prints what each node served, and tears everything down (also on failure).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
tb() { .venv/bin/cluster-testbed -p demo "$@"; }
trap 'tb down >/dev/null' EXIT

echo "== cluster-testbed up: client, dist1, dist2, web1..web3 =="
tb up --nodes 3
tb ps
echo
echo "== 300 requests through the VIP 203.0.113.1, a new connection each =="
tb exec client -- .venv/bin/python -m testbed.traffic --requests 300 --concurrency 6
echo
echo "== wrk, 3 s keep-alive, then 3 s Connection: close =="
tb exec client -- wrk -t2 -c20 -d3s http://203.0.113.1/1k.bin | grep -E "requests in|Requests/sec|Socket errors|Non-2xx" || true
tb exec client -- wrk -t2 -c20 -d3s -H "Connection: close" http://203.0.113.1/1k.bin | grep -E "requests in|Requests/sec|Socket errors|Non-2xx" || true
echo
echo "== the distributor's view (Prometheus metrics) =="
tb exec dist1 -- curl -s http://127.0.0.1:9110/metrics | grep -E '^distributor_(packets_total|backend_connections_open|connections )' | grep -v ' 0.0$' || true
echo
echo "== cluster-testbed down =="
