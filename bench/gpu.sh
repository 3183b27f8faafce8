#!/usr/bin/env bash
# Every check that needs a GPU, in one call (a lent GPU machine gives a session about 15 minutes):
#   bash bench/gpu.sh OUTDIR
# 1. the CUDA tests (-m gpu): CuPy stitching kernels vs torch, the engine's CuPy and torch paths, the chunked
#    selective scan on CUDA vs mamba_ssm's CUDA kernel (skipped where mamba_ssm is not built with it);
# 2. bench/stitching.py on CUDA (105 classes at 256^3, Swin-UNETR fs48);
# 3. bench/scan.py's backends on CUDA (chunked; and mamba_ssm's kernel when importable).
# 4. bench/diffusion.py on CUDA (the diffusion demo model, full sampler, one PET/CT case).
# 5. bench/whole_case.py on CUDA (file to file against the MONAI recipe; the 489x378x234 phantom only).
# Results land in OUTDIR (default bench/results) named after the GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/results}"
mkdir -p "$out"
gpu="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' '-' | tr -cd '[:alnum:]-')"
gpu="${gpu:-unknown-gpu}"
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
"$py" -m pytest -q -p no:cacheprovider -m gpu tests/test_cuda_kernels.py tests/test_sliding_window.py \
    tests/test_scan.py 2>&1 | tee "$out/gpu_tests_${gpu}.txt"
"$py" bench/stitching.py --device cuda --cases conv105,swin --repeats 2 --output "$out/stitching_${gpu}.json"
"$py" bench/scan.py --device cuda --lengths 4096,32768 --repeats 3 --output "$out/scan_${gpu}.json"
# 4. the diffusion demo model on one PET/CT case at the full sampler (the manifest's GPU steps and members)
"$py" bench/diffusion.py --device cuda --output "$out/diffusion_${gpu}.json"
# 5. the whole case, file to file, against the MONAI recipe on the GPU (one size, no folder run: time is short)
"$py" bench/whole_case.py --device cuda --sizes 1 --folder 0 --output "$out/whole_case_${gpu}.json"
