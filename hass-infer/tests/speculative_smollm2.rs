//! Losslessness on real weights: on SmolLM2-135M-Instruct (f32), greedy speculative
//! decoding is token-identical to vanilla decoding for 20 benchmark prompts (the
//! first 4 of MT-bench, HumanEval, GSM8K, Alpaca and QA, copied into
//! `bench-prompts/`), through the chat template, up to 128 new tokens,
//! with a random draft head and with the oracle drafter, which must be accepted to
//! full depth in every round.

use std::path::PathBuf;
use std::sync::OnceLock;

use hass_core::chat::ChatMessage;
use hass_core::tree::TreeParams;
use hass_infer::{GenerationConfig, SpeculativeGenerator, VanillaGenerator};
use hass_models::assets::{ensure, Asset};
use hass_models::{load_model, DraftHead, LoadedModel, WeightDtype};

type B = burn::backend::Flex;

const ORACLE_DEPTH: usize = 4;

fn bench_prompts() -> Vec<String> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../bench-prompts");
    let mut out = Vec::new();
    for set in ["mt_bench", "humaneval", "gsm8k", "alpaca", "qa"] {
        let path = dir.join(format!("{set}.jsonl"));
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for line in text.lines().take(4) {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            out.push(v["turns"][0].as_str().unwrap().to_string());
        }
    }
    out
}

struct Case {
    prompt: Vec<u32>,
    vanilla: Vec<u32>,
}

/// The target and the vanilla outputs, computed once and shared by both tests
/// (which run in parallel, one per core).
fn setup() -> &'static (LoadedModel<B>, Vec<Case>) {
    static SETUP: OnceLock<(LoadedModel<B>, Vec<Case>)> = OnceLock::new();
    SETUP.get_or_init(|| {
        let loaded = load_model::<B>(
            ensure(Asset::SmolLm2).unwrap(),
            &Default::default(),
            WeightDtype::F32,
        )
        .unwrap();
        let cases = bench_prompts()
            .iter()
            .map(|text| {
                let rendered = loaded
                    .chat_template
                    .render(&[ChatMessage::user(text)], true)
                    .unwrap();
                let prompt = loaded.tokenizer.encode(&rendered, false).unwrap();
                let vanilla = VanillaGenerator::new(&loaded.model)
                    .generate(&prompt, &config(), |_| true)
                    .unwrap()
                    .tokens;
                Case { prompt, vanilla }
            })
            .collect();
        (loaded, cases)
    })
}

fn config() -> GenerationConfig {
    GenerationConfig {
        max_new_tokens: 128,
        ..Default::default()
    }
}

#[test]
fn oracle_drafter_is_token_identical_and_fully_accepted_on_smollm2() {
    let (loaded, cases) = setup();
    let m = &loaded.model;
    let (mut tokens, mut rounds) = (0, 0);
    for (i, case) in cases.iter().enumerate() {
        let mut oracle = SpeculativeGenerator::builder(m)
            .oracle(ORACLE_DEPTH)
            .build()
            .unwrap();
        let got = oracle.generate(&case.prompt, &config(), |_| true).unwrap();
        assert_eq!(
            got.tokens, case.vanilla,
            "prompt {i}: oracle output differs from vanilla"
        );
        let s = oracle.speculative_stats();
        // Every round but the last (cut by EOS or max_new_tokens) accepts the whole chain.
        assert!(
            s.accepted_per_round[..s.rounds - 1]
                .iter()
                .all(|&a| a == ORACLE_DEPTH),
            "prompt {i}: oracle acceptance {:?}",
            s.accepted_per_round
        );
        tokens += got.tokens.len();
        rounds += s.rounds;
    }
    println!(
        "oracle: {tokens} tokens in {rounds} rounds (tau {:.2})",
        tokens as f64 / rounds as f64
    );
}

#[test]
fn random_head_is_token_identical_on_smollm2() {
    let (loaded, cases) = setup();
    let m = &loaded.model;
    let head = DraftHead::random(m, 0).unwrap();
    for (i, case) in cases.iter().enumerate() {
        let mut random = SpeculativeGenerator::builder(m)
            .head(&head)
            .tree(TreeParams::new(4, 2, 2).unwrap())
            .build()
            .unwrap();
        let got = random.generate(&case.prompt, &config(), |_| true).unwrap();
        assert_eq!(
            got.tokens, case.vanilla,
            "prompt {i}: random-head output differs from vanilla"
        );
    }
}
