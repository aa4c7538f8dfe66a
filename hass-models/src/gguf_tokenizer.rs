//! Tokenizers built from GGUF metadata (being written).
use crate::gguf::GgufFile;
use hass_core::tokenizer::Tokenizer;
use hass_core::{HassError, Result};
pub fn tokenizer_from_gguf(_file: &GgufFile) -> Result<Tokenizer> {
    Err(HassError::Tokenizer("not yet".into()))
}
pub fn chat_template_from_gguf(_file: &GgufFile) -> Option<String> {
    None
}
