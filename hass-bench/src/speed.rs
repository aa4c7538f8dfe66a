//! The `speed` benchmark of one target model.

use hass_models::HassBackend;
use std::time::{Duration, Instant};

use hass_core::Result;
use hass_infer::{GenerationConfig, VanillaGenerator};
use hass_models::{Llama, LogitRows};
use serde::Serialize;

use crate::machine::{copy_bandwidth, peak_rss_bytes};

/// What the benchmark measures.
#[derive(Debug, Clone)]
pub struct SpeedOptions {
    pub prompt_tokens: usize,
    pub decode_tokens: usize,
    /// New-token counts M of the verify-cost curve.
    pub verify_sizes: Vec<usize>,
    /// Repetitions per verify size (the median is reported).
    pub repeats: usize,
}

impl Default for SpeedOptions {
    fn default() -> Self {
        SpeedOptions {
            prompt_tokens: 512,
            decode_tokens: 128,
            verify_sizes: vec![1, 4, 8, 16, 32, 64],
            repeats: 5,
        }
    }
}

/// One point of the verify-cost curve.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyPoint {
    pub new_tokens: usize,
    pub median_ms: f64,
    /// Relative to the 1-token forward of the same run.
    pub ratio_to_one: f64,
}

/// The report.
#[derive(Debug, Clone, Serialize)]
pub struct SpeedReport {
    pub load_s: f64,
    pub peak_rss_mb: Option<f64>,
    pub prefill_tokens: usize,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens: usize,
    pub decode_tokens_per_s: f64,
    pub weight_mb_per_token: f64,
    pub copy_bandwidth_gb_s: f64,
    pub roofline_tokens_per_s: f64,
    pub roofline_fraction: f64,
    pub verify: Vec<VerifyPoint>,
}

/// Deterministic token ids spread over the vocabulary (timings do not depend on ids).
fn synthetic_tokens(n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + 13) % vocab) as u32).collect()
}

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

/// Runs the benchmark on a loaded model (`load_s` is measured by the caller).
pub fn run_speed<B: HassBackend>(
    model: &Llama<B>,
    load_s: f64,
    opts: &SpeedOptions,
) -> Result<SpeedReport> {
    let vocab = model.config().vocab_size;
    let prompt = synthetic_tokens(opts.prompt_tokens, vocab);

    let gen = VanillaGenerator::new(model);
    let cfg = GenerationConfig {
        max_new_tokens: opts.decode_tokens,
        // No stop token: always generate exactly `decode_tokens`.
        stop_tokens: vec![u32::MAX],
        ..Default::default()
    };
    // Warm-up run (page in the weights, size the allocator), then the measured one.
    gen.generate(
        &prompt[..opts.prompt_tokens.min(32)],
        &GenerationConfig {
            max_new_tokens: 4,
            ..cfg.clone()
        },
        |_| true,
    )?;
    let out = gen.generate(&prompt, &cfg, |_| true)?;

    let max_m = opts.verify_sizes.iter().copied().max().unwrap_or(1);
    let mut cache = model.new_cache(opts.prompt_tokens + max_m);
    let positions: Vec<usize> = (0..prompt.len()).collect();
    model.forward(&prompt, &positions, &mut cache, None, LogitRows::None)?;
    let mut verify = Vec::new();
    let mut one_ms = None;
    for &m in &opts.verify_sizes {
        let tokens = synthetic_tokens(m, vocab);
        let pos: Vec<usize> = (opts.prompt_tokens..opts.prompt_tokens + m).collect();
        let mut times = Vec::new();
        for _ in 0..opts.repeats + 1 {
            let t = Instant::now();
            let o = model.forward(&tokens, &pos, &mut cache, None, LogitRows::All)?;
            // Force the result (all backends compute lazily or asynchronously).
            let _ = o.logits.expect("requested").into_data();
            times.push(t.elapsed());
            cache.truncate(opts.prompt_tokens);
        }
        times.remove(0); // warm-up
        let ms = median(times).as_secs_f64() * 1e3;
        let base = *one_ms.get_or_insert(ms);
        verify.push(VerifyPoint {
            new_tokens: m,
            median_ms: ms,
            ratio_to_one: ms / base,
        });
    }

    let bw = copy_bandwidth();
    let bytes = model.weight_bytes_per_token() as f64;
    let roofline = bw / bytes;
    let decode = out.stats.decode_tokens_per_s();
    Ok(SpeedReport {
        load_s,
        peak_rss_mb: peak_rss_bytes().map(|b| b as f64 / 1e6),
        prefill_tokens: out.stats.prompt_tokens,
        prefill_tokens_per_s: out.stats.prefill_tokens_per_s(),
        decode_tokens: out.stats.generated_tokens,
        decode_tokens_per_s: decode,
        weight_mb_per_token: bytes / 1e6,
        copy_bandwidth_gb_s: bw / 1e9,
        roofline_tokens_per_s: roofline,
        roofline_fraction: decode / roofline,
        verify,
    })
}

impl SpeedReport {
    /// A Markdown rendering.
    pub fn to_markdown(&self) -> String {
        let mut s = String::new();
        s += "| metric | value |\n| --- | --- |\n";
        s += &format!("| load | {:.2} s |\n", self.load_s);
        if let Some(r) = self.peak_rss_mb {
            s += &format!("| peak RSS | {r:.0} MB |\n");
        }
        s += &format!(
            "| prefill ({} tokens) | {:.1} tokens/s |\n",
            self.prefill_tokens, self.prefill_tokens_per_s
        );
        s += &format!(
            "| decode ({} tokens) | {:.1} tokens/s |\n",
            self.decode_tokens, self.decode_tokens_per_s
        );
        s += &format!(
            "| roofline | {:.1} tokens/s ({:.0} MB of weights per token at {:.1} GB/s copy bandwidth) |\n",
            self.roofline_tokens_per_s, self.weight_mb_per_token, self.copy_bandwidth_gb_s
        );
        s += &format!(
            "| decode / roofline | {:.0}% |\n\n",
            self.roofline_fraction * 100.0
        );
        s += "| new tokens M (on a cache of the prompt) | forward ms | × 1-token |\n| --- | --- | --- |\n";
        for p in &self.verify {
            s += &format!(
                "| {} | {:.2} | {:.2} |\n",
                p.new_tokens, p.median_ms, p.ratio_to_one
            );
        }
        s
    }
}
