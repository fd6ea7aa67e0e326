#!/usr/bin/env bash
# Installs what the compose testbed needs on Debian 12 with podman, as root (the compose
# end-to-end test runs it; so can you): the project's own setup (install.sh), Debian's podman,
# runc and debootstrap (only those missing), podman-compose in .venv, and the local base image
# the Dockerfile starts from (debootstrap + podman import: no image registry is needed; the
# monitor profile's base is made the same way by testbed.compose_cluster when that profile is built).
# Leaves /etc alone: podman's settings are given through CONTAINERS_CONF=testbed/image/containers.conf.
# Docker users need none of this: Docker Compose v2 and an engine, then the README's commands.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh

packages=(podman runc debootstrap)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-compose.sh: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  # runc named explicitly: podman depends on crun | runc, and crun refuses hybrid cgroup layouts.
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# podman-compose from PyPI, the version this testbed is tested with (Debian 12 ships 1.0.3).
if ! .venv/bin/podman-compose --version 2>/dev/null | grep -qE "podman-compose version 1\.([6-9]|[1-9][0-9])"; then
  .venv/bin/pip install -q 'podman-compose>=1.6,<2'
fi

export CONTAINERS_CONF="${CONTAINERS_CONF:-$PWD/testbed/image/containers.conf}"
.venv/bin/python -m testbed.compose_cluster --engine podman base
