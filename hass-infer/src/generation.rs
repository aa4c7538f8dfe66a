//! What every generator shares: the request (`GenerationConfig`), the result
//! (`GenerationOutput`), why it stopped, and timing statistics.

use std::time::Duration;

use hass_core::sampling::SamplingParams;
use hass_core::{HassError, Result};

/// A generation request.
#[derive(Debug, Clone)]
pub struct GenerationConfig {
    /// Upper bound on generated tokens (the stop token counts).
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Tokens that end generation; they are kept as the last generated token. Empty
    /// means the model's EOS ids.
    pub stop_tokens: Vec<u32>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        GenerationConfig {
            max_new_tokens: 128,
            sampling: SamplingParams::greedy(),
            stop_tokens: Vec::new(),
        }
    }
}

impl GenerationConfig {
    pub fn validate(&self) -> Result<()> {
        self.sampling.validate()?;
        if self.max_new_tokens == 0 {
            return Err(HassError::InvalidArgument(
                "max_new_tokens must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// A stop token was generated.
    Stop,
    MaxNewTokens,
    /// The KV cache / context window is full.
    ContextLimit,
    /// The token callback asked to stop.
    Cancelled,
}

/// Timing and counts of one request.
#[derive(Debug, Clone, Default)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    /// Prompt forward plus the choice of the first token.
    pub prefill_time: Duration,
    /// Everything after the first token.
    pub decode_time: Duration,
}

impl GenerationStats {
    pub fn prefill_tokens_per_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_time.as_secs_f64().max(1e-12)
    }

    /// Tokens after the first one, over the time after the first one.
    pub fn decode_tokens_per_s(&self) -> f64 {
        self.generated_tokens.saturating_sub(1) as f64 / self.decode_time.as_secs_f64().max(1e-12)
    }

    pub fn total_time(&self) -> Duration {
        self.prefill_time + self.decode_time
    }
}

/// The generated tokens (prompt excluded) and how the request went.
#[derive(Debug, Clone)]
pub struct GenerationOutput {
    pub tokens: Vec<u32>,
    pub stop_reason: StopReason,
    pub stats: GenerationStats,
}
