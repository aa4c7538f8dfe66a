//! Criterion micro-benchmarks of the kernels of one speculative-decoding round, on the
//! real target SmolLM2-135M-Instruct (fetched or read from the `models/` cache) and the
//! default backend (CPU, `burn-flex`, unless a `cuda`/`wgpu` feature is on):
//!
//! - `decode_step`: one target forward of 1 new token on top of a 512-token KV cache,
//!   logits for that row (the cost vanilla decoding pays per token);
//! - `tree_verify/{16,32,64}`: one target forward over an M-node draft tree (tree
//!   positions, ancestor mask) on the same 512-token cache, logits for all M rows;
//! - `draft_step/full/{4,8,10}`: one depth step of EAGLE-2 drafting with top-k =
//!   4/8/10 frontier rows (a middle step: the third of four), as
//!   `EagleProposer::propose` runs it: the draft head's forward with the tree mask on
//!   top of its 512-row cache, the LM head on those rows, log-softmax top-k to the
//!   host and the tree builder's expansion; `draft_step/forward_logits/8` is the head
//!   forward and LM-head logits alone (the rest is top-k and bookkeeping);
//! - `eagle_propose/{15-4-4,59-5-10}`: a whole `EagleProposer::propose` (level-1
//!   top-k already known, `depth` draft steps, selection) for the `speculate` default
//!   tree and `TreeParams::default()` (the reference `total_token = 60`);
//! - `tree_construction/{15-4-4,59-5-10,60-6-10}`: `TreeBuilder` growth plus `finish`
//!   on synthetic deterministic log-probs (host code only, no model);
//! - `projections/{1,2,4,8,64}`: the 120 layer projections of one SmolLM2 forward over
//!   M rows (30 layers of q/k/v, o, gate/up and down matrices of random Q4_1 blocks,
//!   66 MB: cold in cache as in decoding) through `hass_models::quant::qmatmul`.
//!
//! The draft head is randomly initialised (`DraftHead::random`): its weights do not
//! change the cost of a step. Every forward truncates its cache back, so each iteration
//! sees the same context length. Without the model (not cached and no network), only
//! `tree_construction` runs.
//!
//! ```sh
//! cargo bench -p hass-bench --bench kernels
//! HASS_BENCH_DTYPE=f16 cargo bench -p hass-bench --bench kernels   # f16 weights
//! cargo bench -p hass-bench --bench kernels -- tree_verify          # a filter
//! ```

use std::hint::black_box;
use std::time::Duration;

use burn::prelude::*;
use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use hass_core::tree::{DraftTree, TreeBuilder, TreeParams};
use hass_core::Result;
use hass_infer::tuning::synthetic_tokens;
use hass_infer::{draft_step, head_top_k, EagleProposer, Proposer};
use hass_models::assets::{ensure, Asset};
use hass_models::{default_device, load_model, DefaultBackend, DraftHead, LogitRows, WeightDtype};

type B = DefaultBackend;

/// Committed context under every model benchmark.
const CONTEXT: usize = 512;
/// Tree sizes M of `tree_verify` (nodes, root included).
const VERIFY_SIZES: [usize; 3] = [16, 32, 64];
/// Frontier widths of `draft_step`.
const DRAFT_TOP_K: [usize; 3] = [4, 8, 10];
/// The width at which `draft_step/forward_logits` splits the step's cost.
const DRAFT_PARTS_K: usize = 8;
/// Draft steps done before the measured one: the measured step attends over
/// `(DRAFT_STEPS_BEFORE + 1)·k` tree columns, a middle step of a depth-4 growth.
const DRAFT_STEPS_BEFORE: usize = 2;
/// `(total_tokens, depth, top_k)`: the `speculate` default, `TreeParams::default()`
/// (reference `total_token = 60`, depth 5, top-k 10) and depth 6.
const TREES: [(usize, usize, usize); 3] = [(15, 4, 4), (59, 5, 10), (60, 6, 10)];

/// A small deterministic generator (timings do not depend on the values).
struct Lcg(u64);

impl Lcg {
    fn next_u32(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f32 {
        (self.next_u32() >> 8) as f32 / (1u32 << 24) as f32
    }
}

/// One row of a draft's top-k: `k` token ids and descending log-probs (≤ 0), as
/// `log_softmax(..).topk_with_indices(k)` returns them.
fn synthetic_top_k(rng: &mut Lcg, k: usize, vocab: usize) -> (Vec<u32>, Vec<f32>) {
    let tokens = (0..k).map(|_| rng.next_u32() % vocab as u32).collect();
    let mut lps: Vec<f32> = (0..k)
        .map(|b| -0.05 - 0.6 * b as f32 - 1.5 * rng.unit())
        .collect();
    lps.sort_by(|a, b| b.total_cmp(a));
    (tokens, lps)
}

/// The draft outputs a whole growth consumes: the level-1 top-k and, for each of
/// the `depth` steps, `k` rows of top-k children.
struct SyntheticGrowth {
    params: TreeParams,
    level1: (Vec<u32>, Vec<f32>),
    steps: Vec<(Vec<u32>, Vec<f32>)>,
}

impl SyntheticGrowth {
    fn new(params: TreeParams, vocab: usize, seed: u64) -> Self {
        let mut rng = Lcg(seed);
        let k = params.top_k;
        let level1 = synthetic_top_k(&mut rng, k, vocab);
        let steps = (0..params.depth)
            .map(|_| {
                let (mut tokens, mut lps) = (Vec::with_capacity(k * k), Vec::with_capacity(k * k));
                for _ in 0..k {
                    let (t, l) = synthetic_top_k(&mut rng, k, vocab);
                    tokens.extend(t);
                    lps.extend(l);
                }
                (tokens, lps)
            })
            .collect();
        SyntheticGrowth {
            params,
            level1,
            steps,
        }
    }

    /// Growth and selection, as the proposer runs them (without the draft model).
    fn build(&self, root: u32) -> Result<DraftTree> {
        let mut b = TreeBuilder::new(self.params, root, &self.level1.0, &self.level1.1)?;
        for (tokens, lps) in &self.steps {
            b.expand(tokens, lps)?;
        }
        Ok(b.finish())
    }
}

fn tree_label((total, depth, top_k): (usize, usize, usize)) -> String {
    format!("{total}-{depth}-{top_k}")
}

fn tree_construction(c: &mut Criterion) {
    let mut group = c.benchmark_group("tree_construction");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for shape in TREES {
        let params = TreeParams::new(shape.0, shape.1, shape.2).expect("valid tree");
        let growth = SyntheticGrowth::new(params, 49_152, 7);
        group.bench_function(BenchmarkId::from_parameter(tree_label(shape)), |b| {
            b.iter(|| black_box(growth.build(black_box(1)).expect("tree")))
        });
    }
    group.finish();
}

/// The weight dtype from `HASS_BENCH_DTYPE` (`f32`, the default, or `f16`).
fn weight_dtype() -> WeightDtype {
    match std::env::var("HASS_BENCH_DTYPE") {
        Ok(s) => s
            .parse()
            .unwrap_or_else(|e| panic!("HASS_BENCH_DTYPE: {e}")),
        Err(_) => WeightDtype::F32,
    }
}

fn model_benches(c: &mut Criterion) {
    let path = match ensure(Asset::SmolLm2) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("skipping the model benchmarks: SmolLM2 is not available ({e})");
            return;
        }
    };
    let dtype = weight_dtype();
    let device = default_device();
    let model = load_model::<B>(&path, &device, dtype)
        .unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
        .model;
    let vocab = model.config().vocab_size;
    eprintln!(
        "model: {} ({dtype:?} weights), backend {}, context {CONTEXT}",
        path.display(),
        hass_models::backend::backend_name()
    );

    // The target's 512-token context, shared by the target benchmarks.
    let max_m = *VERIFY_SIZES.iter().max().expect("sizes");
    let prompt = synthetic_tokens(CONTEXT, vocab);
    let positions: Vec<usize> = (0..CONTEXT).collect();
    let mut cache = model.new_cache(CONTEXT + max_m);
    let features = model
        .forward(&prompt, &positions, &mut cache, None, LogitRows::None)
        .expect("prefill")
        .features;
    let root = synthetic_tokens(CONTEXT + 1, vocab)[CONTEXT];

    let mut group = c.benchmark_group("decode_step");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    group.bench_function(BenchmarkId::from_parameter(format!("ctx{CONTEXT}")), |b| {
        b.iter(|| {
            let out = model
                .forward(&[root], &[CONTEXT], &mut cache, None, LogitRows::Last)
                .expect("decode forward");
            cache.truncate(CONTEXT);
            black_box(out.logits.expect("requested").into_data())
        })
    });
    group.finish();

    let mut group = c.benchmark_group("tree_verify");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    for m in VERIFY_SIZES {
        // A draft-shaped tree of exactly m nodes (root included).
        let params = TreeParams::new(m - 1, 5, 10).expect("valid tree");
        let tree = SyntheticGrowth::new(params, vocab, m as u64)
            .build(root)
            .expect("tree");
        assert_eq!(tree.len(), m);
        let positions: Vec<usize> = tree.depths().iter().map(|d| CONTEXT + d).collect();
        let mask = tree.mask();
        eprintln!(
            "tree_verify/{m}: {} nodes, depth {}, {} leaves",
            tree.len(),
            tree.max_depth(),
            tree.leaves().len()
        );
        group.throughput(Throughput::Elements(m as u64));
        group.bench_function(BenchmarkId::from_parameter(m), |b| {
            b.iter(|| {
                let out = model
                    .forward(
                        tree.tokens(),
                        &positions,
                        &mut cache,
                        Some(&mask),
                        LogitRows::All,
                    )
                    .expect("verify forward");
                cache.truncate(CONTEXT);
                black_box(out.logits.expect("requested").into_data())
            })
        });
    }
    group.finish();

    // The draft head on its own 512-row cache of (target feature, next token) pairs.
    let head = DraftHead::<B>::random(&model, 0).expect("random head");
    let mut shifted = prompt[1..].to_vec();
    shifted.push(root);

    let mut group = c.benchmark_group("draft_step");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for k in DRAFT_TOP_K {
        let depth = DRAFT_STEPS_BEFORE + 2;
        let params = TreeParams::new(k, depth, k).expect("valid tree");
        let mut dcache = head.new_cache(CONTEXT + depth * k);
        let ctx_out = head
            .forward(
                &model,
                features.clone(),
                &shifted,
                &positions,
                &mut dcache,
                None,
            )
            .expect("draft context");
        let hidden = model.config().hidden_size;
        let mut prev = ctx_out.slice([CONTEXT - 1..CONTEXT, 0..hidden]);
        let (tok1, lp1) = head_top_k(&model, &head, prev.clone(), k).expect("top-k");
        let mut builder = TreeBuilder::new(params, root, &tok1, &lp1).expect("builder");
        for _ in 0..DRAFT_STEPS_BEFORE {
            prev = draft_step(&model, &head, &mut builder, prev, &mut dcache, CONTEXT)
                .expect("draft step");
        }
        let len = dcache.len();
        group.throughput(Throughput::Elements(k as u64));
        group.bench_function(BenchmarkId::new("full", k), |b| {
            b.iter(|| {
                let mut step = builder.clone();
                let out = draft_step(&model, &head, &mut step, prev.clone(), &mut dcache, CONTEXT)
                    .expect("draft step");
                dcache.truncate(len);
                black_box((out, step))
            })
        });
        if k == DRAFT_PARTS_K {
            // The same step without the top-k and the builder: head forward and LM head.
            let rows: Vec<i32> = builder
                .frontier_parent_rows()
                .iter()
                .map(|&r| r as i32)
                .collect();
            let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(rows, [k]), &device);
            let positions = vec![CONTEXT + builder.position_offset(); k];
            group.bench_function(BenchmarkId::new("forward_logits", k), |b| {
                b.iter(|| {
                    let hidden = prev.clone().select(0, idx.clone());
                    let out = head
                        .forward(
                            &model,
                            hidden,
                            builder.frontier_tokens(),
                            &positions,
                            &mut dcache,
                            Some(builder.frontier_mask()),
                        )
                        .expect("draft forward");
                    dcache.truncate(len);
                    black_box(head.logits(&model, out).into_data())
                })
            });
        }
    }
    group.finish();

    let mut group = c.benchmark_group("eagle_propose");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    for shape in &TREES[..2] {
        let params = TreeParams::new(shape.0, shape.1, shape.2).expect("valid tree");
        let mut proposer = EagleProposer::new(&model, &head, params).expect("proposer");
        proposer
            .start(&prompt, features.clone(), root, prompt.len() + 128)
            .expect("proposer start");
        let max_nodes = params.num_nodes();
        group.bench_function(BenchmarkId::from_parameter(tree_label(*shape)), |b| {
            // `propose` truncates the head's cache back itself.
            b.iter(|| black_box(proposer.propose(root, max_nodes).expect("propose")))
        });
    }
    group.finish();
}

/// SmolLM2's projections `(out, in)` of one layer: q/k/v fused, o, gate/up, down.
const LAYER_SHAPES: [(usize, usize); 4] = [(960, 576), (576, 576), (3072, 576), (576, 1536)];

fn projections(c: &mut Criterion) {
    use hass_models::quant::{qmatmul, QMatrix, QType};
    let mut rng = Lcg(7);
    let layers: Vec<Vec<QMatrix>> = (0..30)
        .map(|_| {
            LAYER_SHAPES
                .iter()
                .map(|&(n, k)| {
                    let w: Vec<f32> = (0..n * k).map(|_| rng.unit() - 0.5).collect();
                    QMatrix::quantize(QType::Q4_1, &w, n, k).expect("quantize")
                })
                .collect()
        })
        .collect();
    let mut group = c.benchmark_group("projections");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));
    for m in [1usize, 2, 4, 8, 64] {
        let x: Vec<f32> = (0..m * 1536).map(|_| rng.unit() - 0.5).collect();
        let mut out = vec![0f32; m * 3072];
        group.throughput(Throughput::Elements(m as u64));
        group.bench_function(BenchmarkId::from_parameter(m), |b| {
            b.iter(|| {
                for layer in &layers {
                    for w in layer {
                        let k = w.cols();
                        qmatmul(&x[..m * k], m, w, &mut out[..m * w.rows()]);
                    }
                }
                black_box(&out);
            })
        });
    }
    group.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    tree_construction(&mut c);
    projections(&mut c);
    model_benches(&mut c);
    c.final_summary();
}
