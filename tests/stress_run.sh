#!/usr/bin/env bash
# Run the whole suite N times in a row while CPU burners keep the cores busy, and say
# which tests failed in which run. A check of the suite itself (is it trustworthy on a
# loaded machine?), not part of CI and not run by `make test`.
#
#   tests/stress_run.sh [RUNS]          RUNS defaults to 5
#
# Environment:
#   JOBS=1             runs at once (each a whole suite; more than 1 is itself load, and
#                      makes N runs fit in less wall time on a machine already loaded)
#   BURNERS=2          CPU burners started for the whole session (0: none, e.g. when the
#                      machine is already loaded by something else); stress-ng is used
#                      when installed (Debian package 'stress-ng'), else `python3 -c 'while
#                      True: pass'` processes
#   RUN_TIMEOUT_S=7200 a run still going after this is interrupted (SIGINT, then SIGKILL a
#                      minute later) and counted as failed: a hang shows as TIMEOUT
#   PYTHON=.venv/bin/python    the interpreter that runs pytest
#   PYTEST_ARGS=...    extra pytest arguments (e.g. a directory, `-x`)
#   OUT=.stress/<timestamp>    where each run's log and JUnit XML are kept
#
# Every run uses REQUIRE_SERVICES=1: PostgreSQL, Redis and NATS must answer (see .ci/run),
# and Node's clients must be installed (`make grpcweb grpcjs`). The burners are stopped on
# exit, whatever the exit path (trap). The exit status is 0 only when every run passed.
set -uo pipefail
cd "$(dirname "$0")/.."

RUNS=${1:-5}
JOBS=${JOBS:-1}
RUN_TIMEOUT_S=${RUN_TIMEOUT_S:-7200}
BURNERS=${BURNERS:-2}
PYTHON=${PYTHON:-.venv/bin/python}
PYTEST_ARGS=${PYTEST_ARGS:-}
OUT=${OUT:-.stress/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"

stop_runs() {  # runs still going when this script exits (Ctrl-C, kill): their groups
  local file pid
  for file in "$OUT"/run*.pid; do
    [ -f "$file" ] || continue
    [ -f "${file%.pid}.rc" ] && continue
    pid=$(cat "$file")
    kill -TERM -- "-$pid" 2>/dev/null  # timeout leads its own process group
    sleep 2
    kill -KILL -- "-$pid" 2>/dev/null
  done
}

burner_pids=()
stop_burners() {
  for pid in "${burner_pids[@]}"; do
    kill "$pid" 2>/dev/null
  done
  for pid in "${burner_pids[@]}"; do
    wait "$pid" 2>/dev/null
  done
  burner_pids=()
}
trap 'stop_runs; stop_burners' EXIT
trap 'exit 130' INT TERM

if [ "$BURNERS" -gt 0 ]; then
  if command -v stress-ng >/dev/null 2>&1; then
    stress-ng --cpu "$BURNERS" --quiet &
    burner_pids+=($!)
    how="stress-ng --cpu $BURNERS"
  else
    for _ in $(seq 1 "$BURNERS"); do
      python3 -c 'while True: pass' &
      burner_pids+=($!)
    done
    how="$BURNERS x python3 busy loop"
  fi
else
  how="none"
fi

echo "stress: $RUNS run(s) of the suite, $JOBS at a time, burners: $how, $(nproc) cores," \
  "load average $(cut -d' ' -f1-3 /proc/loadavg), commit $(git rev-parse --short HEAD)," \
  "output in $OUT"

run_one() {  # run number: one whole suite; writes runN.{log,xml,rc,s}
  local run=$1 start rc
  start=$(date +%s)
  # shellcheck disable=SC2086
  REQUIRE_SERVICES=1 timeout -s INT --kill-after=60 "$RUN_TIMEOUT_S" \
    "$PYTHON" -m pytest -q -p no:cacheprovider \
    --junitxml="$OUT/run$run.xml" $PYTEST_ARGS >"$OUT/run$run.log" 2>&1 &
  echo $! >"$OUT/run$run.pid"
  wait $!
  rc=$?
  echo $(($(date +%s) - start)) >"$OUT/run$run.s"
  echo "$rc" >"$OUT/run$run.rc"  # last: its presence says the run is over
}

report_one() {  # run number
  local run=$1 rc seconds verdict
  rc=$(cat "$OUT/run$run.rc")
  seconds=$(cat "$OUT/run$run.s")
  if [ "$rc" -eq 0 ]; then verdict=PASS
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then verdict="TIMEOUT (${RUN_TIMEOUT_S}s)"
  else verdict=FAIL; fi
  echo "stress: run $run/$RUNS $verdict in ${seconds}s (exit $rc, load $(cut -d' ' -f1 /proc/loadavg)): $(tail -n 1 "$OUT/run$run.log")"
  grep -E '^(FAILED|ERROR) ' "$OUT/run$run.log" | sed 's/^/stress:   /'
}

running=()
declare -A pid_of
for run in $(seq 1 "$RUNS"); do
  while [ "${#running[@]}" -ge "$JOBS" ]; do
    pids=()
    for r in "${running[@]}"; do pids+=("${pid_of[$r]}"); done
    wait -n "${pids[@]}"  # a run ended (not a burner)
    still=()
    for r in "${running[@]}"; do
      if [ -f "$OUT/run$r.rc" ]; then report_one "$r"; else still+=("$r"); fi
    done
    running=("${still[@]}")
  done
  run_one "$run" &
  pid_of[$run]=$!
  running+=("$run")
done
for r in "${running[@]}"; do
  wait "${pid_of[$r]}"
  report_one "$r"
done
failed_runs=0
for run in $(seq 1 "$RUNS"); do
  [ "$(cat "$OUT/run$run.rc")" -eq 0 ] || failed_runs=$((failed_runs + 1))
done

stop_burners

# Failures per test over all runs: "flaky" when a test failed in some runs only.
"$PYTHON" - "$OUT" "$RUNS" <<'EOF'
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

out, runs = Path(sys.argv[1]), int(sys.argv[2])
failures: Counter[str] = Counter()
for run in range(1, runs + 1):
    path = out / f"run{run}.xml"
    if not path.exists():
        continue
    for case in ET.parse(path).iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failures[f"{case.get('classname')}::{case.get('name')}"] += 1
if not failures:
    print("stress: no test failed")
for name, count in sorted(failures.items()):
    kind = "always" if count == runs else "flaky"
    print(f"stress: {kind} {name} failed {count}/{runs}")
EOF

echo "stress: $((RUNS - failed_runs))/$RUNS run(s) passed"
[ "$failed_runs" -eq 0 ]
