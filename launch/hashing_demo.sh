#!/usr/bin/env bash
# Cross-modal hashing on the synthetic shards, end to end on 2 processes (CPU or GPUs):
#   1. the synthetic shards and the VSE++ demo run (skipped when they exist),
#   2. image features from that run's image encoder (launch/extract_features.py --backbone run),
#   3. DJSRH, SGRN and CMFAH at 64 bits (configs/{djsrh,sgrn,cmfah}_synthetic.yaml; CMFAH reads the
#      encoder's last feature map as regions), then their test mAP.
# Extra arguments go to both train.py runs, e.g. --set model.bits=32 --set train.epochs=5.
# Why features from the demo encoder: the synthetic images are unlike ImageNet, and random-weight
# CNN features carry no label information here (mAP at chance), so the features come from an
# encoder trained on these shards' captions. It never saw the labels that define relevance.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e .
if [ ! -f shards/synthetic/_info.json ]; then
  python3 launch/make_shards.py synthetic --out shards/synthetic --num 12000 --seed 0 --workers 2
fi
encoder=runs/demo-encoder
if [ ! -f "$encoder/eval.json" ]; then
  OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 launch/train.py \
    --config configs/demo_vsepp_synthetic.yaml --out "$encoder"
fi
if [ ! -f shards/synthetic-vsepp/_info.json ]; then
  python3 launch/extract_features.py --shards shards/synthetic --out shards/synthetic-vsepp \
    --backbone run --weights "$encoder" --layer embed --image-size 64 --resize 64
fi
if [ ! -f shards/synthetic-vsepp-regions/_info.json ]; then  # CMFAH's regions: the encoder's last feature map
  python3 launch/extract_features.py --shards shards/synthetic --out shards/synthetic-vsepp-regions \
    --backbone run --weights "$encoder" --layer regions --image-size 64 --resize 64
fi
stamp=$(date +%Y%m%d-%H%M%S)
for method in djsrh sgrn cmfah; do
  OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 launch/train.py \
    --config "configs/${method}_synthetic.yaml" --out "runs/${method}-$stamp" "$@"
done
python3 - "runs/djsrh-$stamp/eval.json" "runs/sgrn-$stamp/eval.json" "runs/cmfah-$stamp/eval.json" <<'PY'
import json, sys
print(f"\n{'':8} bits  mAP@all I->T  T->I   mAP@50 I->T  T->I   chance   (test queries vs the training set)")
for path in sys.argv[1:]:
    r = json.load(open(path))
    print(f"{r['method'].upper():8} {int(r['bits']):4}  {r['map_i2t']:12.4f} {r['map_t2i']:6.4f}"
          f"  {r['map50_window_i2t']:11.4f} {r['map50_window_t2i']:6.4f}   {r['chance']:.4f}   {path}")
PY
