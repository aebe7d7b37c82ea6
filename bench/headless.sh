#!/usr/bin/env bash
# Headless nodes before and after graphical nodes (issue 19): the same
# headless node, restored from its template, started by this tree's vmrig
# and by the vmrig of REVISION (default e8ef746, the last commit before
# graphical nodes), round by round in turn; timed from start() to
# multi-user.target and measured idle (QEMU's RSS and PSS). Each vmrig
# builds its own image and template first (this tree's images also hold
# procps, which every node has since).
#
# usage: bench/headless.sh [ROUNDS] [REVISION]   (default 5, e8ef746)
source "$(dirname "$0")/common.sh"
rounds=${1:-5}
revision=${2:-e8ef746}

old_vmrig=$(revision_vmrig "$revision")

export VMRIG_BOOT=template
declare -A figures
for round in $(seq 0 "$rounds"); do
    for who in before after; do
        binary=$vmrig
        if [ "$who" = before ]; then binary=$old_vmrig; fi
        output=$("$binary" run --rebuild bench/headless 2>&1) || { echo "$output" | tail -40; exit 1; }
        rm -rf bench/headless/result
        # Round 0 builds images and templates.
        if [ "$round" -eq 0 ]; then continue; fi
        for figure in up-s rss-mib pss-mib; do
            figures[$who-$figure]+="$(value "$figure") "
        done
    done
done
for figure in up-s rss-mib pss-mib; do
    for who in before after; do
        echo "$who $figure: ${figures[$who-$figure]} median $(median <<<"${figures[$who-$figure]}")"
    done
done
