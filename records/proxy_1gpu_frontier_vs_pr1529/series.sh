#!/usr/bin/env bash
# Several run.sh steps in one device call, each with the time the call has left: one call can then train a
# seed and evaluate another, and a step that does not fit is refused by run.sh (it says why) while the next
# one may still fit. Run from the project root on the GPU machine after `source .carry/setup.sh`:
#
#     bash records/proxy_1gpu_frontier_vs_pr1529/series.sh PRESET LIMIT_SECONDS STAGE:SEED [STAGE:SEED ...]
#
# e.g. `series.sh frontier 585 eval:1337 train:42`. STAGE is train, eval, all or warm (run.sh's; `warm:1` first
# on a fresh machine). LIMIT_SECONDS is
# the call's own limit, less what came before this script; each step's deadline is what is left of it less
# H2H_STEP_MARGIN (default 8 s), and the step runs under `timeout` with that deadline, so a step that
# overruns is stopped (run.sh sets its unfinished log aside on the next try) and the logs still come back.
# The environment passes through to run.sh (H2H_SCRIPT, LOG_DIR, H2H_EMA_DECAY, H2H_TRAIN_SECONDS, ...).
# By default only the text logs of LOG_DIR are copied to $OUT/<LOG_DIR's name>/, not the 16 MB artifacts: they
# stay on the machine, where the next call (while it stays warm) evaluates them. The logs are copied after every step,
# so a call cut short (its limit, or the session's device time running out) still returns the finished ones.
# H2H_RETURN_ARTIFACTS=1 copies LOG_DIR's artifacts too (15.9 MB each, under the device's 16 MiB a file; mind its
# 8 files a call): a seed trained in one session can then be evaluated in another, with LOG_DIR carried there
# (a carried folder replaces the machine's copy, so carry the whole LOG_DIR as it came back).
set -uo pipefail
usage="usage: series.sh PRESET LIMIT_SECONDS STAGE:SEED [STAGE:SEED ...]"
preset=${1:?$usage}
limit=${2:?$usage}
shift 2
[ $# -gt 0 ] || { echo "$usage" >&2; exit 2; }
for step in "$@"; do
    case "$step" in train:[0-9]*|eval:[0-9]*|all:[0-9]*|warm:[0-9]*) ;;
        *) echo "series.sh: step $step is not STAGE:SEED with STAGE one of train, eval, all, warm" >&2; exit 2 ;;
    esac
done
return_logs() {
    [ -n "$out" ] || return 0
    mkdir -p "$out/$(basename "$log_dir")"
    cp "$log_dir"/*.txt* "$out/$(basename "$log_dir")/" 2>/dev/null || true
    if [ "${H2H_RETURN_ARTIFACTS:-0}" = 1 ]; then
        cp "$log_dir"/*.ptz "$out/$(basename "$log_dir")/" 2>/dev/null || true
    fi
}
start=$SECONDS
here=$(dirname "${BASH_SOURCE[0]}")
log_dir=${LOG_DIR:-logs/h2h_ema93}
out=${OUT:-}
for step in "$@"; do
    stage=${step%%:*}
    seed=${step#*:}
    left=$((limit - (SECONDS - start) - ${H2H_STEP_MARGIN:-8}))
    echo "series: $preset $step at $((SECONDS - start)) s, deadline $left s ($(date -u +%H:%M:%S) UTC)"
    if [ "$left" -le 0 ]; then
        echo "series: $preset $step not started: the call's time is spent"
        continue
    fi
    OUT="" timeout "$left" bash "$here/run.sh" "$preset" "$seed" "$left" "$stage"
    status=$?
    [ "$status" -eq 124 ] && echo "series: $preset $step stopped at its deadline; run it again"
    [ "$status" -ne 0 ] && [ "$status" -ne 124 ] && echo "series: $preset $step failed (exit $status)"
    return_logs
done
echo "series: done at $((SECONDS - start)) s"
