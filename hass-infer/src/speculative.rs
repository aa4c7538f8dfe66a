//! Tree speculative decoding (EAGLE-2 / HASS, spec §4): a proposer drafts a token
//! tree, the target verifies all of it in one forward with a tree mask, the longest
//! acceptable path is committed by KV compaction, and the first rejected position is
//! replaced by a token drawn from the target. Greedy output equals plain decoding;
//! sampled output has exactly the target's distribution.

use hass_models::HassBackend;
use std::time::{Duration, Instant};

use burn::prelude::*;
use hass_core::acceptance::{greedy_accept, sample_accept};
use hass_core::sampling::{argmax, Sampler};
use hass_core::tree::TreeParams;
use hass_core::{HassError, Result};
use hass_models::{DraftHead, Llama, LogitRows};

use crate::generation::{GenerationConfig, GenerationOutput, GenerationStats, StopReason};
use crate::proposer::{host_f32, EagleProposer, OracleProposer, Proposer};
use crate::vanilla::{check_prompt, logits_row, stop_tokens};

/// Tree nodes a custom proposer is guaranteed room for (it gets more when the request
/// leaves it).
const CUSTOM_TREE_ROOM: usize = 64;

/// Per-request statistics of speculative decoding.
#[derive(Debug, Clone, Default)]
pub struct SpeculativeStats {
    /// Verification rounds (target tree forwards).
    pub rounds: usize,
    /// Draft tokens accepted in each round (excluding the root / bonus token).
    pub accepted_per_round: Vec<usize>,
    /// Time spent drafting trees (proposer).
    pub draft_time: Duration,
    /// Time spent in target tree forwards, logits included.
    pub verify_time: Duration,
    /// Acceptance, compaction and the proposer's commit step.
    pub other_time: Duration,
}

impl SpeculativeStats {
    /// Adds another request's rounds: totals over several requests.
    pub fn add(&mut self, other: &SpeculativeStats) {
        self.rounds += other.rounds;
        self.accepted_per_round
            .extend_from_slice(&other.accepted_per_round);
        self.draft_time += other.draft_time;
        self.verify_time += other.verify_time;
        self.other_time += other.other_time;
    }

    /// Mean tokens committed per round: mean accepted + 1 (spec §6.2's τ).
    pub fn tau(&self) -> f64 {
        if self.accepted_per_round.is_empty() {
            return 0.0;
        }
        1.0 + self.accepted_per_round.iter().sum::<usize>() as f64
            / self.accepted_per_round.len() as f64
    }
}

enum Drafter<'a, B: HassBackend> {
    Head(&'a DraftHead<B>, TreeParams),
    Oracle(usize),
    Custom(Box<dyn Proposer<B> + 'a>),
}

/// Builds a [`SpeculativeGenerator`].
pub struct SpeculativeGeneratorBuilder<'a, B: HassBackend> {
    target: &'a Llama<B>,
    drafter: Option<Drafter<'a, B>>,
    tree: TreeParams,
}

impl<'a, B: HassBackend> SpeculativeGeneratorBuilder<'a, B> {
    /// Drafts with an EAGLE/HASS head.
    pub fn head(mut self, head: &'a DraftHead<B>) -> Self {
        self.drafter = Some(Drafter::Head(head, self.tree));
        self
    }

    /// Tree shape for the head (default: EAGLE's 59 nodes, depth 5, top-k 10).
    pub fn tree(mut self, tree: TreeParams) -> Self {
        self.tree = tree;
        if let Some(Drafter::Head(h, _)) = self.drafter {
            self.drafter = Some(Drafter::Head(h, tree));
        }
        self
    }

    /// Drafts with the target itself ([`OracleProposer`]): for validation.
    pub fn oracle(mut self, depth: usize) -> Self {
        self.drafter = Some(Drafter::Oracle(depth));
        self
    }

    /// Drafts with any [`Proposer`].
    pub fn proposer(mut self, proposer: Box<dyn Proposer<B> + 'a>) -> Self {
        self.drafter = Some(Drafter::Custom(proposer));
        self
    }

    pub fn build(self) -> Result<SpeculativeGenerator<'a, B>> {
        self.tree.validate()?;
        let drafter = self.drafter.ok_or_else(|| {
            HassError::InvalidArgument("speculative decoding needs a draft head or proposer".into())
        })?;
        if let Drafter::Head(_, params) = &drafter {
            params.validate()?;
        }
        Ok(SpeculativeGenerator {
            target: self.target,
            drafter,
            last_stats: SpeculativeStats::default(),
        })
    }
}

/// Generates with a draft proposer and the target; see the module docs.
pub struct SpeculativeGenerator<'a, B: HassBackend> {
    target: &'a Llama<B>,
    drafter: Drafter<'a, B>,
    last_stats: SpeculativeStats,
}

impl<'a, B: HassBackend> SpeculativeGenerator<'a, B> {
    pub fn builder(target: &'a Llama<B>) -> SpeculativeGeneratorBuilder<'a, B> {
        SpeculativeGeneratorBuilder {
            target,
            drafter: None,
            tree: TreeParams::default(),
        }
    }

    /// Statistics of the last [`Self::generate`] call.
    pub fn speculative_stats(&self) -> &SpeculativeStats {
        &self.last_stats
    }

    /// Generates from `prompt`, calling `on_token` with every committed token in order
    /// (several per round); returning `false` stops generation.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        config: &GenerationConfig,
        mut on_token: impl FnMut(u32) -> bool,
    ) -> Result<GenerationOutput> {
        config.validate()?;
        let target = self.target;
        let context = check_prompt(target, prompt)?;
        let stop = stop_tokens(target, config);
        // Vanilla decoding stops once the cache is full: the same token count here.
        let limit = config.max_new_tokens.min(context - prompt.len() + 1);
        let mut sampler = Sampler::new(config.sampling);
        // Room for one full tree beyond the last committed token: the cache (and the
        // proposer's) is sized to the request, not to the model's whole context, since
        // every tree forward writes into it.
        let room = match &self.drafter {
            Drafter::Head(_, params) => params.total_tokens + 1,
            Drafter::Oracle(depth) => 2 * depth + 2,
            Drafter::Custom(_) => CUSTOM_TREE_ROOM,
        };
        let capacity = context.min(prompt.len() + limit + room);
        let (mut eagle, mut oracle);
        let proposer: &mut dyn Proposer<B> = match &mut self.drafter {
            Drafter::Head(head, params) => {
                eagle = EagleProposer::new(target, head, *params)?;
                &mut eagle
            }
            Drafter::Oracle(depth) => {
                oracle = OracleProposer::new(target, *depth)?;
                &mut oracle
            }
            Drafter::Custom(p) => p.as_mut(),
        };
        let mut spec = SpeculativeStats::default();
        let mut cache = target.new_cache(capacity);

        let start = Instant::now();
        let positions: Vec<usize> = (0..prompt.len()).collect();
        let out = target.forward(prompt, &positions, &mut cache, None, LogitRows::Last)?;
        let mut root = sampler.next_token(&logits_row(out.logits.expect("requested"))?);
        let prefill_time = start.elapsed();

        let start = Instant::now();
        let mut tokens = Vec::new();
        let emit = |tok: u32, tokens: &mut Vec<u32>, on_token: &mut dyn FnMut(u32) -> bool| {
            tokens.push(tok);
            if !on_token(tok) {
                Some(StopReason::Cancelled)
            } else if stop.contains(&tok) {
                Some(StopReason::Stop)
            } else if tokens.len() >= limit {
                Some(if tokens.len() >= config.max_new_tokens {
                    StopReason::MaxNewTokens
                } else {
                    StopReason::ContextLimit
                })
            } else {
                None
            }
        };
        let mut stop_reason = emit(root, &mut tokens, &mut on_token);
        if stop_reason.is_none() {
            proposer.start(prompt, out.features, root, capacity)?;
        }
        let vocab = target.config().vocab_size;
        while stop_reason.is_none() {
            let n = cache.len();
            let t0 = Instant::now();
            let tree = proposer.propose(root, cache.capacity() - n)?;
            let t1 = Instant::now();
            let positions: Vec<usize> = tree.depths().iter().map(|d| n + d).collect();
            let out = target.forward(
                tree.tokens(),
                &positions,
                &mut cache,
                Some(&tree.mask()),
                LogitRows::All,
            )?;
            let logits = host_f32(out.logits.expect("requested"))?;
            let t2 = Instant::now();
            let rows = |i: usize| &logits[i * vocab..(i + 1) * vocab];
            let accepted = if sampler.is_greedy() {
                let argmaxes: Vec<u32> = (0..tree.len()).map(|i| argmax(rows(i))).collect();
                greedy_accept(&tree, &argmaxes)?
            } else {
                let mut processor = sampler.processor_mut().clone();
                sample_accept(
                    &tree,
                    |i, out| processor.probs_into(rows(i), out),
                    sampler.rng_mut(),
                )?
            };
            let slots: Vec<usize> = accepted.path.iter().map(|&p| n + p).collect();
            cache.compact(&slots, n)?;
            spec.rounds += 1;
            spec.accepted_per_round.push(accepted.num_accepted());
            let committed: Vec<u32> = accepted.path.iter().map(|&p| tree.tokens()[p]).collect();
            for &tok in &committed[1..] {
                stop_reason = emit(tok, &mut tokens, &mut on_token);
                if stop_reason.is_some() {
                    break;
                }
            }
            if stop_reason.is_none() {
                root = accepted.bonus;
                stop_reason = emit(root, &mut tokens, &mut on_token);
            }
            if stop_reason.is_none() {
                let idx: Vec<i32> = accepted.path.iter().map(|&p| p as i32).collect();
                let len = idx.len();
                let idx =
                    Tensor::<B, 1, Int>::from_data(TensorData::new(idx, [len]), target.device());
                proposer.commit(&committed, out.features.select(0, idx), root)?;
            }
            spec.draft_time += t1 - t0;
            spec.verify_time += t2 - t1;
            spec.other_time += t2.elapsed();
        }
        let stats = GenerationStats {
            prompt_tokens: prompt.len(),
            generated_tokens: tokens.len(),
            prefill_time,
            decode_time: start.elapsed(),
        };
        self.last_stats = spec;
        Ok(GenerationOutput {
            tokens,
            stop_reason: stop_reason.expect("loop ends with a reason"),
            stats,
        })
    }
}
