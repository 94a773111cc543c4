#!/usr/bin/env bash
# Everything the GPU issues (#4, #5, #6) need, in one command for a lent GPU machine, within a
# time budget. Each step is skipped when the budget is spent; a run cut short keeps its finished
# folds. What comes back, under $OUT: session.log, speed.txt, and per run a tarball of its run
# folder without checkpoints (eval.json, model.json histories, cams.npz, ROI metrics, report),
# which folds run on other machines join (docs/results.md, "Runs in parts").
#
# Usage (GPU machine, repo root; carry .whl with the ultralytics and polars wheels):
#   OUT=/tmp/out STEPS="smoke speed sos plus" FOLDS=[0] BUDGET_S=540 bash benchmarks/gpu_session.sh
# STEPS: smoke (tiny CUDA run with the yolo provider), speed (benchmarks/data_path.py, both data
# paths side by side), sos (recipes/sos.toml, folds FOLDS), plus (recipes/sos-plus.toml, folds
# FOLDS). EXTRA: more --set overrides for sos and plus (e.g. "--set teacher.epochs=25").
set -uo pipefail
export PYTHONUNBUFFERED=1 HOME=${HOME:-/tmp/home}
OUT=${OUT:-/tmp/out}; STEPS=${STEPS:-"smoke speed sos"}; FOLDS=${FOLDS:-[0]}
BUDGET_S=${BUDGET_S:-540}; EXTRA=${EXTRA:-}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/session.log") 2>&1
t0=$(date +%s)
left() { echo $(( BUDGET_S - ($(date +%s) - t0) )); }

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . -e plugins/kd_sos \
  >"$OUT/pip.log" 2>&1 || echo "pip install failed (see pip.log)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
python3 -c "import ultralytics; print('ultralytics', ultralytics.__version__)" 2>&1 | tail -1
KD="python3 -m kdtoolkit.cli"

pack() {  # pack RUN NAME: the run folder without checkpoints, as $OUT/NAME.tgz
  tar czf "$OUT/$2.tgz" --exclude='*.safetensors' --exclude='*.pt' \
    --exclude='dataset' --exclude='predict' -C "$(dirname "$1")" "$(basename "$1")" \
    && echo "packed $1 -> $2.tgz ($(du -h "$OUT/$2.tgz" | cut -f1))"
}

step() {  # step NAME MIN_SECONDS COMMAND...: run COMMAND with the budget left, if enough
  local name=$1 need=$2; shift 2
  local budget; budget=$(left)
  if [ "$budget" -lt "$need" ]; then echo "== $name skipped: ${budget}s left"; return 1; fi
  echo "== $name (budget ${budget}s)"; local s; s=$(date +%s)
  timeout "$budget" "$@"; local rc=$?
  echo "== $name rc=$rc in $(( $(date +%s) - s ))s"
}

for s in $STEPS; do
  case $s in
    smoke) step smoke 60 $KD run recipes/sos-quick.toml --quiet --output runs/smoke --device cuda \
      --set roi.provider=\"yolo\" --set roi.epochs=2 --set roi.imgsz=128 --set roi.batch=16 \
      --set task.n=60 --set teacher.epochs=2 --set student.epochs=2 --set cv.only=[0] \
      && pack runs/smoke smoke ;;
    speed) step speed 60 sh -c "for role in student teacher; do python3 benchmarks/data_path.py \
      recipes/sos.toml --set 'roi.provider=\"manual\"' --role \$role --batches 20 --device cuda; \
      done" | tee "$OUT/speed.txt" ;;
    sos) step sos 120 $KD run recipes/sos.toml --quiet --set cv.only="$FOLDS" $EXTRA; pack runs/sos sos ;;
    plus) step plus 120 $KD run recipes/sos-plus.toml --quiet --set cv.only="$FOLDS" $EXTRA
      pack runs/sos-plus sos-plus ;;
    *) echo "unknown step $s" ;;
  esac
done
echo "session done in $(( $(date +%s) - t0 ))s"
ls -la "$OUT"
