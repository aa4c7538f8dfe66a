//! Backend-free pieces of hass: errors, model configuration, sampling parameters,
//! draft trees and acceptance rules, tokenizer and chat templates.

pub mod acceptance;
pub mod chat;
pub mod config;
pub mod error;
pub mod sampling;
pub mod tokenizer;
pub mod tokenizer_builders;
pub mod tree;

pub use acceptance::{
    greedy_accept, sample_accept, sample_accept_with, AcceptCoin, Accepted, RngCoin,
};
pub use chat::{ChatMessage, ChatTemplate};
pub use config::{ModelConfig, RopeScaling};
pub use error::{HassError, Result};
pub use sampling::{
    argmax, sample_from, softmax_in_place, LogitsProcessor, Sampler, SamplingParams,
};
pub use tokenizer::{TokenStream, Tokenizer};
pub use tree::{DraftTree, TreeBuilder, TreeParams};
