//! The PTX of kernels/*.cu (build.rs compiles it into OUT_DIR under the `cuda` feature) and the small
//! pieces every launch needs.

use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, CudaView, DeviceRepr, LaunchConfig,
};
use candle_core::cuda_backend::CudaStorageSlice;
use candle_core::{bail, CudaDevice, Layout, Result, WithDType};
use std::sync::Arc;

/// Threads per block of the alignfuse kernels.
pub(super) const BLOCK: u32 = 256;

/// `n` blocks of [`BLOCK`] threads.
pub(super) fn blocks(n: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (n as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// One thread per element of `n`.
pub(super) fn per_element(n: usize) -> LaunchConfig {
    blocks(n.div_ceil(BLOCK as usize))
}

/// One warp per row (eight rows per block), at least one block.
pub(super) fn per_row(rows: usize) -> LaunchConfig {
    blocks(rows.div_ceil((BLOCK / 32) as usize).max(1))
}

/// One PTX module; candle's device caches it by name after the first load.
pub(super) struct Module {
    name: &'static str,
    ptx: &'static str,
}

pub(super) const SOFTMAX: Module =
    Module { name: "alignfuse_softmax", ptx: include_str!(concat!(env!("OUT_DIR"), "/softmax.ptx")) };
pub(super) const MULTI_TENSOR: Module =
    Module { name: "alignfuse_multi_tensor", ptx: include_str!(concat!(env!("OUT_DIR"), "/multi_tensor.ptx")) };
pub(super) const DROPOUT: Module =
    Module { name: "alignfuse_dropout", ptx: include_str!(concat!(env!("OUT_DIR"), "/dropout.ptx")) };
pub(super) const GELU: Module =
    Module { name: "alignfuse_gelu", ptx: include_str!(concat!(env!("OUT_DIR"), "/gelu.ptx")) };
pub(super) const BIAS: Module =
    Module { name: "alignfuse_bias", ptx: include_str!(concat!(env!("OUT_DIR"), "/bias.ptx")) };
pub(super) const LAYERNORM: Module =
    Module { name: "alignfuse_layernorm", ptx: include_str!(concat!(env!("OUT_DIR"), "/layernorm.ptx")) };
pub(super) const ATTENTION: Module =
    Module { name: "alignfuse_attention", ptx: include_str!(concat!(env!("OUT_DIR"), "/attention.ptx")) };
pub(super) const ITC: Module =
    Module { name: "alignfuse_itc", ptx: include_str!(concat!(env!("OUT_DIR"), "/itc.ptx")) };

impl Module {
    /// The kernel `{root}_{dtype}` (`_f32` / `_bf16`) of this module, loaded on `dev`, and the device's
    /// stream to launch it on (`stream.launch_builder(&func)`).
    pub(super) fn func<T: WithDType>(&self, dev: &CudaDevice, root: &str) -> Result<(CudaFunction, Arc<CudaStream>)> {
        let name = candle_core::cuda_backend::kernel_name::<T>(root);
        let func = dev.get_or_load_custom_func(&name, self.name, self.ptx)?;
        Ok(((*func).clone(), dev.cuda_stream()))
    }
}

/// The elements `layout` addresses, which must be contiguous.
pub(super) fn contiguous<'a, T: DeviceRepr>(
    s: &'a CudaSlice<T>, layout: &Layout, what: &str,
) -> Result<CudaView<'a, T>> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(s.slice(start..end)),
        None => bail!("{what} must be contiguous"),
    }
}

/// A size as the kernels' `int`.
pub(super) fn int(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{what} = {v} is too large for the CUDA kernel")))
}

/// Rejects storage the kernels have no instance for (the ops convert to f32 or bf16 first).
pub(super) fn unsupported(slice: &CudaStorageSlice, op: &str) -> candle_core::Error {
    let dtype = match slice {
        CudaStorageSlice::F16(_) => "f16",
        CudaStorageSlice::F64(_) => "f64",
        _ => "a non-float or mixed dtype",
    };
    candle_core::Error::Msg(format!("{op}: no CUDA kernel for {dtype} (expects f32 or bf16)"))
}
