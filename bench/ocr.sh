#!/usr/bin/env bash
# wait_for_text (issue 19): how long vmrig takes to see text already on a
# node's screen (its variants made in-process, read side by side, the
# first match ending the wait), against NixOS's way on the same screen in
# the same run (tesseract on the screenshot and on two copies ImageMagick
# processes, with NixOS's worker count: a quarter of the cores, at least
# one; and with three workers). ImageMagick is installed if missing: only
# this benchmark uses it.
#
# usage: bench/ocr.sh [ROUNDS]   (default 5)
source "$(dirname "$0")/common.sh"
export BENCH_ROUNDS=${1:-5}

# Debian's ImageMagick 6 names its tool `convert`; NixOS calls it as
# `magick convert`, the same program.
export BENCH_CONVERT=/usr/bin/convert
if [ ! -x "$BENCH_CONVERT" ]; then
    $(if [ "$(id -u)" -ne 0 ]; then echo sudo; fi) apt-get install -y --no-install-recommends imagemagick >/dev/null
fi
# NixOS asks for the legacy and LSTM engines together (--oem 2); Debian's
# English data has the LSTM model only, so both ways use that (--oem 1).
export BENCH_OEM=1
export VMRIG_BOOT=template
bench_run bench/ocr

for figure in vmrig-s nixos-s nixos-3-workers-s vmrig-variants-s nixos-variants-s nixos-3-workers-variants-s; do
    values=$(value "$figure" | tr '\n' ' ')
    echo "$figure: $values median $(median <<<"$values")"
done
