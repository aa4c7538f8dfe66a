//! The EAGLE-1/2 / HASS draft head (spec §2; HASS changes only how it is trained).
//!
//! Row `t` consumes the pair (target feature `f_t`, embedding of token `x_{t+1}`) and
//! predicts the next feature `f̂_{t+1}`; `target.lm_head(f̂)` gives the draft's
//! distribution of `x_{t+2}`. Architecture: `fc` over `[embedding, feature]` (2H → H,
//! optional bias), then one LLaMA decoder layer **without input norm**, and **no
//! final norm**. The embedding and LM head are the target's (frozen, shared), unless
//! the head has its own reduced vocabulary ([`DraftVocab`]: `lm_head.weight`, `d2t`,
//! `t2d`, config `draft_vocab_size`).
//!
//! Checkpoints use the EAGLE layout (`config.json` + `model.safetensors`, keys
//! `embed_tokens.weight`, `fc.weight`, `fc.bias`, `layers.0.*`); the presence of
//! `fc.bias` decides the bias, whatever the config says. Published heads ship as
//! `pytorch_model.bin` pickles, which hass refuses to execute: convert them with
//! `scripts/convert_eagle_checkpoint.py`.

use std::path::Path;

use burn::prelude::*;
use hass_core::config::ModelConfig;
use hass_core::{HassError, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::backend::HassBackend;
use crate::draft_vocab::DraftVocab;
use crate::kv_cache::KvCache;
use crate::layer::{mm, AttnContext, DecoderLayer};
use crate::llama::Llama;
use crate::loader::Loader;
use crate::safetensors_dir::SafetensorsDir;
use crate::weights::{MemoryWeights, WeightSource};

/// A draft head paired with a target (same hidden size and vocabulary).
#[derive(Debug, Clone)]
pub struct DraftHead<B: Backend> {
    config: ModelConfig,
    /// `[2H, H]`: rows `0..H` act on the embedding, `H..2H` on the feature.
    fc: Tensor<B, 2>,
    fc_bias: Option<Tensor<B, 1>>,
    layer: DecoderLayer<B>,
    /// The head's own output vocabulary; `None`: the target's LM head.
    vocab: Option<DraftVocab<B>>,
    device: B::Device,
}

/// A source whose names carry a wrapper prefix (`module.` from `accelerate`).
struct StripPrefix<'a> {
    inner: &'a dyn WeightSource,
    prefix: &'static str,
}

impl WeightSource for StripPrefix<'_> {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn tensor_names(&self) -> Vec<String> {
        self.inner
            .tensor_names()
            .into_iter()
            .map(|n| n.strip_prefix(self.prefix).map(str::to_string).unwrap_or(n))
            .collect()
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.inner.shape(&format!("{}{name}", self.prefix))
    }
    fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        self.inner.read_f32(&format!("{}{name}", self.prefix))
    }
    fn read_ids(&self, name: &str) -> Result<Vec<i64>> {
        self.inner.read_ids(&format!("{}{name}", self.prefix))
    }
}

/// How a saved head stores its weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadDtype {
    F32,
    F16,
    /// Every matrix as int8 with one f32 scale per row (symmetric, the row's largest
    /// magnitude maps to 127), vectors in f16: about half of f16's size, for heads that
    /// travel in the repository. Any tool reading EAGLE's f16 layout needs an export to
    /// [`HeadDtype::F16`] first; hass reads both.
    Int8Rows,
}

impl std::str::FromStr for HeadDtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(HeadDtype::F32),
            "f16" => Ok(HeadDtype::F16),
            "int8-rows" | "int8" => Ok(HeadDtype::Int8Rows),
            other => Err(format!(
                "unknown head dtype `{other}` (f32, f16, int8-rows)"
            )),
        }
    }
}

/// How [`DraftHead::save_as`] writes a head.
#[derive(Debug, Clone, Copy)]
pub struct SaveOptions {
    pub dtype: HeadDtype,
    /// Also write the target's embedding (`embed_tokens.weight`), as EAGLE's own
    /// checkpoints do; hass ignores it on load, so without it a head is ~25× smaller.
    pub with_embedding: bool,
}

impl Default for SaveOptions {
    fn default() -> Self {
        SaveOptions {
            dtype: HeadDtype::F32,
            with_embedding: true,
        }
    }
}

impl<B: HassBackend> DraftHead<B> {
    /// Loads the head in directory `dir` for `target`.
    pub fn load(dir: impl AsRef<Path>, target: &Llama<B>) -> Result<Self> {
        let dir = dir.as_ref();
        let text = std::fs::read_to_string(dir.join("config.json"))
            .map_err(|e| HassError::io(dir.join("config.json"), e))?;
        let ctx = dir.join("config.json").display().to_string();
        let mut config = ModelConfig::from_hf_json(&text, &ctx)?;
        let raw: serde_json::Value = serde_json::from_str(&text).map_err(|e| HassError::Json {
            path: dir.join("config.json"),
            source: e,
        })?;
        if raw.get("qkv_bias").and_then(|v| v.as_bool()) == Some(true) {
            config.attention_bias = true;
        }
        if !dir.join("model.safetensors").exists() && dir.join("pytorch_model.bin").exists() {
            return Err(HassError::InvalidArgument(format!(
                "{}/pytorch_model.bin is a pickle, which hass does not execute; convert it with \
                 `python3 scripts/convert_eagle_checkpoint.py {} <out-dir>` and load <out-dir>",
                dir.display(),
                dir.display()
            )));
        }
        let weights = SafetensorsDir::open(dir)?;
        let head = if weights
            .tensor_names()
            .iter()
            .all(|n| n.starts_with("module."))
        {
            Self::from_source(
                &StripPrefix {
                    inner: &weights,
                    prefix: "module.",
                },
                config,
                target,
            )?
        } else {
            Self::from_source(&weights, config, target)?
        };
        let declared = raw.get("draft_vocab_size").and_then(|v| v.as_u64());
        let full = declared.is_none() || declared == Some(target.config().vocab_size as u64);
        match (declared, head.draft_vocab()) {
            (Some(n), Some(v)) if n as usize != v.size() => Err(HassError::config(
                ctx,
                format!(
                    "draft_vocab_size {n} but lm_head.weight has {} rows",
                    v.size()
                ),
            )),
            (Some(n), None) if !full => Err(HassError::config(
                ctx,
                format!("draft_vocab_size {n} but the head has no lm_head.weight / d2t"),
            )),
            _ => Ok(head),
        }
    }

    /// Builds the head from tensors in the EAGLE layout.
    pub fn from_source(
        source: &dyn WeightSource,
        config: ModelConfig,
        target: &Llama<B>,
    ) -> Result<Self> {
        let tc = target.config();
        let ctx = source.describe();
        config.validate(&ctx)?;
        if config.hidden_size != tc.hidden_size || config.vocab_size != tc.vocab_size {
            return Err(HassError::config(
                ctx,
                format!(
                    "draft head (hidden {}, vocab {}) does not match the target (hidden {}, vocab {})",
                    config.hidden_size, config.vocab_size, tc.hidden_size, tc.vocab_size
                ),
            ));
        }
        if config.num_hidden_layers != 1 {
            return Err(HassError::config(
                ctx,
                format!(
                    "{} draft layers (only 1 is supported)",
                    config.num_hidden_layers
                ),
            ));
        }
        let h = config.hidden_size;
        let device = target.device().clone();
        // Matrices in the target's dtype: the head's forward is as memory-bound as the
        // target's (f16 halves what each committed round reads).
        let ld = Loader::new(source, target.dense_dtype());
        // The stored embedding is a copy of the target's; the target's is used.
        if let Some(shape) = source.shape("embed_tokens.weight") {
            if shape != [tc.vocab_size, h] {
                return Err(HassError::ShapeMismatch {
                    file: source.describe(),
                    name: "embed_tokens.weight".into(),
                    expected: vec![tc.vocab_size, h],
                    found: shape,
                });
            }
            ld.skip("embed_tokens.weight");
        }
        let fc = ld.fused_in_out(&[("fc.weight".to_string(), h)], 2 * h, &device)?;
        let fc_bias = if source.shape("fc.bias").is_some() {
            Some(ld.vector("fc.bias", h, &device)?)
        } else {
            None
        };
        let layer = DecoderLayer::load(&ld, "layers.0", &config, false, &device)?;
        let vocab = DraftVocab::load(&ld, h, tc.vocab_size, &device)?;
        ld.check_all_used(|n| n.ends_with("rotary_emb.inv_freq"))?;
        Ok(DraftHead {
            config,
            fc,
            fc_bias,
            layer,
            vocab,
            device,
        })
    }

    /// The head with `vocab` as its output vocabulary (a reduced-vocabulary head
    /// before training: [`DraftVocab::from_target`]).
    pub fn with_vocab(mut self, vocab: DraftVocab<B>) -> Self {
        self.vocab = Some(vocab);
        self
    }

    /// The head's own output vocabulary, if it has one.
    pub fn draft_vocab(&self) -> Option<&DraftVocab<B>> {
        self.vocab.as_ref()
    }

    /// Size of the distribution [`DraftHead::logits`] returns.
    pub fn output_size(&self) -> usize {
        self.vocab
            .as_ref()
            .map_or(self.config.vocab_size, DraftVocab::size)
    }

    /// Draft logits `[rows, output_size]` of head outputs `x` (`[rows, H]`): the
    /// target's LM head, or the head's own reduced one. Index `i` is target token
    /// [`DraftHead::target_id`]`(i)`.
    pub fn logits(&self, target: &Llama<B>, x: Tensor<B, 2>) -> Tensor<B, 2> {
        match &self.vocab {
            Some(v) => v.logits(x),
            None => target.logits(x),
        }
    }

    /// The target id of draft index `i` (identity without a reduced vocabulary).
    pub fn target_id(&self, i: u32) -> u32 {
        self.vocab.as_ref().map_or(i, |v| v.ids()[i as usize])
    }

    /// A freshly initialised head for `target` (what training starts from):
    /// [`draft_config`] and [`random_head_weights`].
    pub fn random(target: &Llama<B>, seed: u64) -> Result<Self> {
        let config = draft_config(target.config());
        Self::from_source(&random_head_weights(&config, seed), config, target)
    }

    /// The head's tensors in the EAGLE layout (the target's embedding included, as
    /// EAGLE-2-era loaders expect it).
    pub fn export(&self, target: &Llama<B>) -> MemoryWeights {
        self.export_with(target, true)
    }

    fn export_with(&self, target: &Llama<B>, with_embedding: bool) -> MemoryWeights {
        let h = self.config.hidden_size;
        let host = |t: Tensor<B, 1>| {
            t.into_data()
                .convert::<f32>()
                .into_vec::<f32>()
                .expect("f32 data")
        };
        let mut w = MemoryWeights::new("draft head");
        if with_embedding {
            let embed = target
                .embedding()
                .into_data()
                .convert::<f32>()
                .into_vec::<f32>()
                .expect("f32 data");
            w.insert(
                "embed_tokens.weight",
                vec![self.config.vocab_size, h],
                embed,
            );
        }
        w.insert(
            "fc.weight",
            vec![h, 2 * h],
            crate::loader::unfuse(&self.fc, &[h]).remove(0),
        );
        if let Some(b) = &self.fc_bias {
            w.insert("fc.bias", vec![h], host(b.clone()));
        }
        for (name, shape, data) in self.layer.export("layers.0", &self.config) {
            w.insert(name, shape, data);
        }
        if let Some(v) = &self.vocab {
            v.export(&mut w);
        }
        w
    }

    /// Writes `config.json` and `model.safetensors` (f32, embedding included: what
    /// EAGLE's loaders read) to `dir`, each atomically.
    pub fn save(&self, dir: impl AsRef<Path>, target: &Llama<B>) -> Result<()> {
        self.save_as(dir, target, SaveOptions::default())
    }

    /// Like [`DraftHead::save`], with the dtype and embedding of `opts`.
    pub fn save_as(
        &self,
        dir: impl AsRef<Path>,
        target: &Llama<B>,
        opts: SaveOptions,
    ) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| HassError::io(dir, e))?;
        let mut cfg = self.config.to_hf_json();
        cfg["bias"] = serde_json::Value::Bool(self.fc_bias.is_some());
        cfg["qkv_bias"] = serde_json::Value::Bool(self.config.attention_bias);
        if let Some(v) = &self.vocab {
            cfg["draft_vocab_size"] = serde_json::Value::from(v.size());
        }
        let text = serde_json::to_string_pretty(&cfg).expect("JSON value");
        write_atomic(&dir.join("config.json"), text.as_bytes())?;
        let w = self.export_with(target, opts.with_embedding);
        use safetensors::Dtype;
        let f16 = |d: &[f32]| -> Vec<u8> {
            d.iter()
                .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                .collect()
        };
        let mut bytes: Vec<(String, Vec<usize>, Dtype, Vec<u8>)> = Vec::new();
        for (n, (s, d)) in w.iter() {
            // The vocabulary maps keep EAGLE-3's dtypes: int64 offsets, bool flags.
            let (dtype, b) = match (n.as_str(), opts.dtype) {
                ("d2t", _) => (
                    Dtype::I64,
                    d.iter().flat_map(|x| (*x as i64).to_le_bytes()).collect(),
                ),
                ("t2d", _) => (Dtype::BOOL, d.iter().map(|x| (*x != 0.0) as u8).collect()),
                (_, HeadDtype::F32) => {
                    (Dtype::F32, d.iter().flat_map(|x| x.to_le_bytes()).collect())
                }
                (_, HeadDtype::Int8Rows) if s.len() == 2 => {
                    let (q, scales) = int8_rows(d, s[1]);
                    let scale_bytes = scales.iter().flat_map(|x| x.to_le_bytes()).collect();
                    bytes.push((
                        format!("{n}{}", crate::safetensors_dir::ROW_SCALE_SUFFIX),
                        vec![s[0]],
                        Dtype::F32,
                        scale_bytes,
                    ));
                    (Dtype::I8, q)
                }
                _ => (Dtype::F16, f16(d)),
            };
            bytes.push((n.clone(), s.clone(), dtype, b));
        }
        let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
            .iter()
            .map(|(n, s, dtype, b)| {
                let v = safetensors::tensor::TensorView::new(*dtype, s.clone(), b)
                    .expect("consistent view");
                (n.clone(), v)
            })
            .collect();
        let data = safetensors::serialize(views, None)
            .map_err(|e| HassError::malformed(dir.display(), e.to_string()))?;
        write_atomic(&dir.join("model.safetensors"), &data)
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Whether `fc` has a bias.
    pub fn has_fc_bias(&self) -> bool {
        self.fc_bias.is_some()
    }

    /// A one-layer KV cache for this head.
    pub fn new_cache(&self, capacity: usize) -> KvCache<B> {
        let c = &self.config;
        KvCache::new(1, c.num_key_value_heads, c.head_dim, capacity, &self.device)
    }

    /// Predicted features `[t, H]` for rows pairing `features` (`[t, H]`) with the
    /// embeddings of `tokens`, at `positions`, on top of `cache` (extended by `t`).
    /// `tree_mask` has the meaning of [`Llama::forward`]'s.
    pub fn forward(
        &self,
        target: &Llama<B>,
        features: Tensor<B, 2>,
        tokens: &[u32],
        positions: &[usize],
        cache: &mut KvCache<B>,
        tree_mask: Option<&[bool]>,
    ) -> Result<Tensor<B, 2>> {
        let t = tokens.len();
        let [ft, fh] = features.dims();
        if t == 0 || ft != t || fh != self.config.hidden_size || positions.len() != t {
            return Err(HassError::InvalidArgument(format!(
                "draft forward: {t} tokens, features {:?}, {} positions (hidden {})",
                [ft, fh],
                positions.len(),
                self.config.hidden_size
            )));
        }
        cache.check_room(t)?;
        let ctx = AttnContext::new(
            &self.config,
            positions,
            cache.len(),
            tree_mask,
            &self.device,
        )?;
        let e = target.embed_tokens(tokens)?;
        let mut x = mm(Tensor::cat(vec![e, features], 1), &self.fc);
        if let Some(b) = &self.fc_bias {
            x = x + b.clone().unsqueeze::<2>();
        }
        let out = self.layer.forward(x, &self.config, &ctx, cache, 0);
        cache.advance(t);
        Ok(out)
    }
}

/// The config of a one-layer draft head for a target with config `target`: the
/// target's sizes and RoPE, one layer, no QKV bias.
pub fn draft_config(target: &ModelConfig) -> ModelConfig {
    ModelConfig {
        num_hidden_layers: 1,
        attention_bias: false,
        tie_word_embeddings: false,
        ..target.clone()
    }
}

/// Freshly initialised head weights in the EAGLE layout (no `embed_tokens`) with
/// PyTorch's default init: `U(±1/√fan_in)` for the weights and the `fc` bias, norm 1.
pub fn random_head_weights(config: &ModelConfig, seed: u64) -> MemoryWeights {
    let (h, inter) = (config.hidden_size, config.intermediate_size);
    let (q, kv) = (
        config.num_attention_heads * config.head_dim,
        config.num_key_value_heads * config.head_dim,
    );
    let mut rng = StdRng::seed_from_u64(seed);
    let mut w = MemoryWeights::new(format!("random draft head (seed {seed})"));
    let mut uniform = |name: &str, shape: Vec<usize>, fan_in: usize| {
        let bound = 1.0 / (fan_in as f32).sqrt();
        let data = (0..shape.iter().product::<usize>())
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        w.insert(name, shape, data);
    };
    uniform("fc.weight", vec![h, 2 * h], 2 * h);
    uniform("fc.bias", vec![h], 2 * h);
    uniform("layers.0.self_attn.q_proj.weight", vec![q, h], h);
    uniform("layers.0.self_attn.k_proj.weight", vec![kv, h], h);
    uniform("layers.0.self_attn.v_proj.weight", vec![kv, h], h);
    uniform("layers.0.self_attn.o_proj.weight", vec![h, q], q);
    uniform("layers.0.mlp.gate_proj.weight", vec![inter, h], h);
    uniform("layers.0.mlp.up_proj.weight", vec![inter, h], h);
    uniform("layers.0.mlp.down_proj.weight", vec![h, inter], inter);
    w.insert(
        "layers.0.post_attention_layernorm.weight",
        vec![h],
        vec![1.0; h],
    );
    w
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|e| HassError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| HassError::io(path, e))
}

/// `d` (rows of `cols`) as int8 bytes and one scale per row: `q = round(x / scale)`
/// with `scale = max |x| / 127`, so each row keeps its own range.
fn int8_rows(d: &[f32], cols: usize) -> (Vec<u8>, Vec<f32>) {
    let mut q = Vec::with_capacity(d.len());
    let mut scales = Vec::with_capacity(d.len() / cols.max(1));
    for row in d.chunks(cols.max(1)) {
        let amax = row.iter().fold(0f32, |m, x| m.max(x.abs()));
        let scale = if amax > 0.0 { amax / 127.0 } else { 1.0 };
        scales.push(scale);
        q.extend(
            row.iter()
                .map(|x| (x / scale).round().clamp(-127.0, 127.0) as i8 as u8),
        );
    }
    (q, scales)
}
