#!/usr/bin/env bash
# How docs/results.md's GPU numbers were obtained: install offline, a smoke run of the CUDA path,
# then recipes/sos.toml on the GPU (fold by fold: pass e.g. FOLDS=[0] EPOCHS=25).
# Usage (on the GPU machine, repo root): OUT=/tmp/out FOLDS=[0] EPOCHS=25 bash benchmarks/gpu_sos_run.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 HOME=${HOME:-/tmp/home}
OUT=${OUT:-/tmp/out}; FOLDS=${FOLDS:-[0]}; EPOCHS=${EPOCHS:-60}; MAIN_S=${MAIN_S:-420}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . -e plugins/kd_sos \
  >"$OUT/pip.log" 2>&1 || echo "pip install failed (see pip.log)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"
KD="python3 -m kdtoolkit.cli"
start=$(date +%s)
timeout 120 $KD run recipes/sos.toml --output /tmp/smoke --quiet --set roi.provider=\"manual\" \
  --set task.n=40 --set task.size=64 --set data.image_size=64 --set data.crop_size=[32,64] \
  --set teacher.epochs=1 --set student.epochs=1 --set cv.only=[0] || { echo "smoke failed"; exit 1; }
echo "smoke ok in $(( $(date +%s) - start )) s"
start=$(date +%s)
timeout "$MAIN_S" $KD run recipes/sos.toml --quiet --set roi.provider=\"manual\" \
  --set cv.only="$FOLDS" --set teacher.epochs="$EPOCHS" --set student.epochs="$EPOCHS"
echo "main rc=$? in $(( $(date +%s) - start )) s"
cp runs/sos/report.md runs/sos/results.json runs/sos/run.log "$OUT/" 2>/dev/null
cp runs/sos/figures/gradcam.png runs/sos/figures/curves.png "$OUT/" 2>/dev/null
ls "$OUT"
