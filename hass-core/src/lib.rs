//! Backend-free pieces of hass: errors, model configuration, sampling parameters,
//! tokenizer and chat templates.

pub mod chat;
pub mod config;
pub mod error;
pub mod sampling;
pub mod tokenizer;
pub mod tokenizer_builders;

pub use chat::{ChatMessage, ChatTemplate};
pub use config::{ModelConfig, RopeScaling};
pub use error::{HassError, Result};
pub use sampling::{
    argmax, sample_from, softmax_in_place, LogitsProcessor, Sampler, SamplingParams,
};
pub use tokenizer::{TokenStream, Tokenizer};
