#!/usr/bin/env bash
# Round-trip benchmark (design section 7): `succeed("true")` through vmrig's
# agent against a bash on a virtio-serial port driven the NixOS way
# (base64-framed output, then a second exchange for the exit status), in
# the same VM and the same run. See bench/roundtrip/vmrig.toml.
#
# usage: bench/roundtrip.sh
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-host-deps
cargo build --release --workspace -q
vmrig=target/x86_64-unknown-linux-gnu/release/vmrig

output=$("$vmrig" run --rebuild bench/roundtrip 2>&1) || { echo "$output" | tail -40; exit 1; }
rm -rf bench/roundtrip/result
value() { echo "$output" | sed -n "s/^BENCH $1 //p"; }
agent=$(value agent-ms)
shell=$(value port-shell-ms)
echo "succeed(\"true\"): agent $agent ms, bash on a port the NixOS way $shell ms, speed-up $(awk -v a="$shell" -v b="$agent" 'BEGIN {printf "%.1f", a / b}')x (target >= 10x)"
