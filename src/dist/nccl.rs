//! The NCCL engine (`--features nccl`): one process per GPU, launched by `alignfuse launch`, torchrun
//! or SLURM. Rank 0 makes the NCCL unique id and hands it out over the TCP [`rendezvous`], whose
//! connections then watch for a rank that dies. Collectives run on candle's stream of the rank's GPU,
//! in order with the training kernels: nothing waits on the host.

use super::env::Launch;
use super::rendezvous::{self, Rendezvous};
use super::{gathered_shape, supported, Engine};
use anyhow::{anyhow, ensure, Context, Result};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, NcclType, ReduceOp};
use candle_core::cuda_backend::{CudaDType, CudaStorage};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

pub struct Nccl {
    comm: Comm,
    device: Device,
    rank: usize,
    world: usize,
    rendezvous: Option<Rendezvous>,
}

impl Nccl {
    /// Joins the job `launch` describes on the GPU of its local rank (GPU 0 when the launcher made one
    /// GPU visible per rank, as SLURM's `--gpus-per-task=1` does).
    pub fn init(launch: &Launch) -> Result<(Nccl, Device)> {
        let one_visible = std::env::var("CUDA_VISIBLE_DEVICES").is_ok_and(|v| !v.is_empty() && !v.contains(','));
        let gpu = if one_visible { 0 } else { launch.local_rank };
        let device = Device::new_cuda(gpu)
            .with_context(|| format!("rank {}: cannot open GPU {gpu} (from its LOCAL_RANK)", launch.rank))?;
        let Device::Cuda(cuda) = &device else { unreachable!("new_cuda gives a CUDA device") };
        let make_id = || -> Result<Vec<u8>> {
            let id = Id::new().map_err(|e| anyhow!("ncclGetUniqueId failed: {e:?}"))?;
            Ok(id.internal().iter().map(|&c| c as u8).collect())
        };
        // A world of one needs no rendezvous.
        let (blob, rendezvous) = match &launch.master {
            Some((host, port)) => {
                let (blob, r) =
                    rendezvous::join((host, *port), launch.rank, launch.world, rendezvous::timeout(), make_id)?;
                (blob, Some(r))
            }
            None => (make_id()?, None),
        };
        ensure!(blob.len() == 128, "rank 0 sent a {}-byte NCCL id, not 128", blob.len());
        let mut internal = [0 as std::ffi::c_char; 128];
        internal.iter_mut().zip(&blob).for_each(|(d, &s)| *d = s as std::ffi::c_char);
        let comm = Comm::from_rank(cuda.cuda_stream(), launch.rank, launch.world, Id::uninit(internal))
            .map_err(|e| anyhow!("rank {}: ncclCommInitRank failed: {e:?}", launch.rank))?;
        if let Some(r) = &rendezvous {
            r.watch(lost)?;
        }
        Ok((Nccl { comm, device: device.clone(), rank: launch.rank, world: launch.world, rendezvous }, device))
    }

    fn run(&self, t: &Tensor, op: Op) -> Result<Tensor> {
        supported(t)?;
        ensure!(t.device().is_cuda(), "the NCCL engine moves CUDA tensors; this one is on the CPU");
        let call = Call { comm: &self.comm, op, world: self.world };
        Ok(t.contiguous()?.apply_op1_no_bwd(&call)?)
    }
}

/// A peer's watchdog connection closed without a goodbye: stop this rank too.
fn lost(message: String) {
    eprintln!("{message}");
    std::process::exit(1);
}

#[derive(Clone, Copy)]
enum Op {
    Sum,
    Gather,
    Broadcast(usize),
}

/// One collective as a candle op, so it reads and writes the tensors' device memory in place.
struct Call<'a> {
    comm: &'a Comm,
    op: Op,
    world: usize,
}

impl Call<'_> {
    fn on<T: CudaDType + DeviceRepr + NcclType>(
        &self, s: &CudaStorage, l: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (start, end) = l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("not contiguous".into()))?;
        let src = s.as_cuda_slice::<T>()?.slice(start..end);
        let dev = s.device().clone();
        let shape = match self.op {
            Op::Gather => Shape::from(gathered_shape(l.shape(), self.world).map_err(candle_core::Error::wrap)?),
            _ => l.shape().clone(),
        };
        // SAFETY: every element is written by the collective before the tensor is read.
        let mut dst = unsafe { dev.alloc::<T>(shape.elem_count()) }?;
        let done = match self.op {
            Op::Sum => self.comm.all_reduce(&src, &mut dst, &ReduceOp::Sum),
            Op::Gather => self.comm.all_gather(&src, &mut dst),
            Op::Broadcast(root) => self.comm.broadcast(Some(&src), &mut dst, root as i32),
        };
        done.map_err(|e| candle_core::Error::Msg(format!("NCCL: {e:?}")))?;
        Ok((CudaStorage::wrap_cuda_slice(dst, dev), shape))
    }
}

impl CustomOp1 for Call<'_> {
    fn name(&self) -> &'static str {
        "nccl"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("the NCCL engine moves CUDA tensors; this one is on the CPU")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        match s.dtype() {
            DType::F32 => self.on::<f32>(s, l),
            DType::F64 => self.on::<f64>(s, l),
            DType::I64 => self.on::<i64>(s, l),
            d => candle_core::bail!("NCCL engine: no {d:?} collectives"),
        }
    }
}

impl Engine for Nccl {
    fn name(&self) -> &'static str {
        "nccl"
    }
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        self.run(t, Op::Sum)
    }
    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        self.run(t, Op::Gather)
    }
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        self.run(t, Op::Broadcast(root))
    }
    /// An all-reduce of one number, read back: NCCL has no barrier of its own.
    fn barrier(&self) -> Result<()> {
        self.all_reduce_sum(&Tensor::zeros(1, DType::F32, &self.device)?)?.to_vec1::<f32>()?;
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        // The watchdog connections close with the process: the other ranks stop on their own.
        std::process::exit(code)
    }
    fn finish(&self) -> Result<()> {
        self.barrier()?;
        self.rendezvous.as_ref().map_or(Ok(()), Rendezvous::finish)
    }
}
