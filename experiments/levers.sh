#!/usr/bin/env bash
# The evidence behind the default recipe: the paper's fused model, then one lever added at a time,
# each trained the same way (the first 10,000 training images: 9,000 to train, 1,000 to validate on
# the diagonal 11×11 holes; 2 epochs; 2 workers), every run tracked in MLflow.
#
#   bash experiments/levers.sh ../shared/data/cifar10 [more jobs/train.py flags]
#
# Prints one line per step: the step, its validation hole PSNR, Dice, hole L1 and SSIM. The results
# measured here, and the recipe they led to (the defaults), are in docs/results.md.
set -euo pipefail
data=${1:?usage: experiments/levers.sh DATA [jobs/train.py flags]}
shift
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${LEVERS_OUT:-levers}
mkdir -p "$out"

steps=(
  "paper:"  # configs/paper.yaml: fusion by add (the paper's code; its text says concat), dropout 0.5, MSE, Adam 1e-3
  "no-dropout:model.dropout=0.0"
  "mask-channel:model.mask_channel=true"
  "hole-l1:train.loss=hole_l1"
  "adamw-cosine:train.optimizer=adamw train.weight_decay=0.01 train.schedule=cosine train.warmup_epochs=0.2 train.lr=0.002"
)
sets=()
for step in "${steps[@]}"; do
  name=${step%%:*}
  for setting in ${step#*:}; do sets+=(--set "$setting"); done
  python "$repo/jobs/train.py" --config "$repo/configs/paper.yaml" --data "$data" --limit 10000 --epochs 2 \
    --set train.batch_size=32 --set masks.kind=random "${sets[@]}" --set tracking.run_name="levers-$name" \
    --json "$out/$name.json" "$@" >"$out/$name.log" 2>&1 || { tail -5 "$out/$name.log"; exit 1; }
  python - "$out/$name.json" "$name" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
print(f"{sys.argv[2]:14s} psnr_hole {m['val_psnr_hole']:.2f} dB  dice {m['val_dice']:.4f}  "
      f"l1_hole {m['val_l1_hole']:.4f}  ssim {m['val_ssim']:.4f}", flush=True)
PY
done
