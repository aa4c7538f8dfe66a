//! `hass-bench`: benchmarks on this machine.
//!
//! ```text
//! cargo run --release -p hass-bench -- speed                 # SmolLM2 (default model)
//! cargo run --release -p hass-bench -- speed --model m.gguf --json out.json
//! cargo run --release -p hass-bench -- eval --limit 3     # vanilla / EAGLE / HASS heads
//! cargo run --release -p hass-bench -- eval --sweep --limit 1 --sets mt_bench
//! ```

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use hass_bench::eval_cli::{run_eval, EvalArgs};
use hass_bench::speed::{run_speed, SpeedOptions};
use hass_models::assets::{ensure, Asset};
use hass_models::backend::backend_name;
use hass_models::{default_device, load_model, DefaultBackend, WeightDtype};

#[derive(Parser)]
#[command(about = "hass benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load time, peak RSS, prefill/decode throughput vs the memory roofline, verify cost.
    Speed {
        /// HF model directory or .gguf [default: SmolLM2-135M-Instruct, fetched on first use]
        #[arg(long)]
        model: Option<PathBuf>,
        #[arg(long, default_value_t = 512)]
        prompt_tokens: usize,
        #[arg(long, default_value_t = 128)]
        decode_tokens: usize,
        /// New-token counts of the verify-cost curve.
        #[arg(long, value_delimiter = ',', default_value = "1,4,8,16,32,64")]
        verify: Vec<usize>,
        #[arg(long, default_value_t = 5)]
        repeats: usize,
        /// Storage of the weight matrices: auto (a GGUF's quantized blocks as stored,
        /// on the CPU), q4_0, q4_1, q8_0, f16 or f32.
        #[arg(long, default_value = "f16")]
        dtype: WeightDtype,
        /// Also write the report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// τ and speedup of draft heads over vanilla on the six prompt sets (spec §6).
    Eval(EvalArgs),
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Speed {
            model,
            prompt_tokens,
            decode_tokens,
            verify,
            repeats,
            dtype,
            json,
        } => {
            let path = match model {
                Some(p) => p,
                None => ensure(Asset::SmolLm2)?,
            };
            let t = std::time::Instant::now();
            let loaded = load_model::<DefaultBackend>(&path, &default_device(), dtype)
                .with_context(|| format!("loading {}", path.display()))?;
            let load_s = t.elapsed().as_secs_f64();
            let opts = SpeedOptions {
                prompt_tokens,
                decode_tokens,
                verify_sizes: verify,
                repeats,
            };
            let report = run_speed(&loaded.model, load_s, &opts)?;
            println!(
                "model: {}\nbackend: {}\nweights: {dtype:?}\n",
                path.display(),
                backend_name()
            );
            println!("{}", report.to_markdown());
            if let Some(p) = json {
                std::fs::write(&p, serde_json::to_string_pretty(&report)?)
                    .with_context(|| format!("writing {}", p.display()))?;
            }
        }
        Command::Eval(args) => run_eval(args)?,
    }
    Ok(())
}
