//! Losslessness on real weights: on SmolLM2-135M-Instruct, greedy speculative
//! decoding is token-identical to vanilla decoding of the same weights for 20 benchmark
//! prompts (the first 4 of MT-bench, HumanEval, GSM8K, Alpaca and QA, copied into
//! `bench-prompts/`), through the chat template, up to 128 new tokens: with f32
//! weights (a random draft head, and the oracle drafter, which must be accepted to
//! full depth in every round), and with the file's Q4_1/Q8_0 blocks (the oracle, and
//! the committed default head on a depth-3 tree).

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

type Setup = (LoadedModel<B>, Vec<Case>);

/// The target in `dtype` and its vanilla outputs, computed once per dtype and shared
/// by the tests (which run in parallel, one per core).
fn setup(dtype: WeightDtype) -> &'static Setup {
    static F32: OnceLock<Setup> = OnceLock::new();
    static QUANT: OnceLock<Setup> = OnceLock::new();
    let cell = match dtype {
        WeightDtype::F32 => &F32,
        WeightDtype::Auto => &QUANT,
        other => panic!("no setup for {other}"),
    };
    cell.get_or_init(|| {
        let loaded =
            load_model::<B>(ensure(Asset::SmolLm2).unwrap(), &Default::default(), dtype).unwrap();
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

/// The oracle drafts the target's own greedy tokens: every round verifies
/// `ORACLE_DEPTH + 1` rows, and all of them must be accepted.
fn oracle_is_token_identical_and_fully_accepted(dtype: WeightDtype) {
    let (loaded, cases) = setup(dtype);
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
        "oracle ({dtype}): {tokens} tokens in {rounds} rounds (tau {:.2})",
        tokens as f64 / rounds as f64
    );
}

#[test]
fn oracle_drafter_is_token_identical_and_fully_accepted_on_smollm2() {
    oracle_is_token_identical_and_fully_accepted(WeightDtype::F32);
}

#[test]
fn oracle_drafter_is_token_identical_on_quantized_smollm2() {
    oracle_is_token_identical_and_fully_accepted(WeightDtype::Auto);
}

/// The committed default head on the file's quantized blocks, with a tree deep and
/// wide enough to verify several branches per round.
#[test]
fn committed_head_is_token_identical_on_quantized_smollm2() {
    let (loaded, cases) = setup(WeightDtype::Auto);
    let m = &loaded.model;
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../heads/smollm2-hass-v8k-long");
    let head = DraftHead::load(&dir, m).unwrap();
    let (mut accepted, mut rounds) = (0, 0);
    for (i, case) in cases.iter().enumerate() {
        let mut g = SpeculativeGenerator::builder(m)
            .head(&head)
            .tree(TreeParams::new(10, 3, 3).unwrap())
            .build()
            .unwrap();
        let got = g.generate(&case.prompt, &config(), |_| true).unwrap();
        assert_eq!(
            got.tokens, case.vanilla,
            "prompt {i}: speculative output differs from vanilla (quantized weights)"
        );
        let s = g.speculative_stats();
        accepted += s.accepted_per_round.iter().sum::<usize>();
        rounds += s.rounds;
    }
    let tau = 1.0 + accepted as f64 / rounds as f64;
    println!("committed head on q4_1: tau {tau:.2} over {rounds} rounds");
    assert!(
        tau > 1.0,
        "the trained head never got a draft token accepted"
    );
}

#[test]
fn random_head_is_token_identical_on_smollm2() {
    let (loaded, cases) = setup(WeightDtype::F32);
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
