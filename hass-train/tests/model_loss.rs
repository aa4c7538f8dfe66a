//! TrainDraft (HASS multi-stream forward), alignment masks and losses.
#![allow(
    clippy::needless_range_loop,
    clippy::clone_on_copy,
    clippy::cloned_ref_to_slice_refs
)]

use std::path::PathBuf;

use burn::backend::{Autodiff, Flex};
use burn::module::{Module, ModuleVisitor, Param};
use burn::prelude::*;
use hass_core::config::ModelConfig;
use hass_models::{load_hf_model, DraftHead, Llama, MemoryWeights, WeightSource};
use hass_train::align::{diagonal_offset, source_map, stream_masks};
use hass_train::loss::{
    draft_log_probs, ploss, reference_loss, topk_accuracy, topk_loss, vloss, LossPath, LossWeights,
    TargetDist, TopkAccuracy,
};
use hass_train::model::{draft_config, embed_ids, next_stream, random_head_weights, TrainDraft};

type B = Flex;
type AD = Autodiff<Flex>;

fn fixture() -> Llama<B> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/llama3");
    load_hf_model::<B>(dir, &Default::default()).expect("fixture target")
}

/// Deterministic pseudo-random values in [-scale, scale].
fn rnd(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn host<Bk: Backend, const D: usize>(t: Tensor<Bk, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

// ---------------------------------------------------------------- alignment

fn table(l: usize, n: usize) -> Vec<String> {
    let name = |s: usize| {
        if s == 0 {
            "T".to_string()
        } else {
            format!("D{s}")
        }
    };
    source_map(l, n)
        .iter()
        .map(|row| {
            row.iter()
                .map(|s| s.map(name).unwrap_or_else(|| ".".into()))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

#[test]
fn source_map_matches_worked_example() {
    // Spec §3.5, L = 6, n_total = 3; forward k uses n = k streams.
    let f1 = [
        "T . . . . .",
        "T T . . . .",
        "T T T . . .",
        "T T T T . .",
        "T T T T T .",
        "T T T T T T",
    ];
    let f2 = [
        "D1 . . . . .",
        "T D1 . . . .",
        "T T D1 . . .",
        "T T T D1 . .",
        "T T T T D1 .",
        "T T T T T D1",
    ];
    let f3 = [
        "D2 . . . . .",
        "D1 D2 . . . .",
        "T D1 D2 . . .",
        "T T D1 D2 . .",
        "T T T D1 D2 .",
        "T T T T D1 D2",
    ];
    for (n, expected) in [(1, &f1), (2, &f2), (3, &f3)] {
        assert_eq!(table(6, n), expected.to_vec(), "forward {n}");
    }
}

#[test]
fn n1_is_plain_causal() {
    for l in 1..9 {
        let m = source_map(l, 1);
        for r in 0..l {
            for c in 0..l {
                assert_eq!(m[r][c], (c <= r).then_some(0));
            }
        }
        let masks = stream_masks(l, 1);
        assert_eq!(masks.len(), 1);
        for r in 0..l {
            for c in 0..l {
                assert_eq!(masks[0][r * l + c], c <= r);
            }
        }
    }
}

/// The reference's construction (`cnets_hass.py`): mask 0 = tril(ones(L−n+1)) at
/// rows n−1.., cols 0..L−n; mask j = eye(L−n+j+1) at rows n−1−j.., cols 0..L−n+j.
fn reference_masks(l: usize, n: usize) -> Vec<Vec<bool>> {
    let mut out = vec![vec![false; l * l]; n];
    for a in 0..l - n + 1 {
        for b in 0..=a {
            out[0][(n - 1 + a) * l + b] = true;
        }
    }
    for (j, m) in out.iter_mut().enumerate().skip(1) {
        for i in 0..l - n + j + 1 {
            m[(n - 1 - j + i) * l + i] = true;
        }
    }
    out
}

#[test]
fn masks_match_reference_construction() {
    for l in 1..12 {
        for n in 1..=l.min(5) {
            let masks = stream_masks(l, n);
            assert_eq!(masks, reference_masks(l, n), "L={l} n={n}");
            // Disjoint, union = causal lower triangle; draft streams are diagonals.
            for r in 0..l {
                for c in 0..l {
                    let count = masks.iter().filter(|m| m[r * l + c]).count();
                    assert_eq!(count, (c <= r) as usize);
                    for (j, m) in masks.iter().enumerate().skip(1) {
                        assert_eq!(m[r * l + c], c + diagonal_offset(n, j) == r);
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------- model

fn embed(target: &Llama<B>, ids: &[Vec<u32>]) -> Tensor<B, 3> {
    let (b, l) = (ids.len(), ids[0].len());
    let flat: Vec<i32> = ids.iter().flatten().map(|&x| x as i32).collect();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(flat, [b, l]), target.device());
    embed_ids(&target.embedding(), ids)
}

fn ids(seed: u64, b: usize, l: usize, vocab: usize) -> Vec<Vec<u32>> {
    (0..b)
        .map(|i| {
            rnd(seed + i as u64, l, 1.0)
                .iter()
                .map(|x| (((x + 1.0) * 0.5 * vocab as f32) as usize).min(vocab - 1) as u32)
                .collect()
        })
        .collect()
}

fn features(seed: u64, b: usize, l: usize, h: usize, dev: &Device<B>) -> Tensor<B, 3> {
    Tensor::from_data(TensorData::new(rnd(seed, b * l * h, 1.5), [b, l, h]), dev)
}

#[test]
fn weights_round_trip_through_draft_head() {
    let target = fixture();
    let dev = target.device().clone();
    let head = DraftHead::random(&target, 11).unwrap();
    let cfg = head.config().clone();
    let exported = head.export(&target);
    let td = TrainDraft::<B>::from_head(&exported, &cfg, &dev).unwrap();
    assert!(td.has_fc_bias());
    let back = td.to_weights();
    assert!(back.shape("embed_tokens.weight").is_none());
    for (name, (shape, data)) in exported.iter() {
        if name == "embed_tokens.weight" {
            continue;
        }
        assert_eq!(back.shape(name).as_ref(), Some(shape), "{name}");
        assert_eq!(&back.read_f32(name).unwrap(), data, "{name}");
    }
    assert_eq!(back.tensor_names().len(), exported.tensor_names().len() - 1);

    // The same numbers as DraftHead::random.
    assert_eq!(cfg, draft_config(target.config()));
    let r = random_head_weights(&cfg, 11);
    for (name, (_, data)) in r.iter() {
        assert_eq!(&exported.read_f32(name).unwrap(), data, "{name}");
    }

    // Loading what training produces gives the same inference head.
    let head2 = DraftHead::from_source(&back, cfg.clone(), &target).unwrap();
    let (t, h) = (9, cfg.hidden_size);
    let f = Tensor::<B, 2>::from_data(TensorData::new(rnd(5, t * h, 1.0), [t, h]), &dev);
    let toks = &ids(6, 1, t, cfg.vocab_size)[0];
    let pos: Vec<usize> = (0..t).collect();
    let run = |hd: &DraftHead<B>| {
        let mut cache = hd.new_cache(t);
        host(
            hd.forward(&target, f.clone(), toks, &pos, &mut cache, None)
                .unwrap(),
        )
    };
    let d = max_diff(&run(&head), &run(&head2));
    assert!(d <= 1e-6, "round trip changed the forward by {d}");

    // No embedding parameter: only fc, q/k/v/o, gate/up/down, the norm.
    let (hh, i) = (cfg.hidden_size, cfg.intermediate_size);
    let (q, kv) = (
        cfg.num_attention_heads * cfg.head_dim,
        cfg.num_key_value_heads * cfg.head_dim,
    );
    let expect = 2 * hh * hh + hh + hh * q + 2 * hh * kv + q * hh + 3 * hh * i + hh;
    assert_eq!(td.num_params(), expect);
}

#[test]
fn n1_forward_equals_draft_head_forward() {
    let target = fixture();
    let dev = target.device().clone();
    let head = DraftHead::random(&target, 21).unwrap();
    let cfg = head.config().clone();
    let td = TrainDraft::<B>::from_head(&head.export(&target), &cfg, &dev).unwrap();
    let (b, l, h) = (2, 7, cfg.hidden_size);
    let tok = ids(30, b, l, cfg.vocab_size);
    let f = features(31, b, l, h, &dev);
    let emb = embed(&target, &tok);
    let out = td.forward(emb.clone(), &[f.clone()], false);
    for (i, row_toks) in tok.iter().enumerate() {
        let fi = f.clone().slice([i..i + 1, 0..l, 0..h]).reshape([l, h]);
        let mut cache = head.new_cache(l);
        let pos: Vec<usize> = (0..l).collect();
        let want = host(
            head.forward(&target, fi, row_toks, &pos, &mut cache, None)
                .unwrap(),
        );
        let got = host(out.clone().slice([i..i + 1, 0..l, 0..h]));
        let d = max_diff(&got, &want);
        assert!(d <= 1e-5, "sequence {i}: {d}");
    }

    // Right padding: valid rows of a padded sequence equal the unpadded forward.
    let valid = 4;
    let mut padded = tok.clone();
    for x in padded[1][valid..].iter_mut() {
        *x = 0;
    }
    let mut fdata = host(f.clone());
    for t in valid..l {
        for x in &mut fdata[(l + t) * h..(l + t + 1) * h] {
            *x = 0.0;
        }
    }
    let fp = Tensor::<B, 3>::from_data(TensorData::new(fdata, [b, l, h]), &dev);
    let out = td.forward(embed(&target, &padded), &[fp.clone()], false);
    let mut cache = head.new_cache(valid);
    let f1 = fp.slice([1..2, 0..valid, 0..h]).reshape([valid, h]);
    let pos: Vec<usize> = (0..valid).collect();
    let want = host(
        head.forward(&target, f1, &tok[1][..valid], &pos, &mut cache, None)
            .unwrap(),
    );
    let got = host(out.slice([1..2, 0..valid, 0..h]));
    assert!(max_diff(&got, &want) <= 1e-5);
}

#[test]
fn identical_streams_reduce_to_the_causal_forward() {
    let target = fixture();
    let dev = target.device().clone();
    let cfg = draft_config(target.config());
    let td = TrainDraft::<B>::random(&cfg, 4, &dev).unwrap();
    let h = cfg.hidden_size;
    for l in [1, 2, 6] {
        let emb = embed(&target, &ids(40, 2, l, cfg.vocab_size));
        let f = features(41, 2, l, h, &dev);
        for leaky in [false, true] {
            let one = host(td.forward(emb.clone(), &[f.clone()], leaky));
            for n in 2..=4 {
                let many = host(td.forward(emb.clone(), &vec![f.clone(); n], leaky));
                assert!(max_diff(&one, &many) <= 1e-5, "L={l} n={n} leaky={leaky}");
            }
        }
    }
    let (b, l) = (2, 6);
    let emb = embed(&target, &ids(40, b, l, cfg.vocab_size));
    let f = features(41, b, l, h, &dev);
    // The leaky softmax is a different function.
    let a = host(td.forward(emb.clone(), &[f.clone()], false));
    let c = host(td.forward(emb, &[f], true));
    assert!(max_diff(&a, &c) > 1e-3);
}

/// Straight f64 transcription of spec §3.5 (Σ_j mask_j ⊙ S_j, masks from the
/// reference construction) for one sequence.
fn naive_forward(
    w: &MemoryWeights,
    cfg: &ModelConfig,
    emb: &[f32],
    streams: &[Vec<f32>],
    l: usize,
    leaky: bool,
) -> Vec<f64> {
    let h = cfg.hidden_size;
    let (nh, nkv, hd, inter) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.intermediate_size,
    );
    let rep = nh / nkv;
    let n = streams.len();
    let get = |name: &str| -> Vec<f64> {
        w.read_f32(name)
            .unwrap()
            .iter()
            .map(|&x| x as f64)
            .collect()
    };
    let matvec = |m: &[f64], out: usize, x: &[f64]| -> Vec<f64> {
        let inn = x.len();
        (0..out)
            .map(|o| (0..inn).map(|i| m[o * inn + i] * x[i]).sum())
            .collect()
    };
    let (fc_w, fc_b) = (get("fc.weight"), get("fc.bias"));
    let wq = get("layers.0.self_attn.q_proj.weight");
    let wk = get("layers.0.self_attn.k_proj.weight");
    let wv = get("layers.0.self_attn.v_proj.weight");
    let wo = get("layers.0.self_attn.o_proj.weight");
    let wg = get("layers.0.mlp.gate_proj.weight");
    let wu = get("layers.0.mlp.up_proj.weight");
    let wd = get("layers.0.mlp.down_proj.weight");
    let norm = get("layers.0.post_attention_layernorm.weight");
    let pos: Vec<usize> = (0..l).collect();
    let (cos, sin) = cfg.rope_cos_sin(&pos);
    let rope = |x: &mut [f64], t: usize| {
        let heads = x.len() / hd;
        for hh in 0..heads {
            let v = x[hh * hd..(hh + 1) * hd].to_vec();
            for d in 0..hd {
                let rot = if d < hd / 2 {
                    -v[d + hd / 2]
                } else {
                    v[d - hd / 2]
                };
                x[hh * hd + d] = v[d] * cos[t * hd + d] as f64 + rot * sin[t * hd + d] as f64;
            }
        }
    };
    // X_j[t]
    let xs: Vec<Vec<Vec<f64>>> = streams
        .iter()
        .map(|s| {
            (0..l)
                .map(|t| {
                    let mut inp: Vec<f64> =
                        emb[t * h..(t + 1) * h].iter().map(|&x| x as f64).collect();
                    inp.extend(s[t * h..(t + 1) * h].iter().map(|&x| x as f64));
                    let mut x = matvec(&fc_w, h, &inp);
                    for (a, b) in x.iter_mut().zip(&fc_b) {
                        *a += b;
                    }
                    x
                })
                .collect()
        })
        .collect();
    let q: Vec<Vec<f64>> = (0..l)
        .map(|t| {
            let mut q = matvec(&wq, nh * hd, &xs[n - 1][t]);
            rope(&mut q, t);
            q
        })
        .collect();
    let ks: Vec<Vec<Vec<f64>>> = xs
        .iter()
        .map(|x| {
            (0..l)
                .map(|t| {
                    let mut k = matvec(&wk, nkv * hd, &x[t]);
                    rope(&mut k, t);
                    k
                })
                .collect()
        })
        .collect();
    let vs: Vec<Vec<Vec<f64>>> = xs
        .iter()
        .map(|x| (0..l).map(|t| matvec(&wv, nkv * hd, &x[t])).collect())
        .collect();
    let masks = reference_masks(l, n);
    let scale = 1.0 / (hd as f64).sqrt();
    let mut out = Vec::new();
    for r in 0..l {
        let mut attn = vec![0.0; nh * hd];
        for hh in 0..nh {
            let g = hh / rep;
            let qh = &q[r][hh * hd..(hh + 1) * hd];
            let s: Vec<f64> = (0..l)
                .map(|c| {
                    (0..n)
                        .map(|j| {
                            let m = masks[j][r * l + c] as u8 as f64;
                            let kj = &ks[j][c][g * hd..(g + 1) * hd];
                            m * qh.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>() * scale
                        })
                        .sum()
                })
                .collect();
            let cols: Vec<usize> = if leaky {
                (0..l).collect()
            } else {
                (0..=r).collect()
            };
            let mx = cols.iter().map(|&c| s[c]).fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = cols.iter().map(|&c| (s[c] - mx).exp()).sum();
            for c in 0..=r {
                let p = (s[c] - mx).exp() / z;
                for (j, m) in masks.iter().enumerate() {
                    if m[r * l + c] {
                        for d in 0..hd {
                            attn[hh * hd + d] += p * vs[j][c][g * hd + d];
                        }
                    }
                }
            }
        }
        let o = matvec(&wo, h, &attn);
        let x: Vec<f64> = xs[n - 1][r].iter().zip(&o).map(|(a, b)| a + b).collect();
        let ms = x.iter().map(|v| v * v).sum::<f64>() / h as f64;
        let inv = 1.0 / (ms + cfg.rms_norm_eps).sqrt();
        let hn: Vec<f64> = x.iter().zip(&norm).map(|(v, w)| v * inv * w).collect();
        let gt = matvec(&wg, inter, &hn);
        let up = matvec(&wu, inter, &hn);
        let act: Vec<f64> = gt
            .iter()
            .zip(&up)
            .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
            .collect();
        let dn = matvec(&wd, h, &act);
        out.extend(x.iter().zip(&dn).map(|(a, b)| a + b));
    }
    out
}

#[test]
fn multi_stream_forward_matches_naive_transcription() {
    let target = fixture();
    let dev = target.device().clone();
    let cfg = draft_config(target.config());
    let w = random_head_weights(&cfg, 8);
    let td = TrainDraft::<B>::from_head(&w, &cfg, &dev).unwrap();
    let (b, l, h) = (2, 6, cfg.hidden_size);
    let tok = ids(50, b, l, cfg.vocab_size);
    let emb = embed(&target, &tok);
    let emb_host = host(emb.clone());
    let streams: Vec<Tensor<B, 3>> = (0..3).map(|j| features(60 + j, b, l, h, &dev)).collect();
    for n in 1..=3 {
        for leaky in [false, true] {
            let got = host(td.forward(emb.clone(), &streams[..n], leaky));
            for i in 0..b {
                let sh: Vec<Vec<f32>> = streams[..n]
                    .iter()
                    .map(|s| host(s.clone().slice([i..i + 1, 0..l, 0..h])))
                    .collect();
                let want = naive_forward(
                    &w,
                    &cfg,
                    &emb_host[i * l * h..(i + 1) * l * h],
                    &sh,
                    l,
                    leaky,
                );
                let want: Vec<f32> = want.iter().map(|&x| x as f32).collect();
                let d = max_diff(&got[i * l * h..(i + 1) * l * h], &want);
                assert!(d <= 1e-4, "n={n} leaky={leaky} seq {i}: {d}");
            }
        }
    }
}

#[test]
fn next_stream_shifts_right_and_keeps_f0() {
    let dev = Default::default();
    let f = features(70, 2, 4, 3, &dev);
    let p = features(71, 2, 4, 3, &dev);
    let q = next_stream(&[f.clone()], p.clone());
    let (fh, ph, qh) = (host(f), host(p), host(q));
    for b in 0..2 {
        for t in 0..4 {
            for d in 0..3 {
                let want = if t == 0 {
                    fh[(b * 4) * 3 + d]
                } else {
                    ph[(b * 4 + t - 1) * 3 + d]
                };
                assert_eq!(qh[(b * 4 + t) * 3 + d], want);
            }
        }
    }
}

// ---------------------------------------------------------------- losses

const V: usize = 5;
const H: usize = 3;
const L: usize = 3;
const LM: [[f64; H]; V] = [
    [0.5, -1.0, 0.3],
    [1.2, 0.4, -0.7],
    [-0.3, 0.9, 0.8],
    [0.0, -0.5, 1.5],
    [0.7, 0.7, 0.7],
];
const PRED: [[f64; H]; L] = [[0.2, -1.1, 2.5], [1.5, 0.3, -0.4], [-0.9, 0.6, 0.1]];
const TARG: [[f64; H]; L] = [[0.1, 0.4, 0.9], [-0.6, 1.3, 0.2], [2.0, -0.8, 0.5]];
const MASK: [f64; L] = [1.0, 0.0, 1.0];

fn t3(v: &[[f64; H]; L]) -> Tensor<B, 3> {
    let d: Vec<f32> = v.iter().flatten().map(|&x| x as f32).collect();
    Tensor::from_data(TensorData::new(d, [1, L, H]), &Default::default())
}

fn lm() -> Tensor<B, 2> {
    let d: Vec<f32> = LM.iter().flatten().map(|&x| x as f32).collect();
    Tensor::from_data(TensorData::new(d, [V, H]), &Default::default())
}

fn mask() -> Tensor<B, 2> {
    let d: Vec<f32> = MASK.iter().map(|&x| x as f32).collect();
    Tensor::from_data(TensorData::new(d, [1, L]), &Default::default())
}

fn softmax64(z: &[f64]) -> Vec<f64> {
    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let s: f64 = z.iter().map(|x| (x - m).exp()).sum();
    z.iter().map(|x| (x - m).exp() / s).collect()
}

fn head64(x: &[f64; H]) -> Vec<f64> {
    LM.iter()
        .map(|row| row.iter().zip(x).map(|(a, b)| a * b).sum())
        .collect()
}

/// (vloss, ploss, topk_loss with K = k) by hand.
fn hand_losses(k: usize) -> (f64, f64, f64) {
    let n: f64 = MASK.iter().sum::<f64>() + 1e-5;
    let (mut v, mut p, mut t) = (0.0, 0.0, 0.0);
    for r in 0..L {
        let sl1: f64 = (0..H)
            .map(|d| {
                let a = (PRED[r][d] - TARG[r][d]).abs();
                if a < 1.0 {
                    0.5 * a * a
                } else {
                    a - 0.5
                }
            })
            .sum::<f64>()
            / H as f64;
        let pt = softmax64(&head64(&TARG[r]));
        let logq: Vec<f64> = softmax64(&head64(&PRED[r]))
            .iter()
            .map(|x| x.ln())
            .collect();
        let ce: f64 = -(0..V).map(|i| pt[i] * logq[i]).sum::<f64>();
        let mut order: Vec<usize> = (0..V).collect();
        order.sort_by(|&a, &b| pt[b].partial_cmp(&pt[a]).unwrap());
        let tk: f64 = -order[..k].iter().map(|&i| pt[i] * logq[i]).sum::<f64>();
        v += MASK[r] * sl1;
        p += MASK[r] * ce;
        t += MASK[r] * tk;
    }
    (v / n, p / n, t / n)
}

fn scalar<Bk: Backend>(t: Tensor<Bk, 1>) -> f64 {
    host(t)[0] as f64
}

#[test]
fn losses_equal_hand_computation() {
    // Row 0 has |d| > 1 (both SmoothL1 branches); row 1 is masked out.
    let k = 2;
    let (v, p, t) = hand_losses(k);
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-5 * (1.0 + b.abs());

    // Tensor versions.
    let pt = hass_train::loss::target_probs(t3(&TARG), lm());
    let logq = draft_log_probs(t3(&PRED), lm());
    let gv = scalar(vloss(t3(&PRED), t3(&TARG), mask()));
    let gp = scalar(ploss(logq.clone(), pt.clone(), mask()));
    let gt = scalar(topk_loss(logq, pt, k, mask()));
    assert!(close(gv, v), "vloss {gv} vs {v}");
    assert!(close(gp, p), "ploss {gp} vs {p}");
    assert!(close(gt, t), "topk {gt} vs {t}");
    assert!(
        gt < gp,
        "the top-K loss is the ploss restricted to K tokens"
    );
    let weights = LossWeights {
        topk_w: 1.0,
        k,
        ..Default::default()
    };
    assert_eq!((weights.v_w, weights.p_w), (1.0, 0.1));
    let (rl, rv, rp, rt) = reference_loss(t3(&PRED), t3(&TARG), mask(), lm(), &weights);
    assert!(close(scalar(rl), v + 0.1 * p + t));
    assert!(close(scalar(rv), v) && close(scalar(rp), p) && close(scalar(rt), t));

    // Fused version (the training path).
    let dist = TargetDist::new(t3(&TARG), mask(), lm(), k);
    assert_eq!(dist.rows(), &[0, 2]);
    let all = dist.loss(t3(&PRED), &weights);
    assert!(close(scalar(all.loss), v + 0.1 * p + t), "fused total");
    assert!(close(all.vloss, v) && close(all.ploss, p) && close(all.topk_loss, t));
    // topk_w = 0 (stage 1): not in the total, still reported.
    let s1 = dist.loss(
        t3(&PRED),
        &LossWeights {
            k,
            ..Default::default()
        },
    );
    assert!(close(scalar(s1.loss), v + 0.1 * p));
    assert!(close(s1.topk_loss, t));
    // Against itself: vloss 0.
    assert!(dist.loss(t3(&TARG), &weights).vloss.abs() < 1e-7);
}

/// A reduced vocabulary's own, trainable LM head: the fused loss gives the value and
/// the gradients (w.r.t. `predict` and the head) of the plain autodiff formula, with
/// the target distribution over the target's (different, frozen) rows.
#[test]
fn own_draft_head_gets_the_exact_gradient() {
    let weights = LossWeights {
        topk_w: 1.0,
        k: 2,
        ..Default::default()
    };
    let to_ad = |t: Tensor<B, 3>| Tensor::<AD, 3>::from_inner(t);
    let mask_ad = Tensor::<AD, 2>::from_inner(mask());
    let lm_t = Tensor::<AD, 2>::from_inner(lm());
    let w0 = lm() * 0.7 + 0.05;

    let pr = to_ad(t3(&PRED)).require_grad();
    let w = Tensor::<AD, 2>::from_inner(w0.clone()).require_grad();
    let p = hass_train::loss::target_probs(to_ad(t3(&TARG)), lm_t.clone());
    let logq = burn::tensor::activation::log_softmax(
        pr.clone()
            .reshape([L, H])
            .matmul(w.clone().transpose())
            .reshape([1, L, V]),
        2,
    );
    let total = vloss(pr.clone(), to_ad(t3(&TARG)), mask_ad.clone())
        + ploss(logq.clone(), p.clone(), mask_ad.clone()) * 0.1
        + topk_loss(logq, p, 2, mask_ad.clone());
    let value = scalar(total.clone());
    let g = total.backward();
    let (gp_ref, gw_ref) = (host(pr.grad(&g).unwrap()), host(w.grad(&g).unwrap()));

    let pf = to_ad(t3(&PRED)).require_grad();
    let wf = Tensor::<AD, 2>::from_inner(w0).require_grad();
    let dist = TargetDist::new(to_ad(t3(&TARG)), mask_ad, lm_t, 2);
    let out = dist.loss_with_head(pf.clone(), Some(&wf), &weights);
    let fused = scalar(out.loss.clone());
    assert!(
        (fused - value).abs() <= 1e-5 * (1.0 + value.abs()),
        "{fused} vs {value}"
    );
    let g = out.loss.backward();
    let (gp, gw) = (host(pf.grad(&g).unwrap()), host(wf.grad(&g).unwrap()));
    assert!(max_diff(&gp_ref, &gp) <= 1e-6, "{gp_ref:?} vs {gp:?}");
    assert!(max_diff(&gw_ref, &gw) <= 1e-6, "{gw_ref:?} vs {gw:?}");
    assert!(gw.iter().any(|&x| x != 0.0), "the head gets a gradient");
}

/// A batch of 2 × 6 rows at the fixture's sizes (V = 512) on the autodiff backend.
struct FixtureBatch {
    target: Llama<B>,
    dev: Device<B>,
    cfg: ModelConfig,
    lm_head: Tensor<AD, 2>,
    emb: Tensor<AD, 3>,
    f: Tensor<AD, 3>,
    tgt: Tensor<AD, 3>,
    m: Tensor<AD, 2>,
}

/// Embeddings of random ids (seed `seed`), features (`seed + 1`), target features
/// (`seed + 2`, ×3) and the loss mask `mask`.
fn fixture_batch(seed: u64, mask: [f32; 12]) -> FixtureBatch {
    let target = fixture();
    let dev = target.device().clone();
    let cfg = draft_config(target.config());
    let (b, l, h) = (2, 6, cfg.hidden_size);
    FixtureBatch {
        lm_head: Tensor::from_inner(target.lm_head()),
        emb: Tensor::from_inner(embed(&target, &ids(seed, b, l, cfg.vocab_size))),
        f: Tensor::from_inner(features(seed + 1, b, l, h, &dev)),
        tgt: Tensor::from_inner(features(seed + 2, b, l, h, &dev) * 3.0),
        m: Tensor::from_data(TensorData::new(mask.to_vec(), [b, l]), &dev),
        target,
        dev,
        cfg,
    }
}

#[test]
fn fused_loss_gradient_equals_autodiff_reference() {
    // Tiny example: gradient w.r.t. predict itself.
    let weights = LossWeights {
        topk_w: 1.0,
        k: 2,
        ..Default::default()
    };
    let to_ad = |t: Tensor<B, 3>| Tensor::<AD, 3>::from_inner(t);
    let lm_ad = Tensor::<AD, 2>::from_inner(lm());
    let mask_ad = Tensor::<AD, 2>::from_inner(mask());
    let pr = to_ad(t3(&PRED)).require_grad();
    let (rl, ..) = reference_loss(
        pr.clone(),
        to_ad(t3(&TARG)),
        mask_ad.clone(),
        lm_ad.clone(),
        &weights,
    );
    let g_ref = host(pr.grad(&rl.backward()).unwrap());
    let pf = to_ad(t3(&PRED)).require_grad();
    let dist = TargetDist::new(to_ad(t3(&TARG)), mask_ad, lm_ad, 2);
    let g_fused = host(
        pf.grad(&dist.loss(pf.clone(), &weights).loss.backward())
            .unwrap(),
    );
    assert!(
        max_diff(&g_ref, &g_fused) <= 1e-6,
        "{g_ref:?} vs {g_fused:?}"
    );
    assert!(
        g_fused[3..6].iter().all(|&x| x == 0.0),
        "masked row has no gradient"
    );

    // Fixture sizes (V = 512), batch 2, through a HASS forward-2: every parameter
    // gradient equal.
    let FixtureBatch {
        target: _,
        dev,
        cfg,
        lm_head,
        emb,
        f,
        tgt,
        m,
    } = fixture_batch(90, [0., 1., 1., 1., 1., 0., 1., 0., 1., 1., 1., 0.]);
    let (b, l, h) = (2, 6, cfg.hidden_size);
    let q1 = Tensor::<AD, 3>::from_inner(features(93, b, l, h, &dev));
    let weights = LossWeights {
        topk_w: 1.0,
        k: 10,
        ..Default::default()
    };
    let grads_of = |fused: bool| {
        let td = TrainDraft::<AD>::random(&cfg, 5, &dev).unwrap();
        let predict = td.forward(emb.clone(), &[f.clone(), q1.clone()], true);
        let loss = if fused {
            let dist = TargetDist::new(tgt.clone(), m.clone(), lm_head.clone(), weights.k);
            dist.loss(predict, &weights).loss
        } else {
            reference_loss(predict, tgt.clone(), m.clone(), lm_head.clone(), &weights).0
        };
        let value = scalar(loss.clone().inner());
        let grads = loss.backward();
        let mut c = GradCollector {
            grads: &grads,
            out: Vec::new(),
        };
        td.visit(&mut c);
        (value, c.out)
    };
    let (vr, gr) = grads_of(false);
    let (vf, gf) = grads_of(true);
    assert!((vr - vf).abs() <= 1e-5 * (1.0 + vr.abs()), "{vr} vs {vf}");
    for (i, (a, b)) in gr.iter().zip(&gf).enumerate() {
        let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
        let scale = a.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        assert!(
            max_diff(a, b) <= 1e-4 * scale.max(1e-3),
            "param {i}: {} (scale {scale})",
            max_diff(a, b)
        );
    }
}

/// The device loss path (tensor ops, what GPU backends run) against the host path
/// (the fused pass): the same loss values, metrics and gradients for every draft
/// parameter and for a trainable LM head, through a HASS forward-3 at fixture sizes
/// (V = 512), batch 2 with masked rows. Both run here on the CPU backend.
#[test]
fn device_loss_path_equals_host_path() {
    assert_eq!(LossPath::for_backend::<AD>(), LossPath::Host);
    let FixtureBatch {
        target,
        dev,
        cfg,
        lm_head,
        emb,
        f,
        tgt,
        m,
    } = fixture_batch(70, [1., 1., 0., 1., 1., 1., 0., 0., 1., 1., 1., 1.]);
    let (b, l) = (2, 6);
    let weights = LossWeights {
        topk_w: 1.0,
        k: 10,
        ..Default::default()
    };
    // (values per forward, accuracy per forward, gradients: params then the head)
    let run = |path: LossPath, own_head: bool| {
        let td = TrainDraft::<AD>::random(&cfg, 3, &dev).unwrap();
        let w = Tensor::<AD, 2>::from_inner(target.lm_head() * 0.8 + 0.01).require_grad();
        let dist = TargetDist::with_path(tgt.clone(), m.clone(), lm_head.clone(), weights.k, path);
        assert_eq!(dist.path(), Some(path));
        assert_eq!(dist.rows(), &[0, 1, 3, 4, 5, 8, 9, 10, 11]);
        let mut streams = vec![f.clone()];
        let (mut values, mut accs, mut total) = (Vec::new(), Vec::new(), None);
        for _ in 0..3 {
            let predict = td.forward(emb.clone(), &streams, true);
            let out = dist.loss_with_head(predict.clone(), own_head.then_some(&w), &weights);
            values.push([
                scalar(out.loss.clone()),
                out.vloss,
                out.ploss,
                out.topk_loss,
            ]);
            accs.push(out.accuracy);
            total = Some(match total {
                None => out.loss,
                Some(t) => t + out.loss,
            });
            streams.push(next_stream(&streams, predict));
        }
        let grads = total.unwrap().backward();
        let mut c = GradCollector {
            grads: &grads,
            out: Vec::new(),
        };
        td.visit(&mut c);
        let mut g: Vec<Vec<f32>> = c.out.into_iter().map(|g| g.unwrap()).collect();
        if own_head {
            g.push(host(w.grad(&grads).expect("the head gets a gradient")));
        }
        (dist.argmax().to_vec(), values, accs, g)
    };
    for own_head in [false, true] {
        let (am_h, vals_h, acc_h, g_h) = run(LossPath::Host, own_head);
        let (am_d, vals_d, acc_d, g_d) = run(LossPath::Device, own_head);
        assert_eq!(am_h, am_d, "target argmax");
        assert_eq!(acc_h, acc_d, "draft top-1/2/3 counts");
        assert!(acc_h.iter().all(|a| a.total == 9));
        for (a, b) in vals_h.iter().flatten().zip(vals_d.iter().flatten()) {
            assert!(
                (a - b).abs() <= 1e-5 * (1.0 + a.abs()),
                "{vals_h:?} vs {vals_d:?}"
            );
        }
        assert_eq!(g_h.len(), g_d.len());
        for (i, (a, b)) in g_h.iter().zip(&g_d).enumerate() {
            let scale = a.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            assert!(scale > 0.0, "param {i}: zero gradient");
            assert!(
                max_diff(a, b) <= 1e-4 * scale,
                "param {i} (own head {own_head}): {} (scale {scale})",
                max_diff(a, b)
            );
        }
    }
    // Nothing kept: no vocabulary loss on either path, the feature loss alone.
    let zero = Tensor::<AD, 2>::zeros([b, l], &dev);
    for path in [LossPath::Host, LossPath::Device] {
        let dist = TargetDist::with_path(tgt.clone(), zero.clone(), lm_head.clone(), 10, path);
        assert_eq!(dist.path(), None);
        let out = dist.loss(f.clone(), &weights);
        assert_eq!(
            (out.ploss, out.topk_loss, out.accuracy.total),
            (0.0, 0.0, 0)
        );
    }
}

#[test]
fn topk_accuracy_counts() {
    // Draft scores over V = 5 with a fixed order 4 > 3 > 2 > 1 > 0.
    let rows = 5;
    let scores: Vec<f32> = (0..rows).flat_map(|_| [0.0, 1.0, 2.0, 3.0, 4.0]).collect();
    let scores =
        Tensor::<B, 3>::from_data(TensorData::new(scores, [1, rows, 5]), &Default::default());
    // Target argmax at draft rank 0, 1, 2, 3, and (masked) rank 0.
    let argmax = Tensor::<B, 2, Int>::from_data(
        TensorData::new(vec![4, 3, 2, 1, 4], [1, rows]),
        &Default::default(),
    );
    let m = Tensor::<B, 2>::from_data(
        TensorData::new(vec![1.0f32, 1.0, 1.0, 1.0, 0.0], [1, rows]),
        &Default::default(),
    );
    let acc = topk_accuracy(scores, argmax, m.clone());
    let want = TopkAccuracy {
        top1: 1,
        top2: 2,
        top3: 3,
        total: 4,
    };
    assert_eq!(acc, want);
    let mut sum = acc;
    sum.add(acc);
    assert_eq!(sum.total, 8);
    assert_eq!(acc.rates(), (0.25, 0.5, 0.75));

    // The fused path counts the same: identity LM head over H = V = 5, target features
    // one-hot at the wanted argmax, predicted features = the fixed scores.
    let eye: Vec<f32> = (0..25)
        .map(|i| if i % 6 == 0 { 1.0 } else { 0.0 })
        .collect();
    let eye = Tensor::<B, 2>::from_data(TensorData::new(eye, [5, 5]), &Default::default());
    let tf: Vec<f32> = [4usize, 3, 2, 1, 4]
        .iter()
        .flat_map(|&a| (0..5).map(move |i| if i == a { 5.0 } else { 0.0 }))
        .collect();
    let tf = Tensor::<B, 3>::from_data(TensorData::new(tf, [1, rows, 5]), &Default::default());
    let pf: Vec<f32> = (0..rows).flat_map(|_| [0.0, 1.0, 2.0, 3.0, 4.0]).collect();
    let pf = Tensor::<B, 3>::from_data(TensorData::new(pf, [1, rows, 5]), &Default::default());
    let dist = TargetDist::new(tf, m, eye, 2);
    assert_eq!(dist.argmax(), &[4, 3, 2, 1]);
    let acc = dist
        .loss(
            pf,
            &LossWeights {
                k: 2,
                ..Default::default()
            },
        )
        .accuracy;
    assert_eq!(acc, want);
}

// ---------------------------------------------------------------- gradients

struct GradCollector<'a> {
    grads: &'a <AD as burn::tensor::backend::AutodiffBackend>::Gradients,
    out: Vec<Option<Vec<f32>>>,
}

impl ModuleVisitor<AD> for GradCollector<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AD, D>>) {
        self.out.push(param.val().grad(self.grads).map(host));
    }
}

/// Gradients of the HASS forward-3 loss per parameter; `detach_streams` chooses
/// whether the caller detaches the streams (the forward must make it irrelevant).
fn forward3_grads(detach_streams: bool) -> Vec<Option<Vec<f32>>> {
    let target = fixture();
    let dev = target.device().clone();
    let cfg = draft_config(target.config());
    let td = TrainDraft::<AD>::random(&cfg, 9, &dev).unwrap();
    let (b, l, h) = (2, 6, cfg.hidden_size);
    // Frozen tensors marked require_grad: they must still receive no gradient.
    let lm_head = Tensor::<AD, 2>::from_inner(target.lm_head()).require_grad();
    let embedding = Tensor::<AD, 2>::from_inner(target.embedding()).require_grad();
    let flat: Vec<i32> = ids(80, b, l, cfg.vocab_size)
        .into_iter()
        .flatten()
        .map(|x| x as i32)
        .collect();
    let idt = Tensor::<AD, 2, Int>::from_data(TensorData::new(flat, [b, l]), &dev);
    let emb = embed_ids(&embedding, idt);
    let f = Tensor::<AD, 3>::from_inner(features(81, b, l, h, &dev)).require_grad();
    let tgt = Tensor::<AD, 3>::from_inner(features(82, b, l, h, &dev)).require_grad();
    let m = Tensor::<AD, 2>::from_data(
        TensorData::new(
            vec![
                1.0f32, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0,
            ],
            [b, l],
        ),
        &dev,
    );
    let weights = LossWeights {
        topk_w: 1.0,
        ..Default::default()
    };
    let dist = TargetDist::new(tgt.clone(), m.clone(), lm_head.clone(), weights.k);
    let mut streams = vec![f.clone()];
    let mut last = None;
    for _ in 0..3 {
        let predict = td.forward(emb.clone(), &streams, false);
        last = Some(dist.loss(predict.clone(), &weights).loss);
        let next = if detach_streams {
            next_stream(&streams, predict)
        } else {
            let first = streams.last().unwrap().clone().slice([0..b, 0..1, 0..h]);
            Tensor::cat(vec![first, predict.slice([0..b, 0..l - 1, 0..h])], 1)
        };
        streams.push(next);
    }
    let grads = last.unwrap().backward();
    assert!(lm_head.grad(&grads).is_none(), "lm_head got a gradient");
    assert!(embedding.grad(&grads).is_none(), "embedding got a gradient");
    assert!(f.grad(&grads).is_none(), "stream 0 got a gradient");
    assert!(tgt.grad(&grads).is_none(), "target features got a gradient");
    let mut c = GradCollector {
        grads: &grads,
        out: Vec::new(),
    };
    td.visit(&mut c);
    c.out
}

#[test]
fn gradients_reach_every_param_and_only_params() {
    let detached = forward3_grads(true);
    assert_eq!(
        detached.len(),
        10,
        "fc w+b, q, k, v, o, gate, up, down, norm"
    );
    for (i, g) in detached.iter().enumerate() {
        let g = g
            .as_ref()
            .unwrap_or_else(|| panic!("param {i} has no gradient"));
        assert!(
            g.iter().all(|x| x.is_finite()),
            "param {i}: non-finite gradient"
        );
        assert!(g.iter().any(|&x| x != 0.0), "param {i}: zero gradient");
    }
    // Streams are detached inside the forward: no path through earlier forwards.
    let raw = forward3_grads(false);
    for (i, (a, b)) in detached.iter().zip(&raw).enumerate() {
        let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
        assert!(
            max_diff(a, b) == 0.0,
            "param {i}: undetached streams changed the gradient"
        );
    }
}

// ---------------------------------------------------------------- speed (manual)

/// `cargo test --release -p hass-train --test model_loss -- --ignored --nocapture`
#[test]
#[ignore]
fn speed_smollm_sized_batch() {
    use std::time::Instant;
    let dev: Device<B> = Default::default();
    let text = r#"{"model_type":"llama","hidden_size":576,"intermediate_size":1536,
        "num_hidden_layers":1,"num_attention_heads":9,"num_key_value_heads":3,"rms_norm_eps":1e-5,
        "rope_theta":100000.0,"vocab_size":49152,"tie_word_embeddings":true}"#;
    let cfg = draft_config(&ModelConfig::from_hf_json(text, "bench").unwrap());
    let (b, l, h, v) = (2, 512, 576, 49152);
    let td = TrainDraft::<AD>::random(&cfg, 1, &dev).unwrap();
    let lm_head = Tensor::<AD, 2>::from_inner(Tensor::from_data(
        TensorData::new(rnd(1, v * h, 0.05), [v, h]),
        &dev,
    ));
    let emb = Tensor::<AD, 3>::from_inner(features(2, b, l, h, &dev));
    let f = Tensor::<AD, 3>::from_inner(features(3, b, l, h, &dev));
    let tgt = Tensor::<AD, 3>::from_inner(features(4, b, l, h, &dev));
    let m = Tensor::<AD, 2>::ones([b, l], &dev);
    let weights = LossWeights {
        topk_w: 1.0,
        ..Default::default()
    };
    let t0 = Instant::now();
    let dist = TargetDist::new(tgt.clone(), m, lm_head.clone(), weights.k);
    println!("target dist: {:?}", t0.elapsed());
    let mut streams = vec![f];
    for n in 1..=3 {
        let t = Instant::now();
        let predict = td.forward(emb.clone(), &streams, true);
        let _ = host(predict.clone().inner());
        let tf = t.elapsed();
        let losses = dist.loss(predict.clone(), &weights);
        let tl = t.elapsed();
        let grads = losses.loss.backward();
        let _ = td.fc.weight.val().grad(&grads);
        println!(
            "forward {n}: draft {tf:?}, +loss {tl:?}, +backward {:?} ({:.3} {:.3})",
            t.elapsed(),
            losses.ploss,
            losses.topk_loss
        );
        streams.push(next_stream(&streams, predict));
    }
    println!("total {:?}", t0.elapsed());
}
