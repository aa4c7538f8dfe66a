//! Attention of query rows over the KV cache on the host.
//!
//! Burn's batched matmul blocks its products by shape: the same query row attended
//! alone (a decode step) and among 27 rows (a 9-node tree with 3 query heads per KV
//! head) rounded differently (up to 4e-5 in SmolLM2's f32 logits, and whole int8
//! steps once activations are quantized), which broke greedy speculative decoding's
//! token-for-token equality with vanilla decoding. Here every output row is one fixed
//! sequence of operations over its visible keys whatever the other rows and wherever
//! hidden keys sit between them ([`row_portable`] is the reference):
//!
//! * the score of key `j` is `fold8(lanes) · scale`, the lanes multiply-added over the
//!   head dimension eight at a time — it depends on the query and that key alone, so
//!   eight keys are computed at once and their lanes folded together (`vhaddps`);
//! * `p = exp(s − max)` with [`exp`], a fixed polynomial (so eight at a time, with
//!   the same bits as one at a time), 0 for hidden keys;
//! * the probabilities summed and the values multiply-added key by key over the
//!   visible keys, in order, then scaled by `1 / sum`.
//!
//! Rows of one KV group are taken two at a time so that each value row loaded serves
//! both.

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

/// Query rows of one group that share the loads of their values.
const PAIR: usize = 2;

/// `q [groups, rows, hd]` (contiguous) attending over `len` keys: `out [groups, rows,
/// hd]`. `hidden` (`[rows, len]`, when given) is true where row `r` of every group may
/// not see key `j`. Pairs of rows of a group are split over the spin pool's threads;
/// each row is computed the same way whatever the split and its partner.
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
    let per_group = rows.div_ceil(PAIR);
    let tiles = groups * per_group;
    let out = OutPtr(out.as_mut_ptr());
    let pool = Pool::global();
    let parts = if groups * rows * len * hd < PAR_MIN_WORK {
        1
    } else {
        pool.threads().min(tiles)
    };
    let per = tiles.div_ceil(parts);
    let part = |p: usize| {
        let mut scores = vec![0f32; PAIR * len];
        for t in p * per..((p + 1) * per).min(tiles) {
            let (g, r0) = (t / per_group, t % per_group * PAIR);
            let n = PAIR.min(rows - r0);
            let first = g * rows + r0;
            let qs = &q[first * hd..(first + n) * hd];
            let hidden = hidden.map(|m| &m[r0 * len..(r0 + n) * len]);
            // SAFETY: each tile's output rows belong to one part; `out` outlives the job.
            let o = unsafe { std::slice::from_raw_parts_mut(out.get().add(first * hd), n * hd) };
            rows_of_group(
                Group { k, v, g, scale },
                qs,
                hd,
                len,
                hidden,
                &mut scores,
                o,
            );
        }
    };
    match parts {
        1 => part(0),
        _ => pool.run(parts, &part),
    }
}

/// Below this many multiply-adds a call stays on the calling thread.
const PAR_MIN_WORK: usize = 1 << 16;

/// Query rows `qs` (one or two, `hd` each) of `grp` into `o`; `hidden` holds a
/// `[len]` mask per row.
///
/// With AVX2 and FMA (x86-64) and `hd` a multiple of 32, [`rows_avx2`] computes them;
/// otherwise [`row_portable`] does, row by row. Both give the same bits.
fn rows_of_group(
    grp: Group<'_>,
    qs: &[f32],
    hd: usize,
    len: usize,
    hidden: Option<&[bool]>,
    scores: &mut [f32],
    o: &mut [f32],
) {
    let mask = |r: usize| hidden.map(|m| &m[r * len..(r + 1) * len]);
    #[cfg(target_arch = "x86_64")]
    if hd.is_multiple_of(32) && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    {
        // SAFETY: the CPU has AVX2 and FMA, checked just above.
        unsafe {
            match qs.len() / hd {
                1 => rows_avx2::<1>(grp, qs, hd, [mask(0)], scores, o),
                _ => rows_avx2::<2>(grp, qs, hd, [mask(0), mask(1)], scores, o),
            }
        }
        return;
    }
    for (r, (qr, or)) in qs.chunks_exact(hd).zip(o.chunks_exact_mut(hd)).enumerate() {
        row_portable(grp, qr, mask(r), &mut scores[..len], or);
    }
}

/// One past the last key `hidden` lets the row see (`len` without a mask).
fn visible_end(hidden: Option<&[bool]>, len: usize) -> usize {
    match hidden {
        Some(m) => m.iter().rposition(|&h| !h).map_or(0, |j| j + 1),
        None => len,
    }
}

/// The reference order of operations: scores as [`dot`] × scale (−∞ where hidden),
/// their maximum, `p = exp(s − max)` (0 for −∞), `sum += p` over the visible keys in
/// order, `o = fma(p, v, o)` over them in order, then `o × (1 / sum)`.
fn row_portable(
    grp: Group<'_>,
    qr: &[f32],
    hidden: Option<&[bool]>,
    scores: &mut [f32],
    o: &mut [f32],
) {
    let hd = qr.len();
    let end = visible_end(hidden, scores.len());
    let is_hidden = |j: usize| hidden.is_some_and(|m| m[j]);
    let mut max = f32::NEG_INFINITY;
    for (j, s) in scores[..end].iter_mut().enumerate() {
        *s = if is_hidden(j) {
            f32::NEG_INFINITY
        } else {
            dot(qr, grp.key(j, hd)) * grp.scale
        };
        max = max.max(*s);
    }
    o.fill(0.0);
    let mut sum = 0f32;
    for (j, s) in scores[..end].iter().enumerate() {
        if is_hidden(j) {
            continue;
        }
        let p = if *s == f32::NEG_INFINITY {
            0.0
        } else {
            exp(*s - max)
        };
        sum += p;
        for (o, &x) in o.iter_mut().zip(grp.value(j, hd)) {
            *o = p.mul_add(x, *o);
        }
    }
    let inv = 1.0 / sum;
    o.iter_mut().for_each(|x| *x *= inv);
}

/// [`row_portable`] for `R` rows with AVX2 and FMA (`hd` a multiple of 32): the
/// scores of eight keys at once (their lanes folded together), [`exp`] eight at a
/// time, and the value sums 32 outputs at a time in registers, each value row loaded
/// once for the `R` rows. Keys after a row's last visible one are skipped.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_avx2<const R: usize>(
    grp: Group<'_>,
    qs: &[f32],
    hd: usize,
    hidden: [Option<&[bool]>; R],
    scores: &mut [f32],
    o: &mut [f32],
) {
    use std::arch::x86_64::*;
    let len = scores.len() / PAIR;
    let ends: [usize; R] = std::array::from_fn(|r| visible_end(hidden[r], len));
    let mut sums = [0f32; R];
    for r in 0..R {
        let (qr, end) = (&qs[r * hd..(r + 1) * hd], ends[r]);
        let sc = &mut scores[r * len..r * len + end];
        let is_hidden = |j: usize| hidden[r].is_some_and(|m| m[j]);
        // Scores, eight keys at a time; a last partial eight repeats the last key.
        for j0 in (0..end).step_by(8) {
            let mut keys = [qr.as_ptr(); 8];
            for (i, k) in keys.iter_mut().enumerate() {
                *k = grp.key((j0 + i).min(end - 1), hd).as_ptr();
            }
            let mut acc = [_mm256_setzero_ps(); 8];
            for c in (0..hd).step_by(8) {
                // SAFETY: c + 8 <= hd = qr.len() = every key row's length.
                unsafe {
                    let x = _mm256_loadu_ps(qr.as_ptr().add(c));
                    for (a, k) in acc.iter_mut().zip(keys) {
                        *a = _mm256_fmadd_ps(x, _mm256_loadu_ps(k.add(c)), *a);
                    }
                }
            }
            let v = _mm256_mul_ps(fold8x8(acc), _mm256_set1_ps(grp.scale));
            let mut s = [0f32; 8];
            // SAFETY: `s` holds 8 floats.
            unsafe { _mm256_storeu_ps(s.as_mut_ptr(), v) };
            let n = 8.min(end - j0);
            sc[j0..j0 + n].copy_from_slice(&s[..n]);
        }
        let mut max = f32::NEG_INFINITY;
        for (j, s) in sc.iter_mut().enumerate() {
            if is_hidden(j) {
                *s = f32::NEG_INFINITY;
            }
            max = max.max(*s);
        }
        // Probabilities in place of the scores.
        let mut chunks = sc.chunks_exact_mut(8);
        for ch in &mut chunks {
            // SAFETY: `ch` holds 8 floats.
            unsafe {
                let s = _mm256_loadu_ps(ch.as_ptr());
                let p = exp8(_mm256_sub_ps(s, _mm256_set1_ps(max)));
                let gone = _mm256_cmp_ps::<_CMP_EQ_OQ>(s, _mm256_set1_ps(f32::NEG_INFINITY));
                _mm256_storeu_ps(ch.as_mut_ptr(), _mm256_andnot_ps(gone, p));
            }
        }
        for s in chunks.into_remainder() {
            *s = if *s == f32::NEG_INFINITY {
                0.0
            } else {
                exp(*s - max)
            };
        }
        for (j, &p) in sc.iter().enumerate() {
            if !is_hidden(j) {
                sums[r] += p;
            }
        }
    }
    let end = ends.into_iter().max().unwrap_or(0);
    for c in (0..hd).step_by(32) {
        let mut acc = [[_mm256_setzero_ps(); 4]; R];
        for j in 0..end {
            let vr = grp.value(j, hd).as_ptr();
            let mut x = [_mm256_setzero_ps(); 4];
            for (i, x) in x.iter_mut().enumerate() {
                // SAFETY: c + 32 <= hd = the value row's length.
                *x = unsafe { _mm256_loadu_ps(vr.add(c + 8 * i)) };
            }
            for r in 0..R {
                if j >= ends[r] || hidden[r].is_some_and(|m| m[j]) {
                    continue;
                }
                let p = _mm256_set1_ps(scores[r * len + j]);
                for (a, &x) in acc[r].iter_mut().zip(&x) {
                    *a = _mm256_fmadd_ps(p, x, *a);
                }
            }
        }
        for r in 0..R {
            let inv = _mm256_set1_ps(1.0 / sums[r]);
            for (i, a) in acc[r].iter().enumerate() {
                // SAFETY: r · hd + c + 32 <= o.len().
                unsafe {
                    _mm256_storeu_ps(
                        o.as_mut_ptr().add(r * hd + c + 8 * i),
                        _mm256_mul_ps(*a, inv),
                    )
                };
            }
        }
    }
}

/// [`fold8`] of eight vectors at once: lane `i` of the result folds vector `i`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn fold8x8(a: [std::arch::x86_64::__m256; 8]) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    // SAFETY: only called from functions compiled with AVX2 (AVX suffices).
    unsafe {
        // Within each 128-bit half: pairs, then pairs of pairs.
        let h0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
        let h1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
        // Low halves (lanes 0..4 of each vector) plus high halves (lanes 4..8).
        _mm256_add_ps(
            _mm256_permute2f128_ps::<0x20>(h0, h1),
            _mm256_permute2f128_ps::<0x31>(h0, h1),
        )
    }
}

/// `Σ a·b` as 8 lane sums (element `i` in lane `i % 8`, multiply-added) folded by
/// [`fold8`].
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..8 {
            lanes[l] = x[l].mul_add(y[l], lanes[l]);
        }
    }
    for (l, (x, y)) in ca.remainder().iter().zip(cb.remainder()).enumerate() {
        lanes[l] = x.mul_add(*y, lanes[l]);
    }
    fold8(lanes)
}

/// 8 lane sums folded as `vhaddps` pairs them: `((0 + 1) + (2 + 3)) + ((4 + 5) + (6 +
/// 7))`.
#[inline(always)]
fn fold8(l: [f32; 8]) -> f32 {
    ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]))
}

/// Bounds and coefficients of [`exp`]: Cody–Waite reduction by `ln 2` in two parts,
/// then Cephes' `expf` polynomial (relative error ~1e-7 on `[-ln 2 / 2, ln 2 / 2]`).
mod exp_coef {
    /// Below this `x · log2(e)` would leave the normal range; softmax weights this
    /// small (< 1e-37) add nothing next to the maximum's 1.
    pub const MIN: f32 = -87.336_54;
    pub const LOG2E: f32 = std::f32::consts::LOG2_E;
    pub const LN2_HI: f32 = 0.693_359_4;
    pub const LN2_LO: f32 = -2.121_944_4e-4;
    /// 1.5 · 2²³: adding and subtracting it rounds to an integer, ties to even.
    pub const ROUND: f32 = 12_582_912.0;
    pub const P: [f32; 6] = [
        1.987_569_1e-4,
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ];
}

/// `e^x` for `x ≤ 0` as a fixed sequence of f32 operations, so that [`exp8`] gives the
/// same bits (libm's `expf` differs between platforms and has no vector form here).
#[inline(always)]
fn exp(x: f32) -> f32 {
    use exp_coef::*;
    let x = x.max(MIN);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let mut y = P[0];
    for c in &P[1..] {
        y = y.mul_add(r, *c);
    }
    let y = y.mul_add(r * r, r) + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// [`exp`] of eight values.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn exp8(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use exp_coef::*;
    use std::arch::x86_64::*;
    // SAFETY: only called from functions compiled with AVX2 and FMA.
    unsafe {
        let x = _mm256_max_ps(x, _mm256_set1_ps(MIN));
        let round = _mm256_set1_ps(ROUND);
        let n = _mm256_sub_ps(
            _mm256_add_ps(_mm256_mul_ps(x, _mm256_set1_ps(LOG2E)), round),
            round,
        );
        let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_HI), x);
        let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_LO), r);
        let mut y = _mm256_set1_ps(P[0]);
        for c in &P[1..] {
            y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(*c));
        }
        let y = _mm256_add_ps(
            _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), r),
            _mm256_set1_ps(1.0),
        );
        let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_mul_ps(y, _mm256_castsi256_ps(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::Rng;

    /// The AVX2 rows (one, or two sharing their value loads) give the portable row's
    /// bits, with and without hidden keys, for lengths that leave 0..7 keys after the
    /// groups of eight.
    #[test]
    fn avx2_rows_equal_portable_rows_bitwise() {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            let mut rng = Rng(9);
            for (hd, len) in [(64, 1), (64, 7), (32, 130), (128, 33), (64, 517)] {
                let (kd, vd) = (rng.vec(2 * len * hd), rng.vec(2 * len * hd));
                // Large queries: peaked softmax weights, some below exp's range.
                let q: Vec<f32> = rng.vec(2 * hd).iter().map(|x| x * 8.0).collect();
                let view = |data| Kv {
                    data,
                    offset: 0,
                    group_stride: len * hd,
                    row_stride: hd,
                };
                let grp = Group {
                    k: view(&kd),
                    v: view(&vd),
                    g: 1,
                    scale: 0.125,
                };
                let masks: Vec<Vec<bool>> = vec![
                    vec![false; len],
                    (0..len).map(|j| j % 3 == 1).collect(),
                    (0..len).map(|j| j > len / 2).collect(),
                ];
                let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                for (a, b) in [(0, 0), (1, 2), (2, 0)] {
                    let (ma, mb) = (Some(&masks[a][..]), Some(&masks[b][..]));
                    let mut want = vec![0f32; 2 * hd];
                    let mut s = vec![0f32; 2 * len];
                    row_portable(grp, &q[..hd], ma, &mut s[..len], &mut want[..hd]);
                    row_portable(grp, &q[hd..], mb, &mut s[..len], &mut want[hd..]);
                    let (mut one, mut two) = (vec![0f32; hd], vec![0f32; 2 * hd]);
                    // SAFETY: AVX2 and FMA checked above.
                    unsafe {
                        rows_avx2::<1>(grp, &q[..hd], hd, [ma], &mut s, &mut one);
                        rows_avx2::<2>(grp, &q, hd, [ma, mb], &mut s, &mut two);
                    }
                    let at = format!("hd {hd}, len {len}, masks {a} {b}");
                    assert_eq!(bits(&one), bits(&want[..hd]), "{at}");
                    assert_eq!(bits(&two), bits(&want), "{at}");
                }
            }
        }
    }

    /// `exp` against f64 over softmax's range: within 3e-7 relative (~2.5 ulp), 1 at
    /// 0, clamped below `MIN`, and the vector form gives the same bits.
    #[test]
    fn exp_is_accurate_and_vectorises_bitwise() {
        let xs: Vec<f32> = (0..20_000).map(|i| -(i as f32) * 0.0044).collect();
        assert_eq!(exp(0.0), 1.0);
        for &x in &xs {
            let (want, got) = ((x as f64).exp(), exp(x) as f64);
            if x >= exp_coef::MIN {
                assert!(
                    (got - want).abs() <= 3e-7 * want,
                    "exp({x}) = {got}, want {want}"
                );
            } else {
                assert!(got <= 1.2e-38, "exp({x}) = {got}: clamped to exp(MIN)");
            }
        }
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn eight(x: &[f32]) -> [f32; 8] {
                use std::arch::x86_64::*;
                let mut out = [0f32; 8];
                // SAFETY: x holds 8 floats; the caller checked AVX2 and FMA.
                unsafe { _mm256_storeu_ps(out.as_mut_ptr(), exp8(_mm256_loadu_ps(x.as_ptr()))) };
                out
            }
            for ch in xs.chunks_exact(8) {
                // SAFETY: checked above.
                let v = unsafe { eight(ch) };
                for (x, y) in ch.iter().zip(v) {
                    assert_eq!(exp(*x).to_bits(), y.to_bits(), "exp8({x})");
                }
            }
        }
    }
}
