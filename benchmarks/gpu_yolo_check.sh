#!/usr/bin/env bash
# GPU check of the yolo ROI provider inside a real run (issue #5): a tiny SOS phantom recipe with
# roi.provider = "yolo" on CUDA. ultralytics is not on the GPU machine: carry its wheels in .whl/.
# Usage (GPU machine, repo root): OUT=/tmp/out bash benchmarks/gpu_yolo_check.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 HOME=${HOME:-/tmp/home}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . -e plugins/kd_sos \
  >"$OUT/pip.log" 2>&1 || echo "pip install failed (see pip.log)"
start=$(date +%s)
python3 -m kdtoolkit.cli run recipes/sos-quick.toml --quiet --output runs/yolo-gpu \
  --device cuda --set roi.provider=\"yolo\" --set roi.epochs=3 --set roi.imgsz=128 \
  --set roi.batch=16 --set task.n=60 --set teacher.epochs=2 --set student.epochs=2 \
  --set evaluate.cam_examples=2
echo "rc=$? in $(( $(date +%s) - start )) s"
cp runs/yolo-gpu/report.md runs/yolo-gpu/results.json runs/yolo-gpu/run.log "$OUT/" 2>/dev/null
