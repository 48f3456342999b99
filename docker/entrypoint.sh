#!/usr/bin/env bash
# Container entrypoint: with TUNEOPS_DVC_PULL=1 the data (and any other DVC-tracked file) is
# pulled from the DVC remote first (configure it with `dvc remote add -d ...`; credentials from
# the pod's environment), then the command runs: `tuneops api serve`, `prefect worker start ...`,
# or the `prefect flow-run execute` a Docker / Kubernetes work pool starts.
set -euo pipefail
cd /app
if [ "${TUNEOPS_DVC_PULL:-0}" = "1" ]; then
  dvc pull ${TUNEOPS_DVC_REMOTE:+--remote "$TUNEOPS_DVC_REMOTE"}
fi
exec "$@"
