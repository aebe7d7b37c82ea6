#!/usr/bin/env bash
# Boot benchmark (design section 7): a node's start() to its first answered
# command, against a bare QEMU boot of the same kernel into a one-line
# initramfs that powers off at once. Both are measured here, in this run,
# under the accelerator vmrig picks (TCG where KVM does not work).
#
# usage: bench/boot.sh [ROUNDS]      (default 5; prints medians and the ratio)
source "$(dirname "$0")/common.sh"
rounds=${1:-5}

kernel=$(boot_kernel)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
bare_initramfs "$work"

# The same firmware as a node's.
bare=()
for _ in $(seq "$rounds"); do
    bare+=("$(bare_boot "$kernel" "$work/bare.cpio" -bios qboot.rom)")
done

node=()
for _ in $(seq "$rounds"); do
    node+=("$("$vmrig" run --rebuild bench/boot --accel tcg 2>&1 | sed -n 's/^BENCH start-to-first-answer //p')")
done
rm -rf bench/boot/result

bare_median=$(printf '%s\n' "${bare[@]}" | median)
node_median=$(printf '%s\n' "${node[@]}" | median)
echo "bare QEMU boot to a one-line initramfs (s): ${bare[*]}  median $bare_median"
echo "vmrig start() to first answer (s):          ${node[*]}  median $node_median"
echo "ratio: $(awk -v a="$node_median" -v b="$bare_median" 'BEGIN {printf "%.2f", a / b}')  (target: <= 2)"
