#!/usr/bin/env bash
# Make sure a Docker engine answers before the docker-marked tests run (CI calls this).
# Idempotent: a running engine is left alone; otherwise Debian's docker.io is installed if
# needed and dockerd is started detached (log: /var/log/mitogen-sim/dockerd.log).
# Uses the project's virtualenv (the docker SDK lives there): $MITOGEN_VENV, else .venv.
set -euo pipefail
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python="${MITOGEN_VENV:-$top/.venv}/bin/python"
if [ ! -x "$python" ]; then
    echo "ensure-docker: no virtualenv at ${python%/bin/python}; run .ci/setup first" >&2
    exit 1
fi
cd "$top"
exec "$python" -m simulator.dockerd "$@"
