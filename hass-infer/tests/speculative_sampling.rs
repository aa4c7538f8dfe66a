//! End-to-end sampling losslessness on a fixture model: the joint distribution of the
//! first two generated tokens of speculative sampling equals the target's exact
//! distribution (computed from its logits), by a χ² test over 3,000 seeds.
//! Sampling with top-k = 3 keeps 9 cells; the χ² critical value for 8 degrees of
//! freedom at a false-alarm rate of 0.1% is 26.12. Seeds are fixed, so the test is
//! deterministic.

use hass_core::sampling::{LogitsProcessor, SamplingParams};
use hass_core::tree::TreeParams;
use hass_infer::{GenerationConfig, SpeculativeGenerator};
use hass_models::{DraftHead, Llama};

mod common;

use common::*;

const SEEDS: u64 = 3000;
const CHI2_8DF_P001: f64 = 26.12;

fn probs_after(m: &Llama<B>, seq: &[u32], params: &SamplingParams) -> Vec<f32> {
    LogitsProcessor::new(params).probs(&last_logits(m, seq))
}

fn chi2_of(
    m: &Llama<B>,
    prompt: &[u32],
    make: &mut dyn FnMut(u64) -> Vec<u32>,
    params: &SamplingParams,
) -> f64 {
    // Exact joint distribution of (t1, t2) over the support of the processed dists.
    let p1 = probs_after(m, prompt, params);
    let mut cells = Vec::new();
    for (t1, &a) in p1.iter().enumerate().filter(|(_, &a)| a > 0.0) {
        let mut seq = prompt.to_vec();
        seq.push(t1 as u32);
        let p2 = probs_after(m, &seq, params);
        for (t2, &b) in p2.iter().enumerate().filter(|(_, &b)| b > 0.0) {
            cells.push(((t1 as u32, t2 as u32), a as f64 * b as f64));
        }
    }
    assert_eq!(cells.len(), 9, "top-k 3 twice");
    let mut counts = vec![0u64; cells.len()];
    for seed in 0..SEEDS {
        let out = make(seed);
        let i = cells
            .iter()
            .position(|(c, _)| *c == (out[0], out[1]))
            .expect("a token outside the target's support");
        counts[i] += 1;
    }
    cells
        .iter()
        .zip(&counts)
        .map(|((_, p), &o)| {
            let e = p * SEEDS as f64;
            (o as f64 - e).powi(2) / e
        })
        .sum()
}

#[test]
fn first_two_sampled_tokens_follow_the_target_distribution() {
    let m = fixture_model("llama3");
    let head = DraftHead::random(&m, 3).unwrap();
    let prompt = vec![4u32, 300, 41, 77, 120];
    let base = SamplingParams::new(1.0, 3, 1.0, 0).unwrap();
    let run = |g: &mut SpeculativeGenerator<'_, B>, seed: u64| {
        let cfg = GenerationConfig {
            max_new_tokens: 2,
            sampling: SamplingParams { seed, ..base },
            stop_tokens: vec![u32::MAX],
        };
        g.generate(&prompt, &cfg, |_| true).unwrap().tokens
    };
    let mut oracle = SpeculativeGenerator::builder(&m).oracle(2).build().unwrap();
    let chi2 = chi2_of(&m, &prompt, &mut |s| run(&mut oracle, s), &base);
    println!("oracle drafter: chi2 = {chi2:.2} (critical {CHI2_8DF_P001})");
    assert!(chi2 < CHI2_8DF_P001, "oracle drafter: chi2 {chi2}");
    let mut random = SpeculativeGenerator::builder(&m)
        .head(&head)
        .tree(TreeParams::new(6, 2, 3).unwrap())
        .build()
        .unwrap();
    let chi2 = chi2_of(&m, &prompt, &mut |s| run(&mut random, s), &base);
    println!("random head: chi2 = {chi2:.2} (critical {CHI2_8DF_P001})");
    assert!(chi2 < CHI2_8DF_P001, "random head: chi2 {chi2}");
}
