#!/usr/bin/env bash
# The prepared GPU checks, one call of the device tool each (the figures go to docs/benchmarks.md):
#   scripts/device-wheels.sh                       # here, once: wheels the device image lacks -> .whl/
#   run(command="bash scripts/device-check.sh", carry=[".whl"], timeout_s=590)                 # base, ~8 min
#   run(command="CHECKS=compile bash scripts/device-check.sh", carry=[".whl"], timeout_s=400)  # eager vs compiled
# base: the GPU tests (tests/gpu: CUDA vs the CPU fp32 reference), then the benchmarks. Each step is time-boxed
# and everything comes back even when a step fails or runs long: logs and JSON go to $WORK, and after every step
# they are packed into the one file $OUT/device-check.tgz (the device tool returns at most 8 files).
# PY=.venv/bin/python WHEELS=none OUT=/tmp/dc scripts/device-check.sh runs the same steps here (a smoke test).
set -uo pipefail
source "$(dirname "$0")/device-lib.sh"
base() {
  step gpu-tests 240 "$PY" -m pytest -q -m gpu tests/gpu -p no:cacheprovider
  step qat-smollm2 90 "$PY" -m lutq.cli bench qat --shape smollm2-135m --preset q2a4 --seq-len 64 --seq-len 128 \
    --precision bf16 --forward materialized --grad-ckpt off --find-max-batch --max-batch 1024 --json "$WORK/qat-smollm2.json"
  step qat-qwen3 120 "$PY" -m lutq.cli bench qat --shape qwen3-0.6b --preset q2a4 --seq-len 64 --seq-len 128 \
    --precision bf16 --forward materialized --grad-ckpt both --find-max-batch --max-batch 1024 --json "$WORK/qat-qwen3.json"
  step cache 45 "$PY" -m lutq.cli bench cache --model shape:smollm2-135m --seq-len 128 --batch-size 64 --batches 4 \
    --json "$WORK/cache.json"
  step lut-linear 30 "$PY" -m lutq.cli bench lut-linear --dtype bf16 --tokens 8192 --json "$WORK/lut-linear.json"
  step pretrain-1b 100 "$PY" -m lutq.cli bench pretrain --size 1b --variant gqa --seq-len 2048 --micro-batch 8 \
    --steps 5 --warmup 2 --json "$WORK/pretrain-1b.json"
  step pretrain-1b-compiled 150 "$PY" -m lutq.cli bench pretrain --size 1b --variant gqa --seq-len 2048 \
    --micro-batch 8 --steps 5 --warmup 3 --compile --json "$WORK/pretrain-1b-compiled.json"
}
compile() {  # eager vs compiled: one LUT layer; the KD-QAT step (speedrun loss: KD + full KL), decoder layers compiled
  step lut-linear-compiled 60 "$PY" -m lutq.cli bench lut-linear --dtype bf16 --tokens 8192 --steps 50 --warmup 3 \
    --factored-steps 0 --compile --json "$WORK/lut-linear-compiled.json"
  local qat=("$PY" -m lutq.cli bench qat --shape smollm2-135m --seq-len 128 --precision bf16 --forward materialized
             --grad-ckpt off --full-kl-weight 1)
  step qat-q2a4-fullkl-b1024 45 "${qat[@]}" --preset q2a4 --batch-size 1024 --json "$WORK/qat-q2a4-fullkl-b1024.json"
  step qat-q4a4-fullkl-b1024 45 "${qat[@]}" --preset q4a4 --batch-size 1024 --json "$WORK/qat-q4a4-fullkl-b1024.json"
  step qat-q2a4-fullkl-b256 30 "${qat[@]}" --preset q2a4 --batch-size 256 --json "$WORK/qat-q2a4-fullkl-b256.json"
  step qat-q2a4-fullkl-b1024-profile 60 "${qat[@]}" --preset q2a4 --batch-size 1024 --steps 2 \
    --profile "$WORK/qat-q2a4-fullkl-b1024-profile.txt" --json "$WORK/qat-q2a4-fullkl-b1024-profile.json"
  step qat-q2a4-fullkl-b256-compiled 150 "${qat[@]}" --preset q2a4 --batch-size 256 --warmup 2 --compile \
    --json "$WORK/qat-q2a4-fullkl-b256-compiled.json"
}
step device 30 bash -c "nvidia-smi; $PY -c 'import torch; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())'"
for check in ${CHECKS:-base}; do "$check"; done
echo "done ($(date -u +%T))"
