#!/usr/bin/env bash
# Cached-result benchmark (design section 7): `vmrig run` of the reference
# example once its pass is recorded, against `vmrig check` of the same
# definition (reading it and linting its script, no VM) in the same run.
#
# usage: bench/cached.sh [ROUNDS]    (default 20; prints medians and the ratio)
source "$(dirname "$0")/common.sh"
rounds=${1:-20}

example=examples/nix-is-cool

# Records the pass if it is not recorded yet (a full run).
"$vmrig" run "$example" >/dev/null 2>&1
"$vmrig" run "$example" 2>&1 | grep -q "(cached from " || { echo "the pass was not recorded" >&2; exit 1; }

seconds() {
    local started ended
    started=$(date +%s.%N)
    "$@" >/dev/null 2>&1
    ended=$(date +%s.%N)
    awk -v a="$started" -v b="$ended" 'BEGIN {printf "%.4f\n", b - a}'
}
cached=$(for _ in $(seq "$rounds"); do seconds "$vmrig" run "$example"; done | median)
check=$(for _ in $(seq "$rounds"); do seconds "$vmrig" check "$example"; done | median)
echo "cached run: median $cached s over $rounds runs (target <= 0.1 s)"
echo "vmrig check of the same test: median $check s; ratio $(awk -v a="$cached" -v b="$check" 'BEGIN {printf "%.2f", a / b}')"
