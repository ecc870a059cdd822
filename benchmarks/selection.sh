#!/usr/bin/env bash
# README "Selection protocol, baselines and calibration": linear probe selected on holdout vs val, k-NN, NCM, ECE.
# Usage (from the repository root): benchmarks/selection.sh FEATURES.h5 [OUT_DIR]
set -e
F=${1:?give a feature file with train and val splits}
O=${2:-runs/selection}
mkdir -p "$O"  # probe replaces the runs it finds there
export PYTHONPATH=$PWD
SWEEP="--lr 3e-4,1e-3,3e-3 --weight-decay 0,1e-3,1.16e-2 --device cpu"
for sel in holdout:0.1 val; do
  /usr/bin/time -f "%e s" python -m featx probe --features $F --out $O/linear-${sel%%:*} $SWEEP --select $sel 2>&1 | tail -3
done
python -m featx probe --features $F --out $O/knn --head knn --k 10,20,100 --device cpu 2>&1 | tail -5
python -m featx probe --features $F --out $O/ncm --head ncm --device cpu 2>&1 | tail -2
python - "$O" <<'PY'
import json, sys
for r in ("linear-holdout", "linear-val", "knn", "ncm"):
    b = json.load(open(f"{sys.argv[1]}/{r}/run.json"))["best"]
    print(r, {k: b[k] for k in ("name", "select", "select_top1", "val_top1", "val_top1_interval", "val_top5", "val_ece", "val_ece_calibrated", "temperature")})
PY
