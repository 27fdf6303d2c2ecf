# Shared by the device scripts (sourced): wheels the device image lacks, time-boxed steps, one packed result.
# Sets OUT (what comes back: $OUT/device-check.tgz), PY, WORK (logs and JSON, packed after every step).
OUT=${OUT:-runs/device-check}
PY=${PY:-python3}
WHEELS=${WHEELS:-.whl}
WORK=${WORK:-/tmp/device-check}
mkdir -p "$OUT" "$WORK"
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
pack() {  # everything under $WORK into the one file the device tool returns (it returns at most 8 files)
  tar -czf "$OUT/.device-check.tgz" -C "$WORK" . && mv "$OUT/.device-check.tgz" "$OUT/device-check.tgz"
}
step() {  # step NAME SECONDS CMD...: run with a time limit, log to $WORK/NAME.log, go on whatever happens
  local name=$1 secs=$2; shift 2
  echo "== $name ($(date -u +%T))"
  timeout "$secs" "$@" > "$WORK/$name.log" 2>&1
  echo "   rc $? ($(date -u +%T))"; tail -n 25 "$WORK/$name.log"
  pack
}
