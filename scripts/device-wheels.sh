#!/usr/bin/env bash
# Put the wheels that a lent GPU machine's image lacks (it has torch, transformers, typer, rich, pytest, ...;
# it cannot reach a registry) into .whl/, for `scripts/device-check.sh`. Run here, where pip works.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl
platforms=()
for n in 28 27 17; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" --platform manylinux2014_x86_64 -d .whl \
    gguf lion-pytorch lz4 zstandard
ls -la .whl
