//! A draft head with its own reduced vocabulary (EAGLE-3's `lm_head.weight`, `d2t`,
//! `t2d`, `draft_vocab_size`): scores, id mapping, save/load, and bad checkpoints.

mod common;

use std::path::Path;

use burn::tensor::{Tensor, TensorData};
use common::*;
use hass_models::{load_hf_model, DraftHead, DraftVocab, HeadDtype, Llama, SaveOptions};
use safetensors::{Dtype, SafeTensors};

fn target() -> Llama<B> {
    load_hf_model::<B>(fixture_dir("llama3"), &Default::default()).unwrap()
}

/// Every third target id.
fn ids(t: &Llama<B>) -> Vec<u32> {
    (0..t.config().vocab_size as u32).step_by(3).collect()
}

fn head_out(t: &Llama<B>, head: &DraftHead<B>) -> Tensor<B, 2> {
    let h = t.config().hidden_size;
    let feats: Vec<f32> = (0..3 * h)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0)
        .collect();
    head.forward(
        t,
        Tensor::from_data(TensorData::new(feats, [3, h]), &Default::default()),
        &[50, 60, 70],
        &[0, 1, 2],
        &mut head.new_cache(4),
        None,
    )
    .unwrap()
}

#[test]
fn reduced_head_scores_its_tokens_and_round_trips() {
    let t = target();
    let full = DraftHead::random(&t, 11).unwrap();
    let ids = ids(&t);
    let n = ids.len();
    let head = full
        .clone()
        .with_vocab(DraftVocab::from_target(&t, ids.clone()).unwrap());
    assert_eq!(head.output_size(), n);
    assert_eq!(full.output_size(), t.config().vocab_size);
    assert_eq!((head.target_id(0), head.target_id(5)), (0, 15));
    assert_eq!(full.target_id(5), 5);

    // Initialised from the target's rows: column i scores target token ids[i].
    let x = head_out(&t, &head);
    let v = t.config().vocab_size;
    let reduced = to_vec(head.logits(&t, x.clone()));
    let whole = to_vec(full.logits(&t, x));
    for r in 0..3 {
        for (i, &id) in ids.iter().enumerate() {
            let (a, b) = (reduced[r * n + i], whole[r * v + id as usize]);
            assert!(
                (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                "row {r} id {id}: {a} vs {b}"
            );
        }
    }

    // f32 save/load: identical scores; EAGLE-3's tensors and config field.
    let dir = tempfile::tempdir().unwrap();
    head.save(dir.path(), &t).unwrap();
    let again = DraftHead::load(dir.path(), &t).unwrap();
    assert_eq!(again.draft_vocab().unwrap().ids(), ids.as_slice());
    let score = |h: &DraftHead<B>| to_vec(h.logits(&t, head_out(&t, h)));
    assert_eq!(score(&head), score(&again));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["draft_vocab_size"], n);
    let bytes = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let d2t = st.tensor("d2t").unwrap();
    assert_eq!((d2t.dtype(), d2t.shape()), (Dtype::I64, &[n][..]));
    let off: Vec<i64> = d2t
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert!(off.iter().enumerate().all(|(i, &o)| o == 2 * i as i64));
    let t2d = st.tensor("t2d").unwrap();
    assert_eq!((t2d.dtype(), t2d.shape()), (Dtype::BOOL, &[v][..]));
    assert!(t2d
        .data()
        .iter()
        .enumerate()
        .all(|(i, &b)| (b == 1) == (i % 3 == 0)));

    // f16, no embedding: loads, same greedy choices.
    let slim = tempfile::tempdir().unwrap();
    let opts = SaveOptions {
        dtype: HeadDtype::F16,
        with_embedding: false,
    };
    head.save_as(slim.path(), &t, opts).unwrap();
    let s = score(&DraftHead::load(slim.path(), &t).unwrap());
    let a = score(&head);
    let err = a
        .iter()
        .zip(&s)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(err < 2e-2, "f16 head error {err}");
}

/// Rewrites `dir/model.safetensors` with `name` replaced by `(dtype, shape, bytes)`,
/// or removed when `None`.
fn rewrite(dir: &Path, name: &str, with: Option<(Dtype, Vec<usize>, Vec<u8>)>) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != name)
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    if let Some((d, s, b)) = with {
        owned.push((name.to_string(), d, s, b));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = owned
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn i64s(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn bad_reduced_vocabularies_are_errors() {
    let t = target();
    let ids = ids(&t);
    let n = ids.len();
    let head = DraftHead::random(&t, 3)
        .unwrap()
        .with_vocab(DraftVocab::from_target(&t, ids).unwrap());
    let fresh = || {
        let dir = tempfile::tempdir().unwrap();
        head.save(dir.path(), &t).unwrap();
        dir
    };
    let err = |dir: &tempfile::TempDir| DraftHead::load(dir.path(), &t).unwrap_err().to_string();

    // Offsets that make ids repeat or run past the vocabulary.
    let d = fresh();
    let mut off: Vec<i64> = (0..n as i64).map(|i| 2 * i).collect();
    off[4] = off[3] - 1;
    rewrite(d.path(), "d2t", Some((Dtype::I64, vec![n], i64s(&off))));
    assert!(err(&d).contains("strictly ascending"), "{}", err(&d));
    let d = fresh();
    let mut off: Vec<i64> = (0..n as i64).map(|i| 2 * i).collect();
    off[n - 1] += 10;
    rewrite(d.path(), "d2t", Some((Dtype::I64, vec![n], i64s(&off))));
    assert!(
        err(&d).contains("outside the target vocabulary"),
        "{}",
        err(&d)
    );
    // Missing d2t with N < V; a t2d that disagrees; a wrong-length d2t.
    let d = fresh();
    rewrite(d.path(), "d2t", None);
    assert!(err(&d).contains("d2t"), "{}", err(&d));
    let d = fresh();
    let v = t.config().vocab_size;
    rewrite(d.path(), "t2d", Some((Dtype::BOOL, vec![v], vec![1; v])));
    assert!(err(&d).contains("t2d"), "{}", err(&d));
    let d = fresh();
    rewrite(
        d.path(),
        "d2t",
        Some((Dtype::I64, vec![n - 1], i64s(&vec![0; n - 1]))),
    );
    assert!(err(&d).contains("d2t"), "{}", err(&d));
    // Config and tensors disagree.
    let d = fresh();
    let cfg = std::fs::read_to_string(d.path().join("config.json")).unwrap();
    std::fs::write(
        d.path().join("config.json"),
        cfg.replace(
            &format!("\"draft_vocab_size\": {n}"),
            "\"draft_vocab_size\": 100",
        ),
    )
    .unwrap();
    assert!(err(&d).contains("draft_vocab_size 100"), "{}", err(&d));
    // A config that declares a reduced vocabulary the tensors do not carry.
    let d = tempfile::tempdir().unwrap();
    DraftHead::random(&t, 3)
        .unwrap()
        .save(d.path(), &t)
        .unwrap();
    let cfg = std::fs::read_to_string(d.path().join("config.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    json["draft_vocab_size"] = serde_json::Value::from(100);
    std::fs::write(d.path().join("config.json"), json.to_string()).unwrap();
    assert!(err(&d).contains("no lm_head.weight"), "{}", err(&d));
}

/// `N = V` without `d2t`: the identity map (EAGLE-3 drops the buffers then).
#[test]
fn a_full_size_own_head_needs_no_d2t() {
    let t = target();
    let v = t.config().vocab_size as u32;
    let head = DraftHead::random(&t, 5)
        .unwrap()
        .with_vocab(DraftVocab::from_target(&t, (0..v).collect()).unwrap());
    let dir = tempfile::tempdir().unwrap();
    head.save(dir.path(), &t).unwrap();
    rewrite(dir.path(), "d2t", None);
    rewrite(dir.path(), "t2d", None);
    let again = DraftHead::load(dir.path(), &t).unwrap();
    assert_eq!(again.output_size(), v as usize);
    assert_eq!(again.target_id(17), 17);
}
