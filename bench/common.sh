# What every benchmark starts with (sourced, not run): the repository as
# the working directory, the host's tools, a release build in $vmrig, and,
# for benchmarks that report from a test script, bench_run and value.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-host-deps
cargo build --release --workspace -q
vmrig=target/x86_64-unknown-linux-gnu/release/vmrig

# Runs the benchmark test DIR afresh and keeps what it printed in $output.
bench_run() {
    output=$("$vmrig" run --rebuild "$1" 2>&1) || { echo "$output" | tail -40; exit 1; }
    rm -rf "$1/result"
}

# The figure the script printed as `BENCH NAME VALUE`.
value() { echo "$output" | sed -n "s/^BENCH $1 //p"; }

# The median of the numbers on standard input, one a line or several to a
# line separated by spaces.
median() { tr ' ' '\n' | sort -n | awk 'NF {a[++n] = $1} END {print a[int((n + 1) / 2)]}'; }

# Builds REVISION's vmrig, in a worktree of its own under target/, and
# prints its path: for benchmarks that measure a change against the commit
# before it in one run.
revision_vmrig() {
    local tree=target/bench-$1
    if [ ! -d "$tree" ]; then
        git worktree add --detach "$tree" "$1" >/dev/null
    fi
    git -C "$tree" checkout -q --detach "$1"
    (cd "$tree" && cargo build --release -q --workspace)
    echo "$tree/target/x86_64-unknown-linux-gnu/release/vmrig"
}

# The kernel of bench/boot's node (its image built if missing), which the
# bare boots boot.
boot_kernel() {
    local said
    said=$("$vmrig" build bench/boot 2>&1) || { echo "$said" >&2; return 1; }
    echo "$said" | sed -n 's/^machine: image \([^ ]*\) (.*/\1\/vmlinuz/p'
}

# Writes DIR/bare.cpio, an initramfs whose one line powers the machine off
# at once (busybox-static, installed if missing): a bare boot's end.
bare_initramfs() {
    dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q "install ok installed" \
        || DEBIAN_FRONTEND=noninteractive apt-get install -y -q busybox-static >/dev/null
    mkdir -p "$1/initramfs/bin"
    cp /bin/busybox "$1/initramfs/bin/busybox"
    printf '#!/bin/busybox sh\n/bin/busybox reboot -f\n' > "$1/initramfs/init"
    chmod +x "$1/initramfs/init"
    (cd "$1/initramfs" && find . | cpio -o -H newc --quiet > "$1/bare.cpio")
}

# Seconds a bare QEMU (vmrig's machine, under TCG, with QEMU ARGS…) takes
# to boot KERNEL into INITRAMFS and power off.
bare_boot() {
    local kernel=$1 initramfs=$2 start
    shift 2
    start=$(date +%s.%N)
    # A boot that hangs (one SeaBIOS boot did, for 19 minutes) ends the
    # benchmark with an error after two minutes instead of waiting forever.
    timeout 120 qemu-system-x86_64 -machine microvm,rtc=on "$@" -accel tcg -cpu max -m 512 -smp 1 \
        -nodefaults -no-user-config -display none -no-reboot -serial null \
        -kernel "$kernel" -initrd "$initramfs" -append "console=ttyS0 reboot=t panic=-1 pci=off quiet" ||
        { echo "bare_boot: QEMU failed or hung (status $?)" >&2; return 1; }
    awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN {printf "%.3f", b - a}'
}
