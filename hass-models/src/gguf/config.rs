//! [`ModelConfig`] from GGUF metadata (llama.cpp's key names, `{arch}.*`).

use hass_core::config::{Architecture, RopeScaling};
use hass_core::{HassError, ModelConfig, Result};

use super::{GgufFile, GgufValue};

/// An f32 metadata value widened to the f64 its shortest decimal form denotes, so
/// `1e-5f32` becomes `1e-5` (as a HF `config.json` would say), not `9.99999974e-6`.
fn decimal_f64(v: &GgufValue) -> Option<f64> {
    match *v {
        GgufValue::F32(x) => format!("{x}").parse().ok().or(Some(x as f64)),
        _ => v.as_f64(),
    }
}

struct Meta<'a> {
    file: &'a GgufFile,
    arch: &'a str,
}

impl<'a> Meta<'a> {
    fn key(&self, k: &str) -> String {
        format!("{}.{k}", self.arch)
    }

    fn err(&self, msg: impl Into<String>) -> HassError {
        HassError::config(self.file.name(), msg)
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.file.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_integer()
                .and_then(|i| usize::try_from(i).ok())
                .map(Some)
                .ok_or_else(|| {
                    self.err(format!(
                        "`{key}` must be a non-negative integer, found {v:?}"
                    ))
                }),
        }
    }

    fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?
            .ok_or_else(|| self.err(format!("required metadata key `{key}` is missing")))
    }

    fn opt_u32(&self, key: &str) -> Result<Option<u32>> {
        match self.opt_usize(key)? {
            None => Ok(None),
            Some(n) => u32::try_from(n)
                .map(Some)
                .map_err(|_| self.err(format!("`{key}` = {n} does not fit a token id"))),
        }
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.file.get(key) {
            None => Ok(None),
            Some(v) => decimal_f64(v)
                .map(Some)
                .ok_or_else(|| self.err(format!("`{key}` must be a number, found {v:?}"))),
        }
    }

    fn opt_str(&self, key: &str) -> Result<Option<&'a str>> {
        match self.file.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.err(format!("`{key}` must be a string, found {v:?}"))),
        }
    }
}

/// Builds the [`ModelConfig`] of a GGUF file of architecture `llama` or `qwen2`.
///
/// Sizes come from `{arch}.*` keys; the vocabulary size from the `token_embd.weight`
/// rows (else the `tokenizer.ggml.tokens` length, else `{arch}.vocab_size`); tied
/// embeddings when there is no `output.weight`; QKV bias for `qwen2` or when
/// `blk.0.attn_q.bias` exists; EOS ids from `tokenizer.ggml.{eos,eot,eom}_token_id`.
/// Linear rope scaling is read from `{arch}.rope.scaling.*`; Llama-3 scaling from the
/// `rope_freqs.weight` factors llama.cpp's converter writes (checked to match the
/// Llama-3 formula). Anything else that changes the numerics is an error.
pub fn config_from_gguf(file: &GgufFile) -> Result<ModelConfig> {
    let ctx = file.name();
    let arch_name = match file.get("general.architecture") {
        Some(GgufValue::String(s)) => s.as_str(),
        Some(v) => {
            return Err(HassError::config(
                ctx,
                format!("`general.architecture` must be a string, found {v:?}"),
            ))
        }
        None => {
            return Err(HassError::config(
                ctx,
                "metadata key `general.architecture` is missing",
            ))
        }
    };
    let architecture = match arch_name {
        "llama" => Architecture::Llama,
        "qwen2" => Architecture::Qwen2,
        other => {
            return Err(HassError::config(
                ctx,
                format!("unsupported GGUF architecture `{other}` (supported: llama, qwen2)"),
            ))
        }
    };
    let m = Meta {
        file,
        arch: arch_name,
    };

    if m.opt_usize(&m.key("expert_count"))?.unwrap_or(0) > 0 {
        return Err(m.err("mixture-of-experts models are not supported"));
    }
    let hidden_size = m.usize(&m.key("embedding_length"))?;
    let intermediate_size = m.usize(&m.key("feed_forward_length"))?;
    let num_hidden_layers = m.usize(&m.key("block_count"))?;
    let num_attention_heads = m.usize(&m.key("attention.head_count"))?;
    let num_key_value_heads = m
        .opt_usize(&m.key("attention.head_count_kv"))?
        .unwrap_or(num_attention_heads);
    if num_attention_heads == 0 {
        return Err(m.err("attention.head_count must be positive"));
    }
    let head_dim = match m.opt_usize(&m.key("attention.key_length"))? {
        Some(d) => d,
        None => {
            if hidden_size % num_attention_heads != 0 {
                return Err(m.err(format!(
                    "embedding_length {hidden_size} is not a multiple of head_count {num_attention_heads} \
                     and attention.key_length is absent"
                )));
            }
            hidden_size / num_attention_heads
        }
    };
    if let Some(v) = m.opt_usize(&m.key("attention.value_length"))? {
        if v != head_dim {
            return Err(m.err(format!(
                "attention.value_length {v} != key_length {head_dim} is not supported"
            )));
        }
    }
    if let Some(r) = m.opt_usize(&m.key("rope.dimension_count"))? {
        if r != head_dim {
            return Err(m.err(format!(
                "rope.dimension_count {r} != head dim {head_dim}: partial rotary embeddings are not supported"
            )));
        }
    }
    let rms_norm_eps = m
        .opt_f64(&m.key("attention.layer_norm_rms_epsilon"))?
        .ok_or_else(|| {
            m.err(format!(
                "required metadata key `{}` is missing",
                m.key("attention.layer_norm_rms_epsilon")
            ))
        })?;
    let rope_theta = m.opt_f64(&m.key("rope.freq_base"))?.unwrap_or(10_000.0);
    let max_position_embeddings = m.usize(&m.key("context_length"))?;

    let mut rope_scaling = match m.opt_str(&m.key("rope.scaling.type"))? {
        None | Some("none") => None,
        Some("linear") => {
            let factor = m
                .opt_f64(&m.key("rope.scaling.factor"))?
                .ok_or_else(|| m.err("linear rope scaling without rope.scaling.factor"))?;
            if factor.is_nan() || factor <= 0.0 {
                return Err(m.err(format!("rope.scaling.factor {factor} must be positive")));
            }
            Some(RopeScaling::Linear { factor })
        }
        Some(other) => {
            return Err(m.err(format!(
                "unsupported rope scaling type `{other}` (supported: none, linear)"
            )))
        }
    };
    if let Some(info) = file.tensor_info("rope_freqs.weight") {
        if rope_scaling.is_some() {
            return Err(m.err("both rope.scaling.type and rope_freqs.weight are present"));
        }
        let factors = file.dequantize_info(info)?;
        let orig = m.opt_usize(&m.key("rope.scaling.original_context_length"))?;
        rope_scaling =
            llama3_from_factors(&factors, head_dim, rope_theta, orig).map_err(|e| m.err(e))?;
    }

    let vocab_size = match file.tensor_info("token_embd.weight") {
        Some(t) if t.dims.len() == 2 => t.dims[1] as usize,
        Some(t) => return Err(m.err(format!("token_embd.weight has dims {:?}, expected 2", t.dims))),
        None => match file.get("tokenizer.ggml.tokens") {
            Some(v) => v
                .as_array()
                .ok_or_else(|| m.err("`tokenizer.ggml.tokens` must be an array"))?
                .len(),
            None => m
                .opt_usize(&m.key("vocab_size"))?
                .ok_or_else(|| m.err("cannot tell the vocabulary size: no token_embd.weight, tokenizer.ggml.tokens or vocab_size"))?,
        },
    };

    let bos_token_id = m.opt_u32("tokenizer.ggml.bos_token_id")?;
    let mut eos_token_ids = Vec::new();
    for key in [
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
    ] {
        if let Some(id) = m.opt_u32(key)? {
            if !eos_token_ids.contains(&id) {
                eos_token_ids.push(id);
            }
        }
    }

    let cfg = ModelConfig {
        architecture,
        hidden_size,
        intermediate_size,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        rms_norm_eps,
        rope_theta,
        rope_scaling,
        max_position_embeddings,
        vocab_size,
        tie_word_embeddings: file.tensor_info("output.weight").is_none(),
        attention_bias: architecture == Architecture::Qwen2
            || file.tensor_info("blk.0.attn_q.bias").is_some(),
        bos_token_id,
        eos_token_ids,
    };
    cfg.validate(ctx)?;
    Ok(cfg)
}

/// Recognises the per-frequency divisors llama.cpp's converter stores in
/// `rope_freqs.weight` for `rope_type: llama3` (`LlamaModel.generate_extra_tensors`) and
/// returns the equivalent [`RopeScaling::Llama3`] (`None` when every factor is 1).
fn llama3_from_factors(
    factors: &[f32],
    head_dim: usize,
    theta: f64,
    orig_ctx: Option<usize>,
) -> std::result::Result<Option<RopeScaling>, String> {
    if factors.len() != head_dim / 2 {
        return Err(format!(
            "rope_freqs.weight has {} values, expected head_dim / 2 = {}",
            factors.len(),
            head_dim / 2
        ));
    }
    if factors.iter().all(|&f| f == 1.0) {
        return Ok(None);
    }
    let factor = factors.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
    let mut candidates = vec![];
    if let Some(o) = orig_ctx {
        candidates.push(o);
    }
    candidates.push(8192);
    for orig in candidates {
        let (low, high) = (1.0f64, 4.0f64);
        let low_wavelen = orig as f64 / low;
        let high_wavelen = orig as f64 / high;
        let ok = factors.iter().enumerate().all(|(i, &f)| {
            let freq = 1.0 / theta.powf((2 * i) as f64 / head_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let expect = if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (orig as f64 / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            };
            (f as f64 - expect).abs() <= 1e-3 * expect
        });
        if ok {
            return Ok(Some(RopeScaling::Llama3 {
                factor: format!("{}", factor as f32).parse().unwrap_or(factor),
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: orig,
            }));
        }
    }
    Err(
        "rope_freqs.weight holds per-frequency rope factors that do not match Llama-3 scaling \
         (low_freq_factor 1, high_freq_factor 4); such rope scaling is not supported"
            .into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The converter's rope_factors for the Llama-3.1 defaults.
    fn converter_factors(head_dim: usize, theta: f64, factor: f64, orig: f64) -> Vec<f32> {
        (0..head_dim / 2)
            .map(|i| {
                let freq = 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32);
                let wavelen = 2.0 * std::f64::consts::PI / freq as f64;
                let (low_w, high_w) = (orig / 1.0, orig / 4.0);
                (if wavelen < high_w {
                    1.0
                } else if wavelen > low_w {
                    factor
                } else {
                    let smooth = (orig / wavelen - 1.0) / 3.0;
                    1.0 / ((1.0 - smooth) / factor + smooth)
                }) as f32
            })
            .collect()
    }

    #[test]
    fn recognises_llama31_rope_factors() {
        let f = converter_factors(128, 500000.0, 8.0, 8192.0);
        let s = llama3_from_factors(&f, 128, 500000.0, None).unwrap();
        assert_eq!(
            s,
            Some(RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192
            })
        );
        let f32x = converter_factors(64, 500000.0, 32.0, 8192.0);
        assert!(matches!(
            llama3_from_factors(&f32x, 64, 500000.0, None).unwrap(),
            Some(RopeScaling::Llama3 { factor, .. }) if factor == 32.0
        ));
        assert_eq!(
            llama3_from_factors(&vec![1.0; 64], 128, 1e4, None).unwrap(),
            None
        );
        let mut bad = f.clone();
        bad[3] = 2.5;
        assert!(llama3_from_factors(&bad, 128, 500000.0, None).is_err());
        assert!(llama3_from_factors(&f[..10], 128, 500000.0, None).is_err());
    }

    #[test]
    fn decimal_widening() {
        assert_eq!(decimal_f64(&GgufValue::F32(1e-5)), Some(1e-5));
        assert_eq!(decimal_f64(&GgufValue::F32(1e-6)), Some(1e-6));
        assert_eq!(decimal_f64(&GgufValue::F32(100000.0)), Some(1e5));
        assert_eq!(decimal_f64(&GgufValue::F64(0.1)), Some(0.1));
        assert_eq!(decimal_f64(&GgufValue::U32(7)), Some(7.0));
        assert_eq!(decimal_f64(&GgufValue::Bool(true)), None);
    }
}
