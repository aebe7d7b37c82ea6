#!/usr/bin/env bash
# Eight nodes on one VLAN (design section 7): all boot at once, each pings
# every other by name, and the host memory each idle node takes is
# reported (its QEMU's resident set, and its proportional share).
#
# usage: bench/eight.sh
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-host-deps
cargo build --release --workspace -q
vmrig=target/x86_64-unknown-linux-gnu/release/vmrig

output=$("$vmrig" run --rebuild bench/eight 2>&1) || { echo "$output" | tail -40; exit 1; }
rm -rf bench/eight/result
value() { echo "$output" | sed -n "s/^BENCH $1 //p"; }
echo "8 nodes: all at multi-user.target after $(value all-up-s) s, all 56 pings done after $(value all-pinged-s) s"
echo "host memory per idle node: RSS $(value rss-per-node-mib) MiB, PSS $(value pss-per-node-mib) MiB (each node has 512 MiB, the default)"
