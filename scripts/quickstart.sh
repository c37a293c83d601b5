#!/usr/bin/env bash
# Set up (first time only) and run the quick-start study on digits. Rerun to resume it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup-venv.sh
hsgd-tune run studies/quickstart.toml "$@"
