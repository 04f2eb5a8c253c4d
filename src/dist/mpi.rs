//! The MPI engine (`--features mpi`): CPU ranks started by `mpirun`, collectives by the MPI library
//! (OpenMPI in CI). Tensors travel through host buffers, which on the CPU are the tensors' own data.

use super::env::Launch;
use super::{gathered_shape, supported, Engine};
use ::mpi::collective::SystemOperation;
use ::mpi::datatype::Equivalence;
use ::mpi::environment::Universe;
use ::mpi::topology::SimpleCommunicator;
use ::mpi::traits::*;
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Tensor, WithDType};

pub struct Mpi {
    /// Finalises MPI when dropped: at [`Engine::finish`], or at an abort.
    universe: std::cell::RefCell<Option<Universe>>,
    comm: SimpleCommunicator,
    rank: usize,
    world: usize,
}

impl Mpi {
    pub fn init(launch: &Launch) -> Result<Mpi> {
        let universe = ::mpi::initialize().context("MPI_Init failed (or MPI was initialised twice)")?;
        let comm = universe.world();
        let (rank, world) = (comm.rank() as usize, comm.size() as usize);
        ensure!(
            (rank, world) == (launch.rank, launch.world),
            "MPI says rank {rank} of {world}, the environment {}: launch with this MPI's own mpirun",
            launch.vars
        );
        Ok(Mpi { universe: std::cell::RefCell::new(Some(universe)), comm, rank, world })
    }

    fn reduce<T: WithDType + Equivalence>(&self, t: &Tensor) -> Result<Tensor> {
        let send: Vec<T> = t.flatten_all()?.to_vec1()?;
        let mut recv = vec![T::zero(); send.len()];
        self.comm.all_reduce_into(&send[..], &mut recv[..], SystemOperation::sum());
        Ok(Tensor::from_vec(recv, t.shape(), t.device())?)
    }

    fn gather<T: WithDType + Equivalence>(&self, t: &Tensor) -> Result<Tensor> {
        let send: Vec<T> = t.flatten_all()?.to_vec1()?;
        let mut recv = vec![T::zero(); send.len() * self.world];
        self.comm.all_gather_into(&send[..], &mut recv[..]);
        Ok(Tensor::from_vec(recv, gathered_shape(t.shape(), self.world)?, t.device())?)
    }

    fn bcast<T: WithDType + Equivalence>(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        let mut buf: Vec<T> = t.flatten_all()?.to_vec1()?;
        self.comm.process_at_rank(root as i32).broadcast_into(&mut buf[..]);
        Ok(Tensor::from_vec(buf, t.shape(), t.device())?)
    }
}

/// Calls `$f::<T>` with the Rust type of `$t`'s dtype.
macro_rules! by_dtype {
    ($self:ident, $f:ident, $t:expr $(, $arg:expr)*) => {{
        supported($t)?;
        match $t.dtype() {
            DType::F32 => $self.$f::<f32>($t $(, $arg)*),
            DType::F64 => $self.$f::<f64>($t $(, $arg)*),
            DType::I64 => $self.$f::<i64>($t $(, $arg)*),
            d => bail!("MPI engine: no {d:?} collectives"),
        }
    }};
}

impl Engine for Mpi {
    fn name(&self) -> &'static str {
        "mpi"
    }
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        by_dtype!(self, reduce, t)
    }
    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        by_dtype!(self, gather, t)
    }
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        by_dtype!(self, bcast, t, root)
    }
    fn barrier(&self) -> Result<()> {
        self.comm.barrier();
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        self.comm.abort(code)
    }
    /// A barrier, then MPI_Finalize (mpirun takes a rank that exits without it for a crash).
    fn finish(&self) -> Result<()> {
        if self.universe.borrow().is_some() {
            self.comm.barrier();
        }
        drop(self.universe.borrow_mut().take());
        Ok(())
    }
}
