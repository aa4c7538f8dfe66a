//! Vanilla generation on the fixture models: greedy output equals argmax of a full
//! recomputation at every step; stop conditions and bad requests behave.

use hass_core::sampling::{argmax, SamplingParams};
use hass_core::HassError;
use hass_infer::{GenerationConfig, StopReason, VanillaGenerator};

mod common;

use common::*;

#[test]
fn greedy_generation_equals_argmax_of_full_recomputation() {
    for name in ["llama2", "llama3", "qwen2"] {
        let m = fixture_model(name);
        let prompt = vec![20u32, 31, 42, 53, 64];
        let cfg = GenerationConfig {
            max_new_tokens: 12,
            stop_tokens: vec![u32::MAX],
            ..Default::default()
        };
        let mut streamed = Vec::new();
        let out = VanillaGenerator::new(&m)
            .generate(&prompt, &cfg, |t| {
                streamed.push(t);
                true
            })
            .unwrap();
        assert_eq!(out.stop_reason, StopReason::MaxNewTokens);
        assert_eq!(out.tokens.len(), 12);
        assert_eq!(streamed, out.tokens);
        let mut seq = prompt.clone();
        for &t in &out.tokens {
            assert_eq!(
                t,
                argmax(&last_logits(&m, &seq)),
                "{name} diverged after {} tokens",
                seq.len()
            );
            seq.push(t);
        }
        assert_eq!(out.stats.prompt_tokens, 5);
        assert_eq!(out.stats.generated_tokens, 12);
    }
}

#[test]
fn stops_on_a_stop_token_and_keeps_it() {
    let m = fixture_model("llama2");
    let prompt = vec![20u32, 31, 42];
    let cfg = GenerationConfig {
        max_new_tokens: 8,
        stop_tokens: vec![u32::MAX],
        ..Default::default()
    };
    let free = VanillaGenerator::new(&m)
        .generate(&prompt, &cfg, |_| true)
        .unwrap();
    let stop_at = free.tokens[3];
    let first = free.tokens.iter().position(|&t| t == stop_at).unwrap();
    let cfg = GenerationConfig {
        stop_tokens: vec![stop_at],
        ..cfg
    };
    let out = VanillaGenerator::new(&m)
        .generate(&prompt, &cfg, |_| true)
        .unwrap();
    assert_eq!(out.stop_reason, StopReason::Stop);
    assert_eq!(out.tokens, free.tokens[..=first].to_vec());
}

#[test]
fn context_limit_cancellation_and_bad_requests() {
    let m = fixture_model("llama2"); // max_position_embeddings = 256
    let cfg = GenerationConfig {
        max_new_tokens: 1000,
        stop_tokens: vec![u32::MAX],
        ..Default::default()
    };
    let prompt: Vec<u32> = (0..250).map(|i| 20 + (i % 400)).collect();
    let out = VanillaGenerator::new(&m)
        .generate(&prompt, &cfg, |_| true)
        .unwrap();
    assert_eq!(out.stop_reason, StopReason::ContextLimit);
    assert_eq!(
        prompt.len() + out.tokens.len(),
        257,
        "fills the 256-slot cache, plus the token it chose last"
    );

    let mut n = 0;
    let out = VanillaGenerator::new(&m)
        .generate(&[20, 21], &cfg, |_| {
            n += 1;
            n < 3
        })
        .unwrap();
    assert_eq!(out.stop_reason, StopReason::Cancelled);
    assert_eq!(out.tokens.len(), 3);

    let long: Vec<u32> = vec![20; 256];
    assert!(matches!(
        VanillaGenerator::new(&m).generate(&long, &cfg, |_| true),
        Err(HassError::PromptTooLong {
            prompt: 256,
            context: 256
        })
    ));
    assert!(VanillaGenerator::new(&m)
        .generate(&[], &cfg, |_| true)
        .is_err());
    let zero = GenerationConfig {
        max_new_tokens: 0,
        ..cfg.clone()
    };
    assert!(VanillaGenerator::new(&m)
        .generate(&[20], &zero, |_| true)
        .is_err());
    let mut bad = cfg.clone();
    bad.sampling.top_p = 1.5;
    assert!(matches!(
        VanillaGenerator::new(&m).generate(&[20], &bad, |_| true),
        Err(HassError::InvalidSampling(_))
    ));
}

#[test]
fn sampling_is_reproducible_for_a_seed() {
    let m = fixture_model("qwen2");
    let sampling = SamplingParams::new(1.0, 0, 0.9, 7).unwrap();
    let cfg = GenerationConfig {
        max_new_tokens: 10,
        sampling,
        stop_tokens: vec![u32::MAX],
    };
    let a = VanillaGenerator::new(&m)
        .generate(&[20, 30], &cfg, |_| true)
        .unwrap();
    let b = VanillaGenerator::new(&m)
        .generate(&[20, 30], &cfg, |_| true)
        .unwrap();
    assert_eq!(a.tokens, b.tokens);
}
