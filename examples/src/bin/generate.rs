//! Generate text with a LLaMA-family model: a HF directory or a GGUF file
//! (default: SmolLM2-135M-Instruct, fetched on first use), from a raw prompt or a
//! chat message rendered with the model's chat template.
//!
//! ```text
//! cargo run --release -p hass-examples --bin generate -- --chat "What is the capital of France?"
//! cargo run --release -p hass-examples --bin generate -- --model tests/fixtures/models/llama3 --prompt "Hello"
//! ```

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;
use hass_core::chat::ChatMessage;
use hass_core::sampling::SamplingParams;
use hass_infer::{GenerationConfig, VanillaGenerator};
use hass_models::assets::{ensure, Asset};
use hass_models::backend::backend_name;
use hass_models::{default_device, load_model, DefaultBackend, WeightDtype};

#[derive(Parser, Debug)]
#[command(about = "Generate text with a LLaMA-family model (vanilla decoding)")]
struct Args {
    /// A Hugging Face model directory or a .gguf file [default: SmolLM2-135M-Instruct Q4_1, fetched on first use]
    #[arg(long)]
    model: Option<PathBuf>,
    /// Raw prompt, tokenized as is (with the tokenizer's special tokens, e.g. BOS).
    #[arg(long, conflicts_with = "chat")]
    prompt: Option<String>,
    /// A user message, rendered with the model's chat template.
    #[arg(long)]
    chat: Option<String>,
    /// System message for --chat (the template's default when omitted).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// 1 = off.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Storage of the weight matrices: auto (a GGUF's quantized blocks as stored, on
    /// the CPU), q4_0, q4_1, q8_0, f16 or f32.
    #[arg(long, default_value = "f16")]
    dtype: WeightDtype,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let sampling = SamplingParams::new(args.temperature, args.top_k, args.top_p, args.seed)?;
    let path = match args.model {
        Some(p) => p,
        None => ensure(Asset::SmolLm2)?,
    };
    let device = default_device();
    let t0 = std::time::Instant::now();
    let loaded = load_model::<DefaultBackend>(&path, &device, args.dtype)
        .with_context(|| format!("loading {}", path.display()))?;
    eprintln!(
        "loaded {} in {:.2} s on {}",
        path.display(),
        t0.elapsed().as_secs_f64(),
        backend_name()
    );

    let prompt_ids = match (&args.prompt, &args.chat) {
        (Some(p), None) => loaded.tokenizer.encode(p, true)?,
        (None, Some(msg)) => {
            let mut messages = Vec::new();
            if let Some(s) = &args.system {
                messages.push(ChatMessage::system(s));
            }
            messages.push(ChatMessage::user(msg));
            let text = loaded.chat_template.render(&messages, true)?;
            loaded.tokenizer.encode(&text, false)?
        }
        _ => bail!("give --prompt TEXT or --chat MESSAGE"),
    };
    let config = GenerationConfig {
        max_new_tokens: args.max_new_tokens,
        sampling,
        stop_tokens: vec![],
    };
    let mut stream = loaded.tokenizer.stream(true);
    let mut stdout = std::io::stdout();
    let mut failed = None;
    let out = VanillaGenerator::new(&loaded.model).generate(&prompt_ids, &config, |tok| {
        match stream.push(tok) {
            Ok(Some(text)) => {
                print!("{text}");
                let _ = stdout.flush();
            }
            Ok(None) => {}
            Err(e) => failed = Some(e),
        }
        failed.is_none()
    })?;
    if let Some(e) = failed {
        return Err(e.into());
    }
    if let Some(rest) = stream.finish()? {
        print!("{rest}");
    }
    println!();
    let s = &out.stats;
    eprintln!(
        "prompt {} tokens, prefill {:.1} tokens/s | generated {} tokens ({:?}), decode {:.1} tokens/s",
        s.prompt_tokens,
        s.prefill_tokens_per_s(),
        s.generated_tokens,
        out.stop_reason,
        s.decode_tokens_per_s()
    );
    Ok(())
}
