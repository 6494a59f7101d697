#!/bin/sh
# The vault's long tests: the differential test with many more random sequences and
# stress-ng for a minute (FS9_STRESS_S=SECONDS to change), on a real mount.
#   scripts/vault-stress.sh [pytest args]
set -e
cd "$(dirname "$0")/.."
FS9_LONG=1 exec .venv/bin/python -m pytest -q -p no:cacheprovider -s tests/test_vault.py "$@"
