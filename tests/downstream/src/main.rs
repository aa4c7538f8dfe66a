//! Decodes a fixture model through hass's public API on the backend the features pick
//! (`DefaultBackend`) and on the CPU backend in the same process, and fails unless
//! vanilla and speculative greedy output agree token for token on both.
//!
//! `cargo run --release --manifest-path tests/downstream/Cargo.toml [--features wgpu]`

use std::path::{Path, PathBuf};

use anyhow::{ensure, Result};
use hass_core::tree::TreeParams;
use hass_infer::{GenerationConfig, SpeculativeGenerator, VanillaGenerator};
use hass_models::backend::backend_name;
use hass_models::{load_model, DefaultBackend, DraftHead, HassBackend, WeightDtype};

/// Greedy output of the fixture target: plain, speculative with its EAGLE fixture head
/// (random weights: rarely accepted), and speculative with the oracle drafter (the
/// target's own greedy chain: accepted to full depth, so rounds commit several tokens).
struct Decoded {
    vanilla: Vec<u32>,
    speculative: Vec<(&'static str, Vec<u32>, f64)>,
}

fn decode<B: HassBackend>(fixtures: &Path, device: &B::Device, prompt: &str) -> Result<Decoded> {
    let loaded = load_model::<B>(fixtures.join("models/llama3"), device, WeightDtype::F32)?;
    let ids = loaded.tokenizer.encode(prompt, true)?;
    let cfg = GenerationConfig {
        max_new_tokens: 32,
        stop_tokens: vec![], // run the full length: a fixture model rambles
        ..Default::default()
    };
    let vanilla = VanillaGenerator::new(&loaded.model).generate(&ids, &cfg, |_tok| true)?;
    let head = DraftHead::load(fixtures.join("draft/eagle_llama3"), &loaded.model)?;
    let mut with_head = SpeculativeGenerator::builder(&loaded.model)
        .head(&head)
        .tree(TreeParams::new(12, 3, 4)?)
        .build()?;
    let mut oracle = SpeculativeGenerator::builder(&loaded.model).oracle(4).build()?;
    let mut speculative = Vec::new();
    for (name, g) in [("eagle head", &mut with_head), ("oracle", &mut oracle)] {
        let out = g.generate(&ids, &cfg, |_tok| true)?;
        speculative.push((name, out.tokens, g.speculative_stats().tau()));
    }
    Ok(Decoded {
        vanilla: vanilla.tokens,
        speculative,
    })
}

fn main() -> Result<()> {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures");
    let prompt = "The capital of France is";
    let cpu = decode::<burn::backend::Flex>(&fixtures, &Default::default(), prompt)?;
    let picked = decode::<DefaultBackend>(&fixtures, &hass_models::default_device(), prompt)?;
    for (backend, d) in [("cpu", &cpu), (backend_name(), &picked)] {
        println!("{backend}: vanilla {:?}", d.vanilla);
        for (drafter, tokens, tau) in &d.speculative {
            println!(
                "{backend}: speculative ({drafter}) τ = {tau:.2}, identical to vanilla: {}",
                *tokens == d.vanilla
            );
            ensure!(
                *tokens == d.vanilla,
                "{backend}: speculative output ({drafter}) differs from vanilla"
            );
        }
    }
    ensure!(
        picked.vanilla == cpu.vanilla,
        "{} decodes differently from the CPU",
        backend_name()
    );
    println!("{}: identical to the CPU backend", backend_name());
    Ok(())
}
