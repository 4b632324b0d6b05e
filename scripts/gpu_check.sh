#!/usr/bin/env bash
# The one command the lead runs on the H100 (one device call, about 9 minutes at most):
#
#   scripts/gpu_check.sh [all | env tests fwd bwd decode suite ...]      (default: all)
#
#   env     nvidia-smi, versions, `python -m flash_attn_3 check` and `... bench`
#   tests   pytest -m gpu (the big-shape GPU variants), then `suite`
#   gpu     pytest -m gpu only
#   suite   the whole test suite with FLASH_ATTN_3_BACKEND=triton (not -m gpu: already run)
#   fwd bwd decode oplayer   benchmarks/bench_*.py --quick (tables + JSON + PNG); oplayer is
#           bench_op_layer: SDPA through PyTorch's FA3 switch vs flash_attn_func
#   profile scripts/profile_decode_step.py (host time of an eager decode step)
#   combine scripts/time_combine.py (the split-KV merge against its last shared-memory form)
#   window  scripts/time_window_sweep.py --backward (a sliding window's per-tile and per-block
#           cost, GPT-OSS's shape; issue 16); only when named
#   compile scripts/compile_cost.py (first-call and recompile cost per shape class, cold cache)
#   owed    the tests of variants built offline and not yet run on a GPU (OWED_K, the -k below;
#           no -m gpu: a few are CPU-marked checks of GPU behaviour), 6 xdist workers, under
#           PYTEST_OWED_CAP s (default 150); only when named. Pair it with `reliability`: the
#           sanitizer's workload calls the same variants
#   sanitize     scripts/reliability_sanitizer.py alone: SANITIZE_TOOLS (default racecheck) over
#           the workload calls whose names contain one of SANITIZE_ONLY's comma-separated
#           substrings (default: all), under SANITIZE_BUDGET s (default 120); only when named
#   reliability  scripts/reliability.py (issue 17: hostile values, concurrency, > 2^31 elements,
#           differential run, compute-sanitizer) under RELIABILITY_BUDGET s (default 470); only
#           when named, never in `all`; needs .whl/ (RELIABILITY.md says which wheels)
#
# Every part runs under its own cap and a global deadline (GPU_CHECK_SECONDS, default 520), and a
# part that fails or hits its cap does not stop the next. The benches share what the parts before
# them left of the deadline, by weight (fwd 110, bwd 90, decode 50); a single bench gets all of it. Environment knobs: PYTHON (default python3), BENCH_ARGS (added to every bench, e.g.
# "--only D=128"), QUICK=0 (full grids; pair it with one part and BENCH_ARGS), PYTEST_GPU_ARGS
# (added to the `gpu` and `suite` pytest runs, e.g. "-n 8": the GPU tests are compile-bound and the
# device has 16 cores; 8 xdist workers ran the 220 `-m gpu` tests in 3.3 min instead of ~11),
# GPU_TESTS (the paths the `gpu` part collects; default tests), PYTEST_GPU_K (its -k expression),
# ALT_TRITON=VERSION (every part runs under that triton instead of the installed one, with the Gluon
# kernels forced on, FLASH_ATTN_3_GLUON=1 unless set: the GPU check of a triton version that
# gluon_compat.VERSIONS does not yet list as run; its parts travel first, see
# scripts/carry_wheel.sh), FLASH_ATTN_3_COMMIT (the commit the bench JSON records: set it on the caller's side, e.g.
# `FLASH_ATTN_3_COMMIT=abc1234 bash scripts/gpu_check.sh ...`, since the device's copy of .git can
# lag behind the working tree it receives).
#
# What comes back in $OUT (the device tool returns at most 8 files): gpu_check.log (everything),
# summary.md (versions, part results, failing tests, bench tables), bench_{fwd,bwd,decode}.json
# (input of scripts/update_benchmarks.py) and extras.tar.gz (plots, full pytest logs, junit XML).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
OUT=${OUT:-out/gpu_check}
DEADLINE=$((SECONDS + ${GPU_CHECK_SECONDS:-520}))
QUICK_FLAG=$([[ ${QUICK:-1} == 0 ]] && echo "" || echo "--quick")
read -r -a BENCH_EXTRA <<< "${BENCH_ARGS:-}"
mkdir -p "$OUT"
if [[ -n ${ALT_TRITON:-} ]]; then
  bash scripts/carry_wheel.sh receive "$ALT_TRITON" || exit 1
  [[ -d /tmp/triton-$ALT_TRITON/triton ]] || { echo "triton $ALT_TRITON: not all parts here"; exit 1; }
  export PYTHONPATH=/tmp/triton-$ALT_TRITON${PYTHONPATH:+:$PYTHONPATH}
  export FLASH_ATTN_3_GLUON=${FLASH_ATTN_3_GLUON:-1}
fi
WORK=$(mktemp -d)
SUMMARY=$WORK/summary.md

parts=("$@")
(( ${#parts[@]} )) || parts=(all)
for p in "${parts[@]}"; do
  case $p in all|env|tests|gpu|suite|fwd|bwd|decode|oplayer|profile|combine|window|compile|owed|sanitize|reliability) ;;
    *) echo "unknown part '$p': expected all, env, tests, gpu, suite, fwd, bwd, decode, oplayer, profile, combine, window, compile, owed, sanitize or reliability"; exit 2 ;;
  esac
done
want() {
  local p
  for p in "${parts[@]}"; do
    [[ $p == all || $p == "$1" || ($p == tests && $1 == suite) || ($p == gpu && $1 == tests) ]] && return 0
  done
  return 1
}

# run_capped CAP NAME LOGFILE CMD...: CMD's output goes to LOGFILE (its tail to the log); it gets
# SIGINT at the smaller of CAP and the time left (the benches then write what they have) and
# SIGKILL 20 s later. One line per part goes to the summary.
run_capped() {
  local cap=$1 name=$2 logfile=$3 left rc t0
  shift 3
  left=$((DEADLINE - SECONDS - 10))
  (( cap > left )) && cap=$left
  if (( cap < 20 )); then
    echo "== $name: skipped, the deadline is near"
    echo "- $name: skipped (deadline)" >> "$SUMMARY"
    return
  fi
  echo "== $name (cap ${cap}s): $*"
  t0=$SECONDS
  timeout -s INT -k 20 "$cap" "$@" > "$logfile" 2>&1
  rc=$?
  tail -n 25 "$logfile"
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
  echo "- $name: exit $rc after $((SECONDS - t0)) s$( ((rc == 124 || rc == 137)) && echo ' (hit its cap)')" \
    >> "$SUMMARY"
}

pytest_part() {  # NAME CAP PYTEST-ARGS...: records the result line and failing tests
  local name=$1 cap=$2
  shift 2
  run_capped "$cap" "$name" "$WORK/$name.log" \
    "$PY" -m pytest -q -rfE -p no:cacheprovider --durations=15 \
    --junitxml="$WORK/$name.xml" "$@"
  {
    echo "  - result: $(grep -E '(passed|failed|error|no tests ran)' "$WORK/$name.log" | tail -n 1)"
    grep -E '^(FAILED|ERROR) ' "$WORK/$name.log" | head -n 30 | sed 's/^/  - /'
  } >> "$SUMMARY"
}

bench_weight_left=0
for b in fwd:110 bwd:90 decode:50 oplayer:40; do want ${b%%:*} && bench_weight_left=$((bench_weight_left + ${b##*:})); done
bench_part() {  # NAME WEIGHT: the bench gets its weight's share of the time left to the benches
  local name=$1 weight=$2 left cap
  left=$((DEADLINE - SECONDS - 10))
  cap=$((left * weight / bench_weight_left))
  bench_weight_left=$((bench_weight_left - weight))
  # the bench stops starting measurements 35 s before its cap, to print and save its tables
  run_capped "$cap" "bench_$name" "$WORK/bench_$name.log" \
    "$PY" -m "benchmarks.bench_$name" $QUICK_FLAG --out "$WORK" \
    --time-budget $((cap > 60 ? cap - 35 : 25)) "${BENCH_EXTRA[@]}"
  [[ -f $WORK/bench_$name.json ]] && cp "$WORK/bench_$name.json" "$OUT/"
  [[ -f $WORK/bench_$name.md ]] && printf '\n## bench_%s\n\n%s\n' "$name" \
    "$(cat "$WORK/bench_$name.md")" >> "$WORK/tables.md"
}

main() {
  {
    echo "# gpu_check $(date -u '+%Y-%m-%d %H:%M UTC'), parts: ${parts[*]}"
    echo
    "$PY" - <<'EOF'
import platform, torch
try:
    import triton; tv = triton.__version__
except Exception as e:
    tv = f"not importable ({e})"
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE"
print(f"{gpu}; python {platform.python_version()}; torch {torch.__version__}; triton {tv}; "
      f"CUDA {torch.version.cuda}; cuDNN {torch.backends.cudnn.version()}")
EOF
    echo "FLASH_ATTN_3_GLUON=${FLASH_ATTN_3_GLUON:-unset}"
    echo
  } >> "$SUMMARY"
  cat "$SUMMARY"
  # Clients (transformers) find us by package metadata: install the checkout, offline.
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . > "$WORK/install.log" 2>&1 \
    || { echo "editable install failed:"; tail -n 5 "$WORK/install.log"; }

  if want env; then
    nvidia-smi || echo "nvidia-smi failed"
    run_capped 60 "flash_attn_3 check" "$WORK/check.log" "$PY" -m flash_attn_3 check
    run_capped 60 "flash_attn_3 bench" "$WORK/cli_bench.log" "$PY" -m flash_attn_3 bench
  fi
  read -r -a PYTEST_GPU_EXTRA <<< "${PYTEST_GPU_ARGS:-}"
  read -r -a GPU_TEST_PATHS <<< "${GPU_TESTS:-tests}"
  GPU_K=()
  [[ -n ${PYTEST_GPU_K:-} ]] && GPU_K=(-k "$PYTEST_GPU_K")
  want tests && pytest_part pytest_gpu "${PYTEST_GPU_CAP:-240}" -m gpu "${GPU_K[@]}" "${PYTEST_GPU_EXTRA[@]}" "${GPU_TEST_PATHS[@]}"
  if want compile; then
    run_capped 240 "compile_cost" "$WORK/compile_cost.log" "$PY" scripts/compile_cost.py --out "$WORK"
    [[ -f $WORK/compile_cost.json ]] && cp "$WORK/compile_cost.json" "$OUT/"
    [[ -f $WORK/compile_cost.md ]] && printf '\n## compile_cost\n\n%s\n' \
      "$(cat "$WORK/compile_cost.md")" >> "$WORK/tables.md"
  fi
  want fwd && bench_part fwd 110
  want bwd && bench_part bwd 90
  want decode && bench_part decode 50
  want oplayer && bench_part op_layer 40
  want profile && run_capped 40 "profile_decode_step" "$WORK/profile_decode_step.log" \
    "$PY" scripts/profile_decode_step.py
  want combine && run_capped 60 "time_combine" "$WORK/time_combine.log" "$PY" scripts/time_combine.py
  [[ " ${parts[*]} " == *" window "* ]] && run_capped 120 "time_window_sweep" "$WORK/time_window_sweep.log" \
    "$PY" scripts/time_window_sweep.py --backward
  if [[ " ${parts[*]} " == *" owed "* ]]; then
    # Keep this list to what has not yet passed on a GPU; a variant leaves it with the flip of
    # its default (docs/perf-notes.md, "Next device calls").
    owed_k=${OWED_K:-"(bwd and (poison or varlen or seqused or scope or dq_accumulator)) or lowlevel"}
    pytest_part pytest_owed "${PYTEST_OWED_CAP:-150}" -n 6 -k "$owed_k" tests/test_bwd_hopper_layers.py \
      tests/test_bwd_hopper.py tests/test_fwd_hopper.py tests/test_gluon_compat.py \
      tests/test_interface_unit.py tests/test_reliability_hostile.py
  fi
  if [[ " ${parts[*]} " == *" sanitize "* ]]; then
    run_capped $((${SANITIZE_BUDGET:-120} + 20)) sanitize "$WORK/sanitize.log" \
      "$PY" scripts/reliability_sanitizer.py --tools "${SANITIZE_TOOLS:-racecheck}" \
      --only "${SANITIZE_ONLY:-}" --budget "${SANITIZE_BUDGET:-120}" --out "$WORK/sanitize"
    for f in "$WORK"/sanitize/*.log; do [[ -f $f ]] && cp "$f" "$WORK/sanitize_$(basename "$f")"; done
    grep -E "^sanitizer[ :]|^  Error" "$WORK/sanitize.log" | sed 's/^/  - /' >> "$SUMMARY"
  fi
  if [[ " ${parts[*]} " == *" reliability "* ]]; then
    run_capped $((${RELIABILITY_BUDGET:-470} + 90)) reliability "$WORK/reliability.log" \
      "$PY" scripts/reliability.py --budget "${RELIABILITY_BUDGET:-470}" --out "$WORK/reliability"
    [[ -f $WORK/reliability/reliability.md ]] && cat "$WORK/reliability/reliability.md" >> "$SUMMARY"
    [[ -f $WORK/reliability/reliability.json ]] && cp "$WORK/reliability/reliability.json" "$OUT/"
    for f in "$WORK"/reliability/*.log "$WORK"/reliability/*.xml; do
      [[ -f $f ]] && cp "$f" "$WORK/reliability_$(basename "$f")"
    done
  fi
  # The suite's backend fixture already runs every test on triton (CUDA) and reference.
  want suite && pytest_part pytest_suite "${PYTEST_SUITE_CAP:-200}" -m "not gpu" "${PYTEST_GPU_EXTRA[@]}" tests

  [[ -f $WORK/tables.md ]] && cat "$WORK/tables.md" >> "$SUMMARY"
  cp "$SUMMARY" "$OUT/summary.md"
  (cd "$WORK" && tar -czf extras.tar.gz -- *.md *.log $(ls -- *.png *.xml 2>/dev/null))
  cp "$WORK/extras.tar.gz" "$OUT/"
  echo
  echo "================ summary after $SECONDS s; in $OUT: $(ls "$OUT" | tr '\n' ' ')"
  cat "$SUMMARY"
}

main 2>&1 | tee "$OUT/gpu_check.log"
