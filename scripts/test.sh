#!/usr/bin/env bash
# Set up this machine (as root) and run every check the project has:
# lint, type check, then the whole test suite against real CRIU, a real Slurm
# cluster, real OpenMPI and a real PostgreSQL server that the tests start.
#
# Usage: sudo scripts/test.sh [extra pytest args]
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
bash scripts/setup.sh
VENV=${HPCCKPT_VENV:-$REPO/.venv}
echo "[test] ruff" >&2
"$VENV/bin/ruff" check hpcckpt tests benchmarks scripts examples
echo "[test] mypy" >&2
"$VENV/bin/mypy"
echo "[test] import-linter: layers one way, no import cycles (.importlinter)" >&2
"$VENV/bin/lint-imports"
echo "[test] fuzzing the image reader, the policy loader and the command line" >&2
"$VENV/bin/python" -m tests.fuzz.fuzz_image --seconds "${HPCCKPT_FUZZ_SECONDS:-60}"
"$VENV/bin/python" -m tests.fuzz.fuzz_policy --seconds "${HPCCKPT_FUZZ_POLICY_SECONDS:-30}"
"$VENV/bin/python" -m tests.fuzz.fuzz_cli --seconds "${HPCCKPT_FUZZ_CLI_SECONDS:-30}"
echo "[test] pytest (every test must run: a skip fails the run)" >&2
export HPCCKPT_REQUIRE_ALL=1
exec "$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
