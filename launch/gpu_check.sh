#!/usr/bin/env bash
# The GPU path in one bounded check, for a node with one CUDA GPU, no network and a site Python
# (torch + numpy, pyyaml, tqdm, pillow, scikit-learn, onnx, onnxruntime, pytest; no DALI, DeepSpeed or
# webdataset needed). From the repo root, nothing installed:
#
#     bash launch/gpu_check.sh [OUT_DIR]        # default gpu_check_out/; PYTHON=python3 unless set
#
# Parts (each under its own timeout; a failing part does not stop the others; at most ~7.7 minutes):
#   tests        pytest -m cuda (tests/test_cuda_*.py; 90 s per test at most)              150 s
#   bench_head   largefr bench head on the GPU: C = 1M, 8M, 32M; r = 0.1, 1; bf16, fp16;
#                W + momentum in fp32 and bf16                                             130 s
#   synth        the CPU demo's synthetic identities (800 x 12, 600 verification pairs)      30 s
#   train_fp16   300 steps of the demo recipe on the GPU, batch 128, fp16 + loss scaler      60 s
#   train_bf16   the same in bf16                                                            60 s
#   loader_cost  largefr bench train: images/s with the torch loader vs from memory          30 s
# One summary line per part; everything measured goes to OUT_DIR/PART.json (logs: PART.log).
# Without a CUDA GPU it refuses (exit 2) and runs nothing.
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
out="${1:-gpu_check_out}"
py="${PYTHON:-python3}"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=offline

if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA GPU visible to $py's torch ($("$py" -c 'import torch; print(torch.__version__)' 2>&1 | tail -1));" \
       "this check needs one. On a CPU machine run the test suite instead: bash launch/test.sh" >&2
  exit 2
fi
mkdir -p "$out"
"$py" - "$out/device.json" <<'EOF'
import json, sys, torch
props = torch.cuda.get_device_properties(0)
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": props.name,
        "memory_gib": round(props.total_memory / 2**30, 1), "device_count": torch.cuda.device_count()}
open(sys.argv[1], "w").write(json.dumps(info, indent=1) + "\n")
print(f"[gpu_check] device       {info['device']}, {info['memory_gib']} GiB, torch {info['torch']}, CUDA {info['cuda']}")
EOF

failed=0
# run_part NAME KIND SECONDS COMMAND...: the command under `timeout`, its output in OUT/NAME.log,
# then OUT/NAME.json and one summary line (launch/gpu_check_report.py).
run_part() {
  local name="$1" kind="$2" limit="$3"
  shift 3
  local started=$SECONDS rc
  timeout --kill-after=5 "$limit" "$@" > "$out/$name.log" 2>&1
  rc=$?
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
  "$py" launch/gpu_check_report.py "$name" "$kind" "$out" "$rc" "$(( SECONDS - started ))"
}

data="$out/synthetic"
train_sets=(--set "data.path=$data" --set data.loader=torch --set data.num_workers=6 --set train.batch_size=128
            --set schedule.total_steps=300 --set schedule.warmup_steps=30 --set train.log_every=25
            --set train.eval_every=300 --set "train.eval_bins=[verification.bin]" --set checkpoint.every_steps=300
            --set logging.console=false)

run_part tests junit 150 "$py" -m pytest -m cuda -q -rs -p no:cacheprovider --timeout=90 --junitxml="$out/tests.xml" \
  tests/test_cuda_*.py
run_part bench_head jsonl 130 "$py" -m largefr bench head --num-classes 1000000 8000000 32000000 \
  --weight-dtype fp32 bf16 --sample-rate 0.1 1 --dtype bf16 fp16 --world-size 1 --steps 10 --warmup 3 --json
rm -rf "$data"
run_part synth plain 30 "$py" -m largefr synth --out "$data" --identities 800 --per-identity 12 --holdout 100 \
  --pairs 600 --workers 8 --no-progress
for precision in fp16 bf16; do
  rm -rf "$out/train_$precision"
  run_part "train_$precision" train 60 "$py" -m largefr train configs/synthetic_cpu.yaml --resume none \
    "${train_sets[@]}" --set "output_dir=$out/train_$precision" --set "train.precision=$precision"
done
run_part loader_cost jsonl 30 "$py" -m largefr bench train configs/synthetic_cpu.yaml --set "data.path=$data" \
  --set data.loader=torch --set data.num_workers=6 --set train.batch_size=128 --set train.precision=bf16 \
  --set schedule.warmup_steps=1 --steps 40 --warmup 5 --repeats 2 --json

echo "[gpu_check] done: $failed part(s) failed; JSON and logs in $out/"
[ "$failed" -eq 0 ]
