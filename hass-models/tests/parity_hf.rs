//! Parity of the hass target with HF `transformers` on the fixture models made by
//! `scripts/make_hf_fixtures.py` (LLaMA-2 style f32, LLaMA-3 style sharded bf16 with
//! GQA and llama3 rope scaling, Qwen2 style f16 with QKV bias and tied embeddings).
//! Tolerance: 1e-4 max abs on logits and features (the reference's own noise between
//! equivalent attention paths is ~3e-6).

mod common;

use common::*;
use hass_models::{load_hf_model, LogitRows};

const TOL: f32 = 1e-4;
const MODELS: [&str; 3] = ["llama2", "llama3", "qwen2"];

fn check(model: &str, case: &str, got: Vec<f32>, exp: &Expected, name: &str) {
    let (want, _) = exp.f32(name);
    let d = max_abs_diff(&got, &want);
    assert!(
        d <= TOL,
        "{model} {case}: {name} max abs diff {d:e} > {TOL:e}"
    );
}

#[test]
fn prefill_and_incremental_decode_match_reference() {
    for model in MODELS {
        let dev = Default::default();
        let m = load_hf_model::<B>(fixture_dir(model), &dev).unwrap();
        let exp = Expected::load(model);
        let ids = exp.ids("prefill.input_ids");
        let mut cache = m.new_cache(64);
        let pos: Vec<usize> = (0..ids.len()).collect();
        let out = m
            .forward(&ids, &pos, &mut cache, None, LogitRows::All)
            .unwrap();
        check(
            model,
            "prefill",
            to_vec(out.features),
            &exp,
            "prefill.features",
        );
        check(
            model,
            "prefill",
            to_vec(out.logits.unwrap()),
            &exp,
            "prefill.logits",
        );
        for i in 0..4 {
            let tok = exp.ids(&format!("decode.{i}.input_ids"));
            let p = cache.len();
            let out = m
                .forward(&tok, &[p], &mut cache, None, LogitRows::Last)
                .unwrap();
            check(
                model,
                "decode",
                to_vec(out.features),
                &exp,
                &format!("decode.{i}.features"),
            );
            check(
                model,
                "decode",
                to_vec(out.logits.unwrap()),
                &exp,
                &format!("decode.{i}.logits"),
            );
        }
        assert_eq!(cache.len(), ids.len() + 4);
    }
}

#[test]
fn tree_forward_with_mask_and_positions_matches_per_path_reference() {
    for model in MODELS {
        let dev = Default::default();
        let m = load_hf_model::<B>(fixture_dir(model), &dev).unwrap();
        let exp = Expected::load(model);
        let prefix = exp.ids("prefill.input_ids");
        let mut cache = m.new_cache(64);
        let pos: Vec<usize> = (0..prefix.len()).collect();
        m.forward(&prefix, &pos, &mut cache, None, LogitRows::None)
            .unwrap();
        let tree = exp.ids("tree.input_ids");
        let positions: Vec<usize> = exp
            .i64("tree.positions")
            .into_iter()
            .map(|p| p as usize)
            .collect();
        let mask: Vec<bool> = exp.i64("tree.mask").into_iter().map(|v| v != 0).collect();
        let out = m
            .forward(&tree, &positions, &mut cache, Some(&mask), LogitRows::All)
            .unwrap();
        check(model, "tree", to_vec(out.features), &exp, "tree.features");
        check(
            model,
            "tree",
            to_vec(out.logits.unwrap()),
            &exp,
            "tree.logits",
        );
    }
}

#[test]
fn long_prefill_matches_reference() {
    for model in MODELS {
        let dev = Default::default();
        let m = load_hf_model::<B>(fixture_dir(model), &dev).unwrap();
        let exp = Expected::load(model);
        let ids = exp.ids("long.input_ids");
        let mut cache = m.new_cache(ids.len());
        let pos: Vec<usize> = (0..ids.len()).collect();
        let out = m
            .forward(&ids, &pos, &mut cache, None, LogitRows::All)
            .unwrap();
        check(model, "long", to_vec(out.features), &exp, "long.features");
        check(
            model,
            "long",
            to_vec(out.logits.unwrap()),
            &exp,
            "long.logits",
        );
    }
}

#[test]
fn selected_logit_rows_equal_the_same_rows_of_all() {
    let dev = Default::default();
    let m = load_hf_model::<B>(fixture_dir("llama3"), &dev).unwrap();
    let exp = Expected::load("llama3");
    let ids = exp.ids("prefill.input_ids");
    let pos: Vec<usize> = (0..ids.len()).collect();
    let all = to_vec(
        m.forward(&ids, &pos, &mut m.new_cache(16), None, LogitRows::All)
            .unwrap()
            .logits
            .unwrap(),
    );
    let rows = to_vec(
        m.forward(
            &ids,
            &pos,
            &mut m.new_cache(16),
            None,
            LogitRows::Rows(vec![7, 2]),
        )
        .unwrap()
        .logits
        .unwrap(),
    );
    let v = m.config().vocab_size;
    // Equal up to matmul blocking (a different row count changes summation order).
    assert!(max_abs_diff(&rows[..v], &all[7 * v..8 * v]) < 1e-5);
    assert!(max_abs_diff(&rows[v..], &all[2 * v..3 * v]) < 1e-5);
    let last = to_vec(
        m.forward(&ids, &pos, &mut m.new_cache(16), None, LogitRows::Last)
            .unwrap()
            .logits
            .unwrap(),
    );
    assert!(max_abs_diff(&last, &all[(ids.len() - 1) * v..]) < 1e-5);
    assert!(m
        .forward(&ids, &pos, &mut m.new_cache(16), None, LogitRows::None)
        .unwrap()
        .logits
        .is_none());
}
