#!/usr/bin/env bash
# Install (scripts/bootstrap.sh), then run the whole pipeline on the sample data in data/: Prefect's ephemeral API
# (or the server at $PREFECT_API_URL), a local Dask cluster, a local Zarr store. Extra arguments go to the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=${PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS:-120}
exec .venv/bin/pmi-pipeline demo "$@"
