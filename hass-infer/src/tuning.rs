//! Choosing the draft tree from measured costs.
//!
//! The best tree depends on the machine, the target and the head: on a GPU verifying
//! 60 tokens costs about one decode step, on a 2-core CPU 16 tokens cost several. So
//! the tree is picked from measurements instead of a fixed default:
//!
//! - [`CostProfile`]: the target's forward time for `M` new tokens (the verify-cost
//!   curve), one draft depth step per frontier width `k`, and the rest of a round
//!   (acceptance, KV compaction, the head's commit forward), timed on real rounds.
//! - [`AcceptanceStats`]: on calibration text the target generated, how often the
//!   target's next token is the head's rank-`r` candidate at tree level `ℓ`, given
//!   that the levels above were in the tree (the head fed its own features, as when
//!   drafting).
//!
//! [`Tuning::rank`] scores every tree of a grid by expected tokens per second,
//! `E[τ] / round time`, with `E[τ] = 1 + Σ_nodes P(node accepted)` for the tree
//! EAGLE-2 would grow if the head's probabilities were these rates (per-level rank
//! rates multiplied along the path; the best `top_k` nodes of each level expanded, the
//! best `total_tokens` kept). It is a model, so [`measure`] calibrates it: the tree it
//! ranks first is run end to end on the calibration prompts next to plain decoding
//! ([`Validation`]), and the measured round time and decode step replace the modelled
//! ones. `auto` ([`TreeSpec::resolve`]) then decodes plainly unless the best tree is
//! predicted at least [`MIN_GAIN`] faster than vanilla: speculation must never make a
//! user's decoding slower.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use burn::tensor::Tensor;
use hass_core::chat::ChatMessage;
use hass_core::tree::{TreeBuilder, TreeParams};
use hass_core::{HassError, Result};
use hass_models::{DraftHead, HassBackend, Llama, LoadedModel, LogitRows, WeightDtype};
use serde::{Deserialize, Serialize};

use crate::generation::GenerationConfig;
use crate::generator::Generator;
use crate::proposer::{draft_step, head_top_k};
use crate::speculative::{SpeculativeGenerator, SpeculativeStats};
use crate::vanilla::VanillaGenerator;

/// Measured costs of the pieces of a speculative round, in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CostProfile {
    /// `(M, ms)`: a target forward of `M` new tokens, logits of every row, on a cache
    /// of `context` tokens; ascending `M`, starting at 1.
    pub verify_ms: Vec<(usize, f64)>,
    /// `(k, ms)`: one draft depth step with a frontier of `k` rows (head forward, LM
    /// head, top-k, tree expansion); ascending `k`.
    pub draft_step_ms: Vec<(usize, f64)>,
    /// Everything else per round: acceptance, KV compaction, the head's forward over
    /// the committed tokens and its level-1 top-k.
    pub other_ms: f64,
    /// Cache length the curves were measured at.
    pub context: usize,
    /// A plain decode step end to end (forward, logits to the host, sampling),
    /// measured on the calibration prompts: what vanilla decoding really costs per
    /// token, where `verify(1)` times the forward alone.
    #[serde(default)]
    pub vanilla_step_ms: Option<f64>,
    /// Measured over modelled time of a speculative round, from the end-to-end run of
    /// the best tree ([`Validation`]): every round is scaled by it, so the predictions
    /// for this machine agree with what decoding measured (1 before that run).
    #[serde(default = "unit_scale")]
    pub round_scale: f64,
}

fn unit_scale() -> f64 {
    1.0
}

/// Piecewise-linear through `points` (ascending x), extended linearly past both ends.
fn interpolate(points: &[(usize, f64)], x: usize) -> f64 {
    match points {
        [] => f64::NAN,
        [(_, y)] => *y,
        _ => {
            let i = points
                .windows(2)
                .position(|w| x <= w[1].0)
                .unwrap_or(points.len() - 2);
            let ((x0, y0), (x1, y1)) = (points[i], points[i + 1]);
            y0 + (y1 - y0) * (x as f64 - x0 as f64) / (x1 as f64 - x0 as f64)
        }
    }
}

impl CostProfile {
    /// A target forward of `m` new tokens.
    pub fn verify(&self, m: usize) -> f64 {
        interpolate(&self.verify_ms, m)
    }

    /// One draft depth step over `k` rows.
    pub fn draft_step(&self, k: usize) -> f64 {
        interpolate(&self.draft_step_ms, k)
    }

    /// A speculative round with tree `p`: `depth` draft steps, the verification of
    /// the root and `total_tokens` nodes, and the rest, times the calibration.
    pub fn round_ms(&self, p: &TreeParams) -> f64 {
        self.round_scale
            * (p.depth as f64 * self.draft_step(p.top_k)
                + self.verify(p.total_tokens + 1)
                + self.other_ms)
    }

    /// A vanilla decode step (one new token): measured end to end when it was, else
    /// the one-token forward.
    pub fn vanilla_ms(&self) -> f64 {
        self.vanilla_step_ms.unwrap_or_else(|| self.verify(1))
    }
}

/// How often the target's token is the head's rank-`r` candidate, per tree level.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AcceptanceStats {
    /// `counts[ℓ][r]`: starts where the target's token at tree level `ℓ + 1` was the
    /// head's rank-`r` candidate (0-based), all levels above being in the head's top
    /// `max_k`.
    pub counts: Vec<Vec<u64>>,
    /// `totals[ℓ]`: starts whose levels above `ℓ + 1` were all in the top `max_k`.
    pub totals: Vec<u64>,
}

impl AcceptanceStats {
    fn new(levels: usize, max_k: usize) -> Self {
        AcceptanceStats {
            counts: vec![vec![0; max_k]; levels],
            totals: vec![0; levels],
        }
    }

    /// Tree levels measured (a tree of depth `d` needs `d + 1`).
    pub fn levels(&self) -> usize {
        self.totals.len()
    }

    /// Candidates per level measured.
    pub fn max_k(&self) -> usize {
        self.counts.first().map_or(0, Vec::len)
    }

    /// P(the target's token at `level` (1-based) is the rank-`rank` candidate | the
    /// levels above were); 0 where nothing was measured.
    pub fn rate(&self, level: usize, rank: usize) -> f64 {
        let total = self.totals[level - 1];
        if total == 0 {
            return 0.0;
        }
        self.counts[level - 1][rank] as f64 / total as f64
    }

    /// Expected tokens accepted per round (τ − 1) for tree `p` (see the module docs).
    /// `p` must fit the measurement: `depth + 1 ≤ levels()`, `top_k ≤ max_k()`.
    pub fn expected_accepted(&self, p: &TreeParams) -> f64 {
        assert!(p.depth < self.levels() && p.top_k <= self.max_k());
        let k = p.top_k;
        let mut values: Vec<f64> = (0..k).map(|r| self.rate(1, r)).collect();
        let mut frontier = values.clone();
        for level in 2..=p.depth + 1 {
            let mut children: Vec<f64> = frontier
                .iter()
                .flat_map(|&v| (0..k).map(move |r| (v, r)))
                .map(|(v, r)| v * self.rate(level, r))
                .collect();
            values.extend_from_slice(&children);
            children.sort_by(|a, b| b.total_cmp(a));
            children.truncate(k);
            frontier = children;
        }
        values.sort_by(|a, b| b.total_cmp(a));
        values.iter().take(p.total_tokens).sum()
    }
}

/// The trees [`Tuning::rank`] considers.
#[derive(Debug, Clone, PartialEq)]
pub struct TuneGrid {
    pub totals: Vec<usize>,
    pub depths: Vec<usize>,
    pub top_ks: Vec<usize>,
}

impl Default for TuneGrid {
    fn default() -> Self {
        TuneGrid {
            totals: vec![1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 48, 63],
            depths: vec![0, 1, 2, 3, 4, 5],
            top_ks: vec![1, 2, 3, 4, 6, 8],
        }
    }
}

/// One scored tree.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TreeChoice {
    pub params: TreeParams,
    /// Predicted tokens per round (τ).
    pub expected_tau: f64,
    /// Predicted round time.
    pub round_ms: f64,
    /// `expected_tau / round_ms`, per second.
    pub tokens_per_s: f64,
}

/// The best-ranked tree run end to end on the calibration prompts, interleaved with
/// plain decoding (decode tokens per second, prefill excluded: it is the same forward
/// for both): what calibrates the cost model on this machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Validation {
    pub tree: TreeParams,
    /// The model's prediction before calibration.
    pub predicted_tokens_per_s: f64,
    pub measured_tokens_per_s: f64,
    pub predicted_tau: f64,
    pub measured_tau: f64,
    /// Plain decoding as the one-token forward alone predicts it, and as measured.
    pub vanilla_forward_tokens_per_s: f64,
    pub vanilla_measured_tokens_per_s: f64,
}

/// A cost profile and acceptance statistics: what the tree is chosen from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tuning {
    pub costs: CostProfile,
    pub acceptance: AcceptanceStats,
    /// The end-to-end check of the best tree of the default grid, when measured.
    #[serde(default)]
    pub validation: Option<Validation>,
}

impl Tuning {
    /// Every valid tree of `grid` that the measurements cover, best predicted
    /// throughput first (ties: the smaller tree).
    pub fn rank(&self, grid: &TuneGrid) -> Vec<TreeChoice> {
        let max_m = self.costs.verify_ms.last().map_or(1, |p| p.0);
        let mut out = Vec::new();
        for &t in &grid.totals {
            for &d in &grid.depths {
                for &k in &grid.top_ks {
                    let Ok(p) = TreeParams::new(t, d, k) else {
                        continue;
                    };
                    if d + 1 > self.acceptance.levels()
                        || k > self.acceptance.max_k()
                        || t + 1 > max_m
                    {
                        continue;
                    }
                    let tau = 1.0 + self.acceptance.expected_accepted(&p);
                    let ms = self.costs.round_ms(&p);
                    out.push(TreeChoice {
                        params: p,
                        expected_tau: tau,
                        round_ms: ms,
                        tokens_per_s: tau / ms * 1e3,
                    });
                }
            }
        }
        out.sort_by(|a, b| {
            b.tokens_per_s.total_cmp(&a.tokens_per_s).then(
                (a.params.total_tokens, a.params.depth, a.params.top_k).cmp(&(
                    b.params.total_tokens,
                    b.params.depth,
                    b.params.top_k,
                )),
            )
        });
        out
    }

    /// The best tree of `grid`.
    pub fn best(&self, grid: &TuneGrid) -> Result<TreeChoice> {
        self.rank(grid).into_iter().next().ok_or_else(|| {
            HassError::InvalidArgument("no tree of the grid fits the tuning measurements".into())
        })
    }

    /// Vanilla decoding's predicted tokens per second (one token per step).
    pub fn vanilla_tokens_per_s(&self) -> f64 {
        1e3 / self.costs.vanilla_ms()
    }

    /// The `auto` decision from this tuning (read from or written to `path`).
    pub fn auto_tree(&self, path: PathBuf, measured: bool) -> Result<AutoTree> {
        let choice = self.best(&TuneGrid::default())?;
        Ok(AutoTree {
            speculate: self.speculation_pays(&choice),
            choice,
            vanilla_tokens_per_s: self.vanilla_tokens_per_s(),
            validation: self.validation.clone(),
            path,
            measured,
        })
    }

    /// Whether speculating with `choice` is predicted to beat plain decoding by at
    /// least [`MIN_GAIN`] (after calibration, for the validated tree this is what its
    /// run measured).
    pub fn speculation_pays(&self, choice: &TreeChoice) -> bool {
        choice.tokens_per_s >= self.vanilla_tokens_per_s() * (1.0 + MIN_GAIN)
    }

    /// Reads a tuning written by [`Tuning::save`].
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| HassError::io(path, e))?;
        let t: Tuning = serde_json::from_str(&text).map_err(|e| HassError::Json {
            path: path.to_path_buf(),
            source: e,
        })?;
        let ok = !t.costs.verify_ms.is_empty()
            && !t.costs.draft_step_ms.is_empty()
            && t.acceptance.levels() > 0
            && t.acceptance.max_k() > 0
            && t.acceptance
                .counts
                .iter()
                .all(|c| c.len() == t.acceptance.max_k());
        if !ok {
            return Err(HassError::malformed(
                path.display(),
                "tuning file with empty or ragged measurements",
            ));
        }
        Ok(t)
    }

    /// Writes the tuning as JSON (atomically).
    pub fn save(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| HassError::io(dir, e))?;
        }
        let tmp = path.with_extension("tmp");
        let text = serde_json::to_string_pretty(self).expect("serialisable");
        std::fs::write(&tmp, text).map_err(|e| HassError::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| HassError::io(path, e))
    }
}

/// What [`measure`] runs.
#[derive(Debug, Clone)]
pub struct TuneOptions {
    /// Calibration prompts (token ids, chat template applied); the target continues
    /// each greedily for `gen_tokens`.
    pub prompts: Vec<Vec<u32>>,
    pub gen_tokens: usize,
    /// Tree levels to measure acceptance for (trees up to depth `levels − 1`).
    pub levels: usize,
    /// Candidates per level to rank (the largest `top_k` considered).
    pub max_k: usize,
    /// `M` of the verify-cost curve (must include 1).
    pub verify_sizes: Vec<usize>,
    /// Timed repetitions per point (median; one extra warm-up).
    pub repeats: usize,
}

impl Default for TuneOptions {
    fn default() -> Self {
        TuneOptions {
            prompts: Vec::new(),
            gen_tokens: 64,
            levels: 6,
            max_k: 8,
            verify_sizes: vec![1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 48, 64],
            repeats: 3,
        }
    }
}

fn median_ms(mut f: impl FnMut() -> Result<()>, repeats: usize) -> Result<f64> {
    f()?; // warm-up
    let mut times: Vec<Duration> = Vec::with_capacity(repeats);
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed());
    }
    times.sort();
    Ok(times[times.len() / 2].as_secs_f64() * 1e3)
}

/// `n` deterministic token ids spread over a `vocab`-token vocabulary: timings do not
/// depend on the ids, so benchmarks feed these.
pub fn synthetic_tokens(n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + 13) % vocab) as u32).collect()
}

/// The verify-cost curve: median milliseconds of a target forward of `m` new tokens
/// (logits of every row) on a cache holding `context`, for each `m` of `sizes`. The
/// sizes take turns, one forward each per round, so that a machine's drift (other
/// load, clock changes) falls on every size alike and the ratios between them hold.
pub fn verify_curve<B: HassBackend>(
    target: &Llama<B>,
    context: &[u32],
    sizes: &[usize],
    repeats: usize,
) -> Result<Vec<(usize, f64)>> {
    let n = context.len();
    let max_m = sizes.iter().copied().max().unwrap_or(1);
    let mut cache = target.new_cache(n + max_m);
    let positions: Vec<usize> = (0..n).collect();
    target.forward(context, &positions, &mut cache, None, LogitRows::None)?;
    let vocab = target.config().vocab_size;
    let mut forward = |m: usize| -> Result<Duration> {
        let tokens = synthetic_tokens(m, vocab);
        let pos: Vec<usize> = (n..n + m).collect();
        let t = Instant::now();
        let o = target.forward(&tokens, &pos, &mut cache, None, LogitRows::All)?;
        // Force the result (backends compute lazily or asynchronously).
        let _ = o.logits.expect("requested").into_data();
        let took = t.elapsed();
        cache.truncate(n);
        Ok(took)
    };
    let mut times = vec![Vec::with_capacity(repeats); sizes.len()];
    // One warm-up round, then the measured ones.
    for round in 0..=repeats.max(1) {
        for (&m, times) in sizes.iter().zip(&mut times) {
            let took = forward(m)?;
            if round > 0 {
                times.push(took);
            }
        }
    }
    Ok(sizes
        .iter()
        .zip(times)
        .map(|(&m, mut t)| {
            t.sort();
            (m, t[t.len() / 2].as_secs_f64() * 1e3)
        })
        .collect())
}

/// Measures a [`Tuning`] for `target` with `head` on this machine (tens of seconds
/// for SmolLM2 on 2 CPU cores; cache the result).
pub fn measure<B: HassBackend>(
    target: &Llama<B>,
    head: &DraftHead<B>,
    opts: &TuneOptions,
) -> Result<Tuning> {
    if opts.prompts.is_empty() || opts.prompts.iter().any(|p| p.is_empty()) {
        return Err(HassError::InvalidArgument(
            "tuning needs at least one non-empty calibration prompt".into(),
        ));
    }
    if opts.levels == 0
        || opts.max_k == 0
        || opts.max_k > head.output_size()
        || opts.gen_tokens == 0
    {
        return Err(HassError::InvalidArgument(format!(
            "tuning levels {}, max_k {} (draft vocabulary {}) and gen_tokens {} must be >= 1",
            opts.levels,
            opts.max_k,
            head.output_size(),
            opts.gen_tokens
        )));
    }
    if opts.verify_sizes.first() != Some(&1) || opts.verify_sizes.windows(2).any(|w| w[0] >= w[1]) {
        return Err(HassError::InvalidArgument(
            "verify sizes must be ascending and start at 1".into(),
        ));
    }
    // Calibration text, and the rest-of-round cost on real rounds (T = 0, so the
    // output is the target's own greedy continuation).
    let cfg = GenerationConfig {
        max_new_tokens: opts.gen_tokens,
        stop_tokens: vec![u32::MAX],
        ..Default::default()
    };
    let speculative = |tree| -> Result<Generator<'_, B>> {
        Ok(SpeculativeGenerator::builder(target)
            .head(head)
            .tree(tree)
            .build()?
            .into())
    };
    let cheapest = decode_all(
        &mut speculative(TreeParams::new(1, 0, 1)?)?,
        &opts.prompts,
        &cfg,
    )?;
    let sequences: Vec<(usize, Vec<u32>)> = opts
        .prompts
        .iter()
        .zip(&cheapest.outputs)
        .map(|(prompt, out)| (prompt.len(), [prompt.as_slice(), out].concat()))
        .collect();
    let mut acceptance = AcceptanceStats::new(opts.levels, opts.max_k);
    let mut first_features = None;
    for (start, seq) in &sequences {
        let positions: Vec<usize> = (0..seq.len()).collect();
        let features = target
            .forward(
                seq,
                &positions,
                &mut target.new_cache(seq.len()),
                None,
                LogitRows::None,
            )?
            .features;
        rank_continuations(
            target,
            head,
            seq,
            features.clone(),
            *start,
            opts.max_k,
            &mut acceptance,
        )?;
        first_features.get_or_insert(features);
    }

    // Verify curve and draft steps on the first calibration sequence as context.
    let seq = &sequences[0].1;
    let n = seq.len();
    let verify_ms = verify_curve(target, seq, &opts.verify_sizes, opts.repeats)?;
    let positions: Vec<usize> = (0..n).collect();
    let features = first_features.expect("at least one prompt");
    let mut dcache = head.new_cache(n + 2 * opts.max_k);
    let out = head.forward(
        target,
        features.slice([0..n - 1, 0..target.config().hidden_size]),
        &seq[1..],
        &positions[..n - 1],
        &mut dcache,
        None,
    )?;
    let h = target.config().hidden_size;
    let last = out.slice([n - 2..n - 1, 0..h]);
    let ctx = dcache.len();
    let mut draft_step_ms = Vec::new();
    for k in [1, 2, 3, 4, 6, 8, 12, 16]
        .into_iter()
        .filter(|&k| k <= opts.max_k)
    {
        let (tok1, lp1) = head_top_k(target, head, last.clone(), k)?;
        let builder = TreeBuilder::new(TreeParams::new(k, 1, k)?, seq[n - 1], &tok1, &lp1)?;
        let ms = median_ms(
            || {
                let mut b = builder.clone();
                let o = draft_step(target, head, &mut b, last.clone(), &mut dcache, ctx)?;
                let _ = o.into_data();
                dcache.truncate(ctx);
                Ok(())
            },
            opts.repeats,
        )?;
        draft_step_ms.push((k, ms));
    }
    let mut tuning = Tuning {
        costs: CostProfile {
            verify_ms,
            draft_step_ms,
            other_ms: cheapest.rounds.other_time.as_secs_f64() * 1e3
                / cheapest.rounds.rounds.max(1) as f64,
            context: n,
            vanilla_step_ms: None,
            round_scale: 1.0,
        },
        acceptance,
        validation: None,
    };
    // The model's first choice and plain decoding, run end to end, interleaved prompt
    // by prompt so that a change in the machine's load hits both alike.
    let best = tuning.best(&TuneGrid::default())?;
    let mut vanilla: Generator<'_, B> = VanillaGenerator::new(target).into();
    let mut spec = speculative(best.params)?;
    let (mut v, mut s) = (Decoded::default(), Decoded::default());
    for prompt in &opts.prompts {
        v.add(&mut vanilla, prompt, &cfg)?;
        s.add(&mut spec, prompt, &cfg)?;
    }
    if v.tokens > 0 && s.rounds.rounds > 0 {
        tuning.costs.vanilla_step_ms = Some(1e3 / v.tokens_per_s());
        tuning.costs.round_scale = s.ms_per_round() / best.round_ms;
        tuning.validation = Some(Validation {
            tree: best.params,
            predicted_tokens_per_s: best.tokens_per_s,
            measured_tokens_per_s: s.tokens_per_s(),
            predicted_tau: best.expected_tau,
            measured_tau: s.rounds.tau(),
            vanilla_forward_tokens_per_s: 1e3 / tuning.costs.verify(1),
            vanilla_measured_tokens_per_s: v.tokens_per_s(),
        });
    }
    Ok(tuning)
}

/// Decode-phase totals of requests (each request's first token excluded: its
/// prefill makes it).
#[derive(Default)]
struct Decoded {
    outputs: Vec<Vec<u32>>,
    tokens: usize,
    time: Duration,
    /// The speculative rounds of all requests (none for plain decoding).
    rounds: SpeculativeStats,
}

impl Decoded {
    /// Decodes `prompt` with `gen` under `cfg` and adds it up.
    fn add<B: HassBackend>(
        &mut self,
        gen: &mut Generator<'_, B>,
        prompt: &[u32],
        cfg: &GenerationConfig,
    ) -> Result<()> {
        let out = gen.generate(prompt, cfg, |_| true)?;
        self.tokens += out.stats.generated_tokens.saturating_sub(1);
        self.time += out.stats.decode_time;
        if let Some(st) = gen.speculative_stats() {
            self.rounds.add(st);
        }
        self.outputs.push(out.tokens);
        Ok(())
    }

    fn tokens_per_s(&self) -> f64 {
        self.tokens as f64 / self.time.as_secs_f64().max(1e-9)
    }

    fn ms_per_round(&self) -> f64 {
        self.time.as_secs_f64() * 1e3 / self.rounds.rounds.max(1) as f64
    }
}

/// Decodes every prompt with `gen` under `cfg`.
fn decode_all<B: HassBackend>(
    gen: &mut Generator<'_, B>,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
) -> Result<Decoded> {
    let mut d = Decoded::default();
    for prompt in prompts {
        d.add(gen, prompt, cfg)?;
    }
    Ok(d)
}

/// Calibration requests of [`cached_tuning`]: explanation, story, arithmetic and code
/// (not benchmark questions).
pub const CALIBRATION_PROMPTS: [&str; 4] = [
    "Explain how a refrigerator keeps food cold, in simple terms.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Tom has 3 boxes with 12 apples each. He gives away 15 apples. How many are left? \
     Explain step by step.",
    "Write a Python function that returns the n-th Fibonacci number, with a docstring.",
];

/// Revision of what a cached [`Tuning`] holds (2: the end-to-end vanilla step and
/// [`Validation`]); part of its key, so older files are measured again.
const TUNING_FORMAT: u32 = 2;

/// Size and modification time of `path` (what identifies a weight file in the key).
fn file_stamp(path: &Path) -> String {
    match std::fs::metadata(path) {
        Ok(m) => {
            let mtime = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs());
            format!("{}:{}:{mtime}", path.display(), m.len())
        }
        Err(_) => path.display().to_string(),
    }
}

/// What a tuning depends on besides the weights: CPU model and usable threads.
fn machine_stamp() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("{cpu}:{threads}")
}

/// The tuning of `loaded` with the head in `head_dir` (weights in `dtype`) on this
/// machine: read from `cache_dir/<key>.json`, or measured with
/// [`CALIBRATION_PROMPTS`] through the model's chat template and written there. The
/// key covers the target and head files (path, size, mtime), the dtype, the backend
/// and its [`COST_REVISION`](hass_models::backend::COST_REVISION), the tuning format,
/// the CPU model and thread count. Returns the tuning, its file, and whether it was measured now.
pub fn cached_tuning<B: HassBackend>(
    loaded: &LoadedModel<B>,
    head: &DraftHead<B>,
    head_dir: &Path,
    dtype: WeightDtype,
    cache_dir: &Path,
) -> Result<(Tuning, PathBuf, bool)> {
    let key = [
        file_stamp(&loaded.path),
        file_stamp(&head_dir.join("model.safetensors")),
        format!("{dtype:?}"),
        std::any::type_name::<B>().to_string(),
        format!(
            "costs r{} tuning v{TUNING_FORMAT}",
            hass_models::backend::COST_REVISION
        ),
        machine_stamp(),
    ]
    .join("|");
    let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    let path = cache_dir.join(format!("{hash:016x}.json"));
    if let Ok(t) = Tuning::load(&path) {
        return Ok((t, path, false));
    }
    let prompts = CALIBRATION_PROMPTS
        .iter()
        .map(|q| {
            let text = loaded
                .chat_template
                .render(&[ChatMessage::user(*q)], true)?;
            loaded.tokenizer.encode(&text, false)
        })
        .collect::<Result<Vec<_>>>()?;
    let opts = TuneOptions {
        prompts,
        max_k: TuneOptions::default().max_k.min(head.output_size()),
        ..Default::default()
    };
    let t = measure(&loaded.model, head, &opts)?;
    t.save(&path)?;
    Ok((t, path, true))
}

/// A tree as users give it: `auto` (chosen by [`cached_tuning`]) or
/// `total_tokens,depth,top_k`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TreeSpec {
    Auto,
    Fixed(TreeParams),
}

impl FromStr for TreeSpec {
    type Err = HassError;

    fn from_str(s: &str) -> Result<Self> {
        if s.trim().eq_ignore_ascii_case("auto") {
            return Ok(TreeSpec::Auto);
        }
        let parts: Vec<usize> = s
            .split(',')
            .map(|p| p.trim().parse::<usize>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| {
                HassError::InvalidArgument(format!(
                    "tree `{s}`: expected `auto` or total_tokens,depth,top_k"
                ))
            })?;
        match parts[..] {
            [t, d, k] => Ok(TreeSpec::Fixed(TreeParams::new(t, d, k)?)),
            _ => Err(HassError::InvalidArgument(format!(
                "tree `{s}`: expected `auto` or total_tokens,depth,top_k"
            ))),
        }
    }
}

/// The predicted gain below which `auto` decodes plainly: the calibration run times a
/// few prompts, and its speeds move by several percent between runs on a shared
/// machine, so a tree predicted 2% faster may well be slower for the user (SmolLM2's
/// head on a fast CPU engine: predicted 1.03x, measured 0.85x on a short answer).
pub const MIN_GAIN: f64 = 0.05;

/// How [`TreeSpec::resolve`] chose an `auto` tree.
#[derive(Debug, Clone, Serialize)]
pub struct AutoTree {
    /// The best tree of the default grid.
    pub choice: TreeChoice,
    pub vanilla_tokens_per_s: f64,
    /// Whether to speculate with it: predicted at least [`MIN_GAIN`] faster than
    /// vanilla by the calibrated model ([`Tuning::speculation_pays`]); else decode
    /// plainly.
    pub speculate: bool,
    /// That tree run end to end on the calibration prompts.
    pub validation: Option<Validation>,
    /// The cached tuning file.
    pub path: PathBuf,
    /// Measured by this call (else read from the cache).
    pub measured: bool,
}

impl std::fmt::Display for AutoTree {
    /// One line for the logs: the decision, the tree, predicted and measured speeds,
    /// the cache file.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = &self.choice.params;
        if self.speculate {
            write!(f, "tree auto = ")?;
        } else {
            write!(
                f,
                "tree auto: decoding plainly, speculation would not be {:.0}% faster; best \
                 tree ",
                MIN_GAIN * 100.0
            )?;
        }
        write!(
            f,
            "total_tokens {}, depth {}, top_k {}: predicted τ {:.2}, {:.1} vs vanilla {:.1} \
             tokens/s",
            p.total_tokens,
            p.depth,
            p.top_k,
            self.choice.expected_tau,
            self.choice.tokens_per_s,
            self.vanilla_tokens_per_s,
        )?;
        if let Some(v) = self.validation.as_ref().filter(|v| v.tree == *p) {
            write!(
                f,
                "; measured on calibration prompts τ {:.2}, {:.1} vs vanilla {:.1} tokens/s \
                 (uncalibrated model: {:.1} vs {:.1})",
                v.measured_tau,
                v.measured_tokens_per_s,
                v.vanilla_measured_tokens_per_s,
                v.predicted_tokens_per_s,
                v.vanilla_forward_tokens_per_s
            )?;
        }
        write!(
            f,
            " ({} {})",
            if self.measured {
                "measured now, cached in"
            } else {
                "from"
            },
            self.path.display()
        )
    }
}

/// A resolved [`TreeSpec`]: the tree, and for `auto` how it was chosen.
#[derive(Debug, Clone, Serialize)]
pub struct ResolvedTree {
    /// The fixed tree, or the best of `auto`'s grid.
    pub tree: TreeParams,
    pub auto: Option<AutoTree>,
}

impl ResolvedTree {
    /// The tree to speculate with, or `None` where `auto` found that plain decoding
    /// is faster on this machine ([`AutoTree::speculate`]): decode plainly then.
    pub fn speculative_tree(&self) -> Option<TreeParams> {
        match &self.auto {
            Some(a) if !a.speculate => None,
            _ => Some(self.tree),
        }
    }

    /// The decoder this resolution asks for: speculative with `head` on the tree, or
    /// plain where `auto` found that faster.
    pub fn generator<'a, B: HassBackend>(
        &self,
        target: &'a Llama<B>,
        head: &'a DraftHead<B>,
    ) -> Result<Generator<'a, B>> {
        Ok(match self.speculative_tree() {
            Some(tree) => SpeculativeGenerator::builder(target)
                .head(head)
                .tree(tree)
                .build()?
                .into(),
            None => VanillaGenerator::new(target).into(),
        })
    }
}

impl TreeSpec {
    /// The tree to decode with `head` (in `head_dir`): the fixed one, or the best of
    /// the default grid by the tuning cached under `$HASS_CACHE/tuning/`.
    pub fn resolve<B: HassBackend>(
        &self,
        loaded: &LoadedModel<B>,
        head: &DraftHead<B>,
        head_dir: &Path,
        dtype: WeightDtype,
    ) -> Result<ResolvedTree> {
        match self {
            TreeSpec::Fixed(p) => Ok(ResolvedTree {
                tree: *p,
                auto: None,
            }),
            TreeSpec::Auto => {
                let dir = hass_models::assets::cache_dir().join("tuning");
                let (t, path, measured) = cached_tuning(loaded, head, head_dir, dtype, &dir)?;
                let auto = t.auto_tree(path, measured)?;
                Ok(ResolvedTree {
                    tree: auto.choice.params,
                    auto: Some(auto),
                })
            }
        }
    }
}

/// Adds to `stats` the head's ranks of the target's tokens `seq[start + 1..]`, given
/// the target's `features` of `seq`: for each root `seq[p]` (`p ≥ start`), level 1
/// from the head's row over true features, deeper levels feeding the head its own
/// outputs with the true tokens, as drafting an accepted path does.
fn rank_continuations<B: HassBackend>(
    target: &Llama<B>,
    head: &DraftHead<B>,
    seq: &[u32],
    features: Tensor<B, 2>,
    start: usize,
    max_k: usize,
    stats: &mut AcceptanceStats,
) -> Result<()> {
    let n = seq.len();
    if start < 1 || start + 1 >= n {
        return Ok(());
    }
    let h = target.config().hidden_size;
    let levels = stats.levels();
    let positions: Vec<usize> = (0..n).collect();
    let feature = |t: usize| features.clone().slice([t..t + 1, 0..h]);
    let mut cache = head.new_cache(n + levels);
    // Stable rows 0..start: row t pairs f_t with x_{t+1}.
    let out = head.forward(
        target,
        features.clone().slice([0..start, 0..h]),
        &seq[1..start + 1],
        &positions[..start],
        &mut cache,
        None,
    )?;
    let mut prev_stable = out.slice([start - 1..start, 0..h]);
    for p in start..n - 1 {
        let mut prev = prev_stable.clone();
        for level in 1..=levels {
            let at = p + level; // the token this level should predict
            if at >= n {
                break;
            }
            if level > 1 {
                prev = head.forward(
                    target,
                    prev,
                    &[seq[at - 1]],
                    &[p + level - 2],
                    &mut cache,
                    None,
                )?;
            }
            let (top, _) = head_top_k(target, head, prev.clone(), max_k)?;
            stats.totals[level - 1] += 1;
            match top.iter().position(|&t| t == seq[at]) {
                Some(r) => stats.counts[level - 1][r] += 1,
                None => break,
            }
        }
        cache.truncate(p);
        if p + 2 < n {
            prev_stable =
                head.forward(target, feature(p), &[seq[p + 1]], &[p], &mut cache, None)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(rates: &[&[u64]]) -> AcceptanceStats {
        AcceptanceStats {
            counts: rates.iter().map(|r| r.to_vec()).collect(),
            totals: vec![100; rates.len()],
        }
    }

    #[test]
    fn tree_specs_parse() {
        assert_eq!("auto".parse::<TreeSpec>().unwrap(), TreeSpec::Auto);
        assert_eq!(
            "4, 1,2".parse::<TreeSpec>().unwrap(),
            TreeSpec::Fixed(TreeParams::new(4, 1, 2).unwrap())
        );
        for bad in ["", "1,2", "1,2,3,4", "a,b,c", "0,1,1"] {
            assert!(bad.parse::<TreeSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn interpolation_is_linear_and_extends() {
        let pts = [(1, 10.0), (2, 12.0), (4, 20.0)];
        assert_eq!(interpolate(&pts, 1), 10.0);
        assert_eq!(interpolate(&pts, 3), 16.0);
        assert_eq!(interpolate(&pts, 6), 28.0);
        assert_eq!(interpolate(&[(1, 5.0)], 9), 5.0);
    }

    #[test]
    fn expected_accepted_by_hand() {
        // Level 1: ranks 0/1 accepted 50% / 20%; level 2: 40% / 10%.
        let s = stats(&[&[50, 20], &[40, 10]]);
        let p = |t, d, k| TreeParams::new(t, d, k).unwrap();
        assert!((s.expected_accepted(&p(1, 0, 1)) - 0.5).abs() < 1e-12);
        assert!((s.expected_accepted(&p(2, 0, 2)) - 0.7).abs() < 1e-12);
        // Chain of 2: 0.5 + 0.5·0.4.
        assert!((s.expected_accepted(&p(2, 1, 1)) - 0.7).abs() < 1e-12);
        // k = 2, depth 1: candidates 0.5, 0.2, 0.2, 0.05, 0.08, 0.02; best 3.
        assert!((s.expected_accepted(&p(3, 1, 2)) - 0.9).abs() < 1e-12);
        assert!((s.expected_accepted(&p(6, 1, 2)) - 1.05).abs() < 1e-12);
    }

    /// Verify costs up to 8 new tokens, draft steps up to 2 rows, a head right 60% of
    /// the time at level 1: (1, 0, 1) predicts τ 1.6 in 22 + 2 ms, 66.7 tokens/s against
    /// vanilla's 50.
    fn tuning() -> Tuning {
        Tuning {
            costs: CostProfile {
                verify_ms: vec![(1, 20.0), (2, 22.0), (4, 30.0), (8, 60.0)],
                draft_step_ms: vec![(1, 3.0), (2, 4.0)],
                other_ms: 2.0,
                context: 100,
                vanilla_step_ms: None,
                round_scale: 1.0,
            },
            acceptance: stats(&[&[60, 20], &[50, 10]]),
            validation: None,
        }
    }

    #[test]
    fn rank_prefers_throughput_and_respects_the_measurements() {
        let t = tuning();
        let ranked = t.rank(&TuneGrid::default());
        assert!(ranked
            .iter()
            .all(|c| c.params.depth <= 1 && c.params.top_k <= 2 && c.params.total_tokens < 8));
        assert!(ranked
            .windows(2)
            .all(|w| w[0].tokens_per_s >= w[1].tokens_per_s));
        let best = &ranked[0];
        // (1, 0, 1): τ 1.6 in 22 + 2 ms = 66.7/s beats e.g. the 2-chain: τ 1.9 in
        // 3 + 26 + 2 ms.
        assert_eq!(best.params, TreeParams::new(1, 0, 1).unwrap());
        assert!((best.tokens_per_s - 1.6 / 24.0 * 1e3).abs() < 1e-9);
        assert!((t.vanilla_tokens_per_s() - 50.0).abs() < 1e-12);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.json");
        t.save(&path).unwrap();
        assert_eq!(Tuning::load(&path).unwrap(), t);
        std::fs::write(&path, "{\"costs\": 1}").unwrap();
        assert!(Tuning::load(&path).is_err());
    }

    /// `auto` speculates only with a tree predicted faster than plain decoding (the
    /// end-to-end vanilla step and the calibrated round when measured); otherwise it
    /// decodes plainly.
    #[test]
    fn auto_falls_back_to_vanilla_unless_speculation_pays() {
        let mut t = tuning();
        let auto = |t: &Tuning| t.auto_tree(PathBuf::from("t.json"), false).unwrap();
        let a = auto(&t);
        assert!(a.speculate, "{a}");
        assert_eq!(a.choice.params, TreeParams::new(1, 0, 1).unwrap());
        assert!(a.to_string().starts_with("tree auto = "), "{a}");

        // Measured end to end, a vanilla step costs 14 ms (71.4 tokens/s): predicted loss.
        t.costs.vanilla_step_ms = Some(14.0);
        let a = auto(&t);
        assert!(
            !a.speculate && a.to_string().contains("decoding plainly"),
            "{a}"
        );

        // Rounds measured 1.5× the model's time: τ 1.6 in 36 ms is 44.4 tokens/s,
        // below vanilla's measured 50.
        t.costs.vanilla_step_ms = Some(20.0);
        t.costs.round_scale = 1.5;
        t.validation = Some(Validation {
            tree: TreeParams::new(1, 0, 1).unwrap(),
            predicted_tokens_per_s: 66.7,
            measured_tokens_per_s: 44.4,
            predicted_tau: 1.6,
            measured_tau: 1.6,
            vanilla_forward_tokens_per_s: 50.0,
            vanilla_measured_tokens_per_s: 50.0,
        });
        let a = auto(&t);
        assert!((a.choice.tokens_per_s - 1.6 / 36.0 * 1e3).abs() < 1e-9);
        assert!(!a.speculate, "{a}");
        assert!(
            a.to_string().contains("τ 1.60, 44.4 vs vanilla 50.0"),
            "{a}"
        );
        t.costs.round_scale = 1.2;
        assert!(auto(&t).speculate);
        // 1.6 in 24 · 1.29 ms: 51.7 tokens/s, 3% over vanilla, within the noise.
        t.costs.round_scale = 1.29;
        let a = auto(&t);
        assert!(!a.speculate, "{a}");
        assert!(a.to_string().contains("would not be 5% faster"), "{a}");
        // Heads no better than chance never pay.
        t.acceptance = stats(&[&[0, 0], &[0, 0]]);
        assert!(!auto(&t).speculate);
    }
}
