//! The EAGLE draft head against a PyTorch reference of spec §2.2
//! (`scripts/make_draft_fixtures.py`): causal prefix, incremental rows, and two
//! levels of tree growth with shared positions and tree masks over the draft cache.

mod common;

use common::*;
use hass_core::HassError;
use hass_models::{
    load_hf_model, DraftHead, HeadDtype, Llama, LogitRows, SafetensorsDir, SaveOptions,
    WeightSource,
};

const TOL: f32 = 1e-4;

fn target() -> Llama<B> {
    load_hf_model::<B>(fixture_dir("llama3"), &Default::default()).unwrap()
}

fn draft_dir(name: &str) -> std::path::PathBuf {
    fixture_dir("../draft").join(name)
}

fn features(exp: &Expected, name: &str) -> burn::tensor::Tensor<B, 2> {
    let (v, shape) = exp.f32(name);
    burn::tensor::Tensor::from_data(
        burn::tensor::TensorData::new(v, [shape[0], shape[1]]),
        &Default::default(),
    )
}

fn close(got: burn::tensor::Tensor<B, 2>, exp: &Expected, name: &str) {
    let d = max_abs_diff(&to_vec(got), &exp.f32(name).0);
    assert!(d <= TOL, "{name}: max abs diff {d:e}");
}

fn positions(exp: &Expected, name: &str) -> Vec<usize> {
    exp.i64(name).into_iter().map(|p| p as usize).collect()
}

#[test]
fn draft_forward_matches_reference_prefix_step_and_tree() {
    let t = target();
    let head = DraftHead::load(draft_dir("eagle_llama3"), &t).unwrap();
    assert!(head.has_fc_bias());
    let exp = Expected::load_from(draft_dir("eagle_llama3").join("expected.safetensors"));

    let mut cache = head.new_cache(32);
    let ids = exp.ids("prefix.input_ids");
    let out = head
        .forward(
            &t,
            features(&exp, "prefix.features"),
            &ids,
            &positions(&exp, "prefix.positions"),
            &mut cache,
            None,
        )
        .unwrap();
    close(out.clone(), &exp, "prefix.out");
    close(t.logits(out), &exp, "logits.prefix");

    let mut step_cache = cache.clone();
    let out = head
        .forward(
            &t,
            features(&exp, "step.features"),
            &exp.ids("step.input_ids"),
            &positions(&exp, "step.positions"),
            &mut step_cache,
            None,
        )
        .unwrap();
    close(out, &exp, "step.out");

    let mask = |name: &str| {
        exp.i64(name)
            .into_iter()
            .map(|v| v != 0)
            .collect::<Vec<bool>>()
    };
    let a = head
        .forward(
            &t,
            features(&exp, "treeA.features"),
            &exp.ids("treeA.input_ids"),
            &positions(&exp, "treeA.positions"),
            &mut cache,
            Some(&mask("treeA.mask")),
        )
        .unwrap();
    close(a, &exp, "treeA.out");
    let b = head
        .forward(
            &t,
            features(&exp, "treeB.features"),
            &exp.ids("treeB.input_ids"),
            &positions(&exp, "treeB.positions"),
            &mut cache,
            Some(&mask("treeB.mask")),
        )
        .unwrap();
    close(b, &exp, "treeB.out");
    assert_eq!(cache.len(), 8 + 3 + 3);
}

#[test]
fn pickles_are_refused_with_the_conversion_command() {
    let t = target();
    let e = DraftHead::load(draft_dir("eagle_llama3_bin"), &t).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("pickle") && msg.contains("scripts/convert_eagle_checkpoint.py"),
        "{msg}"
    );
}

#[test]
fn mismatched_or_missing_heads_are_errors() {
    let t = target();
    let dir = tempfile::tempdir().unwrap();
    let src = draft_dir("eagle_llama3");
    std::fs::copy(
        src.join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let cfg = std::fs::read_to_string(src.join("config.json")).unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        cfg.replace("\"vocab_size\": 512", "\"vocab_size\": 500"),
    )
    .unwrap();
    let e = DraftHead::load(dir.path(), &t).unwrap_err();
    assert!(e.to_string().contains("does not match the target"), "{e}");
    std::fs::write(
        dir.path().join("config.json"),
        cfg.replace("\"intermediate_size\": 192", "\"intermediate_size\": 96"),
    )
    .unwrap();
    assert!(matches!(
        DraftHead::load(dir.path(), &t).unwrap_err(),
        HassError::ShapeMismatch { .. }
    ));
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    std::fs::write(dir.path().join("config.json"), &cfg).unwrap();
    assert!(DraftHead::load(dir.path(), &t).is_err());
    assert!(matches!(
        DraftHead::load(dir.path().join("nope"), &t).unwrap_err(),
        HassError::Io { .. }
    ));
}

#[test]
fn a_saved_random_head_loads_back_identically() {
    let t = target();
    let head = DraftHead::random(&t, 11).unwrap();
    let dir = tempfile::tempdir().unwrap();
    head.save(dir.path(), &t).unwrap();
    let again = DraftHead::load(dir.path(), &t).unwrap();
    let feats = to_vec(
        t.forward(
            &[4, 50, 60],
            &[0, 1, 2],
            &mut t.new_cache(4),
            None,
            LogitRows::None,
        )
        .unwrap()
        .features,
    );
    let f = || {
        burn::tensor::Tensor::<B, 2>::from_data(
            burn::tensor::TensorData::new(feats.clone(), [3, 64]),
            &Default::default(),
        )
    };
    let a = head
        .forward(
            &t,
            f(),
            &[50, 60, 70],
            &[0, 1, 2],
            &mut head.new_cache(4),
            None,
        )
        .unwrap();
    let run = |h: &DraftHead<B>| {
        to_vec(
            h.forward(
                &t,
                f(),
                &[50, 60, 70],
                &[0, 1, 2],
                &mut h.new_cache(4),
                None,
            )
            .unwrap(),
        )
    };
    let a = to_vec(a);
    assert_eq!(a, run(&again));

    // Saved without the embedding copy in `dtype`: the directory and its tensor names.
    let save = |dtype| {
        let dir = tempfile::tempdir().unwrap();
        let opts = SaveOptions {
            dtype,
            with_embedding: false,
        };
        head.save_as(dir.path(), &t, opts).unwrap();
        let names = SafetensorsDir::open(dir.path()).unwrap().tensor_names();
        (dir, names)
    };
    let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));

    // The distribution form: f16, without the embedding copy; same outputs to f16 precision.
    let (slim, names) = save(HeadDtype::F16);
    assert!(
        names.iter().all(|n| n != "embed_tokens.weight"),
        "{names:?}"
    );
    let err = max_abs_diff(&a, &run(&DraftHead::load(slim.path(), &t).unwrap()));
    assert!(err <= 2e-3 * scale, "f16 head error {err} (scale {scale})");

    // The compact form: int8 matrices with per-row scales, read back transparently
    // (the scales are not tensors of their own), about half of f16's bytes.
    let (compact, names) = save(HeadDtype::Int8Rows);
    assert!(
        names.iter().all(|n| !n.ends_with(".row_scale")),
        "{names:?}"
    );
    let size = |d: &tempfile::TempDir| {
        std::fs::metadata(d.path().join("model.safetensors"))
            .unwrap()
            .len()
    };
    assert!(
        size(&compact) * 10 < size(&slim) * 6,
        "{} vs {}",
        size(&compact),
        size(&slim)
    );
    let err = max_abs_diff(&a, &run(&DraftHead::load(compact.path(), &t).unwrap()));
    assert!(err <= 2e-2 * scale, "int8 head error {err} (scale {scale})");
}
