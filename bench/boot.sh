#!/usr/bin/env bash
# Boot benchmark (design section 7): a node's start() to its first answered
# command, against a bare QEMU boot of the same kernel into a one-line
# initramfs that powers off at once. Both are measured here, in this run,
# under the accelerator vmrig picks (TCG where KVM does not work).
#
# usage: bench/boot.sh [ROUNDS]      (default 5; prints medians and the ratio)
source "$(dirname "$0")/common.sh"
rounds=${1:-5}

dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q "install ok installed" \
    || DEBIAN_FRONTEND=noninteractive apt-get install -y -q busybox-static >/dev/null

"$vmrig" build bench/boot >/dev/null 2>&1
image=$("$vmrig" build bench/boot 2>&1 | sed -n 's/^machine: image \(.*\) (cached).*/\1/p')
kernel="$image/vmlinuz"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/initramfs/bin"
cp /bin/busybox "$work/initramfs/bin/busybox"
printf '#!/bin/busybox sh\n/bin/busybox reboot -f\n' > "$work/initramfs/init"
chmod +x "$work/initramfs/init"
(cd "$work/initramfs" && find . | cpio -o -H newc --quiet > "$work/bare.cpio")


bare=()
for _ in $(seq "$rounds"); do
    start=$(date +%s.%N)
    qemu-system-x86_64 -machine microvm,rtc=on -accel tcg -cpu max -m 512 -smp 1 \
        -nodefaults -no-user-config -display none -no-reboot -serial null \
        -kernel "$kernel" -initrd "$work/bare.cpio" -append "console=ttyS0 reboot=t panic=-1 pci=off quiet"
    bare+=("$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN {printf "%.3f", b - a}')")
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
