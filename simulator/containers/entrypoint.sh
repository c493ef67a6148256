#!/bin/sh
# Container entry point of every mitogen-sim image (installed as /usr/local/sbin/mitogen-sim-entrypoint).
# Applies /etc/sim/node.json (accounts, sudo rules, host keys, sshd options), then replaces itself
# with the image's CMD, by default `/usr/sbin/sshd -D -e`, so sshd's log goes to `docker logs`.
# Runs under docker-init (init=True), which reaps orphans left by ssh sessions.
set -eu
mkdir -p /run/sshd
chmod 0755 /run/sshd
# -I -B: ignore the environment and user site, write no .pyc, so setup leaves no stray files.
python3 -I -B /usr/local/lib/mitogen-sim/node_setup.py /etc/sim/node.json
echo "mitogen-sim: node ready, starting: $*" >&2
exec "$@"
