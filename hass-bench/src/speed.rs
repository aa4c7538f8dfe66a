//! The `speed` benchmark of one target model.

use hass_models::HassBackend;

use hass_core::Result;
use hass_infer::tuning::{synthetic_tokens, verify_curve};
use hass_infer::{GenerationConfig, VanillaGenerator};
use hass_models::Llama;
use serde::Serialize;

use crate::machine::{copy_bandwidth, core_round_trip_ns, peak_rss_bytes};

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
    /// Core-to-core round trip of a cache line just before and just after the verify
    /// curve ([`core_round_trip_ns`]), when measurable.
    pub core_round_trip_ns: [Option<f64>; 2],
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

    let before = core_round_trip_ns();
    let curve = verify_curve(model, &prompt, &opts.verify_sizes, opts.repeats)?;
    let core_round_trip_ns = [before, core_round_trip_ns()];
    let base = curve.first().map_or(1.0, |p| p.1);
    let verify = curve
        .into_iter()
        .map(|(m, ms)| VerifyPoint {
            new_tokens: m,
            median_ms: ms,
            ratio_to_one: ms / base,
        })
        .collect();

    // Before the bandwidth probe, whose 512 MB of buffers would be the peak.
    let peak_rss_mb = peak_rss_bytes().map(|b| b as f64 / 1e6);
    let bw = copy_bandwidth();
    let bytes = model.weight_bytes_per_token() as f64;
    let roofline = bw / bytes;
    let decode = out.stats.decode_tokens_per_s();
    Ok(SpeedReport {
        load_s,
        peak_rss_mb,
        prefill_tokens: out.stats.prompt_tokens,
        prefill_tokens_per_s: out.stats.prefill_tokens_per_s(),
        decode_tokens: out.stats.generated_tokens,
        decode_tokens_per_s: decode,
        weight_mb_per_token: bytes / 1e6,
        copy_bandwidth_gb_s: bw / 1e9,
        roofline_tokens_per_s: roofline,
        roofline_fraction: decode / roofline,
        verify,
        core_round_trip_ns,
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
        if let [Some(before), Some(after)] = self.core_round_trip_ns {
            s += &format!(
                "\nCore-to-core round trip of a cache line: {before:.0} ns before the verify \
                 forwards, {after:.0} ns after (multi-row forwards pass more data between the \
                 cores: their ratios grow when this does).\n"
            );
        }
        s
    }
}
