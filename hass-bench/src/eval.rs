//! The speculative-decoding benchmark (spec §6): every question of a prompt set is
//! decoded by each method — vanilla first, then each draft head — through the target's
//! chat template, one method right after the other so that machine drift hits all of
//! them alike. MT-bench's second turn follows the method's own first answer.

use hass_models::HassBackend;
use std::time::Instant;

use hass_core::chat::ChatMessage;
use hass_core::sampling::SamplingParams;
use hass_core::tree::TreeParams;
use hass_core::Result;
use hass_infer::{GenerationConfig, Generator, SpeculativeGenerator, VanillaGenerator};
use hass_models::{DraftHead, LoadedModel};
use serde::Serialize;

use crate::prompts::Question;

/// The name vanilla decoding is reported under.
pub const VANILLA: &str = "vanilla";

/// A decoding method: vanilla, or a named draft head with its tree.
pub struct Method<'a, B: HassBackend> {
    pub name: String,
    pub head: Option<(&'a DraftHead<B>, TreeParams)>,
}

impl<'a, B: HassBackend> Method<'a, B> {
    pub fn vanilla() -> Self {
        Method {
            name: VANILLA.into(),
            head: None,
        }
    }

    fn generator(&self, target: &'a LoadedModel<B>) -> Result<Generator<'a, B>> {
        Ok(match self.head {
            None => VanillaGenerator::new(&target.model).into(),
            Some((head, tree)) => SpeculativeGenerator::builder(&target.model)
                .head(head)
                .tree(tree)
                .build()?
                .into(),
        })
    }
}

/// One turn of one question.
#[derive(Debug, Clone, Serialize)]
pub struct TurnResult {
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    /// Wall time of the whole turn, prefill included.
    pub wall_s: f64,
    /// Of it, the decode phase (after the prefill's first token): what the tree
    /// tuner predicts.
    pub decode_s: f64,
    /// Verification rounds and accepted draft tokens (0 for vanilla).
    pub rounds: usize,
    pub accepted: usize,
    pub draft_s: f64,
    pub verify_s: f64,
    pub other_s: f64,
    /// The answer, special tokens removed and trimmed (what turn 2 builds on).
    pub answer: String,
    #[serde(skip)]
    pub tokens: Vec<u32>,
}

/// All turns of one question decoded by one method at one temperature.
#[derive(Debug, Clone, Serialize)]
pub struct QuestionResult {
    pub set: String,
    pub question_id: u64,
    pub temperature: f32,
    pub method: String,
    pub turns: Vec<TurnResult>,
    /// At T = 0, whether every turn's tokens equal vanilla's (None for vanilla / T > 0).
    pub identical_to_vanilla: Option<bool>,
}

impl QuestionResult {
    pub fn new_tokens(&self) -> usize {
        self.turns.iter().map(|t| t.new_tokens).sum()
    }

    pub fn wall_s(&self) -> f64 {
        self.turns.iter().map(|t| t.wall_s).sum()
    }

    /// Spec §6.3's per-question speed: Σ new tokens / Σ wall time over the turns.
    pub fn tokens_per_s(&self) -> f64 {
        self.new_tokens() as f64 / self.wall_s().max(1e-12)
    }

    /// Decode tokens per second over the turns (each turn's first token, made by
    /// the prefill, and the prefill's time excluded).
    pub fn decode_tokens_per_s(&self) -> f64 {
        let tokens: usize = self
            .turns
            .iter()
            .map(|t| t.new_tokens.saturating_sub(1))
            .sum();
        let s: f64 = self.turns.iter().map(|t| t.decode_s).sum();
        tokens as f64 / s.max(1e-12)
    }

    pub fn rounds(&self) -> usize {
        self.turns.iter().map(|t| t.rounds).sum()
    }

    /// Spec §6.2's τ of one question: mean accepted draft tokens per round + 1,
    /// over the rounds of all turns.
    pub fn tau(&self) -> Option<f64> {
        let rounds = self.rounds();
        (rounds > 0).then(|| {
            1.0 + self.turns.iter().map(|t| t.accepted).sum::<usize>() as f64 / rounds as f64
        })
    }
}

/// Sampling of question `index` at `temperature`: a fixed seed per question, the
/// same for every method.
pub fn sampling(temperature: f32, seed: u64, index: usize) -> Result<SamplingParams> {
    SamplingParams::new(temperature, 0, 1.0, seed.wrapping_add(index as u64))
}

/// Decodes every turn of `q` with `method`.
pub fn run_question<'a, B: HassBackend>(
    target: &'a LoadedModel<B>,
    method: &Method<'a, B>,
    set: &str,
    q: &Question,
    sampling: SamplingParams,
    max_new_tokens: usize,
) -> Result<QuestionResult> {
    let mut generator = method.generator(target)?;
    let config = GenerationConfig {
        max_new_tokens,
        sampling,
        stop_tokens: Vec::new(),
    };
    let mut messages = Vec::new();
    let mut turns = Vec::new();
    for turn in &q.turns {
        messages.push(ChatMessage::user(turn));
        let text = target.chat_template.render(&messages, true)?;
        let prompt = target.tokenizer.encode(&text, false)?;
        let start = Instant::now();
        let out = generator.generate(&prompt, &config, |_| true)?;
        let wall_s = start.elapsed().as_secs_f64();
        let answer = target
            .tokenizer
            .decode(&out.tokens, true)?
            .trim()
            .to_string();
        let mut r = TurnResult {
            prompt_tokens: prompt.len(),
            new_tokens: out.tokens.len(),
            wall_s,
            decode_s: out.stats.decode_time.as_secs_f64(),
            rounds: 0,
            accepted: 0,
            draft_s: 0.0,
            verify_s: 0.0,
            other_s: 0.0,
            answer: answer.clone(),
            tokens: out.tokens,
        };
        if let Some(s) = generator.speculative_stats() {
            r.rounds = s.rounds;
            r.accepted = s.accepted_per_round.iter().sum();
            r.draft_s = s.draft_time.as_secs_f64();
            r.verify_s = s.verify_time.as_secs_f64();
            r.other_s = s.other_time.as_secs_f64();
        }
        turns.push(r);
        messages.push(ChatMessage::assistant(answer));
    }
    Ok(QuestionResult {
        set: set.to_string(),
        question_id: q.question_id,
        temperature: sampling.temperature,
        method: method.name.clone(),
        turns,
        identical_to_vanilla: None,
    })
}

/// Runs every method on `q` (the first method must be vanilla) and marks, at T = 0,
/// whether each speculative output equals vanilla's token for token.
pub fn run_methods<'a, B: HassBackend>(
    target: &'a LoadedModel<B>,
    methods: &[Method<'a, B>],
    set: &str,
    q: &Question,
    sampling: SamplingParams,
    max_new_tokens: usize,
) -> Result<Vec<QuestionResult>> {
    let mut out: Vec<QuestionResult> = Vec::with_capacity(methods.len());
    for method in methods {
        let mut r = run_question(target, method, set, q, sampling, max_new_tokens)?;
        if let (Some(vanilla), true) = (out.first(), sampling.temperature == 0.0) {
            if method.head.is_some() {
                let same = r
                    .turns
                    .iter()
                    .zip(&vanilla.turns)
                    .all(|(a, b)| a.tokens == b.tokens);
                r.identical_to_vanilla = Some(same);
            }
        }
        out.push(r);
    }
    Ok(out)
}
