#!/usr/bin/env bash
# Round-trip benchmark (design section 7): `succeed("true")` through vmrig's
# agent against a bash on a virtio-serial port driven the NixOS way
# (base64-framed output, then a second exchange for the exit status), in
# the same VM and the same run. See bench/roundtrip/vmrig.toml.
#
# usage: bench/roundtrip.sh
source "$(dirname "$0")/common.sh"

bench_run bench/roundtrip
agent=$(value agent-ms)
shell=$(value port-shell-ms)
echo "succeed(\"true\"): agent $agent ms, bash on a port the NixOS way $shell ms, speed-up $(awk -v a="$shell" -v b="$agent" 'BEGIN {printf "%.1f", a / b}')x (target >= 10x)"
