//! Text generation with hass: plain (vanilla) decoding today; tree-based speculative
//! decoding with HASS/EAGLE draft heads builds on the same request and output types.

pub mod generation;
pub mod proposer;
pub mod speculative;
pub mod vanilla;

pub use generation::{GenerationConfig, GenerationOutput, GenerationStats, StopReason};
pub use proposer::{EagleProposer, OracleProposer, Proposer};
pub use speculative::{SpeculativeGenerator, SpeculativeGeneratorBuilder, SpeculativeStats};
pub use vanilla::VanillaGenerator;
