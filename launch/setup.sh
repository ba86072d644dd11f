#!/usr/bin/env bash
# Idempotent set-up of a virtual environment with largefr and everything its demo and tests use.
# torch is installed first and pinned by a constraints file, so no later package can pull a CUDA build.
# Usage: source launch/setup.sh   (or bash launch/setup.sh; then `. .venv/bin/activate`)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${LARGEFR_VENV:-$repo/.venv}"
torch_pin="${LARGEFR_TORCH:-torch==2.13.0}"
extras="${LARGEFR_EXTRAS:-test,data,eval,onnx,dali,wandb,deepspeed}"

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
stamp="$venv/.largefr-installed"
want="$torch_pin [$extras] $(sha1sum "$repo/pyproject.toml" | cut -c1-12)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  python -m pip install -q --disable-pip-version-check "$torch_pin"
  echo "$torch_pin" > "$venv/constraints.txt"
  PIP_CONSTRAINT="$venv/constraints.txt" python -m pip install -q --disable-pip-version-check -e "$repo[$extras]"
  echo "$want" > "$stamp"
fi
