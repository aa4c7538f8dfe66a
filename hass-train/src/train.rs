//! The trainer (spec §3.4–3.6): AdamW (β 0.9/0.95, weight decay 0.01, ε 1e-8),
//! elementwise gradient value clipping, linear warm-up (1% of the steps) then linear
//! decay to 0, gradient accumulation, `forwards` HASS alignment forwards per batch
//! (1 = EAGLE), feature noise, a held-out split with top-1/2/3 and multi-step greedy
//! accuracy, per-step logs, an SVG chart per epoch, and atomic checkpoints (the EAGLE
//! head layout `hass-infer` loads, the optimizer state and the trainer state) from
//! which a killed run resumes with identical results for the same seed.
//!
//! A [`TrainPlan`] is a list of stages; stage `s > 0` starts from stage `s − 1`'s final
//! head with a fresh optimizer (the reference's two stages: topk_w 0 at lr 3e-5, then
//! topk_w 1 at lr 1e-5).

use hass_models::HassBackend;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::grad_clipping::GradientClippingConfig;
use burn::module::AutodiffModule;
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Recorder};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::DType;
use hass_core::{HassError, Result};
use hass_models::draft_vocab::{most_frequent, target_rows};
use hass_models::{DraftHead, KvCache, Llama, SafetensorsDir};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::chart::write_chart;
use crate::data::{Batch, ShardDataset, ShiftedSample};
use crate::loss::{LossWeights, TargetDist, TopkAccuracy};
use crate::model::{draft_config, embed_ids, next_stream, TrainDraft};

/// A differentiable backend for the head whose inner backend runs the frozen target.
pub trait TrainBackend: AutodiffBackend<InnerBackend: HassBackend> + HassBackend {}
impl<T: AutodiffBackend<InnerBackend: HassBackend> + HassBackend> TrainBackend for T {}

/// One training stage. Every field has a default (the reference's stage 1), so a
/// config file names only what it changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StageConfig {
    /// Passes over the training split.
    pub epochs: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Samples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step (the loss is divided by it).
    pub grad_accum: usize,
    /// HASS alignment forwards per batch; 1 is plain EAGLE training.
    pub forwards: usize,
    /// Feature-regression (SmoothL1) weight.
    pub v_w: f64,
    /// Soft cross-entropy weight.
    pub p_w: f64,
    /// HASS Top-K distillation weight (0 in stage 1, 1 in stage 2).
    pub topk_w: f64,
    /// K of the Top-K loss.
    pub topk_k: usize,
    /// Elementwise gradient clipping bound (`clip_grad_value_`).
    pub clip_value: f32,
    pub weight_decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub adam_eps: f32,
    /// Fraction of the optimizer steps spent warming up.
    pub warmup_frac: f64,
    /// Uniform feature noise amplitude (`std · 512 / L`).
    pub noise_std: f32,
    /// Samples are truncated to this many tokens.
    pub max_len: usize,
    /// Fraction of samples held out for evaluation.
    pub holdout: f64,
    pub seed: u64,
    /// Reproduce the reference's leaky attention masking (spec §3.5 QUIRK).
    pub leaky_softmax: bool,
    /// Held-out samples used for the multi-step greedy accuracy.
    pub kacc_samples: usize,
}

impl Default for StageConfig {
    fn default() -> Self {
        StageConfig {
            epochs: 40,
            lr: 3e-5,
            batch_size: 2,
            grad_accum: 1,
            forwards: 3,
            v_w: 1.0,
            p_w: 0.1,
            topk_w: 0.0,
            topk_k: 10,
            clip_value: 0.5,
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.95,
            adam_eps: 1e-8,
            warmup_frac: 0.01,
            noise_std: 0.2,
            max_len: 2048,
            holdout: 0.05,
            seed: 0,
            leaky_softmax: false,
            kacc_samples: 2,
        }
    }
}

impl StageConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(HassError::InvalidArgument(format!("training config: {m}")));
        if self.epochs == 0 || self.batch_size == 0 || self.grad_accum == 0 || self.forwards == 0 {
            return bad("epochs, batch_size, grad_accum and forwards must be at least 1");
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad("lr must be positive");
        }
        if self.topk_k == 0 || self.max_len < 2 {
            return bad("topk_k must be >= 1 and max_len >= 2");
        }
        if !(0.0..1.0).contains(&self.holdout) || !(0.0..=1.0).contains(&self.warmup_frac) {
            return bad("holdout must be in [0, 1) and warmup_frac in [0, 1]");
        }
        Ok(())
    }

    fn loss_weights(&self) -> LossWeights {
        LossWeights {
            v_w: self.v_w,
            p_w: self.p_w,
            topk_w: self.topk_w,
            k: self.topk_k,
        }
    }
}

/// The stages of a run (JSON: `{"stages": [{...}, {...}]}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainPlan {
    pub stages: Vec<StageConfig>,
    /// Train a head with its own reduced vocabulary of this many target tokens: the
    /// most frequent under the loss mask of the training split (EAGLE-3's
    /// `draft_vocab_size`). Applies when stage 1 starts from a fresh head; a head
    /// started from keeps its own vocabulary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draft_vocab_size: Option<usize>,
}

impl TrainPlan {
    /// The reference's HASS schedule: 40 epochs at lr 3e-5 without the Top-K loss,
    /// then 10 epochs at lr 1e-5 with it, 3 forwards each.
    pub fn hass_reference() -> Self {
        TrainPlan {
            stages: vec![
                StageConfig::default(),
                StageConfig {
                    epochs: 10,
                    lr: 1e-5,
                    topk_w: 1.0,
                    ..StageConfig::default()
                },
            ],
            draft_vocab_size: None,
        }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| HassError::io(path, e))?;
        let plan: TrainPlan = serde_json::from_str(&text).map_err(|e| HassError::Json {
            path: path.to_path_buf(),
            source: e,
        })?;
        plan.validate()?;
        Ok(plan)
    }

    pub fn validate(&self) -> Result<()> {
        if self.stages.is_empty() {
            return Err(HassError::InvalidArgument(
                "training plan has no stages".into(),
            ));
        }
        self.stages.iter().try_for_each(StageConfig::validate)
    }
}

/// Mean losses and accuracy over some batches.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EvalMetrics {
    pub loss: f64,
    pub vloss: f64,
    pub ploss: f64,
    pub topk_loss: f64,
    pub top1: f64,
    pub top2: f64,
    pub top3: f64,
    /// Multi-step greedy accuracy at steps 0..5 (spec §3.6 `getkacc`).
    pub kacc: Vec<f64>,
}

/// What one stage did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageReport {
    pub stage: usize,
    pub steps: usize,
    pub train_tokens: usize,
    /// Wall time of the stage: training, held-out evaluation and checkpoints.
    pub seconds: f64,
    /// The part of it spent in training steps (forwards, losses, backward, optimizer).
    pub train_seconds: f64,
    /// Held-out metrics after each epoch.
    pub epochs: Vec<EvalMetrics>,
}

impl StageReport {
    /// Training tokens per second of wall time.
    pub fn tokens_per_s(&self) -> f64 {
        self.train_tokens as f64 / self.seconds.max(1e-9)
    }

    /// Training tokens per second of training steps (evaluation excluded): the
    /// trainer's throughput.
    pub fn step_tokens_per_s(&self) -> f64 {
        self.train_tokens as f64 / self.train_seconds.max(1e-9)
    }
}

/// Trainer state saved with each checkpoint.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct State {
    epochs_done: usize,
    step: usize,
    train_tokens: usize,
    seconds: f64,
    /// Of `seconds`, in training steps.
    #[serde(default)]
    train_seconds: f64,
    history: Vec<EvalMetrics>,
    step_losses: Vec<f64>,
    /// Micro-batches of epoch `epochs_done` already trained: a checkpoint inside an
    /// epoch (always right after an optimizer step).
    #[serde(default)]
    micro_done: usize,
}

fn stage_dir(out: &Path, stage: usize) -> PathBuf {
    out.join(format!("stage{}", stage + 1))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|e| HassError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| HassError::io(path, e))
}

/// A batch on the autodiff backend.
struct BatchTensors<AD: TrainBackend> {
    emb: Tensor<AD, 3>,
    features: Tensor<AD, 3>,
    dist: TargetDist<AD>,
    tokens: usize,
}

/// How one invocation of [`train`] runs (not part of the plan: changing these never
/// changes the result).
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// A head to start stage 1 from (default: a random head from the stage seed).
    pub init: Option<PathBuf>,
    /// Show progress bars.
    pub progress: bool,
    /// Return after this many epochs of this invocation (a time-boxed session); the
    /// next invocation resumes where it stopped.
    pub stop_after_epochs: Option<usize>,
    /// Return after this many optimizer steps of this invocation, with a checkpoint
    /// there (inside an epoch if need be).
    pub stop_after_steps: Option<usize>,
    /// Also checkpoint inside an epoch, at the first optimizer step this long after
    /// the last checkpoint: an interrupted run loses at most this much work (epochs
    /// over millions of tokens take hours here).
    pub checkpoint_every: Option<std::time::Duration>,
}

/// What is left of one invocation's allowance.
struct Budget {
    epochs: usize,
    steps: usize,
    checkpoint_every: Option<std::time::Duration>,
}

/// Trains a draft head for `target` on `data` following `plan`, writing each stage to
/// `out/stageN` (head: `config.json` + `model.safetensors`; `optimizer.mpk`;
/// `state.json`; `log.jsonl`; `chart.svg`). An interrupted run resumes from its last
/// checkpoint (the end of an epoch, or an optimizer step inside one when
/// [`RunOptions::checkpoint_every`] is set) with identical results.
pub fn train<AD: TrainBackend>(
    target: &Llama<AD::InnerBackend>,
    data: &ShardDataset,
    plan: &TrainPlan,
    out: &Path,
    run: &RunOptions,
) -> Result<Vec<StageReport>> {
    plan.validate()?;
    if data.is_empty() {
        return Err(HassError::InvalidArgument(format!(
            "no training samples in {}",
            data.dir().display()
        )));
    }
    if data.hidden_size() != target.config().hidden_size {
        return Err(HassError::ShapeMismatch {
            file: data.dir().display().to_string(),
            name: "hidden_state".into(),
            expected: vec![target.config().hidden_size],
            found: vec![data.hidden_size()],
        });
    }
    let mut reports = Vec::new();
    let mut start_head: Option<PathBuf> = run.init.clone();
    let mut budget = Budget {
        epochs: run.stop_after_epochs.unwrap_or(usize::MAX),
        steps: run.stop_after_steps.unwrap_or(usize::MAX),
        checkpoint_every: run.checkpoint_every,
    };
    for (s, cfg) in plan.stages.iter().enumerate() {
        let dir = stage_dir(out, s);
        let report = train_stage::<AD>(
            target,
            data,
            cfg,
            s,
            &dir,
            start_head.as_deref(),
            plan.draft_vocab_size,
            run.progress,
            &mut budget,
        )?;
        let finished = report.epochs.len() == cfg.epochs;
        reports.push(report);
        if !finished {
            break;
        }
        start_head = Some(dir);
    }
    Ok(reports)
}

/// How often each target token occurs under the loss mask of `samples` (truncated to
/// `max_len`): what a reduced draft vocabulary is chosen from.
fn token_counts(
    data: &ShardDataset,
    samples: &[usize],
    max_len: usize,
    vocab: usize,
) -> Result<Vec<u64>> {
    let mut counts = vec![0u64; vocab];
    for &i in samples {
        let s = data.get(i)?;
        for (&id, &m) in s.input_ids.iter().zip(&s.loss_mask).take(max_len) {
            let slot = counts.get_mut(id as usize).ok_or_else(|| {
                HassError::InvalidArgument(format!(
                    "token id {id} in {} is outside the target vocabulary of {vocab}",
                    data.dir().display()
                ))
            })?;
            *slot += (m != 0.0) as u64;
        }
    }
    Ok(counts)
}

fn load_draft<AD: TrainBackend>(
    dir: &Path,
    target: &Llama<AD::InnerBackend>,
    device: &AD::Device,
) -> Result<TrainDraft<AD>> {
    let head = DraftHead::load(dir, target)?; // validates against the target
    let weights = SafetensorsDir::open(dir)?;
    TrainDraft::from_head(&weights, head.config(), device)
}

#[allow(clippy::too_many_arguments)]
fn train_stage<AD: TrainBackend>(
    target: &Llama<AD::InnerBackend>,
    data: &ShardDataset,
    cfg: &StageConfig,
    stage: usize,
    dir: &Path,
    start: Option<&Path>,
    draft_vocab_size: Option<usize>,
    progress: bool,
    budget: &mut Budget,
) -> Result<StageReport> {
    std::fs::create_dir_all(dir).map_err(|e| HassError::io(dir, e))?;
    let device: AD::Device = target.device().clone();
    let split = data.split(cfg.holdout);
    let mut state: State = match std::fs::read_to_string(dir.join("state.json")) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| HassError::Json {
            path: dir.join("state.json"),
            source: e,
        })?,
        Err(_) => State::default(),
    };
    let resuming = state.epochs_done > 0 || state.micro_done > 0;
    let recorder = NamedMpkFileRecorder::<FullPrecisionSettings>::new();
    let mut model: TrainDraft<AD> = if resuming {
        // The module record restores the parameter ids the optimizer state is keyed by.
        let record = recorder
            .load(dir.join("draft"), &device)
            .map_err(|e| HassError::malformed(dir.join("draft.mpk").display(), e.to_string()))?;
        load_draft(dir, target, &device)?.load_record(record)
    } else if let Some(start) = start {
        load_draft(start, target, &device)?
    } else {
        let fresh = TrainDraft::random(&draft_config(target.config()), cfg.seed, &device)?;
        match draft_vocab_size {
            Some(n) => {
                let counts =
                    token_counts(data, &split.train, cfg.max_len, target.config().vocab_size)?;
                let ids = most_frequent(&counts, n)?;
                let rows = target_rows(target, &ids)?.cast(DType::F32);
                fresh.with_vocab(Tensor::from_inner(rows), ids)
            }
            None => fresh,
        }
    };
    let mut optim = AdamWConfig::new()
        .with_beta_1(cfg.beta1)
        .with_beta_2(cfg.beta2)
        .with_epsilon(cfg.adam_eps)
        .with_weight_decay(cfg.weight_decay)
        .with_grad_clipping(Some(GradientClippingConfig::Value(cfg.clip_value)))
        .init::<AD, TrainDraft<AD>>();
    if resuming {
        let record = recorder.load(dir.join("optimizer"), &device).map_err(|e| {
            HassError::malformed(dir.join("optimizer.mpk").display(), e.to_string())
        })?;
        optim = optim.load_record(record);
    }
    let micro_per_epoch = split.train.len().div_ceil(cfg.batch_size);
    let steps_per_epoch = micro_per_epoch.div_ceil(cfg.grad_accum);
    let total_steps = steps_per_epoch * cfg.epochs;
    let warmup = ((total_steps as f64) * cfg.warmup_frac) as usize;
    let lr_at = |step: usize| {
        if step < warmup {
            cfg.lr * (step + 1) as f64 / warmup as f64
        } else {
            cfg.lr * (total_steps - step) as f64 / (total_steps - warmup).max(1) as f64
        }
    };
    let embedding = Tensor::<AD, 2>::from_inner(target.embedding().cast(DType::F32));
    // The LM head the target distribution is taken over: the target's, or its rows of
    // the reduced vocabulary (EAGLE-3's `softmax(target_logits[..., t2d])`).
    let lm_head = match model.vocab_ids() {
        Some(ids) => target_rows(target, ids)?,
        None => target.lm_head(),
    };
    let lm_head = Tensor::<AD, 2>::from_inner(lm_head.cast(DType::F32));
    let weights = cfg.loss_weights();
    let bar = progress.then(|| {
        let b = indicatif::ProgressBar::new(total_steps as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "stage {msg} {bar:30} {pos}/{len} steps [{elapsed_precise} < {eta_precise}]",
            )
            .expect("valid template"),
        );
        b.set_message(format!("{}", stage + 1));
        b.set_position(state.step as u64);
        b
    });
    let mut log = String::new();
    let started = Instant::now() - std::time::Duration::from_secs_f64(state.seconds);
    let mut last_checkpoint = Instant::now();
    'epochs: for epoch in state.epochs_done..cfg.epochs {
        if budget.epochs == 0 || budget.steps == 0 {
            break;
        }
        budget.epochs -= 1;
        let mut order = split.train.clone();
        order.shuffle(&mut StdRng::seed_from_u64(
            cfg.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        ));
        let mut accum = GradientsAccumulator::<TrainDraft<AD>>::new();
        let mut epoch_start = Instant::now();
        let skip = std::mem::take(&mut state.micro_done);
        for (m, chunk) in order.chunks(cfg.batch_size).enumerate().skip(skip) {
            let mut rng = StdRng::seed_from_u64(
                cfg.seed ^ ((epoch * 1_000_003 + m) as u64).wrapping_mul(0xD1B5_4A32_D192_ED03),
            );
            let b = make_batch::<AD>(
                data,
                chunk,
                cfg,
                Some(&mut rng),
                &embedding,
                &lm_head,
                &device,
            )?;
            let (loss, metrics) = forward_losses(&model, &b, cfg, &weights);
            let loss = loss / cfg.grad_accum as f64;
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            accum.accumulate(&model, grads);
            state.train_tokens += b.tokens;
            let last_micro = m + 1 == micro_per_epoch;
            if (m + 1) % cfg.grad_accum == 0 || last_micro {
                let lr = lr_at(state.step);
                model = optim.step(lr, model, accum.grads());
                state.step += 1;
                state.step_losses.push(metrics.loss);
                let (t1, t2, t3) = (metrics.top1, metrics.top2, metrics.top3);
                log += &format!(
                    "{}\n",
                    serde_json::json!({"stage": stage + 1, "epoch": epoch, "step": state.step, "lr": lr,
                        "loss": metrics.loss, "vloss": metrics.vloss, "ploss": metrics.ploss,
                        "topk_loss": metrics.topk_loss, "top1": t1, "top2": t2, "top3": t3})
                );
                if let Some(bar) = &bar {
                    bar.set_position(state.step as u64);
                }
                budget.steps = budget.steps.saturating_sub(1);
                let due = budget
                    .checkpoint_every
                    .is_some_and(|every| last_checkpoint.elapsed() >= every);
                if !last_micro && (budget.steps == 0 || due) {
                    state.micro_done = m + 1;
                    state.train_seconds += epoch_start.elapsed().as_secs_f64();
                    epoch_start = Instant::now();
                    state.seconds = started.elapsed().as_secs_f64();
                    checkpoint(&model, &optim, &recorder, target, &state, dir, &mut log)?;
                    last_checkpoint = Instant::now();
                    if budget.steps == 0 {
                        break 'epochs;
                    }
                    state.micro_done = 0;
                }
            }
        }
        state.train_seconds += epoch_start.elapsed().as_secs_f64();
        let eval = evaluate::<AD>(
            &model,
            target,
            data,
            &split.test,
            cfg,
            &embedding,
            &lm_head,
            &device,
        )?;
        state.history.push(eval);
        state.epochs_done = epoch + 1;
        state.seconds = started.elapsed().as_secs_f64();
        checkpoint(&model, &optim, &recorder, target, &state, dir, &mut log)?;
        last_checkpoint = Instant::now();
    }
    if let Some(bar) = bar {
        bar.finish();
    }
    Ok(StageReport {
        stage: stage + 1,
        steps: state.step,
        train_tokens: state.train_tokens,
        seconds: state.seconds,
        train_seconds: state.train_seconds,
        epochs: state.history,
    })
}

fn checkpoint<AD: TrainBackend, O: Optimizer<TrainDraft<AD>, AD>>(
    model: &TrainDraft<AD>,
    optim: &O,
    recorder: &NamedMpkFileRecorder<FullPrecisionSettings>,
    target: &Llama<AD::InnerBackend>,
    state: &State,
    dir: &Path,
    log: &mut String,
) -> Result<()> {
    let head = DraftHead::from_source(&model.valid().to_weights(), model.config().clone(), target)?;
    head.save(dir, target)?;
    // The recorder picks the file extension itself: write in a scratch folder, then move.
    let scratch = dir.join("checkpoint.tmp");
    std::fs::create_dir_all(&scratch).map_err(|e| HassError::io(&scratch, e))?;
    let err =
        |e: burn::record::RecorderError| HassError::malformed(scratch.display(), e.to_string());
    recorder
        .record(optim.to_record(), scratch.join("optimizer"))
        .map_err(err)?;
    recorder
        .record(model.clone().into_record(), scratch.join("draft"))
        .map_err(err)?;
    for name in ["optimizer.mpk", "draft.mpk"] {
        std::fs::rename(scratch.join(name), dir.join(name))
            .map_err(|e| HassError::io(dir.join(name), e))?;
    }
    std::fs::remove_dir(&scratch).map_err(|e| HassError::io(&scratch, e))?;
    let mut file_log = std::fs::read_to_string(dir.join("log.jsonl")).unwrap_or_default();
    file_log += log;
    write_atomic(&dir.join("log.jsonl"), file_log.as_bytes())?;
    log.clear();
    write_chart(&dir.join("chart.svg"), &state.step_losses, &state.history)?;
    // The state goes last: it is what marks the checkpoint complete.
    write_atomic(
        &dir.join("state.json"),
        serde_json::to_string_pretty(state)
            .expect("serialisable")
            .as_bytes(),
    )
}

fn make_batch<AD: TrainBackend>(
    data: &ShardDataset,
    indices: &[usize],
    cfg: &StageConfig,
    noise: Option<&mut StdRng>,
    embedding: &Tensor<AD, 2>,
    lm_head: &Tensor<AD, 2>,
    device: &AD::Device,
) -> Result<BatchTensors<AD>> {
    let mut samples = indices
        .iter()
        .map(|&i| Ok(ShiftedSample::new(&data.get(i)?, cfg.max_len)))
        .collect::<Result<Vec<_>>>()?;
    if let Some(rng) = noise {
        for s in &mut samples {
            s.add_uniform_noise(cfg.noise_std, rng);
        }
    }
    let b = Batch::collate(&samples);
    let (n, l, h) = (b.batch, b.len, b.hidden_size);
    let ids: Vec<i32> = b.input_ids.iter().map(|&x| x as i32).collect();
    let ids = Tensor::<AD, 2, Int>::from_data(TensorData::new(ids, [n, l]), device);
    let features = Tensor::<AD, 3>::from_data(TensorData::new(b.hidden, [n, l, h]), device);
    let target = Tensor::<AD, 3>::from_data(TensorData::new(b.target, [n, l, h]), device);
    let mask = Tensor::<AD, 2>::from_data(TensorData::new(b.loss_mask, [n, l]), device);
    Ok(BatchTensors {
        emb: embed_ids(embedding, ids),
        features,
        dist: TargetDist::new(target, mask, lm_head.clone(), cfg.topk_k),
        tokens: b.lens.iter().sum(),
    })
}

/// The summed loss of `cfg.forwards` alignment forwards, and the metrics of the last.
fn forward_losses<AD: TrainBackend>(
    model: &TrainDraft<AD>,
    b: &BatchTensors<AD>,
    cfg: &StageConfig,
    weights: &LossWeights,
) -> (Tensor<AD, 1>, EvalMetrics) {
    let mut streams = vec![b.features.clone()];
    let mut total: Option<Tensor<AD, 1>> = None;
    let mut m = EvalMetrics::default();
    for f in 0..cfg.forwards {
        let predict = model.forward(b.emb.clone(), &streams, cfg.leaky_softmax);
        let own_head = model.lm_head.as_ref().map(|p| p.val());
        let out = b
            .dist
            .loss_with_head(predict.clone(), own_head.as_ref(), weights);
        let n = cfg.forwards as f64;
        m.vloss += out.vloss / n;
        m.ploss += out.ploss / n;
        m.topk_loss += out.topk_loss / n;
        if f + 1 == cfg.forwards {
            let (t1, t2, t3) = out.accuracy.rates();
            (m.top1, m.top2, m.top3) = (t1, t2, t3);
        }
        total = Some(match total {
            None => out.loss,
            Some(t) => t + out.loss,
        });
        if f + 1 < cfg.forwards {
            streams.push(next_stream(&streams, predict));
        }
    }
    m.loss = cfg.v_w * m.vloss + cfg.p_w * m.ploss + cfg.topk_w * m.topk_loss;
    (total.expect("forwards >= 1"), m)
}

#[allow(clippy::too_many_arguments)]
fn evaluate<AD: TrainBackend>(
    model: &TrainDraft<AD>,
    target: &Llama<AD::InnerBackend>,
    data: &ShardDataset,
    test: &[usize],
    cfg: &StageConfig,
    embedding: &Tensor<AD, 2>,
    lm_head: &Tensor<AD, 2>,
    device: &AD::Device,
) -> Result<EvalMetrics> {
    let weights = cfg.loss_weights();
    let mut sum = EvalMetrics::default();
    let mut acc = TopkAccuracy::default();
    let mut batches = 0usize;
    for chunk in test.chunks(cfg.batch_size) {
        let b = make_batch::<AD>(data, chunk, cfg, None, embedding, lm_head, device)?;
        let (_, m) = forward_losses(model, &b, cfg, &weights);
        sum.loss += m.loss;
        sum.vloss += m.vloss;
        sum.ploss += m.ploss;
        sum.topk_loss += m.topk_loss;
        // Weight accuracy by rows: recompute counts from the last forward's rates.
        let rows = b.dist.rows().len();
        acc.add(TopkAccuracy {
            top1: (m.top1 * rows as f64).round() as usize,
            top2: (m.top2 * rows as f64).round() as usize,
            top3: (m.top3 * rows as f64).round() as usize,
            total: rows,
        });
        batches += 1;
    }
    if batches > 0 {
        let n = batches as f64;
        (sum.loss, sum.vloss, sum.ploss, sum.topk_loss) = (
            sum.loss / n,
            sum.vloss / n,
            sum.ploss / n,
            sum.topk_loss / n,
        );
        (sum.top1, sum.top2, sum.top3) = acc.rates();
    }
    let head = DraftHead::from_source(&model.valid().to_weights(), model.config().clone(), target)?;
    sum.kacc = multi_step_accuracy(
        &head,
        target,
        data,
        &test[..test.len().min(cfg.kacc_samples)],
        cfg.max_len,
    )?;
    Ok(sum)
}

/// Spec §3.6 `getkacc`: from every prefix `p` with `mask[p] = 1`, decode greedily for 5
/// steps feeding back the head's own features and tokens; step `k` is right when its
/// token equals the target's argmax at `p + k` (`argmax lm_head(f_{p+k})`). A miss
/// counts against every later step; counting stops at the first position with mask 0.
/// Returns the accuracy of steps 1..=5 over `samples` of `data` (truncated to
/// `max_len`): how heads are compared on a held-out set.
pub fn multi_step_accuracy<B: HassBackend>(
    head: &DraftHead<B>,
    target: &Llama<B>,
    data: &ShardDataset,
    samples: &[usize],
    max_len: usize,
) -> Result<Vec<f64>> {
    const STEPS: usize = 5;
    let (mut correct, mut total) = ([0usize; STEPS], [0usize; STEPS]);
    let h = target.config().hidden_size;
    let dev = target.device();
    for &i in samples {
        let s = data.get(i)?;
        let l = s.len().min(max_len);
        if l < 2 {
            continue;
        }
        let feats =
            Tensor::<B, 2>::from_data(TensorData::new(s.hidden[..l * h].to_vec(), [l, h]), dev);
        let target_next = host_argmax(target.logits(feats.clone()))?;
        // All true-feature rows at once: row t pairs f_t with x_{t+1} and predicts f̂_{t+1}.
        let mut cache: KvCache<B> = head.new_cache(l + STEPS);
        let positions: Vec<usize> = (0..l - 1).collect();
        let stable = head.forward(
            target,
            feats.slice([0..l - 1, 0..h]),
            &s.input_ids[1..l],
            &positions,
            &mut cache,
            None,
        )?;
        let draft_argmax = |x: Tensor<B, 2>| -> Result<Vec<u32>> {
            let ids = host_argmax(head.logits(target, x))?;
            Ok(ids.into_iter().map(|i| head.target_id(i)).collect())
        };
        let stable_tokens = draft_argmax(stable.clone())?;
        for p in 1..l {
            if s.loss_mask[p] == 0.0 {
                continue;
            }
            let mut steps = cache.clone();
            steps.truncate(p);
            let mut hidden = stable.clone().slice([p - 1..p, 0..h]);
            let mut tok = stable_tokens[p - 1];
            let mut ok = true;
            for k in 0..STEPS {
                let at = p + k;
                if at >= l || s.loss_mask[at] == 0.0 {
                    break;
                }
                total[k] += 1;
                ok &= tok == target_next[at];
                correct[k] += ok as usize;
                // After a miss every later step fails: count them without decoding.
                if ok && k + 1 < STEPS && at + 1 < l {
                    hidden = head.forward(target, hidden, &[tok], &[at], &mut steps, None)?;
                    tok = draft_argmax(hidden.clone())?[0];
                }
            }
        }
    }
    Ok((0..STEPS)
        .map(|k| correct[k] as f64 / total[k].max(1) as f64)
        .collect())
}

fn host_argmax<B: HassBackend>(logits: Tensor<B, 2>) -> Result<Vec<u32>> {
    let [rows, v] = logits.dims();
    let data: Vec<f32> = logits
        .into_data()
        .convert::<f32>()
        .into_vec()
        .map_err(|e| HassError::InvalidArgument(format!("reading logits: {e:?}")))?;
    Ok((0..rows)
        .map(|r| hass_core::sampling::argmax(&data[r * v..(r + 1) * v]))
        .collect())
}
