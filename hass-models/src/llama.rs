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
use crate::layer::{mm, rms_norm, AttnContext, DecoderLayer};
use crate::loader::Loader;
use crate::weights::WeightSource;

/// Storage dtype of the weight matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
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
    pub(crate) fn dtype(self) -> DType {
        match self {
            WeightDtype::F32 => DType::F32,
            WeightDtype::F16 => DType::F16,
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
    embed: Tensor<B, 2>,
    layers: Vec<DecoderLayer<B>>,
    norm: Tensor<B, 1>,
    /// `[vocab, hidden]`; shares the embedding's storage when tied.
    lm_head: Tensor<B, 2>,
    /// `[hidden, vocab]`, contiguous: the layout the linear kernels stream.
    lm_head_t: Tensor<B, 2>,
    device: B::Device,
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
    /// accumulation stay f32; f16 halves the bytes a decode step reads.
    pub fn load_with_dtype(
        source: &dyn WeightSource,
        config: ModelConfig,
        device: &B::Device,
        dtype: WeightDtype,
    ) -> Result<Self> {
        config.validate(&source.describe())?;
        let c = &config;
        let (h, v) = (c.hidden_size, c.vocab_size);
        let ld = Loader::new(source, dtype.dtype());
        let embed = ld.matrix("model.embed_tokens.weight", v, h, device)?;
        let lm_head = if c.tie_word_embeddings {
            ld.skip("lm_head.weight"); // a stored copy of a tied head is redundant, not wrong
            embed.clone()
        } else {
            ld.matrix("lm_head.weight", v, h, device)?
        };
        let layers = (0..c.num_hidden_layers)
            .map(|l| DecoderLayer::load(&ld, &format!("model.layers.{l}"), c, true, device))
            .collect::<Result<Vec<_>>>()?;
        let norm = ld.vector("model.norm.weight", h, device)?;
        ld.check_all_used(is_ignorable)?;
        let lm_head_t = Tensor::from_data(
            lm_head.clone().transpose().into_data(),
            (device, dtype.dtype()),
        );
        Ok(Llama {
            config,
            embed,
            layers,
            norm,
            lm_head,
            lm_head_t,
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
        mm(features, &self.lm_head_t)
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
        let ids = Tensor::<B, 1, Int>::from_data(
            TensorData::new(
                tokens.iter().map(|&x| x as i32).collect::<Vec<_>>(),
                [tokens.len()],
            ),
            &self.device,
        );
        Ok(self.embed.clone().select(0, ids).cast(DType::F32))
    }
}
