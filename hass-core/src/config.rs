//! Model configuration, read from a Hugging Face `config.json` (or built from GGUF
//! metadata), and the RoPE frequencies it implies.
//!
//! Anything that changes the numerics and that hass does not implement (an unknown
//! architecture or rope type, an activation other than SiLU, MLP biases) is an error:
//! a silently wrong model is worse than none.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{HassError, Result};

/// Decoder families hass runs. They share one implementation; the differences are
/// captured by [`ModelConfig`] fields (QKV bias, tied embeddings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Qwen2,
    Mistral,
}

/// RoPE frequency scaling, as in `transformers`' `ROPE_INIT_FUNCTIONS`.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Positions divided by `factor`.
    Linear { factor: f64 },
    /// Dynamic NTK: the base grows once the sequence exceeds `max_position_embeddings`.
    Dynamic { factor: f64 },
    /// LLaMA-3.1 wavelength-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

/// Architecture hyper-parameters of a LLaMA-family decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub vocab_size: usize,
    pub tie_word_embeddings: bool,
    /// Biases on the q/k/v projections (Qwen2).
    pub attention_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// The raw `config.json` fields hass reads; unknown fields are ignored unless they
/// change the numerics (checked in [`ModelConfig::from_hf_json`]).
#[derive(Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    architectures: Option<Vec<String>>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    /// transformers >= 5 folds `rope_theta` and `rope_scaling` into this.
    rope_parameters: Option<Value>,
    max_position_embeddings: Option<usize>,
    vocab_size: usize,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
    use_sliding_window: Option<bool>,
    sliding_window: Option<Value>,
}

fn token_ids(v: &Option<Value>, ctx: &str, field: &str) -> Result<Vec<u32>> {
    let as_id = |x: &Value| {
        x.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| HassError::config(ctx, format!("`{field}` must be a token id, got {x}")))
    };
    match v {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Array(xs)) => xs.iter().map(as_id).collect(),
        Some(x) => Ok(vec![as_id(x)?]),
    }
}

impl RopeScaling {
    /// Parses a `rope_scaling` / `rope_parameters` object. `Ok(None)` means plain RoPE.
    pub fn from_json(v: &Value, ctx: &str) -> Result<Option<Self>> {
        if v.is_null() {
            return Ok(None);
        }
        let kind = v
            .get("rope_type")
            .or_else(|| v.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let num = |key: &str| {
            v.get(key).and_then(Value::as_f64).ok_or_else(|| {
                HassError::config(ctx, format!("rope scaling `{kind}` needs numeric `{key}`"))
            })
        };
        Ok(match kind {
            "default" => None,
            "linear" => Some(RopeScaling::Linear {
                factor: num("factor")?,
            }),
            "dynamic" => Some(RopeScaling::Dynamic {
                factor: num("factor")?,
            }),
            "llama3" => Some(RopeScaling::Llama3 {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
            }),
            other => {
                return Err(HassError::config(
                    ctx,
                    format!(
                    "unsupported rope scaling type `{other}` (supported: linear, dynamic, llama3)"
                ),
                ))
            }
        })
    }
}

impl ModelConfig {
    /// Reads `config.json` from a file.
    pub fn from_hf_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| HassError::io(path, e))?;
        Self::from_hf_json(&text, &path.display().to_string())
    }

    /// Parses the text of a HF `config.json`; `ctx` names it in errors.
    pub fn from_hf_json(text: &str, ctx: &str) -> Result<Self> {
        let raw: HfConfig = serde_json::from_str(text)
            .map_err(|e| HassError::config(ctx, format!("cannot parse: {e}")))?;
        let arch_name = raw
            .model_type
            .clone()
            .or_else(|| raw.architectures.as_ref().and_then(|a| a.first().cloned()))
            .ok_or_else(|| HassError::config(ctx, "no `model_type` or `architectures`"))?;
        let architecture = match arch_name.as_str() {
            "llama" | "LlamaForCausalLM" => Architecture::Llama,
            "qwen2" | "Qwen2ForCausalLM" => Architecture::Qwen2,
            "mistral" | "MistralForCausalLM" => Architecture::Mistral,
            other => {
                return Err(HassError::config(
                    ctx,
                    format!(
                        "unsupported architecture `{other}` (supported: llama, qwen2, mistral)"
                    ),
                ))
            }
        };
        if let Some(act) = &raw.hidden_act {
            if act != "silu" {
                return Err(HassError::config(
                    ctx,
                    format!("unsupported hidden_act `{act}` (only silu)"),
                ));
            }
        }
        if raw.mlp_bias == Some(true) {
            return Err(HassError::config(ctx, "mlp_bias = true is not supported"));
        }
        let sliding = match architecture {
            Architecture::Qwen2 => raw.use_sliding_window == Some(true),
            _ => raw.sliding_window.as_ref().is_some_and(|v| !v.is_null()),
        };
        if sliding {
            return Err(HassError::config(
                ctx,
                "sliding-window attention is not supported",
            ));
        }
        let (rope_theta, rope_scaling) = match &raw.rope_parameters {
            Some(p) if !p.is_null() => (
                p.get("rope_theta")
                    .and_then(Value::as_f64)
                    .or(raw.rope_theta),
                RopeScaling::from_json(p, ctx)?,
            ),
            _ => (
                raw.rope_theta,
                match &raw.rope_scaling {
                    Some(v) => RopeScaling::from_json(v, ctx)?,
                    None => None,
                },
            ),
        };
        let cfg = ModelConfig {
            architecture,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            num_key_value_heads: raw.num_key_value_heads.unwrap_or(raw.num_attention_heads),
            head_dim: raw
                .head_dim
                .unwrap_or(raw.hidden_size / raw.num_attention_heads.max(1)),
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: rope_theta.unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(2048),
            vocab_size: raw.vocab_size,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            attention_bias: raw
                .attention_bias
                .unwrap_or(architecture == Architecture::Qwen2),
            bos_token_id: token_ids(&raw.bos_token_id, ctx, "bos_token_id")?
                .first()
                .copied(),
            eos_token_ids: token_ids(&raw.eos_token_id, ctx, "eos_token_id")?,
        };
        cfg.validate(ctx)?;
        Ok(cfg)
    }

    /// The HF `config.json` fields of this configuration (what [`Self::from_hf_json`]
    /// reads back to an equal value).
    pub fn to_hf_json(&self) -> Value {
        let (model_type, arch) = match self.architecture {
            Architecture::Llama => ("llama", "LlamaForCausalLM"),
            Architecture::Qwen2 => ("qwen2", "Qwen2ForCausalLM"),
            Architecture::Mistral => ("mistral", "MistralForCausalLM"),
        };
        let rope_scaling = match &self.rope_scaling {
            None => Value::Null,
            Some(RopeScaling::Linear { factor }) => {
                serde_json::json!({"rope_type": "linear", "factor": factor})
            }
            Some(RopeScaling::Dynamic { factor }) => {
                serde_json::json!({"rope_type": "dynamic", "factor": factor})
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                serde_json::json!({"rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                    "high_freq_factor": high_freq_factor,
                    "original_max_position_embeddings": original_max_position_embeddings})
            }
        };
        serde_json::json!({
            "model_type": model_type,
            "architectures": [arch],
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids,
        })
    }

    /// Checks the internal consistency of the sizes.
    pub fn validate(&self, ctx: &str) -> Result<()> {
        let err = |m: String| Err(HassError::config(ctx, m));
        if self.hidden_size == 0 || self.num_hidden_layers == 0 || self.vocab_size == 0 {
            return err("hidden_size, num_hidden_layers and vocab_size must be positive".into());
        }
        if self.num_attention_heads == 0 || self.num_key_value_heads == 0 {
            return err("head counts must be positive".into());
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return err(format!(
                "head_dim {} must be even and positive",
                self.head_dim
            ));
        }
        Ok(())
    }

    /// Number of query heads sharing one KV head.
    pub fn kv_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// RoPE inverse frequencies (length `head_dim / 2`) for a forward whose largest
    /// position is `max_pos`, in f32 exactly as `transformers` computes them.
    /// Only dynamic NTK scaling depends on `max_pos`.
    pub fn rope_inv_freq(&self, max_pos: usize) -> Vec<f32> {
        let dim = self.head_dim;
        let mut base = self.rope_theta;
        if let Some(RopeScaling::Dynamic { factor }) = self.rope_scaling {
            let seq_len = max_pos + 1;
            let max = self.max_position_embeddings;
            if seq_len > max {
                base *= ((factor * seq_len as f64 / max as f64) - (factor - 1.0))
                    .powf(dim as f64 / (dim as f64 - 2.0));
            }
        }
        let base = base as f32;
        let inv: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| 1.0 / base.powf(i as f32 / dim as f32))
            .collect();
        match self.rope_scaling {
            Some(RopeScaling::Linear { factor }) => inv.iter().map(|f| f / factor as f32).collect(),
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                let (factor, low, high) = (
                    factor as f32,
                    low_freq_factor as f32,
                    high_freq_factor as f32,
                );
                let old = original_max_position_embeddings as f32;
                let low_wavelen = old / low;
                let high_wavelen = old / high;
                inv.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        let scaled = if wavelen > low_wavelen { f / factor } else { f };
                        let medium = (high_wavelen..=low_wavelen).contains(&wavelen);
                        if medium {
                            let smooth = (old / wavelen - low) / (high - low);
                            (1.0 - smooth) * scaled / factor + smooth * scaled
                        } else {
                            scaled
                        }
                    })
                    .collect()
            }
            _ => inv,
        }
    }

    /// `cos` and `sin` rows (`[positions.len(), head_dim]`, rotate-half layout: the
    /// frequencies repeated twice) for explicit position ids.
    pub fn rope_cos_sin(&self, positions: &[usize]) -> (Vec<f32>, Vec<f32>) {
        let max_pos = positions.iter().copied().max().unwrap_or(0);
        let inv = self.rope_inv_freq(max_pos);
        let half = inv.len();
        let mut cos = Vec::with_capacity(positions.len() * 2 * half);
        let mut sin = Vec::with_capacity(positions.len() * 2 * half);
        for &p in positions {
            for _ in 0..2 {
                for &f in &inv {
                    let angle = p as f32 * f;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
        }
        (cos, sin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA3: &str = r#"{"model_type":"llama","hidden_size":64,"intermediate_size":128,
        "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"rms_norm_eps":1e-5,
        "rope_theta":500000.0,"rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,
        "high_freq_factor":4.0,"original_max_position_embeddings":8192},"vocab_size":100,
        "bos_token_id":1,"eos_token_id":[2,3]}"#;

    #[test]
    fn parses_llama3_style_config() {
        let c = ModelConfig::from_hf_json(LLAMA3, "test").unwrap();
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.kv_groups(), 2);
        assert_eq!(c.eos_token_ids, vec![2, 3]);
        assert_eq!(c.bos_token_id, Some(1));
        assert!(matches!(c.rope_scaling, Some(RopeScaling::Llama3 { .. })));
        assert!(!c.attention_bias);
    }

    #[test]
    fn parses_transformers5_rope_parameters() {
        let text = r#"{"model_type":"qwen2","hidden_size":32,"intermediate_size":64,"num_hidden_layers":1,
            "num_attention_heads":4,"vocab_size":10,"rope_parameters":{"rope_type":"default","rope_theta":1000000.0}}"#;
        let c = ModelConfig::from_hf_json(text, "test").unwrap();
        assert_eq!(c.rope_theta, 1e6);
        assert_eq!(c.rope_scaling, None);
        assert!(c.attention_bias, "qwen2 implies QKV bias");
    }

    #[test]
    fn rejects_unknown_rope_type_and_architecture() {
        let bad_rope = LLAMA3.replace("\"llama3\"", "\"yarn\"");
        let e = ModelConfig::from_hf_json(&bad_rope, "test").unwrap_err();
        assert!(e.to_string().contains("yarn"), "{e}");
        let bad_arch = LLAMA3.replace("\"llama\"", "\"gpt2\"");
        let e = ModelConfig::from_hf_json(&bad_arch, "test").unwrap_err();
        assert!(e.to_string().contains("gpt2"), "{e}");
    }

    #[test]
    fn hf_json_round_trips() {
        let c = ModelConfig::from_hf_json(LLAMA3, "test").unwrap();
        let again = ModelConfig::from_hf_json(&c.to_hf_json().to_string(), "round trip").unwrap();
        assert_eq!(c, again);
    }

    #[test]
    fn rejects_inconsistent_heads() {
        let bad = LLAMA3.replace("\"num_key_value_heads\":2", "\"num_key_value_heads\":3");
        assert!(ModelConfig::from_hf_json(&bad, "test").is_err());
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let c = ModelConfig::from_hf_json(LLAMA3, "test").unwrap();
        let plain = ModelConfig {
            rope_scaling: None,
            ..c.clone()
        };
        let (s, p) = (c.rope_inv_freq(0), plain.rope_inv_freq(0));
        assert_eq!(s[0], p[0], "highest frequency untouched");
        let last = s.len() - 1;
        assert!(
            (s[last] * 8.0 - p[last]).abs() < 1e-12,
            "lowest frequency divided by factor"
        );
    }
}
