#!/usr/bin/env bash
# Warm nodes (issue 17): the reference example started three ways in one
# run of this script, on a copy whose nodes have a file that changes each
# round (so that each round's first run saves afresh):
#   template  every node restored from its template, no save (VMRIG_BOOT=template)
#   first     the default: restored from the template, each node saved once up
#   warm      the same inputs, the script changed: every node restored warm
# For each, the whole `vmrig run` (wall clock) and the host memory of each
# idle node (its QEMU's resident set, proportional share and anonymous
# memory: a save reads every page of the template's RAM file, which then
# counts in the first two though it is the page cache's; measured by
# the script five seconds after the test's last call; that time is not
# counted in the run's).
#
# usage: bench/warm.sh [ROUNDS]   (default 3)
source "$(dirname "$0")/common.sh"
rounds=${1:-3}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -r examples/nix-is-cool/. "$work/"
rm -rf "$work/result"
example=$(cat examples/nix-is-cool/vmrig.toml)

# The example with the nodes' round file holding $1 and the script
# ending with memory figures and the comment $2.
write() {
    local measure
    measure=$(cat <<'PY'
import os, time
measure_started = time.monotonic()
time.sleep(5)
def field(path, name):
    with open(path) as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    return 0
qemus = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        if "(qemu-system-x86" in stat and int(stat.rsplit(")", 1)[1].split()[1]) == os.getppid():
            qemus.append(pid)
    except OSError:
        pass
assert len(qemus) == 2, qemus
print(f"BENCH rss-per-node-mib {sum(field(f'/proc/{p}/status', 'VmRSS') for p in qemus) / 2 / 1024:.0f}")
print(f"BENCH pss-per-node-mib {sum(field(f'/proc/{p}/smaps_rollup', 'Pss') for p in qemus) / 2 / 1024:.0f}")
print(f"BENCH anon-per-node-mib {sum(field(f'/proc/{p}/smaps_rollup', 'Anonymous') for p in qemus) / 2 / 1024:.0f}")
print(f"BENCH measure-s {time.monotonic() - measure_started:.2f}")
PY
)
    local script="${example/print(\"Test was successful\")/print(\"Test was successful\")
$measure
# $2}"
    local server="[nodes.server]
files.\"/etc/bench-round\" = { text = \"$1\" }"
    local client="[nodes.client]
files.\"/etc/bench-round\" = { text = \"$1\" }"
    script="${script/\[nodes.server\]/$server}"
    echo "${script/\[nodes.client\]/$client}" > "$work/vmrig.toml"
}

# Runs the copy with `VMRIG_BOOT=$1`; sets $output, and $seconds to the
# whole run's time less the memory measurement's.
timed_run() {
    local start
    start=$(date +%s.%N)
    output=$(VMRIG_BOOT=$1 "$vmrig" run "$work" 2>&1) || { echo "$output" | tail -40; exit 1; }
    seconds=$(awk -v a="$start" -v b="$(date +%s.%N)" -v m="$(value measure-s)" 'BEGIN {printf "%.2f", b - a - m}')
}

# Images and templates first.
write warm-up warm-up
timed_run template

declare -A wall rss pss anon
for round in $(seq "$rounds"); do
    nonce="$(date +%s%N)"
    write "template-$nonce" "template $round"
    timed_run template
    wall[template]+="$seconds "; rss[template]+="$(value rss-per-node-mib) "; pss[template]+="$(value pss-per-node-mib) "; anon[template]+="$(value anon-per-node-mib) "
    write "warm-$nonce" "first $round"
    timed_run warm
    grep -q "server: saved warm" <<<"$output" && grep -q "client: saved warm" <<<"$output" || { echo "$output" | grep -i warm; echo "the first run did not save both nodes"; exit 1; }
    wall[first]+="$seconds "; rss[first]+="$(value rss-per-node-mib) "; pss[first]+="$(value pss-per-node-mib) "; anon[first]+="$(value anon-per-node-mib) "
    write "warm-$nonce" "warm $round"
    timed_run warm
    [ "$(grep -c 'starting warm' <<<"$output")" = 2 ] || { echo "$output" | grep -i warm; echo "the second run did not restore both nodes warm"; exit 1; }
    wall[warm]+="$seconds "; rss[warm]+="$(value rss-per-node-mib) "; pss[warm]+="$(value pss-per-node-mib) "; anon[warm]+="$(value anon-per-node-mib) "
done
for mode in template first warm; do
    echo "$mode: whole run (s): ${wall[$mode]} median $(median <<<"${wall[$mode]}")"
    echo "$mode: per idle node RSS (MiB): ${rss[$mode]} PSS (MiB): ${pss[$mode]} anonymous (MiB): ${anon[$mode]}"
done
t=$(median <<<"${wall[template]}")
f=$(median <<<"${wall[first]}")
w=$(median <<<"${wall[warm]}")
awk -v t="$t" -v f="$f" -v w="$w" 'BEGIN {printf "first run / template run: %.2f; template run / warm run: %.1f\n", f / t, t / w}'
