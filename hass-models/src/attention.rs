//! Attention of query rows over the KV cache on the host, one row at a time.
//!
//! Burn's batched matmul blocks its products by shape: the same query row attended
//! alone (a decode step) and among 27 rows (a 9-node tree with 3 query heads per KV
//! head) rounded differently (up to 4e-5 in SmolLM2's f32 logits, and whole int8
//! steps once activations are quantized), which broke greedy speculative decoding's
//! token-for-token equality with vanilla decoding. Here every output row is one fixed
//! sequence of operations over the visible keys whatever the other rows: scores as
//! 8-lane partial sums folded in a fixed order, a sequential softmax, and the values
//! summed key by key.

use crate::spin_pool::{OutPtr, Pool};

/// Strided `[groups, len, head_dim]` view of keys or values (head_dim contiguous).
#[derive(Clone, Copy)]
pub(crate) struct Kv<'a> {
    pub data: &'a [f32],
    pub offset: usize,
    pub group_stride: usize,
    pub row_stride: usize,
}

impl Kv<'_> {
    #[inline(always)]
    fn row(&self, g: usize, j: usize, hd: usize) -> &[f32] {
        let at = self.offset + g * self.group_stride + j * self.row_stride;
        &self.data[at..at + hd]
    }
}

/// What one query row attends over: group `g`'s keys and values, and the score scale.
#[derive(Clone, Copy)]
struct Group<'a> {
    k: Kv<'a>,
    v: Kv<'a>,
    g: usize,
    scale: f32,
}

impl Group<'_> {
    #[inline(always)]
    fn key(&self, j: usize, hd: usize) -> &[f32] {
        self.k.row(self.g, j, hd)
    }

    #[inline(always)]
    fn value(&self, j: usize, hd: usize) -> &[f32] {
        self.v.row(self.g, j, hd)
    }
}

/// `q [groups, rows, hd]` (contiguous) attending over `len` keys: `out [groups, rows,
/// hd]`. `hidden` (`[rows, len]`, when given) is true where row `r` of every group may
/// not see key `j`. The (group, row) pairs are split over the spin pool's threads; each
/// pair is computed by one thread, the same way whatever the split.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend(
    q: &[f32],
    k: Kv<'_>,
    v: Kv<'_>,
    groups: usize,
    rows: usize,
    hd: usize,
    len: usize,
    scale: f32,
    hidden: Option<&[bool]>,
    out: &mut [f32],
) {
    let pairs = groups * rows;
    let out = OutPtr(out.as_mut_ptr());
    let pool = Pool::global();
    let parts = if pairs * len * hd < PAR_MIN_WORK {
        1
    } else {
        pool.threads().min(pairs)
    };
    let per = pairs.div_ceil(parts);
    let part = |p: usize| {
        let mut scores = vec![0f32; len];
        for pair in p * per..((p + 1) * per).min(pairs) {
            let (g, r) = (pair / rows, pair % rows);
            // SAFETY: each pair's output row belongs to one part; `out` outlives the job.
            let o = unsafe { std::slice::from_raw_parts_mut(out.get().add(pair * hd), hd) };
            let qr = &q[pair * hd..(pair + 1) * hd];
            let hidden = hidden.map(|m| &m[r * len..(r + 1) * len]);
            row(Group { k, v, g, scale }, qr, hidden, &mut scores, o);
        }
    };
    match parts {
        1 => part(0),
        _ => pool.run(parts, &part),
    }
}

/// Below this many multiply-adds a call stays on the calling thread.
const PAR_MIN_WORK: usize = 1 << 16;

/// One query row `qr` of `grp` into `o`; `hidden[j]` hides key `j` from it.
///
/// With AVX2 (x86-64) [`row_avx2`] computes it; otherwise [`row_portable`]. Both give
/// the same bits: they perform the same IEEE operations in the same order (Rust
/// contracts no multiply-add into an FMA), the AVX2 one only interleaves independent
/// keys and output chunks.
fn row(grp: Group<'_>, qr: &[f32], hidden: Option<&[bool]>, scores: &mut [f32], o: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if qr.len().is_multiple_of(32) && is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { row_avx2(grp, qr, hidden, scores, o) };
    }
    row_portable(grp, qr, hidden, scores, o)
}

/// The reference order of operations: scores as [`dot`] × scale (−∞ where hidden),
/// their maximum, `p = exp(s − max)` summed key by key, `o += p · v` key by key, then
/// `o × (1 / sum)`.
fn row_portable(
    grp: Group<'_>,
    qr: &[f32],
    hidden: Option<&[bool]>,
    scores: &mut [f32],
    o: &mut [f32],
) {
    let hd = qr.len();
    let mut max = f32::NEG_INFINITY;
    for (j, s) in scores.iter_mut().enumerate() {
        *s = if !hidden.is_some_and(|m| m[j]) {
            dot(qr, grp.key(j, hd)) * grp.scale
        } else {
            f32::NEG_INFINITY
        };
        max = max.max(*s);
    }
    o.fill(0.0);
    let mut sum = 0f32;
    for (j, s) in scores.iter().enumerate() {
        if *s == f32::NEG_INFINITY {
            continue;
        }
        let p = (*s - max).exp();
        sum += p;
        for (o, &x) in o.iter_mut().zip(grp.value(j, hd)) {
            *o += p * x;
        }
    }
    let inv = 1.0 / sum;
    o.iter_mut().for_each(|x| *x *= inv);
}

/// [`row_portable`] for `hd` a multiple of 32 with AVX2: four keys' dot products at
/// once (each key's 8 lane sums stay one chain, folded as [`fold8`] does), and the
/// value sums 32 outputs at a time in registers across all keys. Keys after the last
/// visible one are skipped.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn row_avx2(
    grp: Group<'_>,
    qr: &[f32],
    hidden: Option<&[bool]>,
    scores: &mut [f32],
    o: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (hd, len) = (qr.len(), scores.len());
    let is_hidden = |j: usize| hidden.is_some_and(|m| m[j]);
    let end = match hidden {
        Some(m) => m.iter().rposition(|&h| !h).map_or(0, |j| j + 1),
        None => len,
    };
    let lane_sums = |kr: &[f32]| -> __m256 {
        let mut acc = _mm256_setzero_ps();
        for c in (0..hd).step_by(8) {
            // SAFETY: c + 8 <= hd = qr.len() = kr.len().
            let (x, y) = unsafe {
                (
                    _mm256_loadu_ps(qr.as_ptr().add(c)),
                    _mm256_loadu_ps(kr.as_ptr().add(c)),
                )
            };
            acc = _mm256_add_ps(acc, _mm256_mul_ps(x, y));
        }
        acc
    };
    // fold8 in registers: lanes i + (i + 4), then (0 + 2) + (1 + 3).
    let fold = |acc: __m256| -> f32 {
        let l4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
        let l2 = _mm_add_ps(l4, _mm_movehl_ps(l4, l4));
        _mm_cvtss_f32(_mm_add_ss(l2, _mm_shuffle_ps::<1>(l2, l2)))
    };
    let mut max = f32::NEG_INFINITY;
    let mut j = 0;
    while j + 4 <= end {
        let a = [
            lane_sums(grp.key(j, hd)),
            lane_sums(grp.key(j + 1, hd)),
            lane_sums(grp.key(j + 2, hd)),
            lane_sums(grp.key(j + 3, hd)),
        ];
        for (i, acc) in a.into_iter().enumerate() {
            let s = if is_hidden(j + i) {
                f32::NEG_INFINITY
            } else {
                fold(acc) * grp.scale
            };
            scores[j + i] = s;
            max = max.max(s);
        }
        j += 4;
    }
    for (j, s) in scores.iter_mut().enumerate().take(end).skip(j) {
        *s = if is_hidden(j) {
            f32::NEG_INFINITY
        } else {
            fold(lane_sums(grp.key(j, hd))) * grp.scale
        };
        max = max.max(*s);
    }
    // Probabilities in place of the scores; 0 marks a key that adds nothing.
    let mut sum = 0f32;
    for s in &mut scores[..end] {
        if *s == f32::NEG_INFINITY {
            *s = 0.0;
            continue;
        }
        let p = (*s - max).exp();
        sum += p;
        *s = p;
    }
    let inv = 1.0 / sum;
    for c in (0..hd).step_by(32) {
        let mut acc = [_mm256_setzero_ps(); 4];
        for (j, &p) in scores[..end].iter().enumerate() {
            if is_hidden(j) {
                continue;
            }
            let pv = _mm256_set1_ps(p);
            let vr = grp.value(j, hd);
            for (i, a) in acc.iter_mut().enumerate() {
                // SAFETY: c + 32 <= hd = vr.len().
                let x = unsafe { _mm256_loadu_ps(vr.as_ptr().add(c + 8 * i)) };
                *a = _mm256_add_ps(*a, _mm256_mul_ps(pv, x));
            }
        }
        let invv = _mm256_set1_ps(inv);
        for (i, a) in acc.iter().enumerate() {
            // SAFETY: c + 32 <= hd = o.len().
            unsafe { _mm256_storeu_ps(o.as_mut_ptr().add(c + 8 * i), _mm256_mul_ps(*a, invv)) };
        }
    }
}

/// `Σ a·b` as 8 lane sums (element `i` in lane `i % 8`) folded by [`fold8`].
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    for (l, (x, y)) in ca.remainder().iter().zip(cb.remainder()).enumerate() {
        lanes[l] += x * y;
    }
    fold8(lanes)
}

/// 8 lane sums folded `8 → 4 → 2 → 1`.
#[inline(always)]
fn fold8(lanes: [f32; 8]) -> f32 {
    let l4: [f32; 4] = std::array::from_fn(|i| lanes[i] + lanes[i + 4]);
    (l4[0] + l4[2]) + (l4[1] + l4[3])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::Rng;

    /// The AVX2 row gives the portable row's bits, with and without hidden keys,
    /// for lengths that leave 0..3 keys after the groups of four.
    #[test]
    fn avx2_rows_equal_portable_rows_bitwise() {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") {
            let mut rng = Rng(9);
            for (hd, len) in [(64, 1), (64, 7), (32, 130), (128, 33)] {
                let (q, kd, vd) = (rng.vec(hd), rng.vec(2 * len * hd), rng.vec(2 * len * hd));
                let view = |data| Kv {
                    data,
                    offset: 0,
                    group_stride: len * hd,
                    row_stride: hd,
                };
                let masks: [Option<Vec<bool>>; 3] = [
                    None,
                    Some((0..len).map(|j| j % 3 == 1).collect()),
                    Some((0..len).map(|j| j > len / 2).collect()),
                ];
                for mask in &masks {
                    let mut s = vec![0f32; len];
                    let (mut a, mut b) = (vec![0f32; hd], vec![0f32; hd]);
                    let m = mask.as_deref();
                    let grp = Group {
                        k: view(&kd),
                        v: view(&vd),
                        g: 1,
                        scale: 0.125,
                    };
                    row_portable(grp, &q, m, &mut s, &mut a);
                    // SAFETY: AVX2 checked above.
                    unsafe { row_avx2(grp, &q, m, &mut s, &mut b) };
                    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&a), bits(&b), "hd {hd}, len {len}, mask {mask:?}");
                }
            }
        }
    }
}
