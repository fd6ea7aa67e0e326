#!/bin/bash
# Entrypoint of the compose testbed's `monitor` service (testbed/image/Dockerfile.monitor):
#   testbed-monitor            Prometheus (9090) and Alertmanager (9093) with deploy/prometheus's
#                              files, and a mail sink on 127.0.0.1:25 (the smarthost of deploy's
#                              alertmanager.yml) that prints every mail to the container's log;
#                              runs until the container is stopped or one of the three ends.
#   testbed-monitor --health   exit 0 when Prometheus and Alertmanager are ready (the healthcheck).
# The scrape targets come from the environment, rendered from the topology by testbed.compose:
# DISTRIBUTOR_TARGETS and NODE_AGENT_TARGETS, file_sd JSON for targets/distributors.json and
# targets/node-agents.json (when unset, deploy's examples stay: the default 3-node cluster).
set -euo pipefail
CONFIG=/etc/testbed-monitor
DATA=/var/lib/testbed-monitor
PROMETHEUS_PORT=9090
ALERTMANAGER_PORT=9093

ready() { curl -fsS -m 2 -o /dev/null "http://127.0.0.1:$1/-/ready"; }

if [ "${1:-}" = "--health" ]; then
  if ready "$PROMETHEUS_PORT" && ready "$ALERTMANAGER_PORT"; then
    echo "monitor: healthy: Prometheus and Alertmanager ready"
    exit 0
  fi
  echo "monitor: not healthy: Prometheus or Alertmanager not ready"
  exit 1
fi

write_targets() {  # VARIABLE FILE (testbed.compose.MONITOR_TARGET_FILES)
  if [ -n "${!1:-}" ]; then
    printf '%s\n' "${!1}" > "$CONFIG/targets/$2"
  fi
}
write_targets DISTRIBUTOR_TARGETS distributors.json
write_targets NODE_AGENT_TARGETS node-agents.json
mkdir -p "$DATA/prometheus" "$DATA/alertmanager"

pids=()
python3 -u -W ignore -m smtpd -n -c DebuggingServer 127.0.0.1:25 &
pids+=($!)
prometheus-alertmanager --config.file="$CONFIG/alertmanager.yml" --storage.path="$DATA/alertmanager" \
  --web.listen-address="0.0.0.0:$ALERTMANAGER_PORT" --cluster.listen-address= &
pids+=($!)
prometheus --config.file="$CONFIG/prometheus.yml" --storage.tsdb.path="$DATA/prometheus" \
  --storage.tsdb.retention.time=1d --web.listen-address="0.0.0.0:$PROMETHEUS_PORT" &
pids+=($!)

stop() {
  kill -TERM "${pids[@]}" 2>/dev/null || true
  wait
  exit 0
}
trap stop TERM INT  # PID 1 ignores signals it has no handler for
status=0
wait -n || status=$?
echo "testbed-monitor: a service ended (status $status); stopping the others" >&2
kill -TERM "${pids[@]}" 2>/dev/null || true
wait
exit "$status"
