#!/usr/bin/env bash
# Fast start (design section 7, issue 9): nodes restored from a template
# against cold boots, measured in the same run. The template is built (or
# found) before the rounds start, so the fast rounds show a warm template.
#
# usage: bench/fast-start.sh [ROUNDS]   (default 5)
#   - a base-image node: start() to its first answer and to default.target
#   - the reference example, warm images, the whole `vmrig run`
#   - eight nodes until all have pinged each other, and memory per node
source "$(dirname "$0")/common.sh"
rounds=${1:-5}


# Warm images and templates, for both benchmarks' shapes.
bench_run bench/boot
bench_run examples/nix-is-cool
bench_run bench/eight

for mode in cold template; do
    first=(); target=(); example=()
    for _ in $(seq "$rounds"); do
        output=$(VMRIG_BOOT=$mode "$vmrig" run --rebuild bench/boot 2>&1) || { echo "$output" | tail -40; exit 1; }
        first+=("$(value start-to-first-answer)")
        target+=("$(value start-to-default-target)")
        start=$(date +%s.%N)
        VMRIG_BOOT=$mode "$vmrig" run --rebuild examples/nix-is-cool >/dev/null 2>&1
        example+=("$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN {printf "%.2f", b - a}')")
    done
    rm -rf bench/boot/result examples/nix-is-cool/result
    echo "$mode: start() to first answer (s):      ${first[*]}  median $(printf '%s\n' "${first[@]}" | median)"
    echo "$mode: start() to default.target (s):    ${target[*]}  median $(printf '%s\n' "${target[@]}" | median)"
    echo "$mode: reference example, whole run (s): ${example[*]}  median $(printf '%s\n' "${example[@]}" | median)"
    output=$(VMRIG_BOOT=$mode "$vmrig" run --rebuild bench/eight 2>&1) || { echo "$output" | tail -40; exit 1; }
    rm -rf bench/eight/result
    echo "$mode: 8 nodes all up $(value all-up-s) s, all pinged $(value all-pinged-s) s, per node RSS $(value rss-per-node-mib) MiB, PSS $(value pss-per-node-mib) MiB"
done
