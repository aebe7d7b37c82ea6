#!/usr/bin/env bash
# Graphical nodes (issue 19): what a display (virtio-gpu, keyboard and
# tablet, Debian's generic kernel) adds to a node's start and memory. In
# each round, one run of bench/graphics/ starts a headless node and then a
# node with a display, both restored from their templates (no warm
# saves); each is timed from start() to multi-user.target, and measured
# idle five seconds later (its QEMU's resident set and proportional share).
#
# usage: bench/graphics.sh [ROUNDS]   (default 3)
source "$(dirname "$0")/common.sh"
rounds=${1:-3}

export VMRIG_BOOT=template
bench_run bench/graphics   # images and templates first
declare -A figures
for round in $(seq "$rounds"); do
    bench_run bench/graphics
    for figure in headless-up-s desk-up-s headless-rss-mib desk-rss-mib headless-pss-mib desk-pss-mib; do
        figures[$figure]+="$(value "$figure") "
    done
done
for figure in headless-up-s desk-up-s headless-rss-mib desk-rss-mib headless-pss-mib desk-pss-mib; do
    echo "$figure: ${figures[$figure]} median $(median <<<"${figures[$figure]}")"
done
awk -v h="$(median <<<"${figures[headless-up-s]}")" -v d="$(median <<<"${figures[desk-up-s]}")" \
    'BEGIN {printf "start to multi-user.target, display / headless: %.2f\n", d / h}'
