//! Speculative decoding on the small fixture models: greedy output equals vanilla
//! token for token, the oracle drafter is accepted to full depth, bad trees error.

use hass_core::tree::TreeParams;
use hass_infer::{GenerationConfig, SpeculativeGenerator, StopReason, VanillaGenerator};
use hass_models::DraftHead;

mod common;

use common::*;

fn prompts() -> Vec<Vec<u32>> {
    (0..6)
        .map(|i| {
            (0..(5 + 3 * i))
                .map(|j| 20 + ((i * 37 + j * 11) % 480) as u32)
                .collect()
        })
        .collect()
}

#[test]
fn greedy_speculative_equals_vanilla_with_a_random_head_and_the_oracle() {
    for name in ["llama2", "llama3", "qwen2"] {
        let m = fixture_model(name);
        let head = DraftHead::random(&m, 7).unwrap();
        let cfg = GenerationConfig {
            max_new_tokens: 40,
            stop_tokens: vec![u32::MAX],
            ..Default::default()
        };
        let tree = TreeParams::new(12, 3, 4).unwrap();
        for prompt in prompts() {
            let want = VanillaGenerator::new(&m)
                .generate(&prompt, &cfg, |_| true)
                .unwrap();
            let mut streamed = Vec::new();
            let mut g = SpeculativeGenerator::builder(&m)
                .head(&head)
                .tree(tree)
                .build()
                .unwrap();
            let got = g
                .generate(&prompt, &cfg, |t| {
                    streamed.push(t);
                    true
                })
                .unwrap();
            assert_eq!(got.tokens, want.tokens, "{name}: random head diverged");
            assert_eq!(streamed, got.tokens);
            assert_eq!(got.stop_reason, StopReason::MaxNewTokens);

            let mut oracle = SpeculativeGenerator::builder(&m).oracle(4).build().unwrap();
            let got = oracle.generate(&prompt, &cfg, |_| true).unwrap();
            assert_eq!(got.tokens, want.tokens, "{name}: oracle diverged");
            let s = oracle.speculative_stats();
            // Every round but possibly the last (cut by max_new_tokens) accepts the full chain.
            let full = &s.accepted_per_round[..s.rounds - 1];
            assert!(
                full.iter().all(|&a| a == 4),
                "{name}: oracle acceptance {:?}",
                s.accepted_per_round
            );
        }
    }
}

#[test]
fn stops_inside_an_accepted_chunk_like_vanilla() {
    let m = fixture_model("llama3");
    let prompt = prompts()[2].clone();
    let free = GenerationConfig {
        max_new_tokens: 30,
        stop_tokens: vec![u32::MAX],
        ..Default::default()
    };
    let base = VanillaGenerator::new(&m)
        .generate(&prompt, &free, |_| true)
        .unwrap();
    // Stop on a token that appears mid-way: the oracle accepts it inside a chunk.
    let stop_tok = base.tokens[9];
    let cfg = GenerationConfig {
        stop_tokens: vec![stop_tok],
        ..free.clone()
    };
    let want = VanillaGenerator::new(&m)
        .generate(&prompt, &cfg, |_| true)
        .unwrap();
    let got = SpeculativeGenerator::builder(&m)
        .oracle(5)
        .build()
        .unwrap()
        .generate(&prompt, &cfg, |_| true)
        .unwrap();
    assert_eq!(got.tokens, want.tokens);
    assert_eq!(got.stop_reason, StopReason::Stop);
    // max_new_tokens in the middle of a chunk, and the context limit (256 positions).
    for n in [1, 2, 7, 13] {
        let cfg = GenerationConfig {
            max_new_tokens: n,
            ..free.clone()
        };
        let got = SpeculativeGenerator::builder(&m)
            .oracle(5)
            .build()
            .unwrap()
            .generate(&prompt, &cfg, |_| true)
            .unwrap();
        assert_eq!(got.tokens, base.tokens[..n].to_vec());
    }
    let long: Vec<u32> = (0..240).map(|i| 20 + (i % 400)).collect();
    let cfg = GenerationConfig {
        max_new_tokens: 100,
        ..free
    };
    let want = VanillaGenerator::new(&m)
        .generate(&long, &cfg, |_| true)
        .unwrap();
    let head = DraftHead::random(&m, 1).unwrap();
    let got = SpeculativeGenerator::builder(&m)
        .head(&head)
        .tree(TreeParams::new(10, 3, 3).unwrap())
        .build()
        .unwrap()
        .generate(&long, &cfg, |_| true)
        .unwrap();
    assert_eq!(want.stop_reason, StopReason::ContextLimit);
    assert_eq!(
        (got.tokens, got.stop_reason),
        (want.tokens, want.stop_reason)
    );
}

#[test]
fn bad_tree_parameters_and_missing_drafter_are_errors() {
    let m = fixture_model("llama2");
    let head = DraftHead::random(&m, 0).unwrap();
    assert!(TreeParams::new(0, 3, 3).is_err());
    assert!(TreeParams::new(5, 3, 0).is_err());
    assert!(SpeculativeGenerator::builder(&m)
        .head(&head)
        .tree(TreeParams {
            total_tokens: 4,
            depth: 2,
            top_k: 0
        })
        .build()
        .is_err());
    assert!(SpeculativeGenerator::builder(&m).build().is_err());
    assert!(SpeculativeGenerator::builder(&m)
        .oracle(0)
        .build()
        .unwrap()
        .generate(&[20, 21], &GenerationConfig::default(), |_| true)
        .is_err());
}
