#!/usr/bin/env bash
# The GPU checks and benchmarks in one run on a GPU machine (under 10 minutes: each step has a timeout,
# 80+240+75+60+50+70 s).
#
#   here (CPU box, checkout root):  bash benchmarks/gpu_run.sh prepare
#       copies the mamba-ssm wheel (../shared/wheels, built for that image), the came-pytorch wheel (PyPI, for the
#       train step) and the golden fixtures / T5 tokenizer into .gpu/ (git-ignored, about 54 MB; causal-conv1d is
#       left out to stay under 64 MiB)
#   there (device run, carry [".gpu"]):  bash benchmarks/gpu_run.sh
#
# Writes into $OUT (default ./gpu_out): gpu_run.log (everything), pytest_cuda.log, gpu_check.json,
# gpu_speed.json. Steps: 1. benchmarks.gpu_check (backend accuracy at Dimba-L size, no host sync under
# set_sync_debug_mode("error"), CUDA-graph capture, inductor); 2. benchmarks.gpu_speed (Dimba-L-2 vs
# attention-only at 512/1024/2048 px fp16/bf16 for auto(cuda)/parallel/triton, eager and as CUDA graphs,
# accuracy vs the fp32 model, scans vs two mamba-ssm calls, 20 CFG steps at 1024 px); 3. benchmarks.train_step
# (Dimba-L-2 LoRA / full, with and without checkpointing, bf16, CAME); 4. benchmarks.triton_scan (block configs,
# sequence splits, both layouts, against two mamba-ssm calls); 5. benchmarks.gpu_profile (the largest kernels of a forward, kernel
# count); 6. the tests that take DIMBA_TEST_DEVICE=cuda (parallel scan,
# compile incl. mamba-ssm's custom op, golden parity on cuda/parallel/triton, triton kernels compiled).
# Not covered: the ComfyUI host tier on CUDA (needs a ComfyUI checkout there; set COMFYUI_PATH if carried).
set -u
if [ "${1:-}" = prepare ]; then
    mkdir -p .gpu/shared
    cp ../shared/wheels/mamba_ssm-*.whl .gpu/
    python3 -m pip download -q --no-deps --only-binary=:all: -d .gpu came-pytorch
    cp -r ../shared/fixtures ../shared/t5 .gpu/shared/
    git check-ignore -q .gpu || echo 'warning: .gpu is not git-ignored; do not commit it'
    du -sh .gpu
    exit 0
fi
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
LOG="$OUT/gpu_run.log"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/*.whl || exit 1
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
[ -e ../shared ] || ln -s "$PWD/.gpu/shared" ../shared
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, dimba_core.ops as o; print('torch', torch.__version__, torch.cuda.get_device_name(),
'mamba_ssm', o.has_mamba_ssm(), 'causal_conv1d', o.has_causal_conv1d(), 'triton', o.has_triton())"
    echo "== 1. gpu_check"
    timeout 80 python3 -m benchmarks.gpu_check --out "$OUT/gpu_check.json" 2>&1 | grep --line-buffered -v Warning
    echo "== 2. gpu_speed"
    timeout 240 python3 -m benchmarks.gpu_speed --out "$OUT/gpu_speed.json" 2>&1 | grep --line-buffered -v Warning
    echo "== 3. train step, Dimba-L-2, 512 px, batch 2, bf16, CAME (rows: LoRA / full, +ckpt: checkpointed blocks)"
    timeout 75 python3 -m benchmarks.train_step --preset L --px 512 --batch 2 --precision bf16 --optimizer came \
        --steps 3 2>&1 | grep --line-buffered -v Warning
    echo "== 4. fused triton scan vs two mamba-ssm calls (fp16, block configs, both layouts)"
    timeout 60 python3 -m benchmarks.triton_scan --dtype float16 --lengths 4096 16384 \
        --configs 8x16x4 4x32x4 2x32x2 4x64x4 4x32x4x8 4x32x4x32 8x16x4x16 2x32x2x16 2>&1 \
        | grep --line-buffered -v Warning
    echo "== 5. profile: Dimba-L-2 (auto, triton) and the attention-only twin, fp16, 512 / 2048 px"
    timeout 50 python3 -m benchmarks.gpu_profile 2>&1 | grep --line-buffered -v Warning
    echo "== 6. pytest, DIMBA_TEST_DEVICE=cuda: the tests that run on the device"
    DIMBA_TEST_DEVICE=cuda timeout 70 python3 -m pytest -q -p no:cacheprovider -rs --durations=10 -o log_level=WARNING \
        tests/test_parallel_scan.py tests/test_triton_scan.py tests/test_compile.py tests/test_model.py \
        > "$OUT/pytest_cuda.log" 2>&1
    echo "pytest exit $?"
    tail -n 60 "$OUT/pytest_cuda.log"
    date -u
} 2>&1 | tee "$LOG"
