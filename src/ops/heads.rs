//! Attention heads as one autograd node each way: [B, L, H * Dh] -> [B, H, L, Dh] (split) and back
//! (merge). Composed, a split is a reshape, a transpose and a copy, and a merge a transpose and a reshape:
//! five nodes per attention input and output, each of which candle's backward gives an activation-sized
//! zeroed gradient and an add. Here one strided copy runs each way (f32 on the CPU spread over the
//! compute threads, otherwise the backend's own copy), and the backward is the opposite copy.

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

/// `x` [B, L, H * Dh] -> [B, H, L, Dh], contiguous.
pub(super) fn split(x: &Tensor, heads: usize) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Permute::split(x.shape(), heads)?)
}

/// `x` [B, H, L, Dh] -> [B, L, H * Dh], contiguous.
pub(super) fn merge(x: &Tensor) -> Result<Tensor> {
    let (b, h, l, dh) = x.dims4()?;
    x.contiguous()?.apply_op1(Permute::merge(x.shape())?)?.reshape((b, l, h * dh))
}

/// Reads a contiguous tensor as `view` (4-d) and writes it with its middle two dimensions swapped.
pub(super) struct Permute {
    view: Shape,
}

impl Permute {
    /// The split of a [B, L, H * Dh] tensor into `heads` heads ([B, H, L, Dh]).
    pub(super) fn split(shape: &Shape, heads: usize) -> Result<Self> {
        let (b, l, d) = shape.dims3()?;
        if heads == 0 || d % heads != 0 {
            bail!("split_heads: width {d} is not a multiple of {heads} heads");
        }
        Ok(Permute { view: Shape::from((b, l, heads, d / heads)) })
    }

    /// The merge of [B, H, L, Dh] heads ([B, L, H, Dh], to be read as [B, L, H * Dh]).
    pub(super) fn merge(shape: &Shape) -> Result<Self> {
        Ok(Permute { view: Shape::from(shape.dims4()?) })
    }

    fn run<S: BackendStorage>(&self, s: &S, l: &Layout) -> Result<(S, Shape)>
    where
        S::Device: BackendDevice<Storage = S>,
    {
        if !l.is_contiguous() || l.shape().elem_count() != self.view.elem_count() {
            bail!("split/merge heads: input {:?} is not a contiguous {:?}", l.dims(), self.view.dims());
        }
        let src = Layout::contiguous_with_offset(self.view.clone(), l.start_offset()).permute(&[0, 2, 1, 3])?;
        let shape = src.shape().clone();
        // SAFETY: the strided copy below writes every element of the new storage.
        let mut dst = unsafe { s.device().alloc_uninit(&shape, s.dtype())? };
        s.copy_strided_src(&mut dst, 0, &src)?;
        Ok((dst, shape))
    }
}

impl CustomOp1 for Permute {
    fn name(&self) -> &'static str {
        "alignfuse-heads"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(_), Ok((b, n, h, dh))) = (s, self.view.dims4()) else { return self.run(s, l) };
        let x = super::cpu::f32_slice(s, l, "split/merge heads input")?;
        if x.len() != self.view.elem_count() {
            bail!("split/merge heads: input {:?} is not a {:?}", l.dims(), self.view.dims());
        }
        // On the compute threads (the backend's strided copy runs on the calling thread): output row
        // (i, j, t) of [b, h, n, dh] is input row (i, t, j) of [b, n, h, dh].
        // SAFETY: map_rows writes every row.
        let mut y = unsafe { super::cpu::output(x.len()) };
        super::cpu::map_rows(
            &mut y,
            dh,
            || (),
            |_, r, row| {
                let (i, j, t) = (r / (h * n), r / n % h, r % n);
                let src = ((i * n + t) * h + j) * dh;
                row.copy_from_slice(&x[src..src + dh]);
            },
        );
        Ok((CpuStorage::F32(y), Shape::from((b, h, n, dh))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        self.run(s, l)
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let back = Permute { view: y.shape().clone() };
        Ok(Some(g.contiguous()?.apply_op1_no_bwd(&back)?.reshape(x.shape())?))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use candle_core::{Device, Result, Var};

    #[test]
    fn split_and_merge_match_the_composition_values_and_gradients() -> Result<()> {
        let mut r = rng(17);
        let (b, l, h, dh) = (3, 7, 4, 5);
        let x = Var::from_tensor(&uniform(&mut r, &[b, l, h * dh], 1.0, &Device::Cpu)?)?;
        let probe = uniform(&mut r, &[b, h, l, dh], 1.0, &Device::Cpu)?;
        let composed = x.reshape((b, l, h, dh))?.transpose(1, 2)?.contiguous()?;
        let split = super::split(&x, h)?;
        assert_eq!(max_err(&split, &composed)?.0, 0.0);
        let merged = super::merge(&(&split * &probe)?)?;
        let reference = (&composed * &probe)?.transpose(1, 2)?.reshape((b, l, h * dh))?;
        assert_eq!(max_err(&merged, &reference)?.0, 0.0);
        let (g, g_ref) = (merged.sqr()?.sum_all()?.backward()?, reference.sqr()?.sum_all()?.backward()?);
        let (g, g_ref) = (g.get(&x).expect("a gradient"), g_ref.get(&x).expect("a gradient"));
        assert_eq!(max_err(g, g_ref)?.0, 0.0);
        assert!(super::split(&x, 3).is_err());
        Ok(())
    }
}
