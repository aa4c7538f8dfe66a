//! The same prompt decoded twice, vanilla then speculative, on SmolLM2-135M-Instruct
//! (default, fetched on first use) or any `--model`, with a draft head (default: the
//! committed HASS head with an 8k draft vocabulary, `heads/smollm2-hass-v8k-long`;
//! `--draft DIR` for another one in the EAGLE/HASS layout), a random head
//! (`--draft random`) or the oracle drafter (`--draft oracle`: the target drafts for
//! itself, so every draft is right — a correctness check, not a speedup). Prints both
//! texts, whether they are equal (expected at temperature 0), τ, the time split and
//! the speedup.
//!
//! ```text
//! cargo run --release -p hass-examples --bin speculate -- --chat "Name three primary colors."
//! cargo run --release -p hass-examples --bin speculate -- --draft heads/smollm2-eagle --tree 15,4,4
//! ```
//!
//! The tree defaults to `auto`: the shape with the best predicted tokens/s from this
//! machine's measured costs and the head's acceptance (`hass_infer::tuning`), measured
//! once per target, head, dtype and machine (tens of seconds) and cached in
//! `$HASS_CACHE/tuning/`. Where that tree, run on calibration prompts, is not faster
//! than plain decoding, `auto` decodes plainly and says so.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use hass_core::chat::ChatMessage;
use hass_core::sampling::SamplingParams;
use hass_infer::tuning::TreeSpec;
use hass_infer::{GenerationConfig, Generator, SpeculativeGenerator, VanillaGenerator};
use hass_models::assets::{ensure, find_data, Asset, DEFAULT_HEAD};
use hass_models::{default_device, load_model, DefaultBackend, DraftHead, WeightDtype};

#[derive(Parser, Debug)]
#[command(about = "Vanilla vs speculative decoding of one prompt")]
struct Args {
    /// HF model directory or .gguf [default: SmolLM2-135M-Instruct Q4_1]
    #[arg(long)]
    model: Option<PathBuf>,
    /// Draft head directory, `random` or `oracle` [default: heads/smollm2-hass-v8k-long,
    /// for the default model]
    #[arg(long)]
    draft: Option<String>,
    /// A user message (rendered with the chat template).
    #[arg(long, default_value = "Give me three tips for staying healthy.")]
    chat: String,
    /// Tree: `auto` (tuned for this machine and head, cached) or
    /// total_tokens,depth,top_k (total excludes the root; EAGLE-2's GPU default is
    /// 59,5,10).
    #[arg(long, default_value = "auto")]
    tree: TreeSpec,
    /// Oracle chain depth.
    #[arg(long, default_value_t = 4)]
    oracle_depth: usize,
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Storage of the weight matrices, both decoders the same: auto (a GGUF's
    /// quantized blocks as stored, on the CPU), q4_0, q4_1, q8_0, f16 or f32.
    #[arg(long, default_value = "f16")]
    dtype: WeightDtype,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let sampling = SamplingParams::new(args.temperature, 0, 1.0, args.seed)?;
    let default_model = args.model.is_none();
    let path = match args.model {
        Some(p) => p,
        None => ensure(Asset::SmolLm2)?,
    };
    let loaded = load_model::<DefaultBackend>(&path, &default_device(), args.dtype)
        .with_context(|| format!("loading {}", path.display()))?;
    let m = &loaded.model;
    let text = loaded
        .chat_template
        .render(&[ChatMessage::user(&args.chat)], true)?;
    let prompt = loaded.tokenizer.encode(&text, false)?;
    let config = GenerationConfig {
        max_new_tokens: args.max_new_tokens,
        sampling,
        stop_tokens: vec![],
    };

    let t = Instant::now();
    let vanilla = VanillaGenerator::new(m).generate(&prompt, &config, |_| true)?;
    let vanilla_s = t.elapsed().as_secs_f64();

    let draft = match (&args.draft, default_model) {
        (Some(d), _) => d.clone(),
        (None, true) => find_data(DEFAULT_HEAD, "or give a head with --draft DIR")?
            .display()
            .to_string(),
        (None, false) => bail!("give this model's draft head with --draft DIR (or oracle/random)"),
    };
    let head;
    let mut generator: Generator<_> = match draft.as_str() {
        "oracle" => {
            eprintln!("drafter: oracle (the target drafts for itself; a correctness check, slower than vanilla)");
            SpeculativeGenerator::builder(m)
                .oracle(args.oracle_depth)
                .build()?
                .into()
        }
        name => {
            head = if name == "random" {
                eprintln!("drafter: random head (untrained: expect τ ≈ 1)");
                DraftHead::random(m, args.seed)?
            } else {
                eprintln!("drafter: {name}");
                DraftHead::load(name, m)?
            };
            let resolved =
                args.tree
                    .resolve(&loaded, &head, std::path::Path::new(name), args.dtype)?;
            if let Some(a) = &resolved.auto {
                eprintln!("{a}");
            }
            resolved.generator(m, &head)?
        }
    };
    let t = Instant::now();
    let spec = generator.generate(&prompt, &config, |_| true)?;
    let spec_s = t.elapsed().as_secs_f64();

    println!(
        "--- vanilla ({} tokens, {:.1} tokens/s)\n{}",
        vanilla.tokens.len(),
        vanilla.tokens.len() as f64 / vanilla_s,
        loaded.tokenizer.decode(&vanilla.tokens, true)?
    );
    println!(
        "--- {} ({} tokens, {:.1} tokens/s)\n{}",
        if generator.speculative_stats().is_some() {
            "speculative"
        } else {
            "tree auto: plain decoding"
        },
        spec.tokens.len(),
        spec.tokens.len() as f64 / spec_s,
        loaded.tokenizer.decode(&spec.tokens, true)?
    );
    println!("---");
    println!("identical output: {}", spec.tokens == vanilla.tokens);
    if let Some(s) = generator.speculative_stats() {
        println!(
            "tau {:.2} over {} rounds; draft {:.0} ms, verify {:.0} ms, other {:.0} ms",
            s.tau(),
            s.rounds,
            s.draft_time.as_secs_f64() * 1e3,
            s.verify_time.as_secs_f64() * 1e3,
            s.other_time.as_secs_f64() * 1e3
        );
    }
    println!(
        "speedup over vanilla: {:.2}x (wall time, prefill included)",
        vanilla_s / spec_s
    );
    Ok(())
}
