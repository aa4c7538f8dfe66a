//! The LLaMA decoder layer shared by the target and the draft head: pre-norm GQA
//! attention with RoPE at explicit positions over a [`KvCache`], and a SwiGLU MLP.
//!
//! Matrices are stored `[in, out]`, q/k/v fused and gate/up fused, so a layer runs
//! four matmuls.

use burn::prelude::*;
use hass_core::config::ModelConfig;
use hass_core::{HassError, Result};

use crate::backend::HassBackend;
use crate::kv_cache::KvCache;
use crate::linear::Linear;
use crate::loader::Loader;

/// `x · w` in f32, whatever dtype `w` is stored in.
pub(crate) fn mm<B: HassBackend>(x: Tensor<B, 2>, w: &Tensor<B, 2>) -> Tensor<B, 2> {
    B::project(x, w)
}

/// What every layer of one forward shares: RoPE tables for the new positions and the
/// attention mask of the new tokens over the cache.
pub(crate) struct AttnContext<B: Backend> {
    t: usize,
    cos_q: Tensor<B, 4>,
    sin_q: Tensor<B, 4>,
    cos_k: Tensor<B, 4>,
    sin_k: Tensor<B, 4>,
    mask: Option<Tensor<B, 4, Bool>>,
    scale: f64,
}

impl<B: Backend> AttnContext<B> {
    /// Context for `positions.len()` new tokens on top of `past` cached positions.
    ///
    /// `tree_mask`, when given, is `t × cols` row-major over the **last `cols`** cache
    /// positions (the new tokens being the last `t` of them): entry `(i, j)` is true
    /// when new token `i` may attend there. Earlier positions are always visible.
    /// Without it the new tokens attend causally.
    pub fn new(
        c: &ModelConfig,
        positions: &[usize],
        past: usize,
        tree_mask: Option<&[bool]>,
        device: &B::Device,
    ) -> Result<Self> {
        let t = positions.len();
        let (nh, nkv, hd, rep) = (
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            c.kv_groups(),
        );
        let (cos, sin) = c.rope_cos_sin(positions);
        let table = |v: Vec<f32>, heads: usize| {
            Tensor::<B, 4>::from_data(TensorData::new(v, [1, 1, t, hd]), device)
                .repeat_dim(1, heads)
        };
        let mask = match tree_mask {
            None if t == 1 => None,
            None => Some(Self::mask_tensor(t, past, t, |i, j| j <= i, rep, device)),
            Some(m) => {
                let cols = m.len().checked_div(t).unwrap_or(0);
                if t == 0 || m.len() != t * cols || cols < t || cols > past + t {
                    return Err(HassError::InvalidArgument(format!(
                        "tree mask of {} entries for {t} new tokens on {past} cached positions \
                         (needs t × cols with t <= cols <= past + t)",
                        m.len()
                    )));
                }
                Some(Self::mask_tensor(
                    t,
                    past,
                    cols,
                    |i, j| m[i * cols + j],
                    rep,
                    device,
                ))
            }
        };
        Ok(AttnContext {
            t,
            cos_q: table(cos.clone(), nh),
            sin_q: table(sin.clone(), nh),
            cos_k: table(cos, nkv),
            sin_k: table(sin, nkv),
            mask,
            scale: (hd as f64).sqrt().recip(),
        })
    }

    /// Boolean `[1, 1, rep·t, past + t]`, true where attention is forbidden; rows are
    /// (group member, token) because query heads of a KV group are stacked as rows.
    fn mask_tensor(
        t: usize,
        past: usize,
        cols: usize,
        allowed: impl Fn(usize, usize) -> bool,
        rep: usize,
        device: &B::Device,
    ) -> Tensor<B, 4, Bool> {
        let total = past + t;
        let first = total - cols;
        let mut rows = Vec::with_capacity(t * total);
        for i in 0..t {
            rows.extend((0..total).map(|c| c >= first && !allowed(i, c - first)));
        }
        let data: Vec<bool> = (0..rep).flat_map(|_| rows.iter().copied()).collect();
        Tensor::from_data(TensorData::new(data, [1, 1, rep * t, total]), device)
    }
}

/// One pre-norm decoder layer.
#[derive(Debug, Clone)]
pub(crate) struct DecoderLayer<B: Backend> {
    /// `None` for the EAGLE draft layer, which has no input norm.
    attn_norm: Option<Tensor<B, 1>>,
    /// `hidden → (n_heads + 2 n_kv) · head_dim`: q, k, v outputs side by side.
    wqkv: Linear<B>,
    bqkv: Option<Tensor<B, 1>>,
    /// `n_heads · head_dim → hidden`.
    wo: Linear<B>,
    mlp_norm: Tensor<B, 1>,
    /// `hidden → 2 · intermediate`: gate then up.
    w_gate_up: Linear<B>,
    /// `intermediate → hidden`.
    w_down: Linear<B>,
}

/// HF names of one layer's tensors under `prefix` (`model.layers.3`, `layers.0`).
fn qkv_names(prefix: &str, c: &ModelConfig, suffix: &str) -> [(String, usize); 3] {
    let (q, kv) = (
        c.num_attention_heads * c.head_dim,
        c.num_key_value_heads * c.head_dim,
    );
    [
        (format!("{prefix}.self_attn.q_proj.{suffix}"), q),
        (format!("{prefix}.self_attn.k_proj.{suffix}"), kv),
        (format!("{prefix}.self_attn.v_proj.{suffix}"), kv),
    ]
}

impl<B: HassBackend> DecoderLayer<B> {
    pub fn load(
        ld: &Loader,
        prefix: &str,
        c: &ModelConfig,
        input_norm: bool,
        dev: &B::Device,
    ) -> Result<Self> {
        let (h, inter) = (c.hidden_size, c.intermediate_size);
        let attn_norm = if input_norm {
            Some(ld.vector(&format!("{prefix}.input_layernorm.weight"), h, dev)?)
        } else {
            None
        };
        let bqkv = if c.attention_bias {
            Some(ld.fused_vector(&qkv_names(prefix, c, "bias"), dev)?)
        } else {
            None
        };
        Ok(DecoderLayer {
            attn_norm,
            wqkv: ld.linear(&qkv_names(prefix, c, "weight"), h, dev)?,
            bqkv,
            wo: ld.linear(
                &[(format!("{prefix}.self_attn.o_proj.weight"), h)],
                c.num_attention_heads * c.head_dim,
                dev,
            )?,
            mlp_norm: ld.vector(&format!("{prefix}.post_attention_layernorm.weight"), h, dev)?,
            w_gate_up: ld.linear(
                &[
                    (format!("{prefix}.mlp.gate_proj.weight"), inter),
                    (format!("{prefix}.mlp.up_proj.weight"), inter),
                ],
                h,
                dev,
            )?,
            w_down: ld.linear(&[(format!("{prefix}.mlp.down_proj.weight"), h)], inter, dev)?,
        })
    }

    /// Bytes of the projections and norms (what one decode step reads of the layer).
    pub fn weight_bytes(&self) -> usize {
        let vector = |t: &Tensor<B, 1>| t.dims()[0] * size_of::<f32>();
        [&self.wqkv, &self.wo, &self.w_gate_up, &self.w_down]
            .iter()
            .map(|l| l.bytes())
            .sum::<usize>()
            + self.attn_norm.as_ref().map_or(0, vector)
            + vector(&self.mlp_norm)
            + self.bqkv.as_ref().map_or(0, vector)
    }

    /// The layer's tensors in HF names and layout (for saving).
    pub fn export(&self, prefix: &str, c: &ModelConfig) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        let h = c.hidden_size;
        let host = |t: &Tensor<B, 1>| {
            t.clone()
                .into_data()
                .convert::<f32>()
                .into_vec::<f32>()
                .expect("f32 data")
        };
        let mut out = Vec::new();
        if let Some(n) = &self.attn_norm {
            out.push((format!("{prefix}.input_layernorm.weight"), vec![h], host(n)));
        }
        let names = qkv_names(prefix, c, "weight");
        let outs: Vec<usize> = names.iter().map(|(_, o)| *o).collect();
        for ((name, o), m) in names.iter().zip(self.wqkv.hf_parts(&outs)) {
            out.push((name.clone(), vec![*o, h], m));
        }
        if let Some(b) = &self.bqkv {
            let all = host(b);
            let mut at = 0;
            for (name, o) in qkv_names(prefix, c, "bias") {
                out.push((name, vec![o], all[at..at + o].to_vec()));
                at += o;
            }
        }
        let qdim = c.num_attention_heads * c.head_dim;
        let inter = c.intermediate_size;
        out.push((
            format!("{prefix}.self_attn.o_proj.weight"),
            vec![h, qdim],
            self.wo.hf_parts(&[h]).remove(0),
        ));
        out.push((
            format!("{prefix}.post_attention_layernorm.weight"),
            vec![h],
            host(&self.mlp_norm),
        ));
        let mut gu = self.w_gate_up.hf_parts(&[inter, inter]);
        let up = gu.pop().expect("two parts");
        out.push((
            format!("{prefix}.mlp.gate_proj.weight"),
            vec![inter, h],
            gu.pop().expect("two parts"),
        ));
        out.push((format!("{prefix}.mlp.up_proj.weight"), vec![inter, h], up));
        out.push((
            format!("{prefix}.mlp.down_proj.weight"),
            vec![h, inter],
            self.w_down.hf_parts(&[h]).remove(0),
        ));
        out
    }

    /// Runs the layer on `x` (`[t, hidden]`), writing its keys/values to `cache` layer
    /// `index` (the caller commits them with [`KvCache::advance`]).
    pub fn forward(
        &self,
        x: Tensor<B, 2>,
        c: &ModelConfig,
        ctx: &AttnContext<B>,
        cache: &mut KvCache<B>,
        index: usize,
    ) -> Tensor<B, 2> {
        let (nh, nkv, hd, rep, t) = (
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            c.kv_groups(),
            ctx.t,
        );
        let h = match &self.attn_norm {
            Some(w) => B::rms_norm(x.clone(), w, c.rms_norm_eps),
            None => x.clone(),
        };
        let mut qkv = self.wqkv.forward(h);
        if let Some(b) = &self.bqkv {
            qkv = qkv + b.clone().unsqueeze::<2>();
        }
        let q = B::heads(qkv.clone(), 0, nh, hd, Some((&ctx.cos_q, &ctx.sin_q)));
        let k = B::heads(
            qkv.clone(),
            nh * hd,
            nkv,
            hd,
            Some((&ctx.cos_k, &ctx.sin_k)),
        );
        let v = B::heads(qkv, (nh + nkv) * hd, nkv, hd, None);
        let (k_all, v_all) = cache.append(index, k, v);
        // GQA without repeating K/V: query heads of one group become extra rows.
        let q = q.reshape([1, nkv, rep * t, hd]);
        let attn = <B as HassBackend>::attention(q, k_all, v_all, ctx.mask.as_ref(), ctx.scale)
            .reshape([1, nh, t, hd]);
        let x = x + self.wo.forward(B::merge_heads(attn));
        let h = B::rms_norm(x.clone(), &self.mlp_norm, c.rms_norm_eps);
        x + self.w_down.forward(self.w_gate_up.forward_swiglu(h))
    }
}
