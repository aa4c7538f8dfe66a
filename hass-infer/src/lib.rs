//! Text generation with hass: plain (vanilla) decoding today; tree-based speculative
//! decoding with HASS/EAGLE draft heads builds on the same request and output types.

pub mod generation;
pub mod vanilla;

pub use generation::{GenerationConfig, GenerationOutput, GenerationStats, StopReason};
pub use vanilla::VanillaGenerator;
