#!/usr/bin/env bash
# Container nodes (issue 32), side by side in one run of this script, each
# figure a median over ROUNDS whole `vmrig run`s (wall clock; images,
# templates and, for warm, the nodes' saves already in the store):
#   the reference example with both nodes as containers, against both as
#   VMs restored from their templates (VMRIG_BOOT=template) and both as
#   VMs restored warm (their saves from a first run, the script changed
#   each round so that no recorded pass answers);
#   the NixOS driver's benchmark's shape, 24 nodes each running GNU
#   `hello` (bench/hello24), as containers against VMs from templates;
#   the memory of each idle container node of the 24: what the processes
#   in its cgroups hold (PSS, and anonymous), read by the script of one
#   more run five seconds after the nodes' last call.
#
# usage: bench/containers.sh [ROUNDS]   (default 5; the 24-VM runs take
# minutes each under TCG, so that part runs min(ROUNDS, 3) times)
source "$(dirname "$0")/common.sh"
rounds=${1:-5}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for kind in vm container; do
    mkdir -p "$work/$kind"
    cp -r examples/nix-is-cool/. "$work/$kind/"
    rm -rf "$work/$kind/result"
done
sed -i 's/^\[nodes\./[containers./' "$work/container/vmrig.toml"

measure=$(cat <<'PY'
import os, time
time.sleep(5)
def pss_kib(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return sum(int(line.split()[1]) for line in f if line.startswith(("Pss:",)))
    except OSError:
        return 0
def anon_kib(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return sum(int(line.split()[1]) for line in f if line.startswith("Anonymous:"))
    except OSError:
        return 0
pss, anon = [], []
root = "/sys/fs/cgroup/unified" if os.path.isdir("/sys/fs/cgroup/unified") else "/sys/fs/cgroup"
for cgroup in sorted(name for name in os.listdir(root) if name.startswith(f"vmrig-{os.getppid()}-")):
    pids = set()
    for dir, _, files in os.walk(os.path.join(root, cgroup)):
        if "cgroup.procs" in files:
            with open(os.path.join(dir, "cgroup.procs")) as f:
                pids.update(f.read().split())
    pss.append(sum(pss_kib(p) for p in pids) / 1024)
    anon.append(sum(anon_kib(p) for p in pids) / 1024)
print(f"BENCH pss-mib {' '.join(f'{x:.1f}' for x in pss)}")
print(f"BENCH anon-mib {' '.join(f'{x:.1f}' for x in anon)}")
PY
)

# The example of kind $1 with its script ending in `# $2` and this run's
# stamp, so that no pass recorded by an earlier run answers.
stamp=$(date +%s%N)
write() {
    python3 - "$work/$1/vmrig.toml" "# $2 $stamp" <<'PY'
import sys
path, extra = sys.argv[1], sys.argv[2]
text = open(path).read()
last = 'print("Test was successful")\n'
start = text.index(last) + len(last)
end = text.index("'''", start)
open(path, "w").write(text[:start] + extra + "\n" + text[end:])
PY
}

# Seconds one `vmrig run` of "$@" takes (run in a subshell: what it
# printed is in $work/output).
timed_run() {
    local started
    started=$(date +%s.%N)
    "$@" > "$work/output" 2>&1 || { tail -40 "$work/output" >&2; exit 1; }
    awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN {printf "%.2f", b - a}'
}

container=() template=() warm=()
write vm first
"$vmrig" run "$work/vm" >/dev/null 2>&1   # builds what is missing, saves the nodes
"$vmrig" run --rebuild "$work/container" >/dev/null 2>&1
for round in $(seq "$rounds"); do
    write container "round $round"
    container+=("$(timed_run "$vmrig" run --rebuild "$work/container")")
    write vm "template $round"
    template+=("$(timed_run env VMRIG_BOOT=template "$vmrig" run --rebuild "$work/vm")")
    write vm "warm $round"
    warm+=("$(timed_run "$vmrig" run "$work/vm")")
    grep -q ": starting warm:" "$work/output" || { echo "round $round: the VMs did not start warm" >&2; exit 1; }
done

hello_rounds=$(( rounds < 3 ? rounds : 3 ))
mkdir -p "$work/hello24-container" "$work/hello24-vm"
cp bench/hello24/vmrig.toml "$work/hello24-container/"
sed 's/^\[containers\./[nodes./' bench/hello24/vmrig.toml > "$work/hello24-vm/vmrig.toml"
"$vmrig" run --rebuild "$work/hello24-container" >/dev/null 2>&1
env VMRIG_BOOT=template "$vmrig" run --rebuild "$work/hello24-vm" >/dev/null 2>&1
hello_container=() hello_vm=()
for _ in $(seq "$hello_rounds"); do
    hello_container+=("$(timed_run "$vmrig" run --rebuild "$work/hello24-container")")
    hello_vm+=("$(timed_run env VMRIG_BOOT=template "$vmrig" run --rebuild "$work/hello24-vm")")
done

# One more run of the 24 containers, measuring their memory once idle.
python3 - "$work/hello24-container/vmrig.toml" "$measure" <<'PY'
import sys
path, measure = sys.argv[1], sys.argv[2]
text = open(path).read()
text = text.replace('    machine.succeed("hello")\n', '    machine.succeed("hello")\n' + measure + "\n", 1)
open(path, "w").write(text)
PY
timed_run "$vmrig" run --rebuild "$work/hello24-container" >/dev/null
pss=($(sed -n 's/^BENCH pss-mib //p' "$work/output"))
anon=($(sed -n 's/^BENCH anon-mib //p' "$work/output"))

m() { printf '%s\n' "$@" | median; }
c=$(m "${container[@]}") t=$(m "${template[@]}") w=$(m "${warm[@]}")
hc=$(m "${hello_container[@]}") hv=$(m "${hello_vm[@]}")
echo "reference example, containers (s):        ${container[*]}  median $c  (target <= 3)"
echo "reference example, VMs from templates (s): ${template[*]}  median $t"
echo "reference example, warm VMs (s):           ${warm[*]}  median $w"
echo "ratios: templates / containers $(awk -v a="$t" -v b="$c" 'BEGIN {printf "%.1f", a / b}'), warm / containers $(awk -v a="$w" -v b="$c" 'BEGIN {printf "%.1f", a / b}')  (target: containers faster than warm VMs)"
echo "24 nodes running hello, containers (s):    ${hello_container[*]}  median $hc"
echo "24 nodes running hello, VMs from templates (s): ${hello_vm[*]}  median $hv"
echo "ratio: VMs / containers $(awk -v a="$hv" -v b="$hc" 'BEGIN {printf "%.1f", a / b}')  (target >= 5)"
echo "idle container node memory, PSS (MiB, each of the 24): ${pss[*]}  median $(m "${pss[@]}")  (target <= 40)"
echo "idle container node memory, anonymous (MiB, each of the 24): ${anon[*]}  median $(m "${anon[@]}")"
