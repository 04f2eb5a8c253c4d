#!/usr/bin/env bash
# Data-parallel scaling on this machine's CPU: `alignfuse bench train` as one process on one core against
# N MPI ranks (one core each, batch B per rank, so a global batch of N*B), alternating ROUNDS times; prints
# each run's pairs/s (the global batch for the ranks, the gradient all-reduce included) and the ratio of
# the medians.
#
#   bash scripts/bench-data-parallel.sh [CONFIG] [RANKS] [ROUNDS] [STEPS]     (default tiny, 2, 3, 10)
#   ALIGNFUSE_BIN=path to a --features mpi build (default: builds target/release/alignfuse with it)
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:-configs/tiny.toml}
RANKS=${2:-2}
ROUNDS=${3:-3}
STEPS=${4:-10}
BIN=${ALIGNFUSE_BIN:-target/release/alignfuse}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
[ -n "${ALIGNFUSE_BIN:-}" ] || cargo build --release --quiet --features mpi
run() { # NAME COMMAND...
    local name=$1; shift
    "$@" bench train --config "$CONFIG" --steps "$STEPS" --json "$OUT/$name.json" > "$OUT/$name.txt" 2>&1 \
        || { cat "$OUT/$name.txt"; exit 1; }
}
for r in $(seq 1 "$ROUNDS"); do
    CANDLE_NUM_THREADS=1 RAYON_NUM_THREADS=1 run "one-$r" "$BIN"
    # Each rank takes cores / ranks threads (one here) from OMPI_COMM_WORLD_LOCAL_SIZE.
    run "ranks-$r" mpirun --allow-run-as-root --oversubscribe --bind-to none -np "$RANKS" "$BIN"
done
python3 - "$OUT" "$ROUNDS" "$CONFIG" "$RANKS" <<'PY'
import json, statistics, sys
out, rounds, config, ranks = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
one = [json.load(open(f"{out}/one-{r}.json")) for r in range(1, rounds + 1)]
dp = [json.load(open(f"{out}/ranks-{r}.json")) for r in range(1, rounds + 1)]
m1 = statistics.median(x["pairs_per_s"] for x in one)
md = statistics.median(x["pairs_per_s"] for x in dp)
print(f"{config}, {rounds} alternating rounds of {one[0]['steps']} steps")
print(f"1 process, 1 core, batch {one[0]['batch_size']}: " + " ".join("%.1f" % x["pairs_per_s"] for x in one) + f" pairs/s (median {m1:.1f})")
print(f"{ranks} MPI ranks, 1 core each, global batch {dp[0]['batch_size']}: " + " ".join("%.1f" % x["pairs_per_s"] for x in dp) + f" pairs/s (median {md:.1f}; optimiser phase incl. all-reduce {statistics.median(x['optimizer_ms'] for x in dp):.1f} ms/step vs {statistics.median(x['optimizer_ms'] for x in one):.1f})")
print(f"scaling: {md / m1:.2f}x with {ranks} ranks")
PY
