//! The LLaMA-family target model (LLaMA-2/3, Qwen2, Mistral without sliding window).
//!
//! One [`Llama::forward`] takes new tokens with **explicit position ids** and an
//! optional tree mask over them, appends their keys/values to a [`KvCache`], and
//! returns the post-final-norm features of every new position (what a draft head
//! consumes) plus logits for only the rows asked for (the vocabulary projection is
//! the most expensive matmul of a small model).
//!
//! Weights are stored once at load in the layout the matmul reads: `[in, out]` for
//! the projections (q/k/v fused, gate/up fused, so a layer runs 4 matmuls), and the
//! HF `[vocab, hidden]` layout for the embedding/LM head (used as `h · Eᵀ`).

use burn::prelude::*;
use burn::tensor::activation::{silu, softmax};
use burn::tensor::DType;
use hass_core::config::ModelConfig;
use hass_core::{HassError, Result};

use crate::kv_cache::KvCache;
use crate::weights::WeightSource;

/// Storage dtype of the weight matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightDtype {
    #[default]
    F32,
    F16,
}

impl std::str::FromStr for WeightDtype {
    type Err = HassError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(WeightDtype::F32),
            "f16" => Ok(WeightDtype::F16),
            other => Err(HassError::InvalidArgument(format!(
                "weight dtype `{other}` (use f32 or f16)"
            ))),
        }
    }
}

impl WeightDtype {
    fn dtype(self) -> DType {
        match self {
            WeightDtype::F32 => DType::F32,
            WeightDtype::F16 => DType::F16,
        }
    }
}

/// `x · w` in f32, whatever dtype `w` is stored in.
fn mm<B: Backend>(x: Tensor<B, 2>, w: &Tensor<B, 2>) -> Tensor<B, 2> {
    let dt = w.dtype();
    if x.dtype() == dt {
        x.matmul(w.clone())
    } else {
        x.cast(dt).matmul(w.clone()).cast(DType::F32)
    }
}

/// Which rows of a forward need logits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogitRows {
    /// No logits (features only).
    None,
    /// Only the last new position (plain decoding, prefill).
    Last,
    /// Every new position (tree verification, parity tests).
    All,
    /// The given row indices, in this order.
    Rows(Vec<usize>),
}

/// Result of one forward pass over `t` new tokens.
#[derive(Debug, Clone)]
pub struct ForwardOutput<B: Backend> {
    /// Post-final-norm hidden states, `[t, hidden]`.
    pub features: Tensor<B, 2>,
    /// Logits for the requested rows, `[rows, vocab]` (`None` for [`LogitRows::None`]).
    pub logits: Option<Tensor<B, 2>>,
}

#[derive(Debug, Clone)]
struct Layer<B: Backend> {
    attn_norm: Tensor<B, 1>,
    /// `[hidden, (n_heads + 2 n_kv) · head_dim]`: q, k, v columns side by side.
    wqkv: Tensor<B, 2>,
    bqkv: Option<Tensor<B, 1>>,
    /// `[n_heads · head_dim, hidden]`.
    wo: Tensor<B, 2>,
    mlp_norm: Tensor<B, 1>,
    /// `[hidden, 2 · intermediate]`: gate then up.
    w_gate_up: Tensor<B, 2>,
    /// `[intermediate, hidden]`.
    w_down: Tensor<B, 2>,
}

/// A LLaMA-family decoder with its weights on device `B`.
#[derive(Debug, Clone)]
pub struct Llama<B: Backend> {
    config: ModelConfig,
    /// `[vocab, hidden]`.
    embed: Tensor<B, 2>,
    layers: Vec<Layer<B>>,
    norm: Tensor<B, 1>,
    /// `[vocab, hidden]`; shares the embedding's storage when tied.
    lm_head: Tensor<B, 2>,
    device: B::Device,
}

/// Tensors that may sit in a checkpoint without being weights (non-persistent
/// buffers some exporters still write).
fn is_ignorable(name: &str) -> bool {
    name.ends_with("rotary_emb.inv_freq")
}

struct Loader<'a> {
    source: &'a dyn WeightSource,
    /// Storage dtype of the projection matrices.
    dtype: DType,
}

impl Loader<'_> {
    fn read(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let found = self
            .source
            .shape(name)
            .ok_or_else(|| HassError::MissingTensor {
                file: self.source.describe(),
                name: name.to_string(),
            })?;
        if found != shape {
            return Err(HassError::ShapeMismatch {
                file: self.source.describe(),
                name: name.to_string(),
                expected: shape.to_vec(),
                found,
            });
        }
        let data = self.source.read_f32(name)?;
        if data.len() != shape.iter().product::<usize>() {
            return Err(HassError::malformed(
                self.source.describe(),
                format!(
                    "tensor `{name}` holds {} values for shape {shape:?}",
                    data.len()
                ),
            ));
        }
        Ok(data)
    }

    fn vector<B: Backend>(&self, name: &str, len: usize, dev: &B::Device) -> Result<Tensor<B, 1>> {
        Ok(Tensor::from_data(
            TensorData::new(self.read(name, &[len])?, [len]),
            dev,
        ))
    }

    /// Reads HF `[out, in]` matrices with the same `in` and returns them transposed and
    /// fused column-wise: `[in, Σ out]`.
    fn fused_in_out<B: Backend>(
        &self,
        names: &[(&str, usize)],
        d_in: usize,
        dev: &B::Device,
    ) -> Result<Tensor<B, 2>> {
        let total: usize = names.iter().map(|(_, o)| o).sum();
        let mut out = vec![0f32; d_in * total];
        let mut col0 = 0;
        for &(name, d_out) in names {
            let w = self.read(name, &[d_out, d_in])?;
            for o in 0..d_out {
                for i in 0..d_in {
                    out[i * total + col0 + o] = w[o * d_in + i];
                }
            }
            col0 += d_out;
        }
        Ok(Tensor::from_data(
            TensorData::new(out, [d_in, total]),
            (dev, self.dtype),
        ))
    }

    fn fused_bias<B: Backend>(
        &self,
        names: &[(&str, usize)],
        dev: &B::Device,
    ) -> Result<Tensor<B, 1>> {
        let mut out = Vec::new();
        for &(name, len) in names {
            out.extend(self.read(name, &[len])?);
        }
        let n = out.len();
        Ok(Tensor::from_data(TensorData::new(out, [n]), dev))
    }
}

fn rms_norm<B: Backend>(x: Tensor<B, 2>, weight: &Tensor<B, 1>, eps: f64) -> Tensor<B, 2> {
    let var = (x.clone() * x.clone()).mean_dim(1);
    x * (var + eps).sqrt().recip() * weight.clone().unsqueeze::<2>()
}

/// Rotate-half RoPE on `[1, heads, t, hd]` with `cos`/`sin` already `[1, heads, t, hd]`.
fn rope<B: Backend>(x: Tensor<B, 4>, cos: &Tensor<B, 4>, sin: &Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, h, t, d] = x.dims();
    let x1 = x.clone().slice([0..b, 0..h, 0..t, 0..d / 2]);
    let x2 = x.clone().slice([0..b, 0..h, 0..t, d / 2..d]);
    x * cos.clone() + Tensor::cat(vec![x2.neg(), x1], 3) * sin.clone()
}

impl<B: Backend> Llama<B> {
    /// Builds the model from `source`, checking every tensor's presence and shape and
    /// rejecting tensors the model would silently ignore.
    pub fn load(
        source: &dyn WeightSource,
        config: ModelConfig,
        device: &B::Device,
    ) -> Result<Self> {
        Self::load_with_dtype(source, config, device, WeightDtype::F32)
    }

    /// Like [`Llama::load`], keeping the matrices in `dtype`. Norms, activations and
    /// accumulation stay f32; f16 halves the bytes a decode step reads.
    pub fn load_with_dtype(
        source: &dyn WeightSource,
        config: ModelConfig,
        device: &B::Device,
        dtype: WeightDtype,
    ) -> Result<Self> {
        config.validate(&source.describe())?;
        let c = &config;
        let (h, hd, nh, nkv, inter, v) = (
            c.hidden_size,
            c.head_dim,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.intermediate_size,
            c.vocab_size,
        );
        let ld = Loader {
            source,
            dtype: dtype.dtype(),
        };
        let mut expected: Vec<String> = vec![
            "model.embed_tokens.weight".into(),
            "model.norm.weight".into(),
        ];
        let embed_data = ld.read("model.embed_tokens.weight", &[v, h])?;
        let embed =
            Tensor::<B, 2>::from_data(TensorData::new(embed_data, [v, h]), (device, ld.dtype));
        let has_head = source.shape("lm_head.weight").is_some();
        let lm_head = if c.tie_word_embeddings || !has_head {
            if !c.tie_word_embeddings {
                return Err(HassError::MissingTensor {
                    file: source.describe(),
                    name: "lm_head.weight".into(),
                });
            }
            if has_head {
                expected.push("lm_head.weight".into()); // tied: a stored copy is redundant, not wrong
            }
            embed.clone()
        } else {
            expected.push("lm_head.weight".into());
            Tensor::from_data(
                TensorData::new(ld.read("lm_head.weight", &[v, h])?, [v, h]),
                (device, ld.dtype),
            )
        };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let q = format!("{p}.self_attn.q_proj");
            let k = format!("{p}.self_attn.k_proj");
            let vv = format!("{p}.self_attn.v_proj");
            let names = [
                (format!("{q}.weight"), nh * hd),
                (format!("{k}.weight"), nkv * hd),
                (format!("{vv}.weight"), nkv * hd),
            ];
            let refs: Vec<(&str, usize)> = names.iter().map(|(n, o)| (n.as_str(), *o)).collect();
            let wqkv = ld.fused_in_out(&refs, h, device)?;
            let bqkv = if c.attention_bias {
                let bn = [
                    (format!("{q}.bias"), nh * hd),
                    (format!("{k}.bias"), nkv * hd),
                    (format!("{vv}.bias"), nkv * hd),
                ];
                let brefs: Vec<(&str, usize)> = bn.iter().map(|(n, o)| (n.as_str(), *o)).collect();
                expected.extend(bn.iter().map(|(n, _)| n.clone()));
                Some(ld.fused_bias(&brefs, device)?)
            } else {
                None
            };
            let wo_name = format!("{p}.self_attn.o_proj.weight");
            let wo = ld.fused_in_out(&[(&wo_name, h)], nh * hd, device)?;
            let gate = format!("{p}.mlp.gate_proj.weight");
            let up = format!("{p}.mlp.up_proj.weight");
            let down = format!("{p}.mlp.down_proj.weight");
            let w_gate_up = ld.fused_in_out(&[(&gate, inter), (&up, inter)], h, device)?;
            let w_down = ld.fused_in_out(&[(&down, h)], inter, device)?;
            let an = format!("{p}.input_layernorm.weight");
            let mn = format!("{p}.post_attention_layernorm.weight");
            layers.push(Layer {
                attn_norm: ld.vector(&an, h, device)?,
                wqkv,
                bqkv,
                wo,
                mlp_norm: ld.vector(&mn, h, device)?,
                w_gate_up,
                w_down,
            });
            expected.extend(names.into_iter().map(|(n, _)| n));
            expected.extend([wo_name, gate, up, down, an, mn]);
        }
        let norm = ld.vector("model.norm.weight", h, device)?;
        let expected: std::collections::HashSet<String> = expected.into_iter().collect();
        if let Some(extra) = source
            .tensor_names()
            .into_iter()
            .find(|n| !expected.contains(n) && !is_ignorable(n))
        {
            return Err(HassError::UnexpectedTensor {
                file: source.describe(),
                name: extra,
            });
        }
        Ok(Llama {
            config,
            embed,
            layers,
            norm,
            lm_head,
            device: device.clone(),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// The token embedding `[vocab, hidden]` (shared, frozen, by draft heads).
    pub fn embedding(&self) -> &Tensor<B, 2> {
        &self.embed
    }

    /// The LM head `[vocab, hidden]` (draft heads reuse it).
    pub fn lm_head(&self) -> &Tensor<B, 2> {
        &self.lm_head
    }

    /// Bytes of weights read by one decode step (each parameter once; the tied LM head
    /// counts once more because the step reads it as the head).
    pub fn weight_bytes_per_token(&self) -> usize {
        let c = &self.config;
        let per_layer =
            c.hidden_size * (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
                + c.num_attention_heads * c.head_dim * c.hidden_size
                + 3 * c.hidden_size * c.intermediate_size
                + 2 * c.hidden_size;
        let params = c.num_hidden_layers * per_layer + c.vocab_size * c.hidden_size + c.hidden_size;
        params * self.embed.dtype().size()
    }

    /// Allocates a KV cache for this model with room for `capacity` positions.
    pub fn new_cache(&self, capacity: usize) -> KvCache<B> {
        let c = &self.config;
        KvCache::new(
            c.num_hidden_layers,
            c.num_key_value_heads,
            c.head_dim,
            capacity,
            &self.device,
        )
    }

    /// Logits `[rows, vocab]` of features `[rows, hidden]`.
    pub fn logits(&self, features: Tensor<B, 2>) -> Tensor<B, 2> {
        mm(features, &self.lm_head.clone().transpose())
    }

    /// One forward over `tokens` at `positions`, on top of the `cache.len()` committed
    /// positions, which it extends by `tokens.len()`.
    ///
    /// `tree_mask`, when given, is `t × t` row-major: entry `(i, j)` is true when new
    /// token `i` may attend to new token `j` (itself and its ancestors). Without it the
    /// new tokens attend causally. All committed positions are always visible.
    pub fn forward(
        &self,
        tokens: &[u32],
        positions: &[usize],
        cache: &mut KvCache<B>,
        tree_mask: Option<&[bool]>,
        rows: LogitRows,
    ) -> Result<ForwardOutput<B>> {
        let c = &self.config;
        let t = tokens.len();
        if t == 0 {
            return Err(HassError::InvalidArgument(
                "forward over zero tokens".into(),
            ));
        }
        if positions.len() != t {
            return Err(HassError::InvalidArgument(format!(
                "{} position ids for {t} tokens",
                positions.len()
            )));
        }
        if let Some(m) = tree_mask {
            if m.len() != t * t {
                return Err(HassError::InvalidArgument(format!(
                    "tree mask of {} entries for {t} tokens (needs {})",
                    m.len(),
                    t * t
                )));
            }
        }
        if let Some(&bad) = tokens.iter().find(|&&x| x as usize >= c.vocab_size) {
            return Err(HassError::InvalidArgument(format!(
                "token id {bad} is outside the vocabulary of {}",
                c.vocab_size
            )));
        }
        if let LogitRows::Rows(r) = &rows {
            if let Some(&bad) = r.iter().find(|&&i| i >= t) {
                return Err(HassError::InvalidArgument(format!(
                    "logit row {bad} of {t}"
                )));
            }
        }
        cache.check_room(t)?;
        let (nh, nkv, hd, rep) = (
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            c.kv_groups(),
        );
        let dev = &self.device;
        let past = cache.len();
        let total = past + t;

        let ids = Tensor::<B, 1, Int>::from_data(
            TensorData::new(tokens.iter().map(|&x| x as i32).collect::<Vec<_>>(), [t]),
            dev,
        );
        let mut x = self.embed.clone().select(0, ids).cast(DType::F32);

        let (cos, sin) = c.rope_cos_sin(positions);
        let table = |v: Vec<f32>, heads: usize| {
            Tensor::<B, 4>::from_data(TensorData::new(v, [1, 1, t, hd]), dev).repeat_dim(1, heads)
        };
        let (cos_q, sin_q) = (table(cos.clone(), nh), table(sin.clone(), nh));
        let (cos_k, sin_k) = (table(cos, nkv), table(sin, nkv));
        let mask = self.attention_mask(t, past, tree_mask, rep);
        let scale = (hd as f64).sqrt().recip();

        for (l, layer) in self.layers.iter().enumerate() {
            let h = rms_norm(x.clone(), &layer.attn_norm, c.rms_norm_eps);
            let mut qkv = mm(h, &layer.wqkv);
            if let Some(b) = &layer.bqkv {
                qkv = qkv + b.clone().unsqueeze::<2>();
            }
            let split = |from: usize, heads: usize| {
                qkv.clone()
                    .slice([0..t, from..from + heads * hd])
                    .reshape([1, t, heads, hd])
                    .swap_dims(1, 2)
            };
            let q = rope(split(0, nh), &cos_q, &sin_q);
            let k = rope(split(nh * hd, nkv), &cos_k, &sin_k);
            let v = split((nh + nkv) * hd, nkv);
            let (k_all, v_all) = cache.append(l, k, v);
            // GQA without repeating K/V: query heads of one group become extra rows.
            let q = q.reshape([1, nkv, rep * t, hd]);
            let mut scores = q.matmul(k_all.swap_dims(2, 3)) * scale;
            if let Some(m) = &mask {
                scores = scores.mask_fill(m.clone(), f32::NEG_INFINITY);
            }
            let attn = softmax(scores, 3)
                .matmul(v_all)
                .reshape([1, nh, t, hd])
                .swap_dims(1, 2)
                .reshape([t, nh * hd]);
            x = x + mm(attn, &layer.wo);
            let h = rms_norm(x.clone(), &layer.mlp_norm, c.rms_norm_eps);
            let gu = mm(h, &layer.w_gate_up);
            let inter = c.intermediate_size;
            let gate = gu.clone().slice([0..t, 0..inter]);
            let up = gu.slice([0..t, inter..2 * inter]);
            x = x + mm(silu(gate) * up, &layer.w_down);
        }
        cache.advance(t);
        debug_assert_eq!(cache.len(), total);

        let features = rms_norm(x, &self.norm, c.rms_norm_eps);
        let logits = match rows {
            LogitRows::None => None,
            LogitRows::All => Some(self.logits(features.clone())),
            LogitRows::Last => {
                Some(self.logits(features.clone().slice([t - 1..t, 0..c.hidden_size])))
            }
            LogitRows::Rows(r) => {
                let idx = Tensor::<B, 1, Int>::from_data(
                    TensorData::new(r.iter().map(|&i| i as i32).collect::<Vec<_>>(), [r.len()]),
                    dev,
                );
                Some(self.logits(features.clone().select(0, idx)))
            }
        };
        Ok(ForwardOutput { features, logits })
    }

    /// Boolean mask `[1, 1, rep·t, past + t]`, true where attention is forbidden, or
    /// `None` when nothing is masked (a single new token without a tree).
    fn attention_mask(
        &self,
        t: usize,
        past: usize,
        tree: Option<&[bool]>,
        rep: usize,
    ) -> Option<Tensor<B, 4, Bool>> {
        if t == 1 && tree.is_none() {
            return None;
        }
        let total = past + t;
        let mut row_masks = Vec::with_capacity(t * total);
        for i in 0..t {
            for col in 0..total {
                let masked = match col.checked_sub(past) {
                    None => false,
                    Some(j) => match tree {
                        Some(m) => !m[i * t + j],
                        None => j > i,
                    },
                };
                row_masks.push(masked);
            }
        }
        // Rows are (group member r, token i): repeat the t×total block rep times.
        let data: Vec<bool> = (0..rep).flat_map(|_| row_masks.iter().copied()).collect();
        Some(Tensor::from_data(
            TensorData::new(data, [1, 1, rep * t, total]),
            &self.device,
        ))
    }
}
