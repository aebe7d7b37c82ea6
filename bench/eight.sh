#!/usr/bin/env bash
# Eight nodes on one VLAN (design section 7): all boot at once, each pings
# every other by name, and the host memory each idle node takes is
# reported (its QEMU's resident set, and its proportional share).
#
# usage: bench/eight.sh
source "$(dirname "$0")/common.sh"

bench_run bench/eight
echo "8 nodes: all at multi-user.target after $(value all-up-s) s, all 56 pings done after $(value all-pinged-s) s"
echo "host memory per idle node: RSS $(value rss-per-node-mib) MiB, PSS $(value pss-per-node-mib) MiB (each node has 512 MiB, the default)"
