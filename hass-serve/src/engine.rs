//! The generation worker: one thread owns the model (generation is CPU-bound and the
//! model is single-stream), takes requests from a bounded queue in order, and sends
//! each request's text back as it is generated.
//!
//! A request whose receiver is dropped (the HTTP client went away) is noticed at the
//! next token and its generation stops there.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;

use hass_core::chat::ChatTemplate;
use hass_core::tokenizer::{TokenStream, Tokenizer};
use hass_core::HassError;
use hass_infer::tuning::TreeSpec;
use hass_infer::{GenerationConfig, Generator, StopReason, VanillaGenerator};
use hass_models::assets::{ensure, find_data, Asset, DEFAULT_HEAD};
use hass_models::{
    default_device, load_model, DefaultBackend, DraftHead, LoadedModel, WeightDtype,
};
use serde::Serialize;
use tokio::sync::mpsc::UnboundedSender;

use crate::stop::StopMatcher;

/// Which draft head the engine decodes with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Draft {
    /// The committed head for the default model; vanilla decoding for any other.
    Default,
    /// Vanilla decoding.
    None,
    /// The head in this directory.
    Dir(PathBuf),
}

/// What the engine loads.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// A HF model directory or a `.gguf` file; `None`: SmolLM2-135M-Instruct, fetched
    /// on first use.
    pub model: Option<PathBuf>,
    pub draft: Draft,
    pub tree: TreeSpec,
    pub dtype: WeightDtype,
    /// Requests that may wait while one is generated; more are refused.
    pub queue: usize,
}

/// Why the engine did not start.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("loading {what}")]
    Load {
        what: String,
        #[source]
        source: HassError,
    },
    #[error("the engine thread could not be started: {0}")]
    Thread(#[from] std::io::Error),
    #[error("the engine thread ended while loading the model")]
    Exited,
}

/// Why a request was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("the queue is full ({0} requests waiting)")]
    Busy(usize),
    #[error("the generation engine has stopped")]
    Stopped,
}

/// What the HTTP side needs to know about the loaded model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    /// Context window in tokens: prompt plus generated tokens fit in it.
    pub context: usize,
    /// The model file or directory.
    pub path: PathBuf,
    /// The draft head's directory, when decoding speculatively (none where a head
    /// was given but `--tree auto` found plain decoding faster).
    pub head: Option<PathBuf>,
}

/// One generation request.
pub struct Job {
    pub prompt: Vec<u32>,
    pub config: GenerationConfig,
    /// OpenAI stop strings.
    pub stop: Vec<String>,
    pub events: UnboundedSender<Event>,
}

/// What the engine sends back for a [`Job`], in order: text pieces, then one `Done`
/// or `Failed`.
#[derive(Debug, Clone)]
pub enum Event {
    Text(String),
    Done(Summary),
    Failed(String),
}

/// Why a completion ended, in OpenAI's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model's end-of-turn token or a stop string.
    Stop,
    /// `max_tokens` or the context window.
    Length,
}

/// Counts and speed of one finished request.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    #[serde(skip)]
    pub finish_reason: FinishReason,
    #[serde(skip)]
    pub prompt_tokens: usize,
    #[serde(skip)]
    pub completion_tokens: usize,
    /// Whether a draft head proposed the tokens.
    pub speculative: bool,
    /// Mean tokens committed per verification round (speculative decoding only).
    pub tau: Option<f64>,
    /// Verification rounds (speculative decoding only).
    pub rounds: Option<usize>,
    pub decode_tokens_per_s: f64,
}

/// Request counters, shared between the engine thread and the HTTP side.
#[derive(Debug, Default)]
struct Counters {
    queued: AtomicUsize,
    busy: AtomicBool,
    completed: AtomicU64,
    cancelled: AtomicU64,
    failed: AtomicU64,
    rejected: AtomicU64,
}

/// A snapshot of the counters (`GET /health`).
#[derive(Debug, Clone, Serialize)]
pub struct EngineStats {
    /// Requests waiting for the engine.
    pub queued: usize,
    /// Whether a request is being generated.
    pub busy: bool,
    pub completed: u64,
    /// Requests whose client disconnected before the end.
    pub cancelled: u64,
    pub failed: u64,
    /// Requests refused with 503 because the queue was full.
    pub rejected: u64,
}

/// The handle to the engine thread.
#[derive(Clone)]
pub struct Engine {
    jobs: SyncSender<Job>,
    queue: usize,
    counters: Arc<Counters>,
}

impl Engine {
    /// Starts the engine thread, loads the model (and head) on it and returns once
    /// it is ready to generate.
    pub fn start(options: EngineOptions) -> Result<(Engine, ModelInfo), EngineError> {
        let (jobs, queue) = sync_channel(options.queue);
        let (ready_tx, ready_rx) = sync_channel(1);
        let counters = Arc::new(Counters::default());
        let shared = counters.clone();
        let queue_len = options.queue;
        std::thread::Builder::new()
            .name("hass-engine".into())
            .spawn(move || run(options, ready_tx, queue, shared))?;
        let info = ready_rx.recv().map_err(|_| EngineError::Exited)??;
        Ok((
            Engine {
                jobs,
                queue: queue_len,
                counters,
            },
            info,
        ))
    }

    /// Queues `job`, or refuses it at once when the queue is full.
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        self.counters.queued.fetch_add(1, Ordering::SeqCst);
        let refused = match self.jobs.try_send(job) {
            Ok(()) => return Ok(()),
            Err(TrySendError::Full(_)) => {
                self.counters.rejected.fetch_add(1, Ordering::SeqCst);
                SubmitError::Busy(self.queue)
            }
            Err(TrySendError::Disconnected(_)) => SubmitError::Stopped,
        };
        self.counters.queued.fetch_sub(1, Ordering::SeqCst);
        Err(refused)
    }

    pub fn stats(&self) -> EngineStats {
        let c = &self.counters;
        EngineStats {
            queued: c.queued.load(Ordering::SeqCst),
            busy: c.busy.load(Ordering::SeqCst),
            completed: c.completed.load(Ordering::SeqCst),
            cancelled: c.cancelled.load(Ordering::SeqCst),
            failed: c.failed.load(Ordering::SeqCst),
            rejected: c.rejected.load(Ordering::SeqCst),
        }
    }
}

type B = DefaultBackend;

fn load_err(what: impl Into<String>) -> impl FnOnce(HassError) -> EngineError {
    let what = what.into();
    move |source| EngineError::Load { what, source }
}

/// The head directory `draft` names for the model at `model` (`None` when the
/// default model is meant).
fn head_dir(draft: &Draft, default_model: bool) -> Result<Option<PathBuf>, EngineError> {
    match draft {
        Draft::None => Ok(None),
        Draft::Dir(d) => Ok(Some(d.clone())),
        Draft::Default if default_model => find_data(
            DEFAULT_HEAD,
            "or give a head with --draft DIR (--draft none: vanilla decoding)",
        )
        .map(Some)
        .map_err(load_err("the default draft head")),
        Draft::Default => Ok(None),
    }
}

/// The engine thread: loads, reports readiness, then serves jobs until every
/// [`Engine`] handle is gone.
fn run(
    options: EngineOptions,
    ready: SyncSender<Result<ModelInfo, EngineError>>,
    jobs: Receiver<Job>,
    counters: Arc<Counters>,
) {
    let fail = |e| {
        let _ = ready.send(Err(e));
    };
    let loaded = match load(&options) {
        Ok(l) => l,
        Err(e) => return fail(e),
    };
    let head = match load_head(&options, &loaded) {
        Ok(h) => h,
        Err(e) => return fail(e),
    };
    let mut generator = match build_generator(&options, &loaded, head.as_ref()) {
        Ok(g) => g,
        Err(e) => return fail(e),
    };
    let info = ModelInfo {
        tokenizer: loaded.tokenizer.clone(),
        template: loaded.chat_template.clone(),
        context: loaded.model.config().max_position_embeddings,
        path: loaded.path.clone(),
        // None where `--tree auto` chose plain decoding.
        head: head
            .as_ref()
            .filter(|_| generator.speculative_stats().is_some())
            .map(|(d, _)| d.clone()),
    };
    if ready.send(Ok(info)).is_err() {
        return;
    }
    while let Ok(job) = jobs.recv() {
        counters.queued.fetch_sub(1, Ordering::SeqCst);
        counters.busy.store(true, Ordering::SeqCst);
        let counter = match generate(&loaded.tokenizer, &mut generator, job) {
            Outcome::Completed => &counters.completed,
            Outcome::Cancelled => &counters.cancelled,
            Outcome::Failed => &counters.failed,
        };
        counter.fetch_add(1, Ordering::SeqCst);
        counters.busy.store(false, Ordering::SeqCst);
    }
}

/// The draft head (and its directory) the options ask for, if any.
fn load_head(
    options: &EngineOptions,
    loaded: &LoadedModel<B>,
) -> Result<Option<(PathBuf, DraftHead<B>)>, EngineError> {
    let Some(dir) = head_dir(&options.draft, options.model.is_none())? else {
        return Ok(None);
    };
    let head = DraftHead::load(&dir, &loaded.model).map_err(load_err(dir.display().to_string()))?;
    Ok(Some((dir, head)))
}

/// Speculative decoding with `head` (its tree resolved, tuned if `auto`), or vanilla:
/// without a head, or where `auto` measured speculation slower on this machine.
fn build_generator<'a>(
    options: &EngineOptions,
    loaded: &'a LoadedModel<B>,
    head: Option<&'a (PathBuf, DraftHead<B>)>,
) -> Result<Generator<'a, B>, EngineError> {
    let Some((dir, head)) = head else {
        return Ok(VanillaGenerator::new(&loaded.model).into());
    };
    let resolved = options
        .tree
        .resolve(loaded, head, dir, options.dtype)
        .map_err(load_err("the draft tree"))?;
    if let Some(a) = &resolved.auto {
        eprintln!("{a}");
    }
    resolved
        .generator(&loaded.model, head)
        .map_err(load_err("the speculative generator"))
}

fn load(options: &EngineOptions) -> Result<LoadedModel<B>, EngineError> {
    let path = match &options.model {
        Some(p) => p.clone(),
        None => ensure(Asset::SmolLm2).map_err(load_err("the default model"))?,
    };
    load_model::<B>(&path, &default_device(), options.dtype)
        .map_err(load_err(path.display().to_string()))
}

enum Outcome {
    Completed,
    Cancelled,
    Failed,
}

/// Generates `job`, streaming its text through the stop matcher.
fn generate(tokenizer: &Tokenizer, generator: &mut Generator<B>, job: Job) -> Outcome {
    // The prompt's tail as context, so that the first word keeps its leading space.
    let mut stream = TokenStream::with_context(tokenizer.clone(), true, &job.prompt);
    let mut matcher = StopMatcher::new(job.stop);
    let mut stopped = false;
    let mut failed = None;
    let events = &job.events;
    let result = generator.generate(&job.prompt, &job.config, |token| {
        if events.is_closed() {
            return false;
        }
        match stream.push(token) {
            Ok(Some(text)) => {
                let released = matcher.push(&text);
                if !released.text.is_empty() {
                    let _ = events.send(Event::Text(released.text));
                }
                stopped = released.stopped;
                !stopped
            }
            Ok(None) => true,
            Err(e) => {
                failed = Some(e);
                false
            }
        }
    });
    if events.is_closed() {
        return Outcome::Cancelled;
    }
    let out = match (result, failed) {
        (Ok(out), None) => out,
        (Err(e), _) | (Ok(_), Some(e)) => {
            let _ = events.send(Event::Failed(e.to_string()));
            return Outcome::Failed;
        }
    };
    if !stopped {
        let tail = match stream.finish() {
            Ok(t) => t.unwrap_or_default(),
            Err(e) => {
                let _ = events.send(Event::Failed(e.to_string()));
                return Outcome::Failed;
            }
        };
        let released = matcher.push(&tail);
        stopped = released.stopped;
        let rest = released.text + &matcher.finish();
        if !rest.is_empty() {
            let _ = events.send(Event::Text(rest));
        }
    }
    let finish_reason = if stopped || out.stop_reason == StopReason::Stop {
        FinishReason::Stop
    } else {
        FinishReason::Length
    };
    let spec = generator.speculative_stats();
    let summary = Summary {
        finish_reason,
        prompt_tokens: job.prompt.len(),
        completion_tokens: out.tokens.len(),
        speculative: spec.is_some(),
        tau: spec.map(|s| s.tau()),
        rounds: spec.map(|s| s.rounds),
        decode_tokens_per_s: out.stats.decode_tokens_per_s(),
    };
    let _ = events.send(Event::Done(summary));
    Outcome::Completed
}
