#!/usr/bin/env bash
# Warm nodes with a slow-starting service (issue 17): a PostgreSQL node,
# the time from the script's start until a query is answered, started
# from its template (`VMRIG_BOOT=template`, nothing saved), on a first run
# that saves it, and restored warm by a run that changed only its script.
# Each round gives the node a file of its own, so that it saves afresh.
#
# usage: bench/warm-postgres.sh [ROUNDS]   (default 3)
source "$(dirname "$0")/common.sh"
rounds=${1:-3}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
definition=$(cat bench/postgres/vmrig.toml)

# The definition with the node's round file holding $1 and the script
# ending with the comment $2.
write() {
    local node="[nodes.db]
files.\"/etc/bench-round\" = { text = \"$1\" }"
    local script="${definition/\[nodes.db\]/$node}"
    echo "${script/print(f\"BENCH ready-s/# $2
print(f\"BENCH ready-s}" > "$work/vmrig.toml"
}

run_mode() {
    output=$(VMRIG_BOOT=$1 "$vmrig" run "$work" 2>&1) || { echo "$output" | tail -40; exit 1; }
}

write warm-up warm-up
run_mode template

declare -A ready
for round in $(seq "$rounds"); do
    nonce="$(date +%s%N)"
    write "template-$nonce" "template $round"
    run_mode template
    ready[template]+="$(value ready-s) "
    write "warm-$nonce" "first $round"
    run_mode warm
    grep -q "db: saved warm" <<<"$output" || { echo "$output" | grep -i warm; echo "the first run did not save the node"; exit 1; }
    ready[first]+="$(value ready-s) "
    write "warm-$nonce" "warm $round"
    run_mode warm
    grep -q "db: starting warm" <<<"$output" || { echo "$output" | grep -i warm; echo "the node was not restored warm"; exit 1; }
    ready[warm]+="$(value ready-s) "
done
for mode in template first warm; do
    echo "$mode: script start to a query answered (s): ${ready[$mode]} median $(median <<<"${ready[$mode]}")"
done
