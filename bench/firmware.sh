#!/usr/bin/env bash
# What a node's firmware costs: a bare QEMU boot of vmrig's machine (the
# node's kernel into a one-line initramfs that powers off at once) with
# microvm's default firmware when ACPI is on (SeaBIOS, which vmrig used
# until it broke nodes of exactly 2048 MiB) against QEMU's qboot (what
# nodes boot with now), side by side in one run, each a median of ROUNDS.
#
# usage: bench/firmware.sh [ROUNDS]      (default 7)
source "$(dirname "$0")/common.sh"
rounds=${1:-7}

kernel=$(boot_kernel)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
bare_initramfs "$work"

seabios=()
qboot=()
for _ in $(seq "$rounds"); do
    seabios+=("$(bare_boot "$kernel" "$work/bare.cpio")")
    qboot+=("$(bare_boot "$kernel" "$work/bare.cpio" -bios qboot.rom)")
done
seabios_median=$(printf '%s\n' "${seabios[@]}" | median)
qboot_median=$(printf '%s\n' "${qboot[@]}" | median)
echo "SeaBIOS (s): ${seabios[*]}  median $seabios_median"
echo "qboot (s):   ${qboot[*]}  median $qboot_median"
echo "qboot / SeaBIOS: $(awk -v a="$qboot_median" -v b="$seabios_median" 'BEGIN {printf "%.2f", a / b}')"
