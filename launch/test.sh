#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite on CPU. Extra arguments go to pytest.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$repo/launch/setup.sh"
cd "$repo"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
python -m pytest -q -ra "$@"
