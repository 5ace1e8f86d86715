#!/usr/bin/env bash
# The xmdist demo: install, write synthetic shards, train VSE++ with 2 processes, evaluate.
#   bash launch/demo.sh                 # extra arguments go to train.py, e.g. --set train.epochs=2
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e .
if [ ! -f shards/synthetic/_info.json ]; then
  python3 launch/make_shards.py synthetic --out shards/synthetic --num 12000 --seed 0 --workers 2
fi
out="runs/demo-$(date +%Y%m%d-%H%M%S)"
OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 launch/train.py \
  --config configs/demo_vsepp_synthetic.yaml --out "$out" "$@"
python3 - "$out/eval.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"\nVSE++ demo, {r['split']} split ({int(r['num_images'])} images, 5 captions each), {r['checkpoint']}:")
print(f"  image->text  R@1 {r['i2t_r1']:5.1f}  R@5 {r['i2t_r5']:5.1f}  R@10 {r['i2t_r10']:5.1f}  medr {r['i2t_medr']:.0f}")
print(f"  text->image  R@1 {r['t2i_r1']:5.1f}  R@5 {r['t2i_r5']:5.1f}  R@10 {r['t2i_r10']:5.1f}  medr {r['t2i_medr']:.0f}")
print(f"  rsum {r['rsum']:.1f}   (chance R@10: about 1 both ways)   run directory: {sys.argv[1].rsplit('/', 1)[0]}")
PY
