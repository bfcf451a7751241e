# Shared helpers of the experiment scripts (sourced; see experiments/gemma-large/run.sh, experiments/smollm2/run.sh).
# Each step logs its command, output and wall time to $E/logs/<step>.log; result files are copied to $E/results/.
# Every knlight step resumes when re-run (finished items are skipped, fits continue from last.ckpt), so a killed
# script is re-run as it is. STEPS="a b" runs only those steps.
set -uo pipefail   # a failed step is logged; the later ones still run
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
timed() {  # timed <log name> <command...>
  local name=$1; shift
  mkdir -p "$E/logs"
  echo "\$ $*" > "$E/logs/$name.log"
  echo "# $(date -u +%FT%TZ) OMP_NUM_THREADS=$OMP_NUM_THREADS $(git rev-parse --short HEAD 2>/dev/null)" >> "$E/logs/$name.log"
  /usr/bin/time -f "WALL %e s, max RSS %M KB" "$@" >> "$E/logs/$name.log" 2>&1 || echo "FAILED: $name (see $E/logs/$name.log)"
}
latest() { ls -d "$1"/version_* | sort -t_ -k2 -n | tail -1; }
wants() { [[ " ${STEPS:-$ALL} " == *" $1 "* ]]; }
