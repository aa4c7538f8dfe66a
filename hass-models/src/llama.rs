//! The LLaMA-family target model (LLaMA-2/3, Qwen2, Mistral without sliding window).
//!
//! One [`Llama::forward`] takes new tokens with **explicit position ids** and an
//! optional tree mask, appends their keys/values to a [`KvCache`], and returns the
//! post-final-norm features of every new position (what a draft head consumes) plus
//! logits for only the rows asked for (the vocabulary projection is the most
//! expensive matmul of a small model).
//!
//! The embedding/LM head keep the HF `[vocab, hidden]` layout (the head is applied as
//! `h · Eᵀ`); the layers are [`crate::layer`]'s.

use burn::prelude::*;
use burn::tensor::DType;
use hass_core::config::ModelConfig;
use hass_core::{HassError, Result};

use crate::backend::HassBackend;
use crate::kv_cache::KvCache;
use std::sync::Arc;

use crate::layer::{AttnContext, DecoderLayer};
use crate::linear::Linear;
use crate::loader::Loader;
use crate::quant::{QMatrix, QType, QuantMode};
use crate::weights::WeightSource;

/// How the weight matrices are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightDtype {
    #[default]
    F32,
    F16,
    /// Projections in ggml blocks of this type (quantised at load where the file
    /// stores another type); embeddings looked up from the blocks.
    Q8_0,
    Q4_0,
    Q4_1,
    /// As the file stores them: a GGUF's Q8_0/Q4_0/Q4_1 blocks as they are (other
    /// block types as Q8_0) on a backend with quantized kernels; f16 otherwise.
    Auto,
}

impl std::str::FromStr for WeightDtype {
    type Err = HassError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(WeightDtype::F32),
            "f16" => Ok(WeightDtype::F16),
            "q8_0" => Ok(WeightDtype::Q8_0),
            "q4_0" => Ok(WeightDtype::Q4_0),
            "q4_1" => Ok(WeightDtype::Q4_1),
            "auto" => Ok(WeightDtype::Auto),
            other => Err(HassError::InvalidArgument(format!(
                "weight dtype `{other}` (use auto, q4_0, q4_1, q8_0, f16 or f32)"
            ))),
        }
    }
}

impl std::fmt::Display for WeightDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WeightDtype::F32 => "f32",
            WeightDtype::F16 => "f16",
            WeightDtype::Q8_0 => "q8_0",
            WeightDtype::Q4_0 => "q4_0",
            WeightDtype::Q4_1 => "q4_1",
            WeightDtype::Auto => "auto",
        })
    }
}

impl WeightDtype {
    /// The dtype of dense matrices (f32 only for [`WeightDtype::F32`]).
    pub(crate) fn dense(self) -> DType {
        match self {
            WeightDtype::F32 => DType::F32,
            _ => DType::F16,
        }
    }

    /// How projections from `source` are kept on backend `B`: `None` for dense.
    fn quant<B: HassBackend>(self, source: &dyn WeightSource) -> Option<QuantMode> {
        match self {
            WeightDtype::F32 | WeightDtype::F16 => None,
            WeightDtype::Q8_0 => Some(QuantMode::To(QType::Q8_0)),
            WeightDtype::Q4_0 => Some(QuantMode::To(QType::Q4_0)),
            WeightDtype::Q4_1 => Some(QuantMode::To(QType::Q4_1)),
            WeightDtype::Auto => {
                (B::QUANT_KERNELS && source.is_quantized()).then_some(QuantMode::AsStored)
            }
        }
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

/// A LLaMA-family decoder with its weights on device `B`.
#[derive(Debug, Clone)]
pub struct Llama<B: Backend> {
    config: ModelConfig,
    /// `[vocab, hidden]`.
    embed: Embedding<B>,
    layers: Vec<DecoderLayer<B>>,
    norm: Tensor<B, 1>,
    /// `hidden → vocab`: dense `[hidden, vocab]` (contiguous: the layout the kernels
    /// stream), or blocks that share the embedding's when tied.
    lm_head: Linear<B>,
    /// Storage dtype of the dense matrices (the embedding unless quantized).
    dense: DType,
    device: B::Device,
}

/// The token embedding `[vocab, hidden]`.
#[derive(Debug, Clone)]
enum Embedding<B: Backend> {
    Dense(Tensor<B, 2>),
    /// Rows dequantised on lookup.
    Quant(Arc<QMatrix>),
}

/// Tensors that may sit in a checkpoint without being weights (non-persistent
/// buffers some exporters still write).
fn is_ignorable(name: &str) -> bool {
    name.ends_with("rotary_emb.inv_freq")
}

impl<B: HassBackend> Llama<B> {
    /// Builds the model from `source` (f32 matrices), checking every tensor's presence
    /// and shape and rejecting tensors the model would silently ignore.
    pub fn load(
        source: &dyn WeightSource,
        config: ModelConfig,
        device: &B::Device,
    ) -> Result<Self> {
        Self::load_with_dtype(source, config, device, WeightDtype::F32)
    }

    /// Like [`Llama::load`], keeping the matrices in `dtype`. Norms, activations and
    /// accumulation stay f32; f16 halves the bytes a decode step reads, Q4_1 blocks
    /// read under a third of f16's.
    pub fn load_with_dtype(
        source: &dyn WeightSource,
        config: ModelConfig,
        device: &B::Device,
        dtype: WeightDtype,
    ) -> Result<Self> {
        config.validate(&source.describe())?;
        crate::backend::check_device::<B>(device)?;
        let c = &config;
        let (h, v) = (c.hidden_size, c.vocab_size);
        let dense = dtype.dense();
        let quant = dtype.quant::<B>(source);
        let ld = match quant {
            Some(mode) => Loader::quantized(source, dense, mode),
            None => Loader::new(source, dense),
        };
        let embed_name = "model.embed_tokens.weight";
        let head_name = if c.tie_word_embeddings {
            ld.skip("lm_head.weight"); // a stored copy of a tied head is redundant, not wrong
            embed_name
        } else {
            "lm_head.weight"
        };
        let (embed, lm_head) = match quant {
            Some(mode) => {
                let e = Arc::new(ld.qmatrix(embed_name, v, h, mode)?);
                let head = if c.tie_word_embeddings {
                    e.clone()
                } else {
                    Arc::new(ld.qmatrix(head_name, v, h, mode)?)
                };
                (Embedding::Quant(e), Linear::Quant(head))
            }
            None => {
                let e = ld.matrix(embed_name, v, h, device)?;
                let head = ld.fused_in_out(&[(head_name.to_string(), v)], h, device)?;
                (Embedding::Dense(e), Linear::Dense(head))
            }
        };
        let layers = (0..c.num_hidden_layers)
            .map(|l| DecoderLayer::load(&ld, &format!("model.layers.{l}"), c, true, device))
            .collect::<Result<Vec<_>>>()?;
        let norm = ld.vector("model.norm.weight", h, device)?;
        ld.check_all_used(is_ignorable)?;
        Ok(Llama {
            config,
            embed,
            layers,
            norm,
            lm_head,
            dense,
            device: device.clone(),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// The token embedding `[vocab, hidden]` in [`Llama::dense_dtype`] (draft heads
    /// and training share it, frozen; dequantised when stored in blocks).
    pub fn embedding(&self) -> Tensor<B, 2> {
        match &self.embed {
            Embedding::Dense(e) => e.clone(),
            Embedding::Quant(q) => self.dense_matrix(q),
        }
    }

    /// The LM head `[vocab, hidden]` in [`Llama::dense_dtype`] (draft heads reuse it).
    pub fn lm_head(&self) -> Tensor<B, 2> {
        match &self.lm_head {
            Linear::Dense(t) => t.clone().transpose(),
            Linear::Quant(q) => self.dense_matrix(q),
        }
    }

    fn dense_matrix(&self, q: &QMatrix) -> Tensor<B, 2> {
        Tensor::from_data(
            TensorData::new(q.dequantize(), [q.rows(), q.cols()]),
            (&self.device, self.dense),
        )
    }

    /// Storage dtype of dense matrices: this model's, and a draft head's beside it.
    pub fn dense_dtype(&self) -> DType {
        self.dense
    }

    /// Bytes of weights read by one decode step: every projection and the LM head once,
    /// the norms, and one embedding row.
    pub fn weight_bytes_per_token(&self) -> usize {
        let c = &self.config;
        let norms = (2 * c.num_hidden_layers + 1) * c.hidden_size * size_of::<f32>();
        let row = self.lm_head.bytes() / c.vocab_size;
        self.layers
            .iter()
            .map(DecoderLayer::weight_bytes)
            .sum::<usize>()
            + self.lm_head.bytes()
            + norms
            + row
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
        self.lm_head.forward(features)
    }

    /// One forward over `tokens` at `positions`, on top of the `cache.len()` committed
    /// positions, which it extends by `tokens.len()`.
    ///
    /// `tree_mask`, when given, is `t × cols` row-major over the last `cols` cache
    /// positions, the `t` new tokens being the last of them (`cols = t` for a verified
    /// tree): entry `(i, j)` is true when new token `i` may attend there (itself and its
    /// ancestors). Without it the new tokens attend causally. Earlier positions are
    /// always visible.
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
        if let LogitRows::Rows(r) = &rows {
            if let Some(&bad) = r.iter().find(|&&i| i >= t) {
                return Err(HassError::InvalidArgument(format!(
                    "logit row {bad} of {t}"
                )));
            }
        }
        cache.check_room(t)?;
        let ctx = AttnContext::new(c, positions, cache.len(), tree_mask, &self.device)?;
        let mut x = self.embed_tokens(tokens)?;
        for (l, layer) in self.layers.iter().enumerate() {
            x = layer.forward(x, c, &ctx, cache, l);
        }
        cache.advance(t);
        let features = B::rms_norm(x, &self.norm, c.rms_norm_eps);
        let logits = match rows {
            LogitRows::None => None,
            LogitRows::All => Some(self.logits(features.clone())),
            LogitRows::Last => {
                Some(self.logits(features.clone().slice([t - 1..t, 0..c.hidden_size])))
            }
            LogitRows::Rows(r) => {
                let idx = Tensor::<B, 1, Int>::from_data(
                    TensorData::new(r.iter().map(|&i| i as i32).collect::<Vec<_>>(), [r.len()]),
                    &self.device,
                );
                Some(self.logits(features.clone().select(0, idx)))
            }
        };
        Ok(ForwardOutput { features, logits })
    }

    /// Embeddings `[t, hidden]` (f32) of `tokens`, which must be in the vocabulary.
    pub fn embed_tokens(&self, tokens: &[u32]) -> Result<Tensor<B, 2>> {
        let vocab = self.config.vocab_size;
        if let Some(&bad) = tokens.iter().find(|&&x| x as usize >= vocab) {
            return Err(HassError::InvalidArgument(format!(
                "token id {bad} is outside the vocabulary of {vocab}"
            )));
        }
        match &self.embed {
            Embedding::Dense(e) => {
                let ids = Tensor::<B, 1, Int>::from_data(
                    TensorData::new(
                        tokens.iter().map(|&x| x as i32).collect::<Vec<_>>(),
                        [tokens.len()],
                    ),
                    &self.device,
                );
                Ok(e.clone().select(0, ids).cast(DType::F32))
            }
            Embedding::Quant(q) => {
                let ids: Vec<usize> = tokens.iter().map(|&x| x as usize).collect();
                Ok(Tensor::from_data(
                    TensorData::new(q.dequantize_rows(&ids)?, [tokens.len(), q.cols()]),
                    &self.device,
                ))
            }
        }
    }
}
