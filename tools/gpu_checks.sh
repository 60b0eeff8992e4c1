#!/usr/bin/env bash
# The GPU work of gn_det in as few device calls as possible: the self-check, the CUDA tests,
# the layer benchmark and the training benchmark, each writing its files into one folder.
#
#   tools/gpu_checks.sh [STAGE ...]      STAGE: check-parallel | check | tests | norm | norm-bf16 | norm-rest |
#                                               step-profile | padding | host | train | stats-merge | ncu
#
# step-profile (tools/benchmark_train.py --step-profile) shows where a training step's time goes,
# per model, bf16 first; it starts no row after $STEP_PROFILE_ROWS_S seconds (default 480) and
# writes what it has (files named partial), within a 10-minute call.
# padding (tools/benchmark_padding.py) times GN + ReLU over image regions (MODEL.GN.IGNORE_PADDING)
# against plain GN on the dense-map Mask R-CNN shapes, the masked kernels against the unmasked
# (issue 35's target: within 5%).
# host (tools/benchmark_host.py, about a minute) times the host's part of a GN call (real launches, the
# GPU not waited for) against nn.GroupNorm's and frozen BN's, per kernel set and mode (issue 33).
# check-parallel (tools/check_parallel.py) runs the self-check's cases in $CHECK_JOBS processes
# (default 12) at once, for correctness on a GPU whose Triton cache is empty: the kernels compile
# on many cores at once (set TRITON_CACHE_DIR to a folder you carry to keep them for a later
# call). Its times are not measurements; the check stage, after it, times on the warm cache.
# With no stage it runs check, tests, norm and train; ncu (Nsight Compute metrics of the Triton
# kernels, tools/profile_kernels.py) runs only when named. The check stage is
# `"$py" -m gn_det.check` (every Mask R-CNN shape and a few others, each dtype, layout and
# fused op: errors against float64, time against PyTorch, tuning's decisions): its report
# check_<gpu>.json and its printed table check_<gpu>.txt name the GPU; it starts no new case
# after $CHECK_TIME_LIMIT seconds (default 480; the report lists the cases it left out).
# Results go to $GPU_RESULTS, else $OUT (the device tool's return folder), else
# benchmarks/results/. Every stage runs even when an earlier one failed; the exit status is
# the number of stages that failed. With $GPU_PACK set (a .tar.gz path, e.g. under $OUT), the
# results folder is packed into it after every stage: one file back, even when a later stage
# runs past the call's limit.
# The tests stage runs every test marked gpu, in $TEST_JOBS pytest-xdist processes if set.
# A device call may run 10 minutes: the tests stop at $TESTS_TIME_LIMIT seconds (default
# 540) and a layer benchmark starts no new row after $NORM_TIME_LIMIT (default 420; the
# table is still written, listing what it left out); the training benchmark stops at
# $TRAIN_TIME_LIMIT (default 560) with the rows it finished written ($TRAIN_ARGS replaces its
# default --profile, e.g. "--precisions bf16 --iters 15"). One stage per call.
# The layer stages also write routes.json (tools/benchmark_norm.py --write-routes): the shape
# buckets where the kernels lost to PyTorch's GroupNorm, for gn_det/policy/routes.json.
# On the project's lent GPU machine (see docs/PERFORMANCE.md), after
# `bash ../shared/gpu/prepare-site.sh` here, carry .gpu_site and run e.g.
#   export PYTHONPATH=$PWD/.gpu_site:$PWD; bash tools/gpu_checks.sh tests norm-bf16
set -u
cd "$(dirname "$0")/.."
results="${GPU_RESULTS:-${OUT:-benchmarks/results}}"
mkdir -p "$results"
export PYTHONUNBUFFERED=1
failed=0
py="${PYTHON:-$(command -v python3 || command -v python)}"  # (the GPU image has python3 only)
norm_limit="${NORM_TIME_LIMIT:-420}"
ncu_metrics=gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed
ncu_metrics=$ncu_metrics,sm__warps_active.avg.pct_of_peak_sustained_active

stage() {  # name, command...: run it, log it under $results, count a failure
    local name="$1"
    shift
    echo "=== $name: $*"
    local start=$SECONDS
    if ! "$@" 2>&1 | tee -a "$results/gpu_checks.log"; then
        failed=$((failed + 1))
        echo "=== $name FAILED after $((SECONDS - start)) s"
    else
        echo "=== $name done in $((SECONDS - start)) s"
    fi
    if [ -n "${GPU_PACK:-}" ]; then  # (packed beside, then moved: the pack may be inside $results)
        local pack
        pack=$(mktemp) && tar czf "$pack" -C "$results" --exclude="./$(basename "$GPU_PACK")" . \
            && mv "$pack" "$GPU_PACK"
    fi
}

set -o pipefail
# The layer benchmarks measure the kernels with routes off and update a copy of the package's
# routes (gn_det/policy/routes.json) in the results: copy it back over the package's file.
routes="$results/routes.json"
[ -f "$routes" ] || cp gn_det/policy/routes.json "$routes"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$results/gpu_checks.log"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | tr -c 'A-Za-z0-9\n' '_' \
      | tr 'A-Z' 'a-z' | sed 's/^_*//; s/_*$//')
gpu="${gpu:-gpu}"  # as gn_det.diagnostics.check names its report: the GPU's name, lower case, _ for the rest
[ $# -eq 0 ] && set -- check tests norm train
for what in "$@"; do
    case "$what" in
        check-parallel) stage check-parallel "$py" tools/check_parallel.py --jobs "${CHECK_JOBS:-12}" \
                            --time-limit "${CHECK_TIME_LIMIT:-480}" --out-dir "$results" ;;
        check) stage check bash -o pipefail -c '"$4" -m gn_det.check --time-limit "$1" --json "$2" | tee "$3"' _ \
                   "${CHECK_TIME_LIMIT:-480}" "$results/check_$gpu.json" "$results/check_$gpu.txt" "$py" ;;
        tests) stage tests timeout "${TESTS_TIME_LIMIT:-540}" "$py" -m pytest -q -p no:cacheprovider -rfE \
                   -m gpu -k "not more_than_2_to_31" ${TEST_JOBS:+-n "$TEST_JOBS" --dist load} tests
               # the >2^31-element tests hold ~60 GB each: alone, after the others
               stage tests-huge timeout "${TESTS_TIME_LIMIT:-540}" "$py" -m pytest -q -p no:cacheprovider -rfE \
                   -m gpu -k "more_than_2_to_31" tests ;;
        norm) stage norm "$py" tools/benchmark_norm.py --time-limit "$norm_limit" --out-dir "$results" \
                  --write-routes "$routes" ;;
        norm-bf16) stage norm-bf16 "$py" tools/benchmark_norm.py --dtypes bfloat16 --suffix bf16 \
                       --time-limit "$norm_limit" --out-dir "$results" --write-routes "$routes" ;;
        norm-rest) stage norm-rest "$py" tools/benchmark_norm.py --dtypes float32,float16 --suffix fp32_fp16 \
                       --time-limit "$norm_limit" --out-dir "$results" --write-routes "$routes" ;;
        stats-merge) stage stats-merge "$py" tools/benchmark_stats_merge.py --out-dir "$results" ;;
        ncu) stage ncu timeout "${TESTS_TIME_LIMIT:-540}" ncu --target-processes all --clock-control none --csv \
                 --log-file "$results/ncu_kernels.csv" --kernel-name "regex:^_(group|stats|forward|backward)_" \
                 --metrics "$ncu_metrics" "$py" tools/profile_kernels.py ;;
        step-profile) stage step-profile timeout "${TRAIN_TIME_LIMIT:-580}" "$py" tools/benchmark_train.py --step-profile \
                      --time-limit "${STEP_PROFILE_ROWS_S:-480}" --out-dir "$results" ${TRAIN_ARGS:-} ;;
        host) stage host timeout "${TRAIN_TIME_LIMIT:-560}" "$py" tools/benchmark_host.py --out "$results" ;;
        padding) stage padding timeout "${TRAIN_TIME_LIMIT:-560}" "$py" tools/benchmark_padding.py \
                     --out-dir "$results" ;;
        train) stage train timeout "${TRAIN_TIME_LIMIT:-560}" "$py" tools/benchmark_train.py ${TRAIN_ARGS:---profile} \
                   --out-dir "$results" ;;
        *) echo "unknown stage '$what' (check-parallel, check, tests, norm, norm-bf16, norm-rest, step-profile, padding, host, train, stats-merge, ncu)" >&2
           failed=$((failed + 1)) ;;
    esac
done
exit "$failed"
