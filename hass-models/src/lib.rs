//! Burn modules for hass, generic over `B: Backend`: the LLaMA-family target, its KV
//! cache and weight loading (HF safetensors and GGUF).

pub mod assets;
mod attention;
pub mod backend;
pub mod draft;
pub mod draft_vocab;
mod exp;
pub mod gguf;
pub mod gguf_tokenizer;
pub mod hf;
mod host_ops;
pub mod kv_cache;
mod large_m;
mod layer;
pub mod linear;
pub mod llama;
pub mod load;
pub mod loader;
pub mod quant;
pub mod safetensors_dir;
pub mod small_m;
mod spin_pool;
#[cfg(test)]
mod test_rng;
pub mod weights;

pub use backend::{default_device, DefaultBackend, HassBackend};
pub use draft::{DraftHead, HeadDtype, SaveOptions};
pub use draft_vocab::DraftVocab;
pub use hf::load_hf_model;
pub use kv_cache::KvCache;
pub use linear::Linear;
pub use llama::{ForwardOutput, Llama, LogitRows, WeightDtype};
pub use load::{load_model, LoadedModel};
pub use quant::{QMatrix, QType};
pub use safetensors_dir::SafetensorsDir;
pub use weights::{MemoryWeights, WeightSource};
