//! The ViT image encoder with timm / ALBEF parameter names (`visual_encoder.*`): patch embedding, cls
//! token, learned position embeddings, pre-norm blocks with optional DINOv2 layer scale, final norm.

use super::layers::{attend, Ctx, LayerNorm, Linear};
use super::params::{Init, Pb};
use super::segments::Chain;
use crate::config::VisionConfig;
use candle_core::{DType, Result, Tensor};

#[derive(Clone)]
struct Block {
    norm1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    ls1: Option<Tensor>,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    ls2: Option<Tensor>,
    heads: usize,
}

impl Block {
    fn new(pb: &Pb, cfg: &VisionConfig) -> Result<Self> {
        let d = cfg.vision_width;
        let hidden = (d as f64 * cfg.mlp_ratio).round() as usize;
        let ls = |name: &str| -> Result<Option<Tensor>> {
            cfg.layer_scale.map(|v| pb.pp(name).get("gamma", d, Init::Const(v))).transpose()
        };
        Ok(Block {
            norm1: LayerNorm::new(&pb.pp("norm1"), d, cfg.vision_ln_eps)?,
            qkv: Linear::new(&pb.pp("attn.qkv"), d, 3 * d)?,
            proj: Linear::new(&pb.pp("attn.proj"), d, d)?,
            ls1: ls("ls1")?,
            norm2: LayerNorm::new(&pb.pp("norm2"), d, cfg.vision_ln_eps)?,
            fc1: Linear::new(&pb.pp("mlp.fc1"), d, hidden)?,
            fc2: Linear::new(&pb.pp("mlp.fc2"), hidden, d)?,
            ls2: ls("ls2")?,
            heads: cfg.vision_heads,
        })
    }

    fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let [q, k, v] = <[Tensor; 3]>::try_from(self.qkv.forward_split(&self.norm1.forward(x, ctx)?, 3, ctx)?)
            .expect("three parts");
        let a = self.proj.forward(&attend(&q, &k, &v, self.heads, None, 0.0, ctx)?, ctx)?;
        let x = (x + scale(a, &self.ls1)?)?;
        let m = Linear::mlp(&self.fc1, &self.fc2, &self.norm2.forward(&x, ctx)?, ctx)?;
        x + scale(m, &self.ls2)?
    }
}

/// A sublayer's output for the residual stream: in f32 (a bf16 product is promoted, as torch.autocast's add
/// of bf16 to f32 does), times DINOv2's layer scale where the model has one.
fn scale(x: Tensor, gamma: &Option<Tensor>) -> Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    match gamma {
        Some(g) => x.broadcast_mul(g),
        None => Ok(x),
    }
}

pub struct Vit {
    patch_weight: Tensor,
    patch_bias: Tensor,
    cls_token: Tensor,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    norm: LayerNorm,
    patch: usize,
}

impl Vit {
    pub fn new(pb: &Pb, cfg: &VisionConfig) -> Result<Self> {
        let (d, p) = (cfg.vision_width, cfg.patch_size);
        let n = (cfg.image_res / p).pow(2);
        Ok(Vit {
            // LeCun-normal over the patch's 3*p*p inputs, like Linear.
            patch_weight: pb.get(
                "patch_embed.proj.weight",
                (d, 3, p, p),
                Init::Normal(1.0 / ((3 * p * p) as f64).sqrt()),
            )?,
            patch_bias: pb.get("patch_embed.proj.bias", d, Init::Const(0.0))?,
            cls_token: pb.get("cls_token", (1, 1, d), Init::Normal(0.02))?,
            pos_embed: pb.get("pos_embed", (1, n + 1, d), Init::Normal(0.02))?,
            blocks: (0..cfg.vision_depth)
                .map(|i| Block::new(&pb.pp(format!("blocks.{i}")), cfg))
                .collect::<Result<_>>()?,
            norm: LayerNorm::new(&pb.pp("norm"), d, cfg.vision_ln_eps)?,
            patch: p,
        })
    }

    /// images [B, 3, H, W] -> image_embeds [B, 1 + (H/p)*(W/p), D] after the final norm.
    pub fn forward(&self, images: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let (b, c, h, w) = images.dims4()?;
        let p = self.patch;
        let (gh, gw) = (h / p, w / p);
        // A stride-p convolution with a p x p kernel is a matmul over unfolded patches.
        let patches =
            images.reshape((b, c, gh, p, gw, p))?.permute((0, 2, 4, 1, 3, 5))?.reshape((b * gh * gw, c * p * p))?;
        let d = self.patch_weight.dim(0)?;
        let w_flat = self.patch_weight.reshape((d, c * p * p))?;
        let x = ctx.matmul(&patches, &w_flat.t()?)?.broadcast_add(&self.patch_bias)?.reshape((b, gh * gw, d))?;
        let cls = self.cls_token.broadcast_as((b, 1, d))?;
        let mut x = Tensor::cat(&[&cls, &x], 1)?.broadcast_add(&self.pos_embed)?;
        for blk in &self.blocks {
            let blk = blk.clone();
            x = ctx.segment(Chain::Image, &x, move |x, ctx| blk.forward(x, ctx))?;
        }
        self.norm.forward(&x, ctx)
    }
}

/// ALBEF's `interpolate_pos_embed`: keeps the cls token and resizes the square grid of position
/// embeddings [1, 1 + g*g, D] to `new_grid` x `new_grid` with PyTorch's bicubic interpolation
/// (a = -0.75, align_corners = False, borders clamped).
pub fn interpolate_pos_embed(pos: &Tensor, new_grid: usize) -> Result<Tensor> {
    let (_, n, d) = pos.dims3()?;
    let g = ((n - 1) as f64).sqrt().round() as usize;
    if g * g != n - 1 {
        candle_core::bail!("pos_embed has {} grid tokens, not a square number", n - 1)
    }
    if g == new_grid {
        return Ok(pos.clone());
    }
    let data: Vec<f32> = pos.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
    let grid = &data[d..];
    let mut out = vec![0f32; new_grid * new_grid * d];
    let taps = |o: usize| -> ([usize; 4], [f32; 4]) {
        let scale = g as f64 / new_grid as f64;
        let src = (o as f64 + 0.5) * scale - 0.5;
        let i0 = src.floor();
        let t = (src - i0) as f32;
        let idx = |k: i64| (i0 as i64 + k).clamp(0, g as i64 - 1) as usize;
        ([idx(-1), idx(0), idx(1), idx(2)], cubic_weights(t))
    };
    for oy in 0..new_grid {
        let (ys, wy) = taps(oy);
        for ox in 0..new_grid {
            let (xs, wx) = taps(ox);
            let dst = &mut out[(oy * new_grid + ox) * d..][..d];
            for (yi, wyv) in ys.iter().zip(wy) {
                for (xi, wxv) in xs.iter().zip(wx) {
                    let src = &grid[(yi * g + xi) * d..][..d];
                    let wgt = wyv * wxv;
                    for (o, s) in dst.iter_mut().zip(src) {
                        *o += wgt * s;
                    }
                }
            }
        }
    }
    let grid = Tensor::from_vec(out, (1, new_grid * new_grid, d), pos.device())?;
    Tensor::cat(&[&pos.narrow(1, 0, 1)?.to_dtype(DType::F32)?, &grid], 1)
}

/// Keys' cubic convolution weights with A = -0.75 (PyTorch's bicubic) for offset t in [0, 1).
fn cubic_weights(t: f32) -> [f32; 4] {
    const A: f32 = -0.75;
    let near = |x: f32| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f32| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)]
}
