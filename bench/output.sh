#!/usr/bin/env bash
# Command output and copy_from_vm throughput: 64 MiB printed by a command
# (what succeed() returns) and copied out of the guest, against the same
# bytes through a pipe inside the guest, in the same run and guest, so the
# ratios show what reaching the host costs.
#
# usage: bench/output.sh
source "$(dirname "$0")/common.sh"

bench_run bench/output
pipe=$(value pipe-in-guest-mib-s)
output_rate=$(value command-output-mib-s)
copy=$(value copy-from-vm-mib-s)
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / b}'; }
echo "pipe in the guest: $pipe MiB/s"
echo "command output: $output_rate MiB/s, ratio to the pipe $(ratio "$output_rate" "$pipe")"
echo "copy_from_vm: $copy MiB/s, ratio to the pipe $(ratio "$copy" "$pipe")"
