//! Plain autoregressive decoding through the KV cache: the reference every
//! speculative result is compared with, token for token.

use hass_models::HassBackend;
use std::time::Instant;

use burn::prelude::*;
use hass_core::sampling::Sampler;
use hass_core::{HassError, Result};
use hass_models::{Llama, LogitRows};

use crate::generation::{GenerationConfig, GenerationOutput, GenerationStats, StopReason};

/// Copies a `[1, vocab]` logits tensor to the host.
pub(crate) fn logits_row<B: HassBackend>(logits: Tensor<B, 2>) -> Result<Vec<f32>> {
    logits
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| HassError::InvalidArgument(format!("reading logits: {e:?}")))
}

/// Decodes one token per target forward.
pub struct VanillaGenerator<'a, B: HassBackend> {
    target: &'a Llama<B>,
}

impl<'a, B: HassBackend> VanillaGenerator<'a, B> {
    pub fn new(target: &'a Llama<B>) -> Self {
        VanillaGenerator { target }
    }

    /// Generates from `prompt`, calling `on_token` with each new token as soon as it is
    /// chosen; returning `false` from it stops generation.
    pub fn generate(
        &self,
        prompt: &[u32],
        config: &GenerationConfig,
        mut on_token: impl FnMut(u32) -> bool,
    ) -> Result<GenerationOutput> {
        config.validate()?;
        let context = check_prompt(self.target, prompt)?;
        let stop = stop_tokens(self.target, config);
        let mut sampler = Sampler::new(config.sampling);
        let capacity = context.min(prompt.len() + config.max_new_tokens);
        let mut cache = self.target.new_cache(capacity);

        let start = Instant::now();
        let positions: Vec<usize> = (0..prompt.len()).collect();
        let out = self
            .target
            .forward(prompt, &positions, &mut cache, None, LogitRows::Last)?;
        let mut token = sampler.next_token(&logits_row(out.logits.expect("requested"))?);
        let prefill_time = start.elapsed();

        let start = Instant::now();
        let mut tokens = Vec::new();
        let stop_reason = loop {
            tokens.push(token);
            if !on_token(token) {
                break StopReason::Cancelled;
            }
            if stop.contains(&token) {
                break StopReason::Stop;
            }
            if tokens.len() >= config.max_new_tokens {
                break StopReason::MaxNewTokens;
            }
            if cache.len() >= cache.capacity() {
                break StopReason::ContextLimit;
            }
            let pos = cache.len();
            let out = self
                .target
                .forward(&[token], &[pos], &mut cache, None, LogitRows::Last)?;
            token = sampler.next_token(&logits_row(out.logits.expect("requested"))?);
        };
        let stats = GenerationStats {
            prompt_tokens: prompt.len(),
            generated_tokens: tokens.len(),
            prefill_time,
            decode_time: start.elapsed(),
        };
        Ok(GenerationOutput {
            tokens,
            stop_reason,
            stats,
        })
    }
}

/// Errors on an empty prompt or one that leaves no room in the context; returns the
/// context length.
pub(crate) fn check_prompt<B: HassBackend>(target: &Llama<B>, prompt: &[u32]) -> Result<usize> {
    let context = target.config().max_position_embeddings;
    if prompt.is_empty() {
        return Err(HassError::InvalidArgument("empty prompt".into()));
    }
    if prompt.len() >= context {
        return Err(HassError::PromptTooLong {
            prompt: prompt.len(),
            context,
        });
    }
    Ok(context)
}

/// The request's stop tokens, or the model's EOS ids when it names none.
pub(crate) fn stop_tokens<B: HassBackend>(
    target: &Llama<B>,
    config: &GenerationConfig,
) -> Vec<u32> {
    if config.stop_tokens.is_empty() {
        target.config().eos_token_ids.clone()
    } else {
        config.stop_tokens.clone()
    }
}
