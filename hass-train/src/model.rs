//! The trainable EAGLE-1/2 / HASS draft head (spec §2) with the HASS multi-stream
//! training forward (spec §3.5).
//!
//! [`TrainDraft`] holds only the trainable parameters: `fc` (2H → H, bias when the
//! source has `fc.bias`), `q/k/v/o_proj`, `gate/up/down_proj` and the
//! post-attention RMSNorm weight, and with a reduced draft vocabulary its own LM head
//! `[N, H]` (`lm_head`, initialised from the target's rows; see
//! `hass_models::DraftVocab`). The token embedding and the target's LM head are
//! frozen and enter the forward / the losses as plain tensors, which are detached
//! inside, so no gradient ever reaches them.
//!
//! It computes the same function as the inference head `hass_models::DraftHead`
//! (no input norm, RoPE rotate-half, GQA as repeat-interleave, SwiGLU, no final
//! norm), and converts to and from the EAGLE checkpoint layout
//! ([`TrainDraft::from_head`], [`TrainDraft::to_weights`]).
//!
//! One HASS training step over a batch (spec §3.5; `AD` an autodiff backend, the
//! target's `embedding` / `lm_head` bridged with `Tensor::from_inner`):
//!
//! ```text
//! let dist = TargetDist::new(target.clone(), loss_mask, lm_head, weights.k); // once per batch
//! let emb = embed_ids(&embedding, ids);                 // [b, L, H], frozen
//! let mut streams = vec![features];                      // stream 0 = F
//! let mut total = None;
//! for _ in 0..3 {                                        // n_total = 3
//!     let predict = draft.forward(emb.clone(), &streams, leaky);
//!     let out = dist.loss(predict.clone(), &weights);    // same target and mask each time
//!     total = Some(match total { None => out.loss, Some(t) => t + out.loss });
//!     streams.push(next_stream(&streams, predict));      // shifted right, detached
//! }
//! let grads = total.unwrap().backward(); // = the sum of the per-forward gradients
//! ```
//!
//! Summing the forwards' losses and running one backward gives the same gradients as
//! the reference's backward per forward, because the streams are detached.

use burn::module::Param;
use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::activation::{silu, softmax};
use hass_core::config::ModelConfig;
use hass_core::{HassError, Result};
use hass_models::draft_vocab::{d2t_offsets, read_vocab};
use hass_models::loader::Loader;
use hass_models::HassBackend;
use hass_models::{MemoryWeights, WeightSource};

use crate::align;

/// The draft head's trainable parameters (one decoder layer, layer 0 of the EAGLE
/// layout). Linear weights are Burn's `[in, out]`.
#[derive(Module, Debug)]
pub struct TrainDraft<B: HassBackend> {
    /// `[2H, H]`: rows `0..H` act on the embedding, `H..2H` on the feature.
    pub fc: Linear<B>,
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub o_proj: Linear<B>,
    pub gate_proj: Linear<B>,
    pub up_proj: Linear<B>,
    pub down_proj: Linear<B>,
    /// `[H]`.
    pub post_attention_layernorm: Param<Tensor<B, 1>>,
    /// The reduced vocabulary's own LM head `[N, H]` (HF layout), if any.
    pub lm_head: Option<Param<Tensor<B, 2>>>,
    /// Target id of each row of `lm_head` (empty without one).
    #[module(skip)]
    vocab_ids: Vec<u32>,
    hidden: usize,
    intermediate: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    eps: f64,
    /// The head's config (RoPE parameters, sizes); `num_hidden_layers == 1`.
    #[module(skip)]
    config: ModelConfig,
}

pub use hass_models::draft::{draft_config, random_head_weights};

/// Embeddings `[b, L, H]` of `ids` (`[b, L]`) from the frozen `embedding` (`[V, H]`),
/// detached (use it on the autodiff backend with a tensor bridged by `from_inner`).
pub fn embed_ids<B: HassBackend>(embedding: &Tensor<B, 2>, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
    let [b, l] = ids.dims();
    let h = embedding.dims()[1];
    embedding
        .clone()
        .detach()
        .select(0, ids.reshape([b * l]))
        .reshape([b, l, h])
}

/// The next HASS stream (spec §3.5 loop): `predict` (`[b, L, H]`) shifted right by
/// one, its first position taken from the newest stream (always `F[:, 0]`), detached.
pub fn next_stream<B: HassBackend>(
    streams: &[Tensor<B, 3>],
    predict: Tensor<B, 3>,
) -> Tensor<B, 3> {
    let newest = streams.last().expect("at least one stream");
    let [b, l, h] = predict.dims();
    let first = newest.clone().slice([0..b, 0..1, 0..h]);
    let rest = predict.slice([0..b, 0..l.saturating_sub(1), 0..h]);
    Tensor::cat(vec![first, rest], 1).detach()
}

/// Host transpose of a row-major `[rows, cols]` matrix.
fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = data[r * cols + c];
        }
    }
    out
}

fn host<B: HassBackend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("f32 data")
}

fn param2<B: HassBackend>(
    data: Vec<f32>,
    shape: [usize; 2],
    device: &B::Device,
) -> Param<Tensor<B, 2>> {
    Param::from_tensor(Tensor::from_data(TensorData::new(data, shape), device))
}

/// A Linear from the HF weight `[out, in]` (and bias `[out]` when `bias`).
fn linear<B: HassBackend>(
    ld: &Loader,
    name: &str,
    d_in: usize,
    d_out: usize,
    bias: bool,
    device: &B::Device,
) -> Result<Linear<B>> {
    let w = ld.read(&format!("{name}.weight"), &[d_out, d_in])?;
    let w = transpose(&w, d_out, d_in);
    let weight = Param::from_tensor(Tensor::from_data(TensorData::new(w, [d_in, d_out]), device));
    let bias = if bias {
        let b = ld.read(&format!("{name}.bias"), &[d_out])?;
        Some(Param::from_tensor(Tensor::from_data(
            TensorData::new(b, [d_out]),
            device,
        )))
    } else {
        None
    };
    Ok(Linear { weight, bias })
}

/// `x · W + b` through [`HassBackend::project`]: on the CPU, the forward and backward
/// products of training run on every core (Burn's matmul runs on one there).
fn linear_forward<B: HassBackend>(lin: &Linear<B>, x: Tensor<B, 2>) -> Tensor<B, 2> {
    let y = B::project(x, &lin.weight.val());
    match &lin.bias {
        Some(b) => y + b.val().unsqueeze(),
        None => y,
    }
}

/// Rotate-half RoPE with `cos`/`sin` of the same shape as `x` (`[b, heads, t, hd]`).
fn rope<B: HassBackend>(x: Tensor<B, 4>, cos: Tensor<B, 4>, sin: Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, h, t, d] = x.dims();
    let x1 = x.clone().slice([0..b, 0..h, 0..t, 0..d / 2]);
    let x2 = x.clone().slice([0..b, 0..h, 0..t, d / 2..d]);
    x * cos + Tensor::cat(vec![x2.neg(), x1], 3) * sin
}

impl<B: HassBackend> TrainDraft<B> {
    /// Builds the head from tensors in the EAGLE layout (`fc.weight` `[H, 2H]`,
    /// optional `fc.bias`, `layers.0.*`; an `embed_tokens.weight` is ignored), e.g.
    /// `DraftHead::export(&target)` or a checkpoint directory. `config` must describe
    /// one layer (see [`draft_config`]); QKV biases are read when
    /// `config.attention_bias`.
    pub fn from_head(
        source: &dyn WeightSource,
        config: &ModelConfig,
        device: &B::Device,
    ) -> Result<Self> {
        let ctx = source.describe();
        config.validate(&ctx)?;
        if config.num_hidden_layers != 1 {
            return Err(HassError::config(
                ctx,
                format!(
                    "{} draft layers (only 1 is supported; use hass_train::model::draft_config)",
                    config.num_hidden_layers
                ),
            ));
        }
        let c = config;
        let (h, inter, hd) = (c.hidden_size, c.intermediate_size, c.head_dim);
        let (qd, kvd) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
        let rd = Loader::new(source, burn::tensor::DType::F32);
        let fc_bias = source.shape("fc.bias").is_some();
        let qkv_bias = c.attention_bias;
        let p = "layers.0";
        let fc = linear(&rd, "fc", 2 * h, h, fc_bias, device)?;
        let q_proj = linear(
            &rd,
            &format!("{p}.self_attn.q_proj"),
            h,
            qd,
            qkv_bias,
            device,
        )?;
        let k_proj = linear(
            &rd,
            &format!("{p}.self_attn.k_proj"),
            h,
            kvd,
            qkv_bias,
            device,
        )?;
        let v_proj = linear(
            &rd,
            &format!("{p}.self_attn.v_proj"),
            h,
            kvd,
            qkv_bias,
            device,
        )?;
        let o_proj = linear(&rd, &format!("{p}.self_attn.o_proj"), qd, h, false, device)?;
        let gate_proj = linear(&rd, &format!("{p}.mlp.gate_proj"), h, inter, false, device)?;
        let up_proj = linear(&rd, &format!("{p}.mlp.up_proj"), h, inter, false, device)?;
        let down_proj = linear(&rd, &format!("{p}.mlp.down_proj"), inter, h, false, device)?;
        let norm = rd.read(&format!("{p}.post_attention_layernorm.weight"), &[h])?;
        if let Some(shape) = source.shape("embed_tokens.weight") {
            if shape != [c.vocab_size, h] {
                return Err(HassError::ShapeMismatch {
                    file: source.describe(),
                    name: "embed_tokens.weight".into(),
                    expected: vec![c.vocab_size, h],
                    found: shape,
                });
            }
        }
        rd.skip("embed_tokens.weight"); // the target's embedding is used
        let (lm_head, vocab_ids) = match read_vocab(&rd, h, c.vocab_size)? {
            Some((w, ids)) => (Some(param2(w, [ids.len(), h], device)), ids),
            None => (None, Vec::new()),
        };
        rd.check_all_used(|n| n.ends_with("rotary_emb.inv_freq"))?;
        Ok(TrainDraft {
            fc,
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            gate_proj,
            up_proj,
            down_proj,
            post_attention_layernorm: Param::from_tensor(Tensor::from_data(
                TensorData::new(norm, [h]),
                device,
            )),
            lm_head,
            vocab_ids,
            hidden: h,
            intermediate: inter,
            n_heads: c.num_attention_heads,
            n_kv_heads: c.num_key_value_heads,
            head_dim: hd,
            eps: c.rms_norm_eps,
            config: c.clone(),
        })
    }

    /// The head with its own reduced vocabulary: `lm_head` `[ids.len(), H]` scores
    /// target tokens `ids` (ascending), e.g. the target's rows for them
    /// (`hass_models::draft_vocab::target_rows`).
    pub fn with_vocab(mut self, lm_head: Tensor<B, 2>, ids: Vec<u32>) -> Self {
        assert_eq!(
            lm_head.dims(),
            [ids.len(), self.hidden],
            "draft LM head shape"
        );
        self.lm_head = Some(Param::from_tensor(lm_head));
        self.vocab_ids = ids;
        self
    }

    /// Target ids of the reduced vocabulary (`None`: the target's LM head is used).
    pub fn vocab_ids(&self) -> Option<&[u32]> {
        self.lm_head.as_ref().map(|_| self.vocab_ids.as_slice())
    }

    /// A freshly initialised head ([`random_head_weights`]; the same numbers as
    /// `DraftHead::random` with the same seed).
    pub fn random(config: &ModelConfig, seed: u64, device: &B::Device) -> Result<Self> {
        Self::from_head(&random_head_weights(config, seed), config, device)
    }

    /// The head's tensors in the EAGLE layout (HF `[out, in]`, f32), **without**
    /// `embed_tokens.weight`: `DraftHead::from_source(&w, config.clone(), &target)`
    /// loads it (and `DraftHead::save` adds the target's embedding).
    pub fn to_weights(&self) -> MemoryWeights {
        let mut w = MemoryWeights::new("trained draft head");
        let mut put = |name: &str, lin: &Linear<B>| {
            let [d_in, d_out] = lin.weight.dims();
            let data = transpose(&host(lin.weight.val()), d_in, d_out);
            w.insert(format!("{name}.weight"), vec![d_out, d_in], data);
            if let Some(b) = &lin.bias {
                w.insert(format!("{name}.bias"), vec![d_out], host(b.val()));
            }
        };
        let p = "layers.0";
        put("fc", &self.fc);
        put(&format!("{p}.self_attn.q_proj"), &self.q_proj);
        put(&format!("{p}.self_attn.k_proj"), &self.k_proj);
        put(&format!("{p}.self_attn.v_proj"), &self.v_proj);
        put(&format!("{p}.self_attn.o_proj"), &self.o_proj);
        put(&format!("{p}.mlp.gate_proj"), &self.gate_proj);
        put(&format!("{p}.mlp.up_proj"), &self.up_proj);
        put(&format!("{p}.mlp.down_proj"), &self.down_proj);
        w.insert(
            format!("{p}.post_attention_layernorm.weight"),
            vec![self.hidden],
            host(self.post_attention_layernorm.val()),
        );
        if let Some(lm) = &self.lm_head {
            let [n, h] = lm.dims();
            w.insert("lm_head.weight", vec![n, h], host(lm.val()));
            w.insert("d2t", vec![n], d2t_offsets(&self.vocab_ids));
        }
        w
    }

    /// The head's config (one layer).
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Whether `fc` has a bias.
    pub fn has_fc_bias(&self) -> bool {
        self.fc.bias.is_some()
    }

    /// The ordinary causal forward (EAGLE training, HASS forward 1):
    /// `forward(emb, &[features], leaky)`.
    pub fn forward_causal(
        &self,
        emb: Tensor<B, 3>,
        features: Tensor<B, 3>,
        leaky: bool,
    ) -> Tensor<B, 3> {
        self.forward(emb, &[features], leaky)
    }

    /// The HASS training forward over a batch (spec §3.5), `n = streams.len() ≥ 1`.
    ///
    /// - `emb` `[b, L, H]`: embeddings of the paired ids (row `t` ↔ `x_{t+1}`); frozen,
    ///   detached here.
    /// - `streams[0]` `[b, L, H]`: target features `F`; `streams[j]`, `j ≥ 1`: forward
    ///   `j`'s predictions shifted right ([`next_stream`]). All streams are detached
    ///   here, so no gradient flows into them (or into earlier forwards).
    /// - `leaky`: `false` masks with −∞ before the softmax (correct, the default);
    ///   `true` reproduces the reference [QUIRK]: masked scores enter the softmax as
    ///   logit 0 and their probabilities are zeroed afterwards (rows sum to < 1).
    ///
    /// `X_j = fc([E, stream_j])`; queries and the attention residual come from
    /// `X_{n−1}`; keys/values from every stream, column `c` at RoPE position `c`; row
    /// `r` reads column `c ≤ r` from stream `max(0, c − r + n − 1)`
    /// ([`align::source_map`]). Then `o_proj`, residual, post-attention RMSNorm, SwiGLU
    /// MLP, residual. Returns the predicted features `[b, L, H]`.
    ///
    /// Padding: sequences are right-padded and the structure is causal, so valid rows
    /// never attend to pad columns; pad rows produce garbage that the loss mask drops.
    /// No padding mask is needed (none is applied, as in the reference).
    ///
    /// With `n = 1` this is the plain causal forward of `DraftHead::forward`.
    pub fn forward(
        &self,
        emb: Tensor<B, 3>,
        streams: &[Tensor<B, 3>],
        leaky: bool,
    ) -> Tensor<B, 3> {
        let n = streams.len();
        assert!(n >= 1, "TrainDraft::forward needs at least one stream");
        let [b, l, h] = emb.dims();
        assert_eq!(h, self.hidden, "embedding width");
        for s in streams {
            assert_eq!(
                s.dims(),
                [b, l, h],
                "stream shape must equal the embedding's"
            );
        }
        let (nh, nkv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let rep = nh / nkv;
        let device = emb.device();

        // X for every stream, side by side along the sequence: [b, n·L, H].
        let emb = emb.detach();
        let e_cat = if n == 1 {
            emb
        } else {
            Tensor::cat(vec![emb; n], 1)
        };
        let s_cat = Tensor::cat(streams.iter().map(|s| s.clone().detach()).collect(), 1);
        let x_all = linear_forward(
            &self.fc,
            Tensor::cat(vec![e_cat, s_cat], 2).reshape([b * n * l, 2 * h]),
        );
        let x_new = if n == 1 {
            x_all.clone()
        } else {
            x_all
                .clone()
                .reshape([b, n * l, h])
                .slice([0..b, (n - 1) * l..n * l, 0..h])
                .reshape([b * l, h])
        };

        // RoPE tables: positions 0..L, repeated for every stream on the key side.
        let positions: Vec<usize> = (0..l).collect();
        let (cos, sin) = self.config.rope_cos_sin(&positions);
        let table = |v: &[f32], streams: usize, heads: usize| {
            let data: Vec<f32> = (0..streams).flat_map(|_| v.iter().copied()).collect();
            Tensor::<B, 4>::from_data(TensorData::new(data, [1, 1, streams * l, hd]), &device)
                .repeat_dim(1, heads)
                .repeat_dim(0, b)
        };

        let q = linear_forward(&self.q_proj, x_new.clone())
            .reshape([b, l, nh, hd])
            .swap_dims(1, 2);
        let q = rope(q, table(&cos, 1, nh), table(&sin, 1, nh));
        let k = linear_forward(&self.k_proj, x_all.clone())
            .reshape([b, n * l, nkv, hd])
            .swap_dims(1, 2);
        let k = rope(k, table(&cos, n, nkv), table(&sin, n, nkv));
        let v = linear_forward(&self.v_proj, x_all)
            .reshape([b, n * l, nkv, hd])
            .swap_dims(1, 2);

        // GQA without repeating K/V: the query heads of one KV group become rows
        // (group member i, position r) → row i·L + r.
        let q = q.reshape([b, nkv, rep * l, hd]);
        let scale = (hd as f64).sqrt().recip();
        let stream =
            |t: &Tensor<B, 4>, j: usize| t.clone().slice([0..b, 0..nkv, j * l..(j + 1) * l, 0..hd]);

        // Stream 0 serves a causal block of columns; stream j ≥ 1 serves one column
        // per row, c = r − d_j with d_j = n − 1 − j (a diagonal). So the scores are
        // q·K_0ᵀ (L columns) plus, per draft stream, one extra column holding
        // q_r · K_j[r − d_j] (masked where r < d_j); the softmax runs over those
        // L + n − 1 columns, which is exactly the softmax over the L columns of
        // S = Σ_j mask_j ⊙ (q·K_jᵀ) with the masked entries removed.
        let masks = align::stream_masks(l, n);
        let offset = |j: usize| align::diagonal_offset(n, j);
        // K_j / V_j rows moved down by d_j (row r holds position r − d_j, zeros
        // above), repeated for the rep query heads of each KV group.
        let shifted = |t: Tensor<B, 4>, d: usize| {
            let t = if d == 0 {
                t
            } else if d >= l {
                Tensor::zeros([b, nkv, l, hd], &device)
            } else {
                Tensor::cat(
                    vec![
                        Tensor::zeros([b, nkv, d, hd], &device),
                        t.slice([0..b, 0..nkv, 0..l - d, 0..hd]),
                    ],
                    2,
                )
            };
            t.repeat_dim(2, rep)
        };
        let k_diag: Vec<Tensor<B, 4>> = (1..n).map(|j| shifted(stream(&k, j), offset(j))).collect();
        let v_diag: Vec<Tensor<B, 4>> = (1..n).map(|j| shifted(stream(&v, j), offset(j))).collect();
        let mut cols = vec![q.clone().matmul(stream(&k, 0).swap_dims(2, 3)) * scale];
        for kd in &k_diag {
            cols.push((q.clone() * kd.clone()).sum_dim(3) * scale);
        }
        let width = l + n - 1;
        let scores = Tensor::cat(cols, 3); // [b, nkv, rep·L, L + n − 1]

        // Row r, column col: allowed (from the stream masks), or for leaky the
        // stream-0 entries c > r, which enter the softmax as logit 0 and are zeroed
        // after it (the reference's Σ_j mask_j ⊙ S_j leaves exactly those at 0).
        let allowed = |r: usize, col: usize| {
            if col < l {
                masks[0][r * l + col]
            } else {
                let j = col - l + 1;
                r >= offset(j) && masks[j][r * l + r - offset(j)]
            }
        };
        let leak = |r: usize, col: usize| leaky && col < l && col > r;
        let bool_mask = |f: &dyn Fn(usize, usize) -> bool| {
            let row_block: Vec<bool> = (0..l)
                .flat_map(|r| (0..width).map(move |col| (r, col)))
                .map(|(r, col)| f(r, col))
                .collect();
            let data: Vec<bool> = (0..rep).flat_map(|_| row_block.iter().copied()).collect();
            Tensor::<B, 4, Bool>::from_data(TensorData::new(data, [1, 1, rep * l, width]), &device)
                .repeat_dim(1, nkv)
                .repeat_dim(0, b)
        };
        let neg = bool_mask(&|r, col| !allowed(r, col) && !leak(r, col));
        let probs = if leaky {
            let zero = bool_mask(&leak);
            let scores = scores
                .mask_fill(zero.clone(), 0.0)
                .mask_fill(neg, f32::NEG_INFINITY);
            softmax(scores, 3).mask_fill(zero, 0.0)
        } else {
            softmax(scores.mask_fill(neg, f32::NEG_INFINITY), 3)
        };
        let mut attn = probs
            .clone()
            .slice([0..b, 0..nkv, 0..rep * l, 0..l])
            .matmul(stream(&v, 0)); // [b, nkv, rep·L, hd]
        for (j, vd) in v_diag.into_iter().enumerate() {
            let pj = probs
                .clone()
                .slice([0..b, 0..nkv, 0..rep * l, l + j..l + j + 1]);
            attn = attn + pj.repeat_dim(3, hd) * vd;
        }
        let attn = attn
            .reshape([b, nh, l, hd])
            .swap_dims(1, 2)
            .reshape([b * l, nh * hd]);

        let x = x_new + linear_forward(&self.o_proj, attn);
        let hn = self.rms_norm(x.clone());
        let mlp = linear_forward(
            &self.down_proj,
            silu(linear_forward(&self.gate_proj, hn.clone())) * linear_forward(&self.up_proj, hn),
        );
        (x + mlp).reshape([b, l, h])
    }

    /// `x · rsqrt(mean(x²) + eps) · w` over the last dim of `[rows, H]`.
    fn rms_norm(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let var = (x.clone() * x.clone()).mean_dim(1);
        x * (var + self.eps).sqrt().recip() * self.post_attention_layernorm.val().unsqueeze::<2>()
    }
}
