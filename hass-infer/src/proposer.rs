//! Proposers: what drafts a token tree for the target to verify (the proposer /
//! verifier split). [`EagleProposer`] runs an EAGLE/HASS draft head with EAGLE-2's
//! dynamic tree; [`OracleProposer`] asks the target itself, which makes every draft
//! right and so checks the tree, mask and cache bookkeeping end to end.

use burn::prelude::*;
use hass_core::tree::{DraftTree, TreeBuilder, TreeParams};
use hass_core::{HassError, Result};
use hass_models::HassBackend;
use hass_models::{DraftHead, KvCache, Llama, LogitRows};

/// Drafts trees for the verifier and learns what was committed.
pub trait Proposer<B: HassBackend> {
    /// Called once after the target's prefill: the prompt, its target features
    /// `[prompt, hidden]`, the first root (the token chosen from the prefill) and the
    /// capacity of the target's cache (positions the request can reach), so that the
    /// proposer sizes its own caches to the request rather than to the model's context.
    fn start(
        &mut self,
        prompt: &[u32],
        features: Tensor<B, 2>,
        root: u32,
        capacity: usize,
    ) -> Result<()>;

    /// A tree rooted at `root` (node 0) of at most `max_nodes` nodes (≥ 1).
    fn propose(&mut self, root: u32, max_nodes: usize) -> Result<DraftTree>;

    /// After verification: `committed` (the root and the accepted tokens, now in the
    /// target's cache), their target features `[committed, hidden]`, and the next root.
    fn commit(&mut self, committed: &[u32], features: Tensor<B, 2>, next_root: u32) -> Result<()>;
}

pub(crate) fn host_f32<B: HassBackend, const D: usize>(t: Tensor<B, D>) -> Result<Vec<f32>> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| HassError::InvalidArgument(format!("reading a tensor: {e:?}")))
}

/// Top-`k` tokens and log-probabilities of each row of `logits` (`[rows, vocab]`),
/// row-major `[rows · k]`. On the host: one pass per row, no sort of the vocabulary
/// and no `[rows, vocab]` log-softmax tensor.
pub fn top_k_log_probs<B: HassBackend>(
    logits: Tensor<B, 2>,
    k: usize,
) -> Result<(Vec<u32>, Vec<f32>)> {
    let [rows, vocab] = logits.dims();
    if k > vocab {
        return Err(HassError::InvalidArgument(format!(
            "top-{k} of a {vocab}-token distribution"
        )));
    }
    let data = host_f32(logits)?;
    let (mut ids, mut lps) = (Vec::with_capacity(rows * k), Vec::with_capacity(rows * k));
    for row in data.chunks_exact(vocab.max(1)).take(rows) {
        let (i, l) = hass_core::sampling::top_k_log_probs(row, k);
        ids.extend(i);
        lps.extend(l);
    }
    Ok((ids, lps))
}

/// The head's top-`k` next tokens (target ids) and draft log-probabilities for each
/// row of its outputs `x` (`[rows, H]`), row-major `[rows · k]`: over the target's
/// vocabulary, or over the head's reduced one, mapped back through `d2t`.
pub fn head_top_k<B: HassBackend>(
    target: &Llama<B>,
    head: &DraftHead<B>,
    x: Tensor<B, 2>,
    k: usize,
) -> Result<(Vec<u32>, Vec<f32>)> {
    let (mut tokens, log_probs) = top_k_log_probs(head.logits(target, x), k)?;
    for t in &mut tokens {
        *t = head.target_id(*t);
    }
    Ok((tokens, log_probs))
}

/// One depth step of EAGLE-2 growth (spec §4.3): the frontier's parent rows of `prev`
/// (the head's previous output), the head's forward at the frontier's shared position
/// `context + offset` under the frontier's ancestor mask, the LM head, top-k, and the
/// builder's expansion. Returns the head output `[top_k, hidden]`.
pub fn draft_step<B: HassBackend>(
    target: &Llama<B>,
    head: &DraftHead<B>,
    builder: &mut TreeBuilder,
    prev: Tensor<B, 2>,
    cache: &mut KvCache<B>,
    context: usize,
) -> Result<Tensor<B, 2>> {
    let k = builder.params().top_k;
    let rows: Vec<i32> = builder
        .frontier_parent_rows()
        .iter()
        .map(|&r| r as i32)
        .collect();
    let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(rows, [k]), target.device());
    let hidden = prev.select(0, idx);
    let positions = vec![context + builder.position_offset(); k];
    let out = head.forward(
        target,
        hidden,
        builder.frontier_tokens(),
        &positions,
        cache,
        Some(builder.frontier_mask()),
    )?;
    debug_assert_eq!(out.dims(), [k, target.config().hidden_size]);
    let (tokens, log_probs) = head_top_k(target, head, out.clone(), k)?;
    builder.expand(&tokens, &log_probs)?;
    Ok(out)
}

/// EAGLE-2 drafting with a draft head (spec §4.3): the head's KV cache holds the
/// "stable" rows built from target features; tree rows are discarded each round.
pub struct EagleProposer<'a, B: HassBackend> {
    target: &'a Llama<B>,
    head: &'a DraftHead<B>,
    params: TreeParams,
    cache: Option<KvCache<B>>,
    /// Head output of the last committed row, `[1, hidden]`: f̂ at the root's position.
    last_hidden: Option<Tensor<B, 2>>,
    /// Level-1 candidates after the pending root: tokens and log-probs.
    level1: (Vec<u32>, Vec<f32>),
}

impl<'a, B: HassBackend> EagleProposer<'a, B> {
    pub fn new(target: &'a Llama<B>, head: &'a DraftHead<B>, params: TreeParams) -> Result<Self> {
        params.validate()?;
        if params.top_k > head.output_size() {
            return Err(HassError::InvalidArgument(format!(
                "top_k {} exceeds the draft vocabulary of {}",
                params.top_k,
                head.output_size()
            )));
        }
        Ok(EagleProposer {
            target,
            head,
            params,
            cache: None,
            last_hidden: None,
            level1: (vec![], vec![]),
        })
    }

    /// Runs the head on committed pairs (features `f_t`, tokens `x_{t+1}`) and prepares
    /// the level-1 candidates of the next tree from the last row.
    fn extend(&mut self, features: Tensor<B, 2>, tokens: &[u32]) -> Result<()> {
        let cache = self.cache.as_mut().expect("started");
        let n = cache.len();
        let positions: Vec<usize> = (n..n + tokens.len()).collect();
        let out = self
            .head
            .forward(self.target, features, tokens, &positions, cache, None)?;
        let [t, h] = out.dims();
        let last = out.slice([t - 1..t, 0..h]);
        self.level1 = head_top_k(self.target, self.head, last.clone(), self.params.top_k)?;
        self.last_hidden = Some(last);
        Ok(())
    }
}

impl<B: HassBackend> Proposer<B> for EagleProposer<'_, B> {
    fn start(
        &mut self,
        prompt: &[u32],
        features: Tensor<B, 2>,
        root: u32,
        capacity: usize,
    ) -> Result<()> {
        let tree_rows = self.params.depth * self.params.top_k;
        self.cache = Some(self.head.new_cache(capacity + tree_rows));
        let mut shifted = prompt[1..].to_vec();
        shifted.push(root);
        self.extend(features, &shifted)
    }

    fn propose(&mut self, root: u32, max_nodes: usize) -> Result<DraftTree> {
        let cache_len = self.cache.as_ref().map(|c| c.len()).ok_or_else(|| {
            HassError::InvalidArgument("EagleProposer::propose before start".into())
        })?;
        if max_nodes <= 1 {
            return DraftTree::from_parents(vec![root], vec![None]);
        }
        let mut params = self.params;
        params.total_tokens = params.total_tokens.min(max_nodes - 1);
        let (tok1, lp1) = &self.level1;
        let mut builder = TreeBuilder::new(params, root, tok1, lp1)?;
        let mut out = self.last_hidden.clone().expect("started");
        let cache = self.cache.as_mut().expect("started");
        while !builder.is_done() {
            out = draft_step(self.target, self.head, &mut builder, out, cache, cache_len)?;
        }
        // Tree rows never become context: only target features of accepted tokens do.
        cache.truncate(cache_len);
        Ok(builder.finish())
    }

    fn commit(&mut self, committed: &[u32], features: Tensor<B, 2>, next_root: u32) -> Result<()> {
        let mut shifted = committed[1..].to_vec();
        shifted.push(next_root);
        self.extend(features, &shifted)
    }
}

/// Proposes what the target itself would generate: a chain of its greedy tokens of
/// length `depth`, each chain node also carrying the target's second choice as a
/// leaf (so sampling exercises multi-candidate rejection). With greedy decoding every
/// chain token is accepted, so τ = depth + 1 every round: a check that tree
/// positions, masks and KV compaction are right. Costs `depth + 1` extra target
/// forwards per round: a validation tool, not a speedup.
pub struct OracleProposer<'a, B: HassBackend> {
    target: &'a Llama<B>,
    depth: usize,
    cache: Option<KvCache<B>>,
}

impl<'a, B: HassBackend> OracleProposer<'a, B> {
    pub fn new(target: &'a Llama<B>, depth: usize) -> Result<Self> {
        if depth == 0 {
            return Err(HassError::InvalidArgument(
                "oracle depth must be at least 1".into(),
            ));
        }
        Ok(OracleProposer {
            target,
            depth,
            cache: None,
        })
    }
}

impl<B: HassBackend> Proposer<B> for OracleProposer<'_, B> {
    fn start(
        &mut self,
        prompt: &[u32],
        _features: Tensor<B, 2>,
        _root: u32,
        capacity: usize,
    ) -> Result<()> {
        let mut cache = self.target.new_cache(capacity + self.depth + 1);
        let positions: Vec<usize> = (0..prompt.len()).collect();
        self.target
            .forward(prompt, &positions, &mut cache, None, LogitRows::None)?;
        self.cache = Some(cache);
        Ok(())
    }

    fn propose(&mut self, root: u32, max_nodes: usize) -> Result<DraftTree> {
        let cache = self.cache.as_mut().ok_or_else(|| {
            HassError::InvalidArgument("OracleProposer::propose before start".into())
        })?;
        let n = cache.len();
        let (mut tokens, mut parents) = (vec![root], vec![None]);
        let mut tip = 0;
        for _ in 0..self.depth {
            if tokens.len() + 2 > max_nodes {
                break;
            }
            let pos = cache.len();
            let logits = self
                .target
                .forward(&[tokens[tip]], &[pos], cache, None, LogitRows::Last)?
                .logits
                .expect("requested");
            let (top, _) = top_k_log_probs(logits, 2)?;
            tokens.extend([top[0], top[1]]);
            parents.extend([Some(tip), Some(tip)]);
            tip = tokens.len() - 2;
        }
        cache.truncate(n);
        DraftTree::from_parents(tokens, parents)
    }

    fn commit(
        &mut self,
        committed: &[u32],
        _features: Tensor<B, 2>,
        _next_root: u32,
    ) -> Result<()> {
        let cache = self.cache.as_mut().expect("started");
        let n = cache.len();
        let positions: Vec<usize> = (n..n + committed.len()).collect();
        self.target
            .forward(committed, &positions, cache, None, LogitRows::None)?;
        Ok(())
    }
}
