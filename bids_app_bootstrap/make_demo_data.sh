#!/bin/sh
# CI sample data: the demo dataset of `make demo` (a simulated 2 mm head, 5 echoes, 3 T),
# generated locally by qsmprep-sim from the phantom shipped in the package (no download).
# Usage: make_demo_data.sh OUT_DIR [qsmprep-sim options]
set -eu
out=${1:?usage: make_demo_data.sh OUT_DIR [qsmprep-sim options]}
shift
rm -rf "$out"
exec qsmprep-sim "$out" --subjects 1 --voxel-size 2 --seed 1 "$@"
