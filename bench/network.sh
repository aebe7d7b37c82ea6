#!/usr/bin/env bash
# Network benchmark: throughput (a 32 MiB HTTP download with curl) and
# round-trip latency (20 pings) between two nodes through vmrig's switch,
# against the same measurements over the server's own loopback, in the same
# run and the same guest, so the ratio shows what the switch path costs.
# Then the host into the server through forward_port: an HTTP request
# against the same request through the switch, and the same download.
#
# usage: bench/network.sh
source "$(dirname "$0")/common.sh"

bench_run bench/network
switch_mbit=$(value throughput-switch-mbit)
loop_mbit=$(value throughput-loopback-mbit)
switch_rtt=$(value rtt-switch-ms)
loop_rtt=$(value rtt-loopback-ms)
echo "throughput: switch $switch_mbit Mbit/s, loopback $loop_mbit Mbit/s, ratio $(awk -v a="$switch_mbit" -v b="$loop_mbit" 'BEGIN {printf "%.2f", a / b}')"
echo "round trip: switch $switch_rtt ms, loopback $loop_rtt ms, ratio $(awk -v a="$switch_rtt" -v b="$loop_rtt" 'BEGIN {printf "%.2f", a / b}')"
forward_mbit=$(value throughput-forward-mbit)
switch_request=$(value request-switch-ms)
forward_request=$(value request-forward-ms)
echo "throughput: forward_port $forward_mbit Mbit/s, ratio to loopback $(awk -v a="$forward_mbit" -v b="$loop_mbit" 'BEGIN {printf "%.2f", a / b}')"
echo "HTTP request: forward_port $forward_request ms, switch $switch_request ms, ratio $(awk -v a="$forward_request" -v b="$switch_request" 'BEGIN {printf "%.2f", a / b}')"
