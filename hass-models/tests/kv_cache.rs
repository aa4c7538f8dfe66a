//! KV-cache operations checked against plain causal recomputation: truncation, and
//! compaction of a verified tree path (speculative decoding's commit step).

mod common;

use common::*;
use hass_models::{load_hf_model, LogitRows};

#[test]
fn compacting_a_tree_path_equals_decoding_that_path() {
    let dev = Default::default();
    let m = load_hf_model::<B>(fixture_dir("llama3"), &dev).unwrap();
    let exp = Expected::load("llama3");
    let prefix = exp.ids("prefill.input_ids");
    let p = prefix.len();
    let tree = exp.ids("tree.input_ids");
    let parents = exp.i64("tree.parents");
    let positions: Vec<usize> = exp
        .i64("tree.positions")
        .into_iter()
        .map(|x| x as usize)
        .collect();
    let mask: Vec<bool> = exp.i64("tree.mask").into_iter().map(|v| v != 0).collect();

    let mut cache = m.new_cache(32);
    let pre_pos: Vec<usize> = (0..p).collect();
    m.forward(&prefix, &pre_pos, &mut cache, None, LogitRows::None)
        .unwrap();
    m.forward(&tree, &positions, &mut cache, Some(&mask), LogitRows::None)
        .unwrap();
    // Accept the path root -> 1 -> 3 -> 5 (node 5's parent chain).
    let mut path = vec![5usize];
    while parents[*path.last().unwrap()] >= 0 {
        path.push(parents[*path.last().unwrap()] as usize);
    }
    path.reverse();
    assert_eq!(path, vec![0, 1, 3, 5]);
    let slots: Vec<usize> = path.iter().map(|&i| p + i).collect();
    cache.compact(&slots, p).unwrap();
    assert_eq!(cache.len(), p + path.len());
    let next = 42u32;
    let got = m
        .forward(&[next], &[cache.len()], &mut cache, None, LogitRows::Last)
        .unwrap();

    let mut seq = prefix.clone();
    seq.extend(path.iter().map(|&i| tree[i]));
    seq.push(next);
    let pos: Vec<usize> = (0..seq.len()).collect();
    let want = m
        .forward(&seq, &pos, &mut m.new_cache(32), None, LogitRows::Last)
        .unwrap();
    let d = max_abs_diff(&to_vec(got.logits.unwrap()), &to_vec(want.logits.unwrap()));
    assert!(
        d < 1e-4,
        "compacted cache differs from recomputation by {d:e}"
    );
}

#[test]
fn truncation_drops_the_tail() {
    let dev = Default::default();
    let m = load_hf_model::<B>(fixture_dir("llama2"), &dev).unwrap();
    let ids: Vec<u32> = (20..30).collect();
    let pos: Vec<usize> = (0..10).collect();
    let mut cache = m.new_cache(16);
    m.forward(&ids, &pos, &mut cache, None, LogitRows::None)
        .unwrap();
    cache.truncate(6);
    let got = m
        .forward(&[99], &[6], &mut cache, None, LogitRows::Last)
        .unwrap();
    let mut seq = ids[..6].to_vec();
    seq.push(99);
    let pos: Vec<usize> = (0..7).collect();
    let want = m
        .forward(&seq, &pos, &mut m.new_cache(16), None, LogitRows::Last)
        .unwrap();
    let d = max_abs_diff(&to_vec(got.logits.unwrap()), &to_vec(want.logits.unwrap()));
    assert!(d < 1e-4, "{d:e}");
}

#[test]
fn a_full_cache_is_an_error_not_a_panic() {
    let dev = Default::default();
    let m = load_hf_model::<B>(fixture_dir("llama2"), &dev).unwrap();
    let mut cache = m.new_cache(4);
    let err = m
        .forward(
            &[1, 2, 3, 4, 5],
            &[0, 1, 2, 3, 4],
            &mut cache,
            None,
            LogitRows::Last,
        )
        .unwrap_err();
    assert!(err.to_string().contains("context"), "{err}");
    assert!(cache.compact(&[9], 0).is_err());
}
