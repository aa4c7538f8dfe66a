//! Lossless text generation with hass: tree speculative decoding (EAGLE-2 drafting
//! with EAGLE/HASS draft heads) and plain vanilla decoding behind the same request and
//! output types, so switching is one flag.
//!
//! ```no_run
//! use hass_core::tree::TreeParams;
//! use hass_infer::{GenerationConfig, Generator, SpeculativeGenerator, VanillaGenerator};
//! use hass_models::{default_device, load_model, DefaultBackend, DraftHead, WeightDtype};
//!
//! # fn main() -> hass_core::Result<()> {
//! let device = default_device();
//! let target = load_model::<DefaultBackend>("SmolLM2-135M-Instruct.Q4_1.gguf", &device, WeightDtype::F32)?;
//! let head = DraftHead::load("heads/hass-smollm2", &target.model)?;
//! let prompt = target.tokenizer.encode("The capital of France is", false)?;
//! let config = GenerationConfig { max_new_tokens: 64, ..Default::default() };
//!
//! let mut speculative = SpeculativeGenerator::builder(&target.model)
//!     .head(&head)
//!     .tree(TreeParams::new(15, 4, 4)?)
//!     .build()?;
//! let out = speculative.generate(&prompt, &config, |_token| true)?;
//! println!("{} (τ = {:.2})", target.tokenizer.decode(&out.tokens, true)?, speculative.speculative_stats().tau());
//!
//! // The same request, decoded one token per target forward: identical output at T = 0.
//! // `Generator` holds either decoder behind one `generate`.
//! let use_draft = false;
//! let mut generator: Generator<_> = if use_draft {
//!     speculative.into()
//! } else {
//!     VanillaGenerator::new(&target.model).into()
//! };
//! let plain = generator.generate(&prompt, &config, |_token| true)?;
//! assert_eq!(plain.tokens, out.tokens);
//! # Ok(())
//! # }
//! ```
//!
//! Greedy speculative output equals vanilla output token for token; sampled output
//! follows the target's distribution exactly (multi-candidate acceptance with
//! renormalised residuals, spec §4.6).

pub mod generation;
pub mod generator;
pub mod proposer;
pub mod speculative;
pub mod tuning;
pub mod vanilla;

pub use generation::{GenerationConfig, GenerationOutput, GenerationStats, StopReason};
pub use generator::Generator;
pub use proposer::{
    draft_step, head_top_k, top_k_log_probs, EagleProposer, OracleProposer, Proposer,
};
pub use speculative::{SpeculativeGenerator, SpeculativeGeneratorBuilder, SpeculativeStats};
pub use vanilla::VanillaGenerator;
