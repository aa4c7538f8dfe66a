//! Running the target over tokenised samples and storing its features in shards
//! (the reference `ge_data`, spec §1.3), resumably.
//!
//! Sample `j` goes to shard `j / shard_size`, so the assignment is a pure function of
//! the sample order. `datagen.json` records the configuration and a fingerprint of
//! the samples; a rerun into the same directory checks it (a mismatch is an error),
//! keeps every shard that is already complete (written atomically and whose header
//! matches its samples' hash) and computes only the missing ones.

use hass_models::HassBackend;
use std::path::{Path, PathBuf};
use std::time::Instant;

use hass_core::{HassError, Result};
use hass_models::{Llama, LogitRows};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use super::render::Sample;
use super::shards::{
    list_shards, samples_hash, shard_file_name, write_shard, FeatureDtype, Fnv64, ShardHeader,
    ShardMeta, FORMAT,
};

/// Name of the manifest in a datagen directory.
pub const MANIFEST: &str = "datagen.json";

/// Settings of [`generate_shards`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatagenOptions {
    /// Samples per shard.
    pub shard_size: usize,
    /// Storage dtype of the features (the reference stores fp16).
    pub dtype: FeatureDtype,
    /// Samples are truncated to this many tokens before the forward.
    pub max_len: usize,
    /// A name for the target, recorded in the manifest and every shard.
    pub model_name: String,
    /// Samples run concurrently (threads sharing the model); the output is identical
    /// for any value (it is not part of the manifest). Keep 1 on a GPU, and on the CPU,
    /// where one sample's prefill already runs its products and attention on every
    /// core; more workers may help where one sample cannot fill the cores.
    pub workers: usize,
}

impl Default for DatagenOptions {
    fn default() -> Self {
        Self {
            shard_size: 256,
            dtype: FeatureDtype::F16,
            max_len: 2048,
            model_name: "target".into(),
            workers: 1,
        }
    }
}

/// The manifest `datagen.json`: everything that determines the shards' contents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub model: String,
    pub architecture: String,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub vocab_size: usize,
    pub dtype: FeatureDtype,
    pub shard_size: usize,
    pub max_len: usize,
    pub num_samples: usize,
    pub num_shards: usize,
    pub total_tokens: usize,
    /// FNV-1a 64 of every sample's length, ids and mask, in order.
    pub corpus_hash: String,
    /// A fingerprint of the target: its features at the first positions of sample 0
    /// (first dims only). Compared with a tolerance on resume, so that a different
    /// checkpoint with the same shape is caught while another backend or weight dtype
    /// of the same model is accepted.
    #[serde(default)]
    pub probe: Vec<f32>,
}

/// Positions and dims of [`Manifest::probe`].
const PROBE_TOKENS: usize = 8;
const PROBE_DIMS: usize = 16;

fn probe<B: HassBackend>(model: &Llama<B>, first: &Sample) -> Result<Vec<f32>> {
    let ids = &first.input_ids[..first.len().min(PROBE_TOKENS)];
    let h = model.config().hidden_size;
    let f = sample_features(model, ids)?;
    Ok(f.chunks(h)
        .flat_map(|row| row[..h.min(PROBE_DIMS)].iter().copied())
        .collect())
}

/// Do two probes come from the same model (up to f16 weights / backend rounding)?
fn probes_match(a: &[f32], b: &[f32]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let scale = a.iter().chain(b).fold(1.0f32, |m, x| m.max(x.abs()));
    a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 2e-2 * scale)
}

impl Manifest {
    /// Reads `dir/datagen.json`, if present.
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(MANIFEST);
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read(&path).map_err(|e| HassError::io(&path, e))?;
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|source| HassError::Json { path, source })
    }

    fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(MANIFEST);
        let tmp = dir.join(format!("{MANIFEST}.tmp"));
        let text = serde_json::to_string_pretty(self).expect("manifest serialises");
        std::fs::write(&tmp, text + "\n").map_err(|e| HassError::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| HassError::io(&path, e))
    }

    /// The fields in which `self` (on disk) and `other` (this run) differ.
    fn diff(&self, other: &Manifest) -> Vec<String> {
        let a = serde_json::to_value(self).expect("manifest");
        let b = serde_json::to_value(other).expect("manifest");
        let (a, b) = (a.as_object().unwrap(), b.as_object().unwrap());
        a.iter()
            .filter(|(k, v)| k.as_str() != "probe" && b.get(*k) != Some(v))
            .map(|(k, v)| format!("{k}: {v} on disk, {} now", b[k]))
            .collect()
    }
}

/// What a [`generate_shards`] run did.
#[derive(Debug, Clone, PartialEq)]
pub struct DatagenReport {
    pub out_dir: PathBuf,
    /// Samples in the corpus.
    pub samples: usize,
    /// Shards of the corpus.
    pub shards: usize,
    /// Shards computed by this run.
    pub shards_written: usize,
    /// Shards found complete and kept.
    pub shards_skipped: usize,
    /// Target forwards (= samples) run.
    pub samples_computed: usize,
    /// Tokens the target ran over.
    pub tokens_computed: usize,
    /// Wall time of the computing part (forwards, conversion, writes).
    pub seconds: f64,
    /// `tokens_computed / seconds` (0 when nothing was computed).
    pub tokens_per_sec: f64,
}

/// Post-norm features `[L·H]` (f32) of one sample: a fresh cache and one prefill
/// forward without logits.
pub fn sample_features<B: HassBackend>(model: &Llama<B>, input_ids: &[u32]) -> Result<Vec<f32>> {
    let len = input_ids.len();
    let positions: Vec<usize> = (0..len).collect();
    let mut cache = model.new_cache(len);
    let out = model.forward(input_ids, &positions, &mut cache, None, LogitRows::None)?;
    out.features
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| HassError::InvalidArgument(format!("reading features: {e:?}")))
}

/// [`write_shard`] with the features of `part` computed by `workers` threads sharing
/// `model`; results are written in sample order (out-of-order ones wait in memory).
fn write_shard_parallel<B: HassBackend>(
    model: &Llama<B>,
    path: &Path,
    part: &[Sample],
    meta: &ShardMeta,
    workers: usize,
    bar: &ProgressBar,
) -> Result<()> {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;

    let next = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel::<(usize, Result<Vec<f32>>)>();
        for _ in 0..workers.min(part.len()) {
            let tx = tx.clone();
            let next = &next;
            scope.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= part.len() {
                    break;
                }
                let r = sample_features(model, &part[i].input_ids);
                let failed = r.is_err();
                if tx.send((i, r)).is_err() || failed {
                    // The writer gave up, or this sample failed: stop taking work.
                    next.store(part.len(), Ordering::Relaxed);
                    break;
                }
            });
        }
        drop(tx);
        let mut pending: BTreeMap<usize, Result<Vec<f32>>> = BTreeMap::new();
        // `rx` moves into the closure, so an early error drops it and the workers stop.
        write_shard(path, part, meta, move |i, s| loop {
            if let Some(r) = pending.remove(&i) {
                bar.inc(s.len() as u64);
                return r;
            }
            match rx.recv() {
                Ok((j, r)) => {
                    pending.insert(j, r);
                }
                Err(_) => {
                    return Err(HassError::InvalidArgument(format!(
                        "datagen: the workers stopped before sample {i} of {}",
                        path.display()
                    )))
                }
            }
        })
    })
}

/// Is `path` a complete shard of exactly `samples` from this run?
fn shard_is_complete(path: &Path, samples: &[Sample], m: &Manifest, first: usize) -> bool {
    let Ok(h) = ShardHeader::read(path) else {
        return false;
    };
    h.meta("format") == Some(FORMAT)
        && h.meta("num_samples") == Some(samples.len().to_string().as_str())
        && h.meta("first_sample") == Some(first.to_string().as_str())
        && h.meta("hidden_size") == Some(m.hidden_size.to_string().as_str())
        && h.meta("dtype") == Some(m.dtype.as_str())
        && h.meta("samples_hash") == Some(samples_hash(samples).as_str())
}

/// Runs `model` over every sample and writes the shards into `out_dir` (created if
/// needed), resuming a previous run of the same configuration.
///
/// Each sample gets a fresh KV cache and one prefill forward ([`sample_features`]).
/// With `progress`, an `indicatif` bar shows tokens, tokens/s and the ETA on stderr.
///
/// Errors: no samples, an empty sample, a token outside the vocabulary, a sample
/// longer than the model's context, `shard_size == 0`, or a `datagen.json` in
/// `out_dir` recording another configuration or corpus ([`HassError::Config`] listing
/// the differences).
pub fn generate_shards<B: HassBackend>(
    model: &Llama<B>,
    samples: impl IntoIterator<Item = Sample>,
    out_dir: impl AsRef<Path>,
    opts: &DatagenOptions,
    progress: bool,
) -> Result<DatagenReport> {
    let out_dir = out_dir.as_ref();
    if opts.shard_size == 0 || opts.max_len == 0 {
        return Err(HassError::InvalidArgument(
            "datagen: shard_size and max_len must be at least 1".into(),
        ));
    }
    let cfg = model.config();
    let mut samples: Vec<Sample> = samples.into_iter().collect();
    if samples.is_empty() {
        return Err(HassError::InvalidArgument(
            "datagen: the corpus has no samples".into(),
        ));
    }
    let mut hash = Fnv64::default();
    let mut total_tokens = 0;
    for (j, s) in samples.iter_mut().enumerate() {
        if s.input_ids.len() != s.loss_mask.len() {
            return Err(HassError::InvalidArgument(format!(
                "datagen: sample {j} has {} ids but {} mask entries",
                s.input_ids.len(),
                s.loss_mask.len()
            )));
        }
        s.input_ids.truncate(opts.max_len);
        s.loss_mask.truncate(opts.max_len);
        if s.input_ids.is_empty() {
            return Err(HassError::InvalidArgument(format!(
                "datagen: sample {j} is empty"
            )));
        }
        if let Some(&bad) = s.input_ids.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            return Err(HassError::InvalidArgument(format!(
                "datagen: sample {j} has token id {bad}, outside the target's vocabulary of {} \
                 (tokenised with another model's tokenizer?)",
                cfg.vocab_size
            )));
        }
        if s.len() > cfg.max_position_embeddings {
            return Err(HassError::PromptTooLong {
                prompt: s.len(),
                context: cfg.max_position_embeddings,
            });
        }
        total_tokens += s.len();
        hash.write_sample(s);
    }
    let n = samples.len();
    let num_shards = n.div_ceil(opts.shard_size);
    let manifest = Manifest {
        format: FORMAT.into(),
        model: opts.model_name.clone(),
        architecture: format!("{:?}", cfg.architecture),
        hidden_size: cfg.hidden_size,
        num_layers: cfg.num_hidden_layers,
        vocab_size: cfg.vocab_size,
        dtype: opts.dtype,
        shard_size: opts.shard_size,
        max_len: opts.max_len,
        num_samples: n,
        num_shards,
        total_tokens,
        corpus_hash: hash.hex(),
        probe: probe(model, &samples[0])?,
    };

    std::fs::create_dir_all(out_dir).map_err(|e| HassError::io(out_dir, e))?;
    match Manifest::read(out_dir)? {
        Some(old)
            if Manifest {
                probe: Vec::new(),
                ..old.clone()
            } != Manifest {
                probe: Vec::new(),
                ..manifest.clone()
            } =>
        {
            return Err(HassError::config(
                format!("{}", out_dir.join(MANIFEST).display()),
                format!(
                    "this directory holds data generated with another configuration or \
                     corpus ({}); use a fresh directory, or delete it to start over",
                    old.diff(&manifest).join("; ")
                ),
            ));
        }
        Some(old) if !probes_match(&old.probe, &manifest.probe) => {
            return Err(HassError::config(
                format!("{}", out_dir.join(MANIFEST).display()),
                "this directory holds data generated by another target model (same shapes, \
                 different features on the probe positions); use a fresh directory"
                    .to_string(),
            ));
        }
        Some(_) => {}
        None => {
            if !list_shards(out_dir)?.is_empty() {
                return Err(HassError::config(
                    out_dir.display().to_string(),
                    format!("has shards but no {MANIFEST}; refusing to mix runs"),
                ));
            }
            manifest.write(out_dir)?;
        }
    }
    // Leftovers of an interrupted write.
    for entry in std::fs::read_dir(out_dir).map_err(|e| HassError::io(out_dir, e))? {
        let path = entry.map_err(|e| HassError::io(out_dir, e))?.path();
        if path.extension().is_some_and(|e| e == "tmp") {
            let _ = std::fs::remove_file(&path);
        }
    }
    let todo: Vec<usize> = (0..num_shards)
        .filter(|&k| {
            let lo = k * opts.shard_size;
            let hi = (lo + opts.shard_size).min(n);
            let path = out_dir.join(shard_file_name(k));
            if !path.exists() {
                return true;
            }
            if shard_is_complete(&path, &samples[lo..hi], &manifest, lo) {
                return false;
            }
            eprintln!(
                "datagen: {} is incomplete or stale; recomputing it",
                path.display()
            );
            true
        })
        .collect();

    let todo_tokens: usize = todo
        .iter()
        .map(|&k| {
            let lo = k * opts.shard_size;
            let hi = (lo + opts.shard_size).min(n);
            samples[lo..hi].iter().map(Sample::len).sum::<usize>()
        })
        .sum();
    let bar = if progress {
        let b = ProgressBar::new(todo_tokens as u64);
        b.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} tok \
                 {per_sec} ETA {eta} {msg}",
            )
            .expect("progress template")
            .progress_chars("=> "),
        );
        b.set_message(format!("0/{} shards", todo.len()));
        b
    } else {
        ProgressBar::hidden()
    };

    let start = Instant::now();
    let mut samples_computed = 0;
    let mut tokens_computed = 0;
    for (done, &k) in todo.iter().enumerate() {
        let lo = k * opts.shard_size;
        let hi = (lo + opts.shard_size).min(n);
        let part = &samples[lo..hi];
        let meta = ShardMeta {
            model: opts.model_name.clone(),
            hidden_size: cfg.hidden_size,
            dtype: opts.dtype,
            first_sample: lo,
            samples_hash: samples_hash(part),
        };
        let path = out_dir.join(shard_file_name(k));
        if opts.workers <= 1 {
            write_shard(&path, part, &meta, |_, s| {
                let f = sample_features(model, &s.input_ids)?;
                samples_computed += 1;
                tokens_computed += s.len();
                bar.inc(s.len() as u64);
                Ok(f)
            })?;
        } else {
            write_shard_parallel(model, &path, part, &meta, opts.workers, &bar)?;
            samples_computed += part.len();
            tokens_computed += part.iter().map(Sample::len).sum::<usize>();
        }
        bar.set_message(format!("{}/{} shards", done + 1, todo.len()));
    }
    let seconds = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    Ok(DatagenReport {
        out_dir: out_dir.to_path_buf(),
        samples: n,
        shards: num_shards,
        shards_written: todo.len(),
        shards_skipped: num_shards - todo.len(),
        samples_computed,
        tokens_computed,
        seconds,
        tokens_per_sec: if seconds > 0.0 && tokens_computed > 0 {
            tokens_computed as f64 / seconds
        } else {
            0.0
        },
    })
}
