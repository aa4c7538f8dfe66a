//! Helpers shared by the hass-infer integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use hass_models::{load_hf_model, Llama, LogitRows};

/// The backend the cargo features pick (the CPU unless `wgpu` or `cuda` is on), so the
/// backend-generic tests run on a GPU backend when built with its feature.
pub type B = hass_models::DefaultBackend;

/// A committed fixture model (`tests/fixtures/models/<name>`).
pub fn fixture_model(name: &str) -> Llama<B> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/models")
        .join(name);
    load_hf_model::<B>(dir, &Default::default()).unwrap()
}

/// Logits after `seq`, by a full recomputation without a prior cache.
pub fn last_logits(m: &Llama<B>, seq: &[u32]) -> Vec<f32> {
    let pos: Vec<usize> = (0..seq.len()).collect();
    let out = m
        .forward(
            seq,
            &pos,
            &mut m.new_cache(seq.len()),
            None,
            LogitRows::Last,
        )
        .unwrap();
    out.logits.unwrap().into_data().into_vec::<f32>().unwrap()
}
