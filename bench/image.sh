#!/usr/bin/env bash
# Image benchmark (design section 7): images built on a cached base, in one
# run, in a store of its own.
#  1. `vmrig build` of base + curl into an empty store: the base, then the
#     image on it, every package downloaded;
#  2. the baseline, measured in the same run: mmdebstrap alone installing
#     the same packages from nothing, from the same archive, its root on a
#     tmpfs as vmrig's is;
#  3. the same image again from the store that holds the base and the
#     package cache (the image removed);
#  4. a second image on the base, with another small package (hello);
#  5. `vmrig build` once more, which must find everything cached.
# A build's downloads are the package files that came into the store's
# package cache while it ran.
#
# usage: bench/image.sh
source "$(dirname "$0")/common.sh"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
store=$work/store
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN {printf "%.3f", b - a}'; }
cached_packages() {
    if [ -d "$store/cache/packages" ]; then find "$store/cache/packages" -maxdepth 1 -name '*.deb' | wc -l; else echo 0; fi
}

# build TEST: `vmrig build TEST` into the store; sets $seconds and $fetched.
build() {
    local before start
    before=$(cached_packages)
    start=$(now)
    VMRIG_STORE="$store" "$vmrig" build "$1" >"$work/build.log" 2>&1 || { tail -30 "$work/build.log"; exit 1; }
    seconds=$(since "$start")
    fetched=$(($(cached_packages) - before))
}

mkdir "$work/hello"
sed 's/packages = \["curl"\]/packages = ["curl", "hello"]/' bench/image/vmrig.toml >"$work/hello/vmrig.toml"
grep -q '"hello"' "$work/hello/vmrig.toml"

build bench/image
empty_store=$seconds empty_fetched=$fetched
base_seconds=$(python3 -c 'import json,sys; print("%.1f" % json.load(open(sys.argv[1]))["meta"]["seconds"])' "$store"/bases/*/manifest.json)

# The same packages and archive lines vmrig used, from its image manifest.
manifest=$(ls "$store"/images/*/manifest.json)
packages=$(python3 -c 'import json,sys; print(",".join(json.load(open(sys.argv[1]))["meta"]["packages"]))' "$manifest")
mapfile -t sources < <(python3 -c 'import json,sys; print("\n".join(json.load(open(sys.argv[1]))["meta"]["sources"]))' "$manifest")
mkdir "$work/scratch"
start=$(now)
TMPDIR=$work/scratch unshare --mount --propagation private -- sh -c 'mount -t tmpfs tmpfs "$0" && exec "$@"' "$work/scratch" \
    mmdebstrap --quiet --variant=essential --include="$packages" --format=null bookworm /dev/null "${sources[@]}"
from_nothing=$(since "$start")

rm -rf "$store"/images "$store"/initramfs
build bench/image
on_base=$seconds on_base_fetched=$fetched

build "$work/hello"
second=$seconds second_fetched=$fetched

build bench/image
cached=$seconds

ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / b}'; }
echo "baseline: mmdebstrap alone, base + curl from nothing: $from_nothing s"
echo "vmrig build, base + curl, empty store: $empty_store s (the base $base_seconds s of it), $empty_fetched packages downloaded"
echo "vmrig build, base + curl, store with the base: $on_base s, $on_base_fetched packages downloaded  ratio $(ratio "$on_base" "$from_nothing") to mmdebstrap from nothing (target: <= 8 s, no download)"
echo "vmrig build, base + curl + hello, store with the base: $second s, $second_fetched packages downloaded"
echo "vmrig build, cached: $cached s"
