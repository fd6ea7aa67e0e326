#!/usr/bin/env bash
# Installs what the demo, the tests and the benchmarks need on Debian 12, as root:
# Debian packages (only those missing) and a virtual environment in .venv with the project.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(iproute2 iptables nftables procps curl wrk nginx libnginx-mod-http-echo haproxy
          prometheus prometheus-alertmanager bird2
          libnetfilter-queue-dev python3-venv python3-dev gcc chromium)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install.sh: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
  # Debian starts a BIRD for the host itself when bird2 is installed; the project runs its own BIRDs
  # (the testbed's router, and the distributor daemon's, each with its own config and socket), so one
  # it just installed is switched off rather than left routing for the host.
  if [[ " ${missing[*]} " == *" bird2 "* ]] && [ -d /run/systemd/system ]; then
    systemctl disable --now bird.service || true
  fi
fi

# Debian's own interpreter: python3-dev and python3-venv match it, whatever else is on PATH.
if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv .venv
fi
stamp=.venv/.installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[test,bench]'
  touch "$stamp"
fi
