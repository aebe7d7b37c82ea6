#!/usr/bin/env bash
# Image benchmark (design section 7): `vmrig build` of a package set into an
# empty store, against mmdebstrap alone installing the same packages from
# the same archive, measured in this run: once plain (same variant, no
# hooks), once with vmrig's own options (initramfs-tools diverted, docs
# excluded) but without vmrig's export and packing, which isolates what
# vmrig adds. Then `vmrig build` again, which must find everything cached.
#
# usage: bench/image.sh
source "$(dirname "$0")/common.sh"

store=$(mktemp -d)
trap 'rm -rf "$store"' EXIT
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN {printf "%.3f", b - a}'; }

start=$(now)
VMRIG_STORE="$store" "$vmrig" build bench/image >/dev/null 2>&1
vmrig_build=$(since "$start")

# The same packages and archive lines vmrig used, from its image manifest.
manifest=$(ls "$store"/images/*/manifest.json)
packages=$(python3 -c 'import json,sys; print(",".join(json.load(open(sys.argv[1]))["meta"]["packages"]))' "$manifest")
mapfile -t sources < <(python3 -c 'import json,sys; print("\n".join(json.load(open(sys.argv[1]))["meta"]["sources"]))' "$manifest")
start=$(now)
mmdebstrap --quiet --variant=essential --include="$packages" --format=null bookworm /dev/null "${sources[@]}"
mmdebstrap_alone=$(since "$start")

start=$(now)
excludes=()
for dir in man doc info locale lintian; do excludes+=("--dpkgopt=path-exclude=/usr/share/$dir/*"); done
mmdebstrap --quiet --variant=essential --include="$packages" --format=null \
    --essential-hook='chroot "$1" dpkg-divert --quiet --local --rename --add /usr/sbin/update-initramfs && ln -s /bin/true "$1/usr/sbin/update-initramfs"' \
    "${excludes[@]}" bookworm /dev/null "${sources[@]}"
mmdebstrap_same_options=$(since "$start")

start=$(now)
VMRIG_STORE="$store" "$vmrig" build bench/image >/dev/null 2>&1
cached=$(since "$start")

ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / b}'; }
echo "mmdebstrap alone: $mmdebstrap_alone s; with vmrig's options: $mmdebstrap_same_options s"
echo "vmrig build, empty store: $vmrig_build s  ratio $(ratio "$vmrig_build" "$mmdebstrap_alone") to mmdebstrap alone (target: <= 1.5), $(ratio "$vmrig_build" "$mmdebstrap_same_options") to it with vmrig's options"
echo "vmrig build, cached: $cached s  (target: <= 0.1)"
