# Sourced by .ci/cuda-check.sh and scripts/build-cuda.sh: installs PyPI's CUDA 13.0.2 toolkit wheels once into a
# cached venv and exports CUDA_HOME, PATH and CUDA_COMPUTE_CAP=90 (H100/H200). The `nvvm` extra matters: without
# it pip takes the newest nvidia-nvvm (13.5), whose PTX (.version 9.5) the lent GPUs' driver 580 (CUDA 13.0,
# PTX ISA <= 9.0) refuses. Keep these variables fixed between runs: changing them rebuilds candle-kernels (~7 min).
#   ALIGNFUSE_CUDA_CACHE  toolkit cache (default: $HOME/.cache/alignfuse-cuda); sets $cuda_cache
cuda_cache="${ALIGNFUSE_CUDA_CACHE:-$HOME/.cache/alignfuse-cuda}"
cuda_venv="$cuda_cache/venv"
cuda_spec='cuda-toolkit[nvcc,nvvm,crt,cudart,cccl,nvrtc,cublas,curand]==13.0.2'
if [[ "$(cat "$cuda_venv/.alignfuse-toolkit" 2>/dev/null)" != "$cuda_spec" ]]; then
    echo "cuda-env: installing the CUDA 13.0.2 toolkit wheels into $cuda_venv" >&2
    rm -rf "$cuda_venv"
    python3 -m venv "$cuda_venv"
    "$cuda_venv/bin/pip" install --quiet "$cuda_spec"
    echo "$cuda_spec" > "$cuda_venv/.alignfuse-toolkit"
fi
cuda_home=("$cuda_venv"/lib/python3.*/site-packages/nvidia/cu13)
if [[ ! -x "${cuda_home[0]}/bin/nvcc" ]]; then
    echo "cuda-env: no nvcc under ${cuda_home[0]}; delete $cuda_venv to reinstall" >&2
    exit 1
fi
export CUDA_HOME="${cuda_home[0]}"
export PATH="$CUDA_HOME/bin:$PATH"
export CUDA_COMPUTE_CAP=90
