#!/usr/bin/env bash
# Installs what is needed, then runs the whole test suite (unit and end-to-end; end-to-end needs root).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python -m pytest tests "$@"
