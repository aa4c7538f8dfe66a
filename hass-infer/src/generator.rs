//! One type for both decoders, so that an application switches between plain and
//! speculative decoding with a single flag and keeps the rest of its code.

use hass_core::Result;
use hass_models::HassBackend;

use crate::generation::{GenerationConfig, GenerationOutput};
use crate::speculative::{SpeculativeGenerator, SpeculativeStats};
use crate::vanilla::VanillaGenerator;

/// Vanilla or speculative decoding behind one `generate`.
pub enum Generator<'a, B: HassBackend> {
    Vanilla(VanillaGenerator<'a, B>),
    Speculative(SpeculativeGenerator<'a, B>),
}

impl<'a, B: HassBackend> Generator<'a, B> {
    /// See [`VanillaGenerator::generate`] and [`SpeculativeGenerator::generate`].
    pub fn generate(
        &mut self,
        prompt: &[u32],
        config: &GenerationConfig,
        on_token: impl FnMut(u32) -> bool,
    ) -> Result<GenerationOutput> {
        match self {
            Generator::Vanilla(g) => g.generate(prompt, config, on_token),
            Generator::Speculative(g) => g.generate(prompt, config, on_token),
        }
    }

    /// Round statistics of the last request, for speculative decoding.
    pub fn speculative_stats(&self) -> Option<&SpeculativeStats> {
        match self {
            Generator::Vanilla(_) => None,
            Generator::Speculative(g) => Some(g.speculative_stats()),
        }
    }
}

impl<'a, B: HassBackend> From<VanillaGenerator<'a, B>> for Generator<'a, B> {
    fn from(g: VanillaGenerator<'a, B>) -> Self {
        Generator::Vanilla(g)
    }
}

impl<'a, B: HassBackend> From<SpeculativeGenerator<'a, B>> for Generator<'a, B> {
    fn from(g: SpeculativeGenerator<'a, B>) -> Self {
        Generator::Speculative(g)
    }
}
