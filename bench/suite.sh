#!/usr/bin/env bash
# Suite benchmark (issue 10): the six tests of crates/vmrig/tests/suite (one
# fails on purpose) run one by one, as a shell loop of `vmrig run` would,
# against `vmrig run -j 1`, `-j 2` and the default (as many as the host's
# cores and memory hold), all in the same run with warm images and
# templates; then the five passing tests as a fully cached suite.
#
# usage: bench/suite.sh [ROUNDS]    (default 1; prints medians)
source "$(dirname "$0")/common.sh"
rounds=${1:-1}

vmrig=$PWD/$vmrig
suite=$(mktemp -d)
trap 'rm -rf "$suite"' EXIT
cp -r crates/vmrig/tests/suite/. "$suite/"
cd "$suite"
tests=(base/hello base/service base/two-nodes clients/failing clients/subtests clients/tools)
passing=(base/hello base/service base/two-nodes clients/subtests clients/tools)

# Warm-up: images and templates built, not timed.
capacity=$("$vmrig" run --rebuild . 2>&1 | grep -o 'as many as [^)]*' || true)

seconds() {
    local started ended
    started=$(date +%s.%N)
    "$@" >/dev/null 2>&1 || true
    ended=$(date +%s.%N)
    awk -v a="$started" -v b="$ended" 'BEGIN {printf "%.2f\n", b - a}'
}
one_by_one() { for test in "${tests[@]}"; do "$vmrig" run --rebuild "$test" || true; done; }

alone=$(for _ in $(seq "$rounds"); do seconds one_by_one; done | median)
j1=$(for _ in $(seq "$rounds"); do seconds "$vmrig" run --rebuild -j 1 .; done | median)
j2=$(for _ in $(seq "$rounds"); do seconds "$vmrig" run --rebuild -j 2 .; done | median)
auto=$(for _ in $(seq "$rounds"); do seconds "$vmrig" run --rebuild .; done | median)
"$vmrig" run "${passing[@]}" >/dev/null 2>&1
cached=$(for _ in $(seq 5); do seconds "$vmrig" run "${passing[@]}"; done | median)

ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / b}'; }
echo "6 tests one by one (a loop of vmrig run): $alone s"
echo "vmrig run -j 1: $j1 s ($(ratio "$alone" "$j1")x the loop)"
echo "vmrig run -j 2: $j2 s ($(ratio "$alone" "$j2")x the loop)"
echo "vmrig run (default: $capacity): $auto s ($(ratio "$alone" "$auto")x the loop)"
echo "5 passing tests fully cached: $cached s, $(awk -v a="$cached" 'BEGIN {printf "%.3f", a / 5}') s per test (target <= 0.1 s)"
