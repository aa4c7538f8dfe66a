//! HASS training losses and metrics (spec §3.3, §3.6).
//!
//! With `M` the loss mask `[b, L]` and `N = ΣM + 1e-5`:
//! - `vloss = Σ M · mean_h SmoothL1_{β=1}(predict, target) / N`
//! - `ploss = −Σ M · Σ_v p_v · log q_v / N`, `p = softmax(lm_head(target))` (detached),
//!   `log q = log_softmax(lm_head(predict))`
//! - `topk_loss = −Σ M · Σ_{v ∈ TopK(p)} p_v · log q_v / N` (unnormalised `p_v`)
//! - `loss = v_w·vloss + p_w·ploss + topk_w·topk_loss`
//!
//! Two implementations:
//! - [`TargetDist`] (the training path): the target side (`p`, its top-K and argmax)
//!   is computed **once per batch**, for the rows with `M > 0` only, and reused by all
//!   HASS forwards. Its vocabulary losses run on one of two [`LossPath`]s, chosen by
//!   the backend:
//!   - [`LossPath::Host`] (CPU backends): one fused host pass per row (log-sum-exp,
//!     both cross-entropies, their gradient w.r.t. the logits, the draft's top-3 for
//!     the metrics), the gradient fed back through `predict` as
//!     `Σ predict ⊙ (g · lm_head)`: exact value, exact gradient, and no `[rows, V]`
//!     tensor kept in the autodiff graph. On a CPU each elementwise `[rows, V]` tensor
//!     op costs about as much as the vocabulary matmul, so this is several times
//!     faster than tensor ops.
//!   - [`LossPath::Device`] (GPU backends): the same losses as tensor ops on the
//!     rows kept, `p` and its top-K staying on the device; only the loss values and
//!     the draft's top-3 ids (for the metrics) come back to the host. Copying
//!     `[rows, V]` logits to the host every forward would starve a GPU.
//! - The tensor functions ([`vloss`], [`ploss`], [`topk_loss`], [`reference_loss`],
//!   [`topk_accuracy`]): plain autodiff ops, any backend; the reference the fused path
//!   is tested against.
//!
//! The LM head is detached everywhere: it never receives a gradient.

use burn::prelude::*;
use burn::tensor::activation::{log_softmax, softmax};
use hass_core::sampling::top_k;
use hass_models::HassBackend;

/// Loss weights (defaults: HASS stage 1, `topk_w = 0`; stage 2 uses `topk_w = 1`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossWeights {
    pub v_w: f64,
    pub p_w: f64,
    pub topk_w: f64,
    /// K of the top-K loss.
    pub k: usize,
}

impl Default for LossWeights {
    fn default() -> Self {
        LossWeights {
            v_w: 1.0,
            p_w: 0.1,
            topk_w: 0.0,
            k: 10,
        }
    }
}

/// Masked accuracy counts: the target's argmax within the draft's top-1/2/3.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TopkAccuracy {
    pub top1: usize,
    pub top2: usize,
    pub top3: usize,
    /// Rows counted (mask > 0).
    pub total: usize,
}

impl TopkAccuracy {
    /// Adds another batch's counts.
    pub fn add(&mut self, other: TopkAccuracy) {
        self.top1 += other.top1;
        self.top2 += other.top2;
        self.top3 += other.top3;
        self.total += other.total;
    }

    /// `(top1, top2, top3)` as fractions of `total` (0 when empty).
    pub fn rates(&self) -> (f64, f64, f64) {
        if self.total == 0 {
            return (0.0, 0.0, 0.0);
        }
        let t = self.total as f64;
        (
            self.top1 as f64 / t,
            self.top2 as f64 / t,
            self.top3 as f64 / t,
        )
    }

    /// Counts one row whose target argmax sits at `rank` in the draft's order.
    fn count(&mut self, rank: Option<usize>) {
        self.total += 1;
        if let Some(r) = rank {
            self.top1 += (r < 1) as usize;
            self.top2 += (r < 2) as usize;
            self.top3 += (r < 3) as usize;
        }
    }

    /// Counts the rows `r` with `keep(r)`: `top` holds each row's draft ids, best
    /// first, `k` per row; `argmax[r]` is the row's target token.
    fn count_rows(&mut self, top: &[u32], k: usize, argmax: &[u32], keep: impl Fn(usize) -> bool) {
        for (r, (ids, am)) in top.chunks(k).zip(argmax).enumerate() {
            if keep(r) {
                self.count(ids.iter().position(|t| t == am));
            }
        }
    }
}

/// The losses of one HASS forward ([`TargetDist::loss`]).
#[derive(Debug, Clone)]
pub struct Losses<B: HassBackend> {
    /// `v_w·vloss + p_w·ploss + topk_w·topk_loss`, with the exact gradient w.r.t. the
    /// draft's parameters (backward this).
    pub loss: Tensor<B, 1>,
    pub vloss: f64,
    pub ploss: f64,
    /// Computed (for logging) even when `topk_w = 0`.
    pub topk_loss: f64,
    /// Masked top-1/2/3 accuracy of this forward's draft distribution.
    pub accuracy: TopkAccuracy,
}

/// Where [`TargetDist`] computes the vocabulary losses (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossPath {
    /// A fused pass per row on the host.
    Host,
    /// Tensor ops on the backend's device.
    Device,
}

impl LossPath {
    /// The faster path for `B`: the host where tensors live in host memory, else the
    /// device.
    pub fn for_backend<B: HassBackend>() -> Self {
        if B::HOST_MEMORY {
            LossPath::Host
        } else {
            LossPath::Device
        }
    }
}

impl std::fmt::Display for LossPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LossPath::Host => "host (fused pass per row)",
            LossPath::Device => "device (tensor ops)",
        })
    }
}

/// The target distribution of the kept rows, where the loss path keeps it.
#[derive(Debug, Clone)]
enum TargetSide<B: HassBackend> {
    /// Row-major host data: `probs [rows, V]`, top-K `[rows, K]` (descending), `M_r / N`.
    Host {
        probs: Vec<f32>,
        topk_ids: Vec<u32>,
        topk_probs: Vec<f32>,
        row_weight: Vec<f64>,
    },
    /// The same as tensors: `probs [rows, V]`, top-K `[rows, K]`, `M_r / N` `[rows, 1]`.
    Device {
        probs: Tensor<B, 2>,
        topk_ids: Tensor<B, 2, Int>,
        topk_probs: Tensor<B, 2>,
        row_weight: Tensor<B, 2>,
    },
}

/// The batch's target side, computed once and shared by the HASS forwards: the target
/// features and loss mask, and for every row with `M > 0` the target distribution
/// `p = softmax(lm_head(f))`, its top-K (ids and unnormalised probabilities) and its
/// argmax.
#[derive(Debug, Clone)]
pub struct TargetDist<B: HassBackend> {
    target: Tensor<B, 3>,
    mask: Tensor<B, 2>,
    lm_head: Tensor<B, 2>,
    /// Flat indices `b·L + t` of the rows with `M > 0`.
    rows: Vec<usize>,
    /// Empty when no row is kept.
    side: Option<TargetSide<B>>,
    argmax: Vec<u32>,
    k: usize,
    vocab: usize,
}

/// Runs `f(row, data)` over the `width`-long rows of `buf`, on all cores.
fn for_rows<T: Send>(
    buf: &mut [f32],
    width: usize,
    f: impl Fn(usize, &mut [f32]) -> T + Sync,
) -> Vec<T> {
    let rows = buf.len().checked_div(width).unwrap_or(0);
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(rows.max(1));
    if threads <= 1 {
        return buf
            .chunks_mut(width)
            .enumerate()
            .map(|(i, r)| f(i, r))
            .collect();
    }
    let per = rows.div_ceil(threads);
    std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> = buf
            .chunks_mut(per * width)
            .enumerate()
            .map(|(ci, chunk)| {
                s.spawn(move || {
                    chunk
                        .chunks_mut(width)
                        .enumerate()
                        .map(|(i, r)| f(ci * per + i, r))
                        .collect::<Vec<T>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("loss worker panicked"))
            .collect()
    })
}

/// Index of the first maximum.
fn argmax_row(x: &[f32]) -> (usize, f32) {
    let mut best = (0, f32::NEG_INFINITY);
    for (i, &v) in x.iter().enumerate() {
        if v > best.1 {
            best = (i, v);
        }
    }
    best
}

fn host_f32<B: HassBackend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("f32 data")
}

/// `x [rows, H] · lm_headᵀ` as host data (mutable in place).
fn logits_host<B: HassBackend>(x: Tensor<B, 2>, lm_head: &Tensor<B, 2>) -> TensorData {
    B::project(x, &lm_head.clone().transpose())
        .into_data()
        .convert::<f32>()
}

impl<B: HassBackend> TargetDist<B> {
    /// From the target features `[b, L, H]` (row `t` = `f_{t+1}`), the loss mask
    /// `[b, L]` and the frozen LM head `[V, H]`; `k ≥ 1` is the K of the top-K loss.
    /// The losses run on [`LossPath::for_backend`].
    pub fn new(
        target_features: Tensor<B, 3>,
        loss_mask: Tensor<B, 2>,
        lm_head: Tensor<B, 2>,
        k: usize,
    ) -> Self {
        Self::with_path(
            target_features,
            loss_mask,
            lm_head,
            k,
            LossPath::for_backend::<B>(),
        )
    }

    /// [`TargetDist::new`] on the given loss path.
    pub fn with_path(
        target_features: Tensor<B, 3>,
        loss_mask: Tensor<B, 2>,
        lm_head: Tensor<B, 2>,
        k: usize,
        path: LossPath,
    ) -> Self {
        let [b, l, h] = target_features.dims();
        let [vocab, hl] = lm_head.dims();
        assert_eq!(h, hl, "LM head width");
        assert_eq!(loss_mask.dims(), [b, l], "loss mask shape");
        assert!(k >= 1 && k <= vocab, "top-K loss needs 1 <= k <= V");
        let target = target_features.detach();
        let mask = loss_mask.detach();
        let lm_head = lm_head.detach();
        let m = host_f32(mask.clone());
        let rows: Vec<usize> = (0..b * l).filter(|&i| m[i] != 0.0).collect();
        let norm = m.iter().map(|&x| x as f64).sum::<f64>() + 1e-5;
        let row_weight: Vec<f64> = rows.iter().map(|&i| m[i] as f64 / norm).collect();
        let mut argmax = Vec::new();
        let side = (!rows.is_empty()).then(|| {
            let x = select_rows(target.clone(), &rows);
            match path {
                LossPath::Host => {
                    let mut data = logits_host(x, &lm_head);
                    let per_row =
                        for_rows(data.as_mut_slice::<f32>().expect("f32"), vocab, |_, row| {
                            let (am, mx) = argmax_row(row);
                            let mut s = 0.0f64;
                            for v in row.iter_mut() {
                                let e = (*v - mx).exp();
                                *v = e;
                                s += e as f64;
                            }
                            let inv = (1.0 / s) as f32;
                            for v in row.iter_mut() {
                                *v *= inv;
                            }
                            let (ids, vals) = top_k(row, k);
                            (am as u32, ids, vals)
                        });
                    let (mut topk_ids, mut topk_probs) = (Vec::new(), Vec::new());
                    for (am, ids, vals) in per_row {
                        argmax.push(am);
                        topk_ids.extend(ids);
                        topk_probs.extend(vals);
                    }
                    TargetSide::Host {
                        probs: data.into_vec::<f32>().expect("f32 data"),
                        topk_ids,
                        topk_probs,
                        row_weight,
                    }
                }
                LossPath::Device => {
                    let device = x.device();
                    let probs = softmax(x.matmul(lm_head.clone().transpose()), 1);
                    let (topk_probs, topk_ids) = probs.clone().topk_with_indices(k, 1);
                    argmax = host_ids(probs.clone().argmax(1));
                    let n = row_weight.len();
                    let w: Vec<f32> = row_weight.iter().map(|&w| w as f32).collect();
                    TargetSide::Device {
                        probs,
                        topk_ids,
                        topk_probs,
                        row_weight: Tensor::from_data(TensorData::new(w, [n, 1]), &device),
                    }
                }
            }
        });
        TargetDist {
            target,
            mask,
            lm_head,
            rows,
            side,
            argmax,
            k,
            vocab,
        }
    }

    /// Where the vocabulary losses run.
    pub fn path(&self) -> Option<LossPath> {
        self.side.as_ref().map(|s| match s {
            TargetSide::Host { .. } => LossPath::Host,
            TargetSide::Device { .. } => LossPath::Device,
        })
    }

    /// The K of the stored top-K.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Flat indices `b·L + t` of the rows the vocabulary losses cover (`M > 0`).
    pub fn rows(&self) -> &[usize] {
        &self.rows
    }

    /// Target argmax per covered row (same order as [`TargetDist::rows`]).
    pub fn argmax(&self) -> &[u32] {
        &self.argmax
    }

    /// All losses of one forward's `predict` `[b, L, H]` (the same batch), with
    /// `weights.k == self.k()`; the draft's logits use the frozen LM head the
    /// distribution was built with.
    pub fn loss(&self, predict: Tensor<B, 3>, weights: &LossWeights) -> Losses<B> {
        self.loss_with_head(predict, None, weights)
    }

    /// [`TargetDist::loss`] with the draft's logits from `draft_head` (`[V, H]`, the
    /// same rows as the distribution's LM head) when given: a trainable head (a
    /// reduced vocabulary's own), which gets its exact gradient too.
    pub fn loss_with_head(
        &self,
        predict: Tensor<B, 3>,
        draft_head: Option<&Tensor<B, 2>>,
        weights: &LossWeights,
    ) -> Losses<B> {
        assert_eq!(
            weights.k, self.k,
            "LossWeights::k differs from the TargetDist's K"
        );
        assert_eq!(predict.dims(), self.target.dims(), "predict shape");
        let v = vloss(predict.clone(), self.target.clone(), self.mask.clone());
        let vloss_value = v.clone().into_scalar().elem::<f64>();
        let mut loss = v * weights.v_w;
        let mut accuracy = TopkAccuracy::default();
        let (mut ploss_value, mut topk_value) = (0.0, 0.0);
        if let Some(side) = &self.side {
            let pv = select_rows(predict, &self.rows);
            let head = match draft_head {
                Some(w) => {
                    assert_eq!(w.dims(), self.lm_head.dims(), "draft LM head shape");
                    w.clone()
                }
                None => self.lm_head.clone(),
            };
            let (surrogate, pl, tl) = match side {
                TargetSide::Host {
                    probs,
                    topk_ids,
                    topk_probs,
                    row_weight,
                } => {
                    let host = HostTarget {
                        probs,
                        topk_ids,
                        topk_probs,
                        row_weight,
                        argmax: &self.argmax,
                        k: self.k,
                        vocab: self.vocab,
                    };
                    host.loss(pv, head, draft_head.is_some(), weights, &mut accuracy)
                }
                TargetSide::Device {
                    probs,
                    topk_ids,
                    topk_probs,
                    row_weight,
                } => {
                    let logits = pv.matmul(head.transpose());
                    let kk = 3.min(self.vocab);
                    let top3 = host_ids(logits.clone().detach().topk_with_indices(kk, 1).1);
                    accuracy.count_rows(&top3, kk, &self.argmax, |_| true);
                    let logq = log_softmax(logits, 1);
                    let pl = (probs.clone() * logq.clone()).sum_dim(1).neg() * row_weight.clone();
                    let tl = (topk_probs.clone() * logq.gather(1, topk_ids.clone()))
                        .sum_dim(1)
                        .neg()
                        * row_weight.clone();
                    let (pl, tl) = (pl.sum(), tl.sum());
                    let values = host_f32(Tensor::cat(
                        vec![pl.clone().detach(), tl.clone().detach()],
                        0,
                    ));
                    let terms = pl * weights.p_w + tl * weights.topk_w;
                    (terms, values[0] as f64, values[1] as f64)
                }
            };
            ploss_value = pl;
            topk_value = tl;
            loss = loss + surrogate;
        }
        Losses {
            loss,
            vloss: vloss_value,
            ploss: ploss_value,
            topk_loss: topk_value,
            accuracy,
        }
    }
}

/// Rows `rows` of `x` viewed as `[b·L, H]`.
fn select_rows<B: HassBackend>(x: Tensor<B, 3>, rows: &[usize]) -> Tensor<B, 2> {
    let [b, l, h] = x.dims();
    let idx = Tensor::<B, 1, Int>::from_data(
        TensorData::new(
            rows.iter().map(|&r| r as i32).collect::<Vec<_>>(),
            [rows.len()],
        ),
        &x.device(),
    );
    x.reshape([b * l, h]).select(0, idx)
}

/// The host side's data, borrowed for one forward's fused loss.
struct HostTarget<'a> {
    probs: &'a [f32],
    topk_ids: &'a [u32],
    topk_probs: &'a [f32],
    row_weight: &'a [f64],
    argmax: &'a [u32],
    k: usize,
    vocab: usize,
}

impl HostTarget<'_> {
    /// The weighted vocabulary losses of the kept rows `pv` `[rows, H]` with the
    /// draft's LM head `head` (`trainable`: it gets its gradient too), as a tensor
    /// with the exact value and gradient; also `(ploss, topk_loss)` and the accuracy.
    fn loss<B: HassBackend>(
        &self,
        pv: Tensor<B, 2>,
        head: Tensor<B, 2>,
        trainable: bool,
        weights: &LossWeights,
        accuracy: &mut TopkAccuracy,
    ) -> (Tensor<B, 1>, f64, f64) {
        let (k, vocab) = (self.k, self.vocab);
        let (p_w, t_w) = (weights.p_w, weights.topk_w);
        let mut data = logits_host(pv.clone().detach(), &head.clone().detach());
        let per_row = for_rows(data.as_mut_slice::<f32>().expect("f32"), vocab, |r, x| {
            let p = &self.probs[r * vocab..(r + 1) * vocab];
            let ids = &self.topk_ids[r * k..(r + 1) * k];
            let pk = &self.topk_probs[r * k..(r + 1) * k];
            let c = self.row_weight[r];
            // Pass 1: max and the draft's top-3 (for the metrics).
            let (top3, _) = top_k(x, 3.min(vocab));
            let mx = x[top3[0] as usize];
            let xk: Vec<f64> = ids.iter().map(|&i| x[i as usize] as f64).collect();
            // Pass 2: e = exp(x − max) in place, Σe, Σp, Σp·x.
            let (mut s, mut sp, mut spx) = (0.0f64, 0.0f64, 0.0f64);
            for (xv, &pv) in x.iter_mut().zip(p) {
                sp += pv as f64;
                spx += pv as f64 * *xv as f64;
                let e = (*xv - mx).exp();
                *xv = e;
                s += e as f64;
            }
            let lse = mx as f64 + s.ln();
            let spk: f64 = pk.iter().map(|&q| q as f64).sum();
            let ploss_row = lse * sp - spx;
            let topk_row: f64 = pk
                .iter()
                .zip(&xk)
                .map(|(&q, &xv)| q as f64 * (lse - xv))
                .sum();
            // Pass 3: ∂/∂x of c·(p_w·ploss_row + t_w·topk_row), in place:
            // c·(softmax(x)·(p_w·Σp + t_w·Σp_K) − p_w·p − t_w·p_K).
            let coef = (c * (p_w * sp + t_w * spk) / s) as f32;
            let cp = (c * p_w) as f32;
            for (xv, &pv) in x.iter_mut().zip(p) {
                *xv = coef * *xv - cp * pv;
            }
            for (&i, &q) in ids.iter().zip(pk) {
                x[i as usize] -= (c * t_w * q as f64) as f32;
            }
            let rank = top3.iter().position(|&t| t == self.argmax[r]);
            (c * ploss_row, c * topk_row, rank)
        });
        let (mut ploss, mut topk) = (0.0, 0.0);
        for (pl, tl, rank) in per_row {
            ploss += pl;
            topk += tl;
            accuracy.count(rank);
        }
        // d loss / d predict = g · head, fed back as Σ predict ⊙ G; a trainable head
        // gets d loss / d head = gᵀ · predict the same way.
        let g = Tensor::<B, 2>::from_data(data, &pv.device());
        let mut surrogate = (pv.clone() * B::project(g.clone(), &head.clone().detach())).sum();
        if trainable {
            let gw = B::project(g.transpose(), &pv.detach());
            surrogate = surrogate + (head * gw).sum();
        }
        let value = p_w * ploss + t_w * topk;
        (surrogate.clone() - surrogate.detach() + value, ploss, topk)
    }
}

/// Integer ids as host data, row-major.
fn host_ids<B: HassBackend, const D: usize>(t: Tensor<B, D, Int>) -> Vec<u32> {
    t.into_data()
        .convert::<i64>()
        .into_vec::<i64>()
        .expect("int data")
        .into_iter()
        .map(|x| x as u32)
        .collect()
}

// ------------------------------------------------------------------ tensor versions

/// `features [b, L, H] · lm_headᵀ → [b, L, V]`, the head detached.
pub fn logits<B: HassBackend>(features: Tensor<B, 3>, lm_head: Tensor<B, 2>) -> Tensor<B, 3> {
    let [b, l, h] = features.dims();
    let v = lm_head.dims()[0];
    features
        .reshape([b * l, h])
        .matmul(lm_head.detach().transpose())
        .reshape([b, l, v])
}

/// The draft's log-probabilities `log_softmax(lm_head(predict))`, `[b, L, V]`.
pub fn draft_log_probs<B: HassBackend>(
    predict: Tensor<B, 3>,
    lm_head: Tensor<B, 2>,
) -> Tensor<B, 3> {
    log_softmax(logits(predict, lm_head), 2)
}

/// The target distribution `softmax(lm_head(target_features))`, detached.
pub fn target_probs<B: HassBackend>(
    target_features: Tensor<B, 3>,
    lm_head: Tensor<B, 2>,
) -> Tensor<B, 3> {
    softmax(logits(target_features.detach(), lm_head), 2).detach()
}

/// `Σ_{b,t} M · per_row / (ΣM + 1e-5)` for `per_row` `[b, L]`.
fn masked_mean<B: HassBackend>(per_row: Tensor<B, 2>, mask: Tensor<B, 2>) -> Tensor<B, 1> {
    let mask = mask.detach();
    let n = mask.clone().sum() + 1e-5;
    (per_row * mask).sum() / n
}

/// SmoothL1 (β = 1) between `predict` and `target` `[b, L, H]`, mean over H, masked
/// mean over rows.
pub fn vloss<B: HassBackend>(
    predict: Tensor<B, 3>,
    target: Tensor<B, 3>,
    mask: Tensor<B, 2>,
) -> Tensor<B, 1> {
    let [b, l, _] = predict.dims();
    let a = (predict - target.detach()).abs();
    let quad = a.clone().clamp_max(1.0);
    // |d| < 1: ½d²; else ½ + (|d| − 1) = |d| − ½.
    let per = quad.clone() * quad.clone() * 0.5 + (a - quad);
    masked_mean(per.mean_dim(2).reshape([b, l]), mask)
}

/// Soft cross-entropy `−Σ M·p·log q / N` from the draft's log-probabilities `logq`
/// and the target probabilities `p` (both `[b, L, V]`).
pub fn ploss<B: HassBackend>(
    logq: Tensor<B, 3>,
    p: Tensor<B, 3>,
    mask: Tensor<B, 2>,
) -> Tensor<B, 1> {
    let [b, l, _] = logq.dims();
    let per = (p.detach() * logq).sum_dim(2).reshape([b, l]).neg();
    masked_mean(per, mask)
}

/// The HASS top-K loss: the soft cross-entropy restricted to the target's top-`k`
/// tokens, weighted by their unnormalised probabilities.
pub fn topk_loss<B: HassBackend>(
    logq: Tensor<B, 3>,
    p: Tensor<B, 3>,
    k: usize,
    mask: Tensor<B, 2>,
) -> Tensor<B, 1> {
    let [b, l, _] = logq.dims();
    let (pk, ids) = p.detach().topk_with_indices(k, 2);
    let per = (pk * logq.gather(2, ids)).sum_dim(2).reshape([b, l]).neg();
    masked_mean(per, mask)
}

/// The combined loss with tensor ops only: `(loss, vloss, ploss, topk_loss)`.
pub fn reference_loss<B: HassBackend>(
    predict: Tensor<B, 3>,
    target_features: Tensor<B, 3>,
    mask: Tensor<B, 2>,
    lm_head: Tensor<B, 2>,
    weights: &LossWeights,
) -> (Tensor<B, 1>, Tensor<B, 1>, Tensor<B, 1>, Tensor<B, 1>) {
    let p = target_probs(target_features.clone(), lm_head.clone());
    let v = vloss(predict.clone(), target_features, mask.clone());
    let logq = draft_log_probs(predict, lm_head);
    let pl = ploss(logq.clone(), p.clone(), mask.clone());
    let tl = topk_loss(logq, p, weights.k, mask);
    let loss = v.clone() * weights.v_w + pl.clone() * weights.p_w + tl.clone() * weights.topk_w;
    (loss, v, pl, tl)
}

/// Counts, over rows with `mask > 0`, whether `target_argmax` (`[b, L]`) is among the
/// top-1/2/3 of the draft's `scores` (`[b, L, V]`, logits or log-probabilities).
pub fn topk_accuracy<B: HassBackend>(
    scores: Tensor<B, 3>,
    target_argmax: Tensor<B, 2, Int>,
    mask: Tensor<B, 2>,
) -> TopkAccuracy {
    let kk = 3.min(scores.dims()[2]);
    let ids = host_ids(scores.detach().topk_with_indices(kk, 2).1);
    let m = host_f32(mask);
    let mut acc = TopkAccuracy::default();
    acc.count_rows(&ids, kk, &host_ids(target_argmax), |r| m[r] != 0.0);
    acc
}
