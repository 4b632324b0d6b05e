#!/usr/bin/env bash
# Carry a triton wheel to the device machine in parts (it has no network, and one call carries at
# most 64 MiB of ignored files; a triton wheel is 3-4 times that). Two halves:
#
#   here:    scripts/carry_wheel.sh split VERSION
#            downloads triton==VERSION's manylinux x86_64 wheel for CPython 3.12 (the device's
#            Python), unpacks it and leaves out what a kernel never loads (CUPTI and libproton,
#            which only the profiler uses; the instrumentation test library; the ptxas that this
#            version does not use for sm_90), packs the rest as .tar.xz (3.8.0: 237 MB wheel ->
#            99 MB), writes SHA256SUMS (the pack's hash and each part's) and the parts of at most
#            PART_MIB MiB (default 60; FIRST_MIB for part-00, to leave room for other carried
#            files in the first call) under .whl/parts/triton-VERSION/ (ignored by git), and
#            prints the device calls that carry them. PACK=0 splits the wheel itself.
#
#   device:  scripts/carry_wheel.sh receive VERSION
#            one call per part, each carrying that part and SHA256SUMS: checks the part's hash
#            and keeps it in $STORE (default /tmp/fa3_wheels; ignored files of the working tree
#            may be replaced by the next call's, /tmp stays while the machine is warm). Once every
#            part is there it joins them, checks the hash and unpacks the pack (or pip-installs
#            the wheel) into /tmp/triton-VERSION; then
#            `PYTHONPATH=/tmp/triton-VERSION python ...` imports that triton instead of the
#            installed one (torch does not import triton at start-up).
#
#   device:  scripts/carry_wheel.sh status VERSION    which parts $STORE holds, installed or not
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-}
version=${2:-}
if [[ -z $mode || -z $version ]]; then
  sed -n '2,22p' "$0"
  exit 2
fi
PY=${PYTHON:-python3}
PART_MIB=${PART_MIB:-60}
PARTS=.whl/parts/triton-$version
STORE=${STORE:-/tmp/fa3_wheels}/triton-$version
TARGET=/tmp/triton-$version

split_here() {
  rm -rf "$PARTS" ".whl/download-$version"
  mkdir -p "$PARTS" ".whl/download-$version"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d ".whl/download-$version" "triton==$version"
  local wheel
  wheel=$(ls ".whl/download-$version"/triton-"$version"-*.whl)
  if [[ ${PACK:-1} == 1 ]]; then
    wheel=$(pack "$wheel")
  fi
  local name
  name=$(basename "$wheel")
  (cd "$(dirname "$wheel")" && sha256sum "$name") > "$PARTS/SHA256SUMS"
  if [[ -n ${FIRST_MIB:-} ]]; then
    head -c "$((FIRST_MIB * 1048576))" "$wheel" > "$PARTS/part-00"
    tail -c "+$((FIRST_MIB * 1048576 + 1))" "$wheel" | split -b "${PART_MIB}M" -d -a 2 \
      --numeric-suffixes=1 - "$PARTS/part-"
  else
    split -b "${PART_MIB}M" -d -a 2 "$wheel" "$PARTS/part-"
  fi
  (cd "$PARTS" && sha256sum part-*) >> "$PARTS/SHA256SUMS"
  local size parts
  size=$(stat -c %s "$wheel")
  rm -rf ".whl/download-$version"
  parts=$(ls "$PARTS"/part-* | wc -l)
  echo "$name: $size bytes, sha256 $(awk 'NR==1 {print $1}' "$PARTS/SHA256SUMS")"
  echo "$parts parts of at most $PART_MIB MiB in $PARTS:"
  ls -l "$PARTS" | awk 'NR > 1 {printf "  %s %d bytes\n", $9, $5}'
  echo
  echo "Device calls (one per part, on one warm machine; run's carry argument, then the command):"
  for p in "$PARTS"/part-*; do
    echo "  carry [\"$p\", \"$PARTS/SHA256SUMS\"]   command: bash scripts/carry_wheel.sh receive $version"
  done
  echo "Then: PYTHONPATH=$TARGET python -c 'import triton; print(triton.__version__)'"
}

pack() {  # WHEEL -> prints the path of the .tar.xz of what the kernels need from it
  local wheel=$1 dir
  dir=$(dirname "$wheel")/unpacked
  rm -rf "$dir" && mkdir -p "$dir"
  "$PY" -m zipfile -e "$wheel" "$dir" >&2
  local nv=$dir/triton/backends/nvidia
  rm -rf "$nv/lib/cupti" "$nv/lib/cupti-blackwell" "$dir/triton/instrumentation" \
    "$dir/triton/_C/libproton.so"
  # Up to 3.8 sm_90 is assembled by ptxas (ptxas-blackwell is for sm_100+); from 3.9 sm_90 and
  # newer take ptxas-blackwell and ptxas serves only below sm_90. The pack is for sm_90.
  case $version in
    3.6.*|3.7.*|3.8.*) rm -f "$nv/bin/ptxas-blackwell" ;;
    *) rm -f "$nv/bin/ptxas" ;;
  esac
  chmod +x "$nv"/bin/* 2>/dev/null || true
  (cd "$dir" && tar cf - . | xz -9 -T2 > "../triton-$version-sm90.tar.xz")
  rm -rf "$dir"
  echo "$(dirname "$wheel")/triton-$version-sm90.tar.xz"
}

receive() {
  [[ -f $PARTS/SHA256SUMS ]] || { echo "no $PARTS/SHA256SUMS: carry it with each part"; exit 1; }
  mkdir -p "$STORE"
  cp "$PARTS/SHA256SUMS" "$STORE/"
  local p
  for p in "$PARTS"/part-*; do
    [[ -f $p ]] || continue
    local want got
    want=$(awk -v n="$(basename "$p")" '$2 == n {print $1}' "$PARTS/SHA256SUMS")
    got=$(sha256sum "$p" | awk '{print $1}')
    if [[ $want != "$got" ]]; then
      echo "$(basename "$p"): sha256 $got, expected $want: not kept"
      exit 1
    fi
    cp "$p" "$STORE/"
    echo "$(basename "$p"): ok, kept in $STORE"
  done
  status
  local missing
  missing=$(missing_parts)
  if [[ -n $missing ]]; then
    echo "still missing: $missing"
    return 0
  fi
  install_wheel
}

missing_parts() {
  awk 'NR > 1 {print $2}' "$STORE/SHA256SUMS" | while read -r n; do
    [[ -f $STORE/$n ]] || printf '%s ' "$n"
  done
}

install_wheel() {
  local name want got
  name=$(awk 'NR==1 {print $2}' "$STORE/SHA256SUMS")
  want=$(awk 'NR==1 {print $1}' "$STORE/SHA256SUMS")
  cat "$STORE"/part-* > "$STORE/$name"
  got=$(sha256sum "$STORE/$name" | awk '{print $1}')
  if [[ $want != "$got" ]]; then
    echo "$name: sha256 $got, expected $want: not installed"
    rm -f "$STORE/$name"
    exit 1
  fi
  rm -rf "$TARGET"
  if [[ $name == *.tar.xz ]]; then
    mkdir -p "$TARGET" && tar -xJf "$STORE/$name" -C "$TARGET"
  else
    "$PY" -m pip install -q --no-deps --no-index --target "$TARGET" "$STORE/$name"
  fi
  echo "$name: sha256 ok, installed in $TARGET"
  PYTHONPATH=$TARGET "$PY" -c 'import triton; print("PYTHONPATH='"$TARGET"' imports triton", triton.__version__, "from", triton.__file__)'
}

status() {
  [[ -f $STORE/SHA256SUMS ]] || { echo "$STORE: nothing received"; return 0; }
  local total have
  total=$(awk 'NR > 1' "$STORE/SHA256SUMS" | wc -l)
  have=$(ls "$STORE"/part-* 2>/dev/null | wc -l)
  echo "$STORE: $have of $total parts$([[ -d $TARGET/triton ]] && echo ", installed in $TARGET")"
}

case $mode in
  split) split_here ;;
  receive) receive ;;
  status) status ;;
  *) echo "unknown mode '$mode': split, receive or status"; exit 2 ;;
esac
