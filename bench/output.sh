#!/usr/bin/env bash
# Command output and copy_from_vm throughput: 64 MiB printed by a command
# (what succeed() returns) and copied out of the guest, against the same
# bytes through a pipe inside the guest, in the same run and guest, so the
# ratios show what reaching the host costs; then all three again with
# another VM beside it whose guest keeps its two CPUs busy (the host's two
# cores then have three busy threads). Three runs.
#
# usage: bench/output.sh
source "$(dirname "$0")/common.sh"

ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / b}'; }
for run in 1 2 3; do
bench_run bench/output
for prefix in "" busy-; do
    pipe=$(value "${prefix}pipe-in-guest-mib-s")
    output_rate=$(value "${prefix}command-output-mib-s")
    copy=$(value "${prefix}copy-from-vm-mib-s")
    echo "${prefix:-idle-}host: pipe in the guest: $pipe MiB/s"
    echo "${prefix:-idle-}host: command output: $output_rate MiB/s, ratio to the pipe $(ratio "$output_rate" "$pipe")"
    echo "${prefix:-idle-}host: copy_from_vm: $copy MiB/s, ratio to the pipe $(ratio "$copy" "$pipe")"
done
echo "$output" | grep '^CPU '
done
