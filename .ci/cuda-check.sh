#!/usr/bin/env bash
# Type-checks the CUDA build on a machine without a GPU: candle's CUDA backend, the NCCL engine and this crate's
# kernels/*.cu (build.rs runs nvcc --ptx under `cargo check` too, so a kernel that does not compile
# fails here). The CUDA 13.0 toolkit comes from PyPI wheels (scripts/cuda-env.sh); the checks below enforce
# PTX ISA <= 9.0, what the lent GPUs' driver 580 loads, and assemble every kernel for sm_90 with ptxas (what
# the driver's JIT does when the op first runs on the card), candle's too; for ours it prints registers, shared
# memory and spills.
#
# Usage: .ci/cuda-check.sh [extra cargo check args]
#   ALIGNFUSE_CRATE       crate to check (default: the repository holding this script)
#   ALIGNFUSE_CUDA_CACHE  toolkit cache (default: $HOME/.cache/alignfuse-cuda)
# Its own CARGO_TARGET_DIR ($ALIGNFUSE_CUDA_TARGET, default <cache>/target) keeps the CPU build intact; keep PATH, CUDA_HOME
# and CUDA_COMPUTE_CAP fixed between runs, as changing them rebuilds candle-kernels (~7 min).
set -euo pipefail

crate="${ALIGNFUSE_CRATE:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
# shellcheck source=../scripts/cuda-env.sh
source "$crate/scripts/cuda-env.sh"
# Outside the clone, so later CI runs on the same machine reuse candle-kernels (7+ min cold).
export CARGO_TARGET_DIR="${ALIGNFUSE_CUDA_TARGET:-$cuda_cache/target}"

cd "$crate"
start=$SECONDS
cargo check --features cuda,nccl --all-targets "$@"

# The PTX of the newest build of each crate that has kernels (ours, candle's): older builds' folders stay.
ptx_files=()
for out in $(ls -td "$CARGO_TARGET_DIR"/debug/build/*/out); do
    crate_dir=$(basename "$(dirname "$out")")
    crate_name=${crate_dir%-*}
    if compgen -G "$out/*.ptx" >/dev/null && [[ " ${seen_crates:-} " != *" $crate_name "* ]]; then
        seen_crates="${seen_crates:-} $crate_name"
        ptx_files+=("$out"/*.ptx)
    fi
done
# PTX ISA of each: the lent machines' driver loads at most 9.0.
for ptx in "${ptx_files[@]}"; do
    version=$(sed -n 's/^\.version \([0-9.]*\).*/\1/p' "$ptx" | head -n 1)
    if ! awk -v v="$version" 'BEGIN { exit !(v != "" && v + 0 <= 9.0) }'; then
        echo "cuda-check: $ptx has PTX .version ${version:-?}; the GPUs' driver needs <= 9.0 (nvvm 13.0)" >&2
        exit 1
    fi
    # A kernel the driver could not JIT would otherwise first fail on a lent GPU.
    arch=$(sed -n 's/^\.target \(sm_[0-9a-z]*\).*/\1/p' "$ptx" | head -n 1)
    if ! report=$(ptxas -arch="${arch:-sm_$CUDA_COMPUTE_CAP}" -v "$ptx" -o /dev/null 2>&1); then
        echo "cuda-check: ptxas cannot assemble $ptx for ${arch:-sm_$CUDA_COMPUTE_CAP}:" >&2
        echo "$report" >&2
        exit 1
    fi
    [[ "$ptx" == */build/alignfuse-*/out/* ]] || continue
    echo "$report" | awk -v f="$(basename "$ptx")" '
        /Compiling entry function/ { gsub(/\x27/, "", $7); k = $7 }
        /spill stores/ { spills = $5 + $9 }
        /Used [0-9]+ registers/ { sub(/.*Used /, ""); printf "cuda-check: %s %s: %s, %d bytes spilled\n", f, k, $0, spills }' >&2
done
echo "cuda-check: passed in $((SECONDS - start)) s (nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'))" >&2
