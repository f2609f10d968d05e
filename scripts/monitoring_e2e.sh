#!/usr/bin/env bash
# The monitoring end-to-end check (scripts/monitoring_e2e.py): a real serve_api.py and a real
# Prometheus on loopback; every dashboard query, alert expression and the HPA adapter query is
# evaluated against live data. Installs Prometheus (Debian package: prometheus + promtool) if
# missing. Bounded: the whole check is killed after MONITORING_E2E_TIMEOUT_S (default 600) s.
#   Env: PYTHON (default .venv/bin/python: needs the project's requirements, i.e. make install)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
START=$SECONDS

if ! command -v prometheus >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || { echo "prometheus is missing: apt-get install prometheus (needs root)" >&2; exit 1; }
    echo "[monitoring-e2e] installing prometheus (apt-get)"
    timeout 300 apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -q --no-install-recommends prometheus >/dev/null
fi
# The Debian package may start a system Prometheus on :9090 where an init system runs; this check
# never uses that one (its own instance listens on a free port).
[ -x "$PYTHON" ] || { echo "no $PYTHON: run make install first" >&2; exit 1; }

rc=0
timeout -k 10 "${MONITORING_E2E_TIMEOUT_S:-600}" "$PYTHON" scripts/monitoring_e2e.py "$@" || rc=$?
echo "[monitoring-e2e] $([ "$rc" = 0 ] && echo PASSED || echo "FAILED (exit $rc)") in $((SECONDS - START)) s"
exit "$rc"
