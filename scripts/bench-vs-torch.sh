#!/usr/bin/env bash
# alignfuse's training step against the PyTorch eager baseline (benches/torch_step.py) on the same model,
# batch size, caption length and number of compute threads, alternating ROUNDS times; prints both, the
# ratio of the medians and the median of the rounds' own ratios (alignfuse without its data wait, as the
# baseline is fed from memory).
#
#   bash scripts/bench-vs-torch.sh [CONFIG] [THREADS] [ROUNDS] [STEPS]     (default tiny, 1, 3, 10)
#   PYTHON=/path/to/python (with torch, transformers, timm)  ALIGNFUSE_BIN=target/release/alignfuse
#   DEVICE=cuda PRECISION=bf16   (the baseline's device and precision; alignfuse follows the config)
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:-configs/tiny.toml}
THREADS=${2:-1}
ROUNDS=${3:-3}
STEPS=${4:-10}
PYTHON=${PYTHON:-python3}
BIN=${ALIGNFUSE_BIN:-target/release/alignfuse}
DEVICE=${DEVICE:-cpu}
PRECISION=${PRECISION:-fp32}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
[ -x "$BIN" ] || cargo build --release --quiet
for r in $(seq 1 "$ROUNDS"); do
    CANDLE_NUM_THREADS=$THREADS RAYON_NUM_THREADS=$THREADS "$BIN" bench train --config "$CONFIG" \
        --steps "$STEPS" --json "$OUT/alignfuse-$r.json" > "$OUT/alignfuse-$r.txt" 2>&1 \
        || { cat "$OUT/alignfuse-$r.txt"; exit 1; }
    tokens=$("$PYTHON" -c "import json,sys; print(round(json.load(open(sys.argv[1]))['tokens']))" "$OUT/alignfuse-$r.json")
    OMP_NUM_THREADS=$THREADS "$PYTHON" benches/torch_step.py --config "$CONFIG" --steps "$STEPS" \
        --threads "$THREADS" --tokens "$tokens" --device "$DEVICE" --precision "$PRECISION" \
        --json "$OUT/torch-$r.json" > /dev/null
done
"$PYTHON" - "$OUT" "$ROUNDS" "$CONFIG" "$THREADS" <<'PY'
import json, statistics, sys
out, rounds, config, threads = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
a = [json.load(open(f"{out}/alignfuse-{r}.json")) for r in range(1, rounds + 1)]
t = [json.load(open(f"{out}/torch-{r}.json")) for r in range(1, rounds + 1)]
am = statistics.median(x["compute_pairs_per_s"] for x in a)
tm = statistics.median(x["pairs_per_s"] for x in t)
print(f"{config}, batch {a[0]['batch_size']}, {a[0]['tokens']:.1f} tokens, {threads} thread(s), {rounds} alternating rounds")
fmt = lambda xs, key: " ".join("%.1f" % x[key] for x in xs)
print(f"alignfuse pairs/s: {fmt(a, 'compute_pairs_per_s')}  (median {am:.1f}; "
      f"peak RSS {max(x['peak_rss_mib'] or 0 for x in a):.0f} MiB)")
print(f"torch {t[0]['torch']} eager pairs/s: {fmt(t, 'pairs_per_s')}  (median {tm:.1f}; "
      f"peak {max(x['peak_mib'] for x in t):.0f} MiB)")
# Each round runs both back to back: the machine's speed drifts between rounds (a shared VM: +-15% over
# minutes), so the round's own ratio cancels most of it.
ratios = [x["compute_pairs_per_s"] / y["pairs_per_s"] for x, y in zip(a, t)]
print("per-round ratios: " + " ".join("%.2f" % r for r in ratios))
print(f"alignfuse / torch: {am / tm:.2f}x (ratio of medians), {statistics.median(ratios):.2f}x (median of per-round ratios)")
PY
