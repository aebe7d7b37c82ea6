#!/usr/bin/env bash
# What keeping packages' documentation costs (issue 33), in one run, in a
# store of its own that already holds the base and the package cache: the
# reference example's server packages built into an image with their
# documentation (the default) and without (`documentation = false`, the
# baseline: what every image was before), each built RUNS times. For each:
# the build's seconds, the image's size, and a cold boot's run
# (`boot = "cold"`, one `succeed("true")`), as medians.
#
# usage: bench/documentation.sh [RUNS]   (default 3)
source "$(dirname "$0")/common.sh"
runs=${1:-3}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export VMRIG_STORE=$work/store
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN {printf "%.2f", b - a}'; }
for kind in with without; do mkdir "$work/$kind"; done
cp bench/documentation/vmrig.toml "$work/with/"
sed 's/^boot = "cold"$/&\ndocumentation = false/' bench/documentation/vmrig.toml >"$work/without/vmrig.toml"
grep -q '^documentation = false' "$work/without/vmrig.toml"

# The base and the package cache first.
"$vmrig" build "$work/without" >"$work/log" 2>&1 || { tail -30 "$work/log"; exit 1; }

declare -A build size boot
for ((run = 1; run <= runs; run++)); do
    for kind in without with; do
        rm -rf "$VMRIG_STORE"/images "$VMRIG_STORE"/initramfs "$VMRIG_STORE"/templates
        start=$(now)
        "$vmrig" build "$work/$kind" >"$work/log" 2>&1 || { tail -30 "$work/log"; exit 1; }
        build[$kind]+="$(since "$start") "
        size[$kind]=$(du -m --apparent-size "$VMRIG_STORE"/images/*/rootfs.img | cut -f1)
        start=$(now)
        "$vmrig" run --rebuild "$work/$kind" >"$work/log" 2>&1 || { tail -30 "$work/log"; exit 1; }
        boot[$kind]+="$(since "$start") "
    done
done

for kind in without with; do
    echo "$kind documentation: build $(echo "${build[$kind]}" | median) s, image ${size[$kind]} MiB, cold run $(echo "${boot[$kind]}" | median) s  (runs: build ${build[$kind]}; cold run ${boot[$kind]})"
done
