#!/usr/bin/env bash
# GPU checks and benchmarks (one CUDA device): CUDA/NCCL training paths in every precision,
# DeepSpeed on CUDA, VSE++ ResNet-152 step timings at batch 128, 224 px, and a CMFAH step from pixels.
#   bash launch/gpu_check.sh OUT_DIR
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # xmdist from this tree, installed or not
out=${1:-/tmp/gpu_check}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, torchvision, webdataset, deepspeed; print('torch', torch.__version__, 'tv', torchvision.__version__, 'ds', deepspeed.__version__)" | tee -a "$out/gpu.txt"
python3 launch/make_shards.py synthetic --out /tmp/xm_shards --num 4000 --val 500 --test 500 \
  --samples-per-shard 250 --workers 8 --seed 0 2>/dev/null
for prec in bf16 fp32; do
  python3 launch/bench.py train --config configs/vsepp_coco.yaml --set data.shards=/tmp/xm_shards \
    --set model.weights=null --set train.precision=$prec --set data.num_workers=8 --steps 15 \
    --json "$out/bench_vsepp_r152_$prec.json" 2>&1 | grep -v Warning | tail -30
done
python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tail -15 | tee "$out/pytest_gpu.txt"
python3 -m pytest -q tests/test_metrics.py -k cuda -p no:cacheprovider 2>&1 | tail -3 | tee -a "$out/pytest_gpu.txt"
# CMFAH from pixels: VGG19 trunk fine-tuned end to end (random weights), regions 7 x 7 x 512, bf16
python3 launch/bench.py train --config configs/cmfah_synthetic.yaml --set data.shards=/tmp/xm_shards \
  --set model.image_input=pixels --set model.weights=null --set model.image_size=224 --set train.precision=bf16 \
  --set data.num_workers=8 --steps 15 --json "$out/bench_cmfah_pixels_bf16.json" 2>&1 | grep -v Warning | tail -30
