#!/usr/bin/env bash
# The GPU check, in one call of the device tool (under 8 minutes on an H200):
#   here, once:    bash bench/device_check.sh --prepare     # wheels into .whl/, tokenizers (+ train_gpt.py) into .device/
#   device run:    command "bash bench/device_check.sh", carry [".whl", ".device"], timeout_s 540
# It installs the carried wheels (the device has PyTorch but no zstandard, brotli or jsonschema), runs the
# CUDA-marked tests, then bench/device_bench.py, and writes $OUT/device-<date>.md (commit it under bench/results/).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--prepare" ]]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >> .git/info/exclude
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
        zstandard==0.25.0 brotli==1.2.1 jsonschema==4.26.0 jsonschema-specifications referencing rpds-py \
        python-minifier==3.4.0
    mkdir -p .device
    cp ../shared/fixtures/tokenizers/fineweb_1024_bpe.model ../shared/fixtures/tokenizers/fineweb_8192_bpe.model .device/
    if [[ -f peers/parameter-golf/train_gpt.py ]]; then cp peers/parameter-golf/train_gpt.py .device/
    else echo "no peers/parameter-golf/train_gpt.py: the side-by-side row with the challenge's trainer will be skipped"; fi
    du -sh .whl .device
    exit 0
fi

OUT="${OUT:-/tmp/caddie-device-out}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt" || true
set +e
timeout 120 python3 -m pytest -q -m cuda tests -p no:cacheprovider 2>&1 | tee "$OUT/cuda-tests.log"
timeout 330 python3 bench/device_bench.py --out "$OUT/device-$(date +%F).md" 2>&1 | tee "$OUT/device-bench.log"
