//! Tree tuning on a fixture target with a random head: the measurements have the
//! promised shape, the chosen tree decodes losslessly, and depth-0 trees (level-1
//! candidates only, no draft forward) are lossless too.

mod common;

use common::*;
use hass_core::tree::TreeParams;
use hass_infer::tuning::{measure, TuneGrid, TuneOptions};
use hass_infer::{GenerationConfig, SpeculativeGenerator, VanillaGenerator};
use hass_models::DraftHead;

#[test]
fn tuning_measures_and_its_choice_is_lossless() {
    let m = fixture_model("llama3");
    let head = DraftHead::random(&m, 7).unwrap();
    let prompts: Vec<Vec<u32>> = vec![(20..32).collect(), (100..108).collect()];
    let opts = TuneOptions {
        prompts: prompts.clone(),
        gen_tokens: 12,
        levels: 3,
        max_k: 4,
        verify_sizes: vec![1, 2, 4, 8, 16],
        repeats: 1,
    };
    let t = measure(&m, &head, &opts).unwrap();
    let c = &t.costs;
    assert_eq!(
        c.verify_ms.iter().map(|p| p.0).collect::<Vec<_>>(),
        vec![1, 2, 4, 8, 16]
    );
    assert_eq!(
        c.draft_step_ms.iter().map(|p| p.0).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    assert!(c
        .verify_ms
        .iter()
        .chain(&c.draft_step_ms)
        .all(|p| p.1 > 0.0));
    assert!(c.other_ms > 0.0 && c.context == 12 + 12);
    let a = &t.acceptance;
    assert_eq!((a.levels(), a.max_k()), (3, 4));
    // Level 1 ranks every root of the generated part whose next token is known.
    assert_eq!(a.totals[0], 2 * (12 - 1));
    for l in 0..3 {
        assert!(a.counts[l].iter().sum::<u64>() <= a.totals[l]);
        if l > 0 {
            assert!(a.totals[l] <= a.counts[l - 1].iter().sum::<u64>());
        }
    }
    let ranked = t.rank(&TuneGrid::default());
    assert!(!ranked.is_empty());
    assert!(ranked
        .iter()
        .all(|r| r.params.depth < 3 && r.params.top_k <= 4 && r.params.total_tokens < 16));
    let best = t.best(&TuneGrid::default()).unwrap();
    assert_eq!(best, ranked[0]);
    // The vanilla step and the best tree were measured end to end, and the rounds
    // calibrated: for the validated tree, prediction and measurement now agree.
    assert!(c.vanilla_step_ms.is_some_and(|ms| ms > 0.0));
    let v = t.validation.as_ref().expect("validated");
    assert_eq!(v.tree, best.params);
    assert!(v.measured_tokens_per_s > 0.0 && v.vanilla_measured_tokens_per_s > 0.0);
    assert!(v.measured_tau >= 1.0 && v.measured_tau <= best.params.depth as f64 + 2.0);
    assert!(c.round_scale > 0.0 && c.round_scale.is_finite());
    let rel = |a: f64, b: f64| (a - b).abs() / b;
    assert!(rel(v.predicted_tokens_per_s / c.round_scale, best.tokens_per_s) < 1e-9);
    assert!(rel(t.vanilla_tokens_per_s(), v.vanilla_measured_tokens_per_s) < 1e-9);
    // Measured τ is over the rounds that ran, predicted τ an expectation: the
    // calibrated tokens/s match the measured ones up to that difference (and the last
    // round of a request, whose tokens past the limit are dropped).
    assert!(
        rel(
            best.tokens_per_s * v.measured_tau / best.expected_tau,
            v.measured_tokens_per_s
        ) < 0.1,
        "{v:?} vs {best:?}"
    );
    let cfg = GenerationConfig {
        max_new_tokens: 24,
        stop_tokens: vec![u32::MAX],
        ..Default::default()
    };
    for tree in [
        best.params,
        TreeParams::new(1, 0, 1).unwrap(),
        TreeParams::new(3, 0, 4).unwrap(),
    ] {
        let mut g = SpeculativeGenerator::builder(&m)
            .head(&head)
            .tree(tree)
            .build()
            .unwrap();
        for p in &prompts {
            let want = VanillaGenerator::new(&m)
                .generate(p, &cfg, |_| true)
                .unwrap();
            assert_eq!(
                g.generate(p, &cfg, |_| true).unwrap().tokens,
                want.tokens,
                "{tree:?}"
            );
        }
    }
}

#[test]
fn bad_tuning_options_are_errors() {
    let m = fixture_model("llama3");
    let head = DraftHead::random(&m, 7).unwrap();
    let ok = TuneOptions {
        prompts: vec![(20..28).collect()],
        gen_tokens: 4,
        ..Default::default()
    };
    for bad in [
        TuneOptions {
            prompts: vec![],
            ..ok.clone()
        },
        TuneOptions {
            prompts: vec![vec![]],
            ..ok.clone()
        },
        TuneOptions {
            max_k: 100_000,
            ..ok.clone()
        },
        TuneOptions {
            gen_tokens: 0,
            ..ok.clone()
        },
        TuneOptions {
            verify_sizes: vec![2, 4],
            ..ok.clone()
        },
    ] {
        assert!(measure(&m, &head, &bad).is_err(), "{bad:?}");
    }
}

/// `cached_tuning` measures once, then reads the cache; a damaged cache file is
/// measured again and rewritten.
#[test]
fn tunings_are_cached_per_target_and_head() {
    use hass_infer::tuning::cached_tuning;
    use hass_models::{load_model, WeightDtype};
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/models/llama3");
    let loaded = load_model::<B>(&dir, &Default::default(), WeightDtype::F32).unwrap();
    let head = DraftHead::random(&loaded.model, 3).unwrap();
    let heads = tempfile::tempdir().unwrap();
    head.save(heads.path(), &loaded.model).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let (first, path, measured) =
        cached_tuning(&loaded, &head, heads.path(), WeightDtype::F32, cache.path()).unwrap();
    assert!(measured && path.is_file() && path.starts_with(cache.path()));
    let (again, path2, measured2) =
        cached_tuning(&loaded, &head, heads.path(), WeightDtype::F32, cache.path()).unwrap();
    assert!(!measured2);
    assert_eq!((again, &path2), (first.clone(), &path));
    // Another dtype is another key.
    let (_, other, _) =
        cached_tuning(&loaded, &head, heads.path(), WeightDtype::F16, cache.path()).unwrap();
    assert_ne!(other, path);
    std::fs::write(&path, "not json").unwrap();
    let (_, _, remeasured) =
        cached_tuning(&loaded, &head, heads.path(), WeightDtype::F32, cache.path()).unwrap();
    assert!(remeasured);
    assert!(hass_infer::tuning::Tuning::load(&path).is_ok());
}
