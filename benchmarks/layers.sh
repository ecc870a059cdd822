#!/usr/bin/env bash
# README "Feature sets": MobileNetV2 (shared weights) at 128 px, full view, 200 classes; a probe on the last stage
# alone vs the last two (and three) stages concatenated, first as one sweep, then each set alone.
# Usage (from the repository root): benchmarks/layers.sh [OUT_DIR]
set -e
O=${1:-runs/layers}
mkdir -p "$O"
export PYTHONPATH=$PWD
F=$O/mnv2-128-full-last3.h5
/usr/bin/time -f "%e s" python -m featx extract --data ../shared/data/tiny-imagenet-200-train100.zip \
  --backbone mobilenet_v2 --weights ../shared/weights/mobilenet_v2_imagenet_tflite.pth --size 128 --views full \
  --splits train,val --layers last3 --device cpu --out $F 2>&1 | tail -2
SWEEP="--lr 3e-4,1e-3,3e-3 --weight-decay 0,1e-3 --normalize standard --device cpu"
for sets in last1,last2,last3 last1 last2; do
  /usr/bin/time -f "%e s" python -m featx probe --features $F --out $O/probe-${sets//,/-} $SWEEP --feature-set $sets 2>&1 | tail -2
done
