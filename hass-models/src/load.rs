//! One entry point for "a model on disk": a Hugging Face directory or a GGUF file,
//! loaded with its tokenizer and chat template.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use hass_core::chat::ChatTemplate;
use hass_core::tokenizer::Tokenizer;
use hass_core::{HassError, Result};

use crate::backend::HassBackend;
use crate::gguf::GgufWeights;
use crate::gguf_tokenizer::{chat_template_from_gguf, tokenizer_from_gguf};
use crate::hf::read_hf_config;
use crate::llama::{Llama, WeightDtype};
use crate::safetensors_dir::SafetensorsDir;

/// A target model with what is needed to talk to it.
pub struct LoadedModel<B: Backend> {
    pub model: Llama<B>,
    pub tokenizer: Tokenizer,
    /// The model's own template, or a built-in one guessed from its special tokens.
    pub chat_template: ChatTemplate,
    pub path: PathBuf,
}

/// Loads `path`: a directory in HF layout, or a `.gguf` file (dequantised), keeping
/// the matrices in `dtype`.
pub fn load_model<B: HassBackend>(
    path: impl AsRef<Path>,
    device: &B::Device,
    dtype: WeightDtype,
) -> Result<LoadedModel<B>> {
    let path = path.as_ref();
    if path.is_dir() {
        let config = read_hf_config(path)?;
        let model = Llama::load_with_dtype(&SafetensorsDir::open(path)?, config, device, dtype)?;
        let tokenizer = Tokenizer::from_file(path.join("tokenizer.json"))?;
        let config = path.join("tokenizer_config.json");
        let template = if config.exists() {
            ChatTemplate::from_tokenizer_config(&config)?
        } else {
            None
        };
        let chat_template = template.unwrap_or_else(|| ChatTemplate::guess_builtin_for(&tokenizer));
        return Ok(LoadedModel {
            model,
            tokenizer,
            chat_template,
            path: path.to_path_buf(),
        });
    }
    if path.extension().is_some_and(|e| e == "gguf") {
        let weights = GgufWeights::open(path)?;
        let tokenizer = tokenizer_from_gguf(weights.file())?;
        let chat_template = match chat_template_from_gguf(weights.file()) {
            Some(src) => {
                let token = |key: &str| {
                    weights
                        .file()
                        .get_u32(key)
                        .ok()
                        .and_then(|id| tokenizer.id_to_token(id))
                };
                let bos = token("tokenizer.ggml.bos_token_id");
                let eos = token("tokenizer.ggml.eos_token_id");
                ChatTemplate::new(src, bos.as_deref(), eos.as_deref())?
            }
            None => ChatTemplate::guess_builtin_for(&tokenizer),
        };
        let config = weights.config().clone();
        let model = Llama::load_with_dtype(&weights, config, device, dtype)?;
        return Ok(LoadedModel {
            model,
            tokenizer,
            chat_template,
            path: path.to_path_buf(),
        });
    }
    Err(HassError::InvalidArgument(format!(
        "{}: expected a Hugging Face model directory or a .gguf file",
        path.display()
    )))
}
