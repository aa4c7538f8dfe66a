//! Loading a Hugging Face model directory (`config.json`, safetensors weights and
//! the optional `generation_config.json`, whose EOS ids take precedence).

use std::path::Path;

use hass_core::{HassError, ModelConfig, Result};

use crate::backend::HassBackend;
use crate::llama::Llama;
use crate::safetensors_dir::SafetensorsDir;

/// Reads `config.json` and merges the EOS ids of `generation_config.json` if present.
pub fn read_hf_config(dir: &Path) -> Result<ModelConfig> {
    let mut config = ModelConfig::from_hf_file(dir.join("config.json"))?;
    let gen = dir.join("generation_config.json");
    if gen.exists() {
        let text = std::fs::read_to_string(&gen).map_err(|e| HassError::io(&gen, e))?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| HassError::Json {
            path: gen.clone(),
            source: e,
        })?;
        let ids: Vec<u32> = match json.get("eos_token_id") {
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_u64())
                .map(|v| v as u32)
                .collect(),
            Some(v) => v.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
            None => vec![],
        };
        for id in ids {
            if !config.eos_token_ids.contains(&id) {
                config.eos_token_ids.push(id);
            }
        }
    }
    Ok(config)
}

/// Loads the model in the HF directory `dir` onto `device`.
pub fn load_hf_model<B: HassBackend>(
    dir: impl AsRef<Path>,
    device: &B::Device,
) -> Result<Llama<B>> {
    let dir = dir.as_ref();
    let config = read_hf_config(dir)?;
    let weights = SafetensorsDir::open(dir)?;
    Llama::load(&weights, config, device)
}
