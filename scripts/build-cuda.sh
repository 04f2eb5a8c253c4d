#!/usr/bin/env bash
# Builds `alignfuse --features cuda,nccl --release` on this GPU-less machine and packs it for a GPU machine that has
# no Rust toolchain: dist/alignfuse-cuda.xz (about 8 MB; `xz -dc dist/alignfuse-cuda.xz > alignfuse` there).
# The toolkit comes from PyPI wheels (scripts/cuda-env.sh). cudarc links libcuda, libcublas, libcublasLt,
# libcurand, libcudart and libnvrtc by their unversioned names: the wheels ship versioned ones, so this adds
# `libX.so` links beside them, and a stub libcuda.so (soname libcuda.so.1) defining every `cu*` function cudarc
# declares; the GPU machine's driver provides the real one at run time. Its own target directory keeps the CPU
# build in target/release untouched. Cold: about 12 minutes on 2 cores.
#   ALIGNFUSE_CUDA_CACHE  toolkit and build cache (default: $HOME/.cache/alignfuse-cuda)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=cuda-env.sh
source "$repo/scripts/cuda-env.sh"
lib="$CUDA_HOME/lib"

# NCCL (the data-parallel engine) from its own wheel, beside the toolkit's libraries.
nccl_lib=("$cuda_venv"/lib/python3.*/site-packages/nvidia/nccl/lib)
if ! ls "${nccl_lib[0]}"/libnccl.so.* >/dev/null 2>&1; then
    "$cuda_venv/bin/pip" install --quiet 'nvidia-nccl-cu13'
    nccl_lib=("$cuda_venv"/lib/python3.*/site-packages/nvidia/nccl/lib)
fi
cp -f "$(ls "${nccl_lib[0]}"/libnccl.so.* | sort | head -n 1)" "$lib/"

# Unversioned names for the linker.
for name in cublas cublasLt cudart nvrtc curand nccl; do
    versioned=$(ls "$lib"/lib$name.so.* 2>/dev/null | sort | head -n 1)
    [[ -n "$versioned" ]] || { echo "build-cuda: no lib$name.so.* in $lib" >&2; exit 1; }
    ln -sf "$(basename "$versioned")" "$lib/lib$name.so"
done

# The stub driver library: every cu* function of cudarc's driver bindings, empty.
cudarc=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* 2>/dev/null | sort | tail -n 1)
if [[ -z "$cudarc" ]]; then
    (cd "$repo" && cargo fetch --quiet)
    cudarc=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* | sort | tail -n 1)
fi
stub="$cuda_cache/libcuda-stub.c"
grep -o 'fn cu[A-Za-z0-9_]*(' "$cudarc/src/driver/sys/mod.rs" | sed 's/^fn //; s/($//' | sort -u \
    | sed 's/.*/void &(void) {}/' > "$stub"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$lib/libcuda.so" "$stub"

export CARGO_TARGET_DIR="${ALIGNFUSE_CUDA_BUILD_TARGET:-$cuda_cache/target-build}"
cd "$repo"
start=$SECONDS
cargo build --release --features cuda,nccl
mkdir -p dist
xz -T0 -6 -c "$CARGO_TARGET_DIR/release/alignfuse" > dist/alignfuse-cuda.xz.tmp
mv dist/alignfuse-cuda.xz.tmp dist/alignfuse-cuda.xz
echo "build-cuda: dist/alignfuse-cuda.xz ($(du -h dist/alignfuse-cuda.xz | cut -f1)) in $((SECONDS - start)) s" >&2
