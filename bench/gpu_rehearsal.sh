#!/usr/bin/env bash
# Rehearse a lent GPU's two calls on this CPU, in a copy of the device machine's Python (docs/gpu.md "How to measure"):
# torch 2.11 and the versions its image holds, the carried wheels, ddpmkit from src/ (not installed), --tiny sizes.
# A lent GPU comes with 15 minutes; this finds, in about 2 minutes here (1 once the copy exists), what would break there.
#
#   make gpu-wheels && bash bench/gpu_rehearsal.sh [PYTHON]    # PYTHON: a Python 3.12, as there (default: python3.12)
#
# The copy lives in .gpu-rehearsal/ (ignored by git; about 5 GB: torch's CUDA wheels, which also run on a CPU).
set -euo pipefail
python=${1:-python3.12}
env=.gpu-rehearsal
# the device image's versions (/work/.library/device/KINDS.md, 2026-11); torch 2.11 pins its own triton and CUDA wheels
pins=(torch==2.11.0 triton==3.6.0 accelerate==1.15.0 transformers==5.17.0 huggingface_hub==1.33.0 numpy==2.5.2
      safetensors==0.8.0 torchdiffeq==0.2.5 scipy tqdm tensorboard pillow matplotlib scikit-learn requests regex pyyaml
      filelock pytest)
compgen -G ".gpu-wheels/*.whl" >/dev/null || { echo "no .gpu-wheels/: run make gpu-wheels first" >&2; exit 2; }
if [ ! -x "$env/bin/python3" ]; then
    "$python" -m venv "$env"
    "$env/bin/python3" -m pip install -q --no-compile "${pins[@]}"
fi
export PATH=$PWD/$env/bin:$PATH TORCHINDUCTOR_CACHE_DIR=$PWD/$env/inductor
python3 -c "import torch, sys; print('rehearsal: Python', sys.version.split()[0], 'torch', torch.__version__)"
out=$(mktemp -d)
GPU_SESSION_TESTS=after OUT=$out/call1 bash bench/gpu_session.sh --tiny --quick --deadline 320 --parts demo-graphed sampling preset
GPU_SESSION_TESTS=0 OUT=$out/call2 bash bench/gpu_session.sh --tiny --quick --rounds 3 --parts cifar upsampling overhead demo images
python3 bench/gpu_report.py "$out/call1/gpu.json" "$out/call2/gpu.json" --tests "$out/call1/test_cuda.log"
# a part that raised is the rehearsal's failure: on the GPU it would cost that part's figures
if grep -q part_errors "$out/call1/gpu.json" "$out/call2/gpu.json"; then
    echo "rehearsal: a part failed (part_errors in $out/call*/gpu.json)" >&2
    exit 1
fi
echo "rehearsal: both calls ran; their files are in $out"
