//! Attention of query rows over the KV cache on the host.
//!
//! Burn's batched matmul blocks its products by shape: the same query row attended
//! alone (a decode step) and among 27 rows (a 9-node tree with 3 query heads per KV
//! head) rounded differently (up to 4e-5 in SmolLM2's f32 logits, and whole int8
//! steps once activations are quantized), which broke greedy speculative decoding's
//! token-for-token equality with vanilla decoding. Here every output row is one fixed
//! sequence of operations over its visible keys, whatever the other rows and wherever
//! hidden keys sit between them ([`row_portable`] is the reference):
//!
//! * the score of key `j` is `fold8(lanes) · scale`, the lanes multiply-added over the
//!   head dimension eight at a time — it depends on the query and that key alone, so
//!   eight keys are computed at once and their lanes folded together (`vhaddps`);
//! * `p = exp(s − max)` with [`exp`], a fixed polynomial (so eight at a time, with
//!   the same bits as one at a time);
//! * `sum` as 8 lane sums, the `o`-th visible key in lane `o % 8`, folded by [`fold8`];
//!   the values multiply-added key by key over the visible keys in order, then scaled
//!   by `1 / sum`.

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

/// A row's working space: scores, then the visible keys' weights and indices.
struct Scratch {
    scores: Vec<f32>,
    p: Vec<f32>,
    keys: Vec<u32>,
}

impl Scratch {
    fn new(len: usize) -> Scratch {
        let n = len.next_multiple_of(8);
        Scratch {
            scores: vec![0.0; n],
            p: vec![0.0; n],
            keys: vec![0; n],
        }
    }
}

/// `q [groups, rows, hd]` (contiguous) attending over `len` keys: `out [groups, rows,
/// hd]`. `hidden` (`[rows, len]`, when given) is true where row `r` of every group may
/// not see key `j`; every row sees at least one key. The (group, row) pairs are split
/// over the spin pool's threads; each pair is computed by one thread, the same way
/// whatever the split.
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
        let mut scratch = Scratch::new(len);
        for pair in p * per..((p + 1) * per).min(pairs) {
            let (g, r) = (pair / rows, pair % rows);
            // SAFETY: each pair's output row belongs to one part; `out` outlives the job.
            let o = unsafe { std::slice::from_raw_parts_mut(out.get().add(pair * hd), hd) };
            let qr = &q[pair * hd..(pair + 1) * hd];
            let hidden = hidden.map(|m| &m[r * len..(r + 1) * len]);
            row(Group { k, v, g, scale }, qr, hidden, len, &mut scratch, o);
        }
    };
    match parts {
        1 => part(0),
        _ => pool.run(parts, &part),
    }
}

/// Below this many multiply-adds a call stays on the calling thread.
const PAR_MIN_WORK: usize = 1 << 16;

/// One query row `qr` of `grp` over `len` keys into `o`; `hidden[j]` hides key `j`.
///
/// With AVX2 and FMA (x86-64) and `hd` a multiple of 32, [`row_avx2`] computes it;
/// otherwise [`row_portable`]. Both give the same bits.
fn row(
    grp: Group<'_>,
    qr: &[f32],
    hidden: Option<&[bool]>,
    len: usize,
    scratch: &mut Scratch,
    o: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if qr.len().is_multiple_of(32)
        && is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
    {
        // SAFETY: the CPU has AVX2 and FMA, checked just above.
        return unsafe { row_avx2(grp, qr, hidden, len, scratch, o) };
    }
    row_portable(grp, qr, hidden, len, o)
}

/// One past the last key `hidden` lets the row see (`len` without a mask).
fn visible_end(hidden: Option<&[bool]>, len: usize) -> usize {
    match hidden {
        Some(m) => m[..len].iter().rposition(|&h| !h).map_or(0, |j| j + 1),
        None => len,
    }
}

/// The reference order of operations (see the module's documentation).
fn row_portable(grp: Group<'_>, qr: &[f32], hidden: Option<&[bool]>, len: usize, o: &mut [f32]) {
    let hd = qr.len();
    let visible: Vec<usize> = (0..len)
        .filter(|&j| !hidden.is_some_and(|m| m[j]))
        .collect();
    let scores: Vec<f32> = visible
        .iter()
        .map(|&j| dot(qr, grp.key(j, hd)) * grp.scale)
        .collect();
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    let mut lanes = [0f32; 8];
    o.fill(0.0);
    for (i, (&j, &s)) in visible.iter().zip(&scores).enumerate() {
        let p = exp(s - max);
        lanes[i % 8] += p;
        for (o, &x) in o.iter_mut().zip(grp.value(j, hd)) {
            *o = p.mul_add(x, *o);
        }
    }
    let inv = 1.0 / fold8(lanes);
    o.iter_mut().for_each(|x| *x *= inv);
}

/// [`row_portable`] with AVX2 and FMA (`hd` a multiple of 32): the scores of eight
/// keys at once (their lanes folded together), hidden keys masked and the maximum
/// taken in vectors, [`exp`] eight at a time, the visible keys' weights packed (so the
/// sum and the value loop never test the mask), and the values multiply-added up to 64
/// outputs at a time in registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_avx2(
    grp: Group<'_>,
    qr: &[f32],
    hidden: Option<&[bool]>,
    len: usize,
    scratch: &mut Scratch,
    o: &mut [f32],
) {
    use std::arch::x86_64::*;
    let hd = qr.len();
    let end = visible_end(hidden, len);
    let Scratch { scores, p, keys } = scratch;
    let neg_inf = _mm256_set1_ps(f32::NEG_INFINITY);
    // Scores, eight keys at a time; a last partial eight repeats key `end - 1`, which
    // is visible, so the maximum is unchanged.
    let mut vmax = neg_inf;
    for j0 in (0..end).step_by(8) {
        let mut rows = [qr.as_ptr(); 8];
        for (i, k) in rows.iter_mut().enumerate() {
            *k = grp.key((j0 + i).min(end - 1), hd).as_ptr();
        }
        let mut acc = [_mm256_setzero_ps(); 8];
        for c in (0..hd).step_by(8) {
            // SAFETY: c + 8 <= hd = qr.len() = every key row's length.
            unsafe {
                let x = _mm256_loadu_ps(qr.as_ptr().add(c));
                for (a, k) in acc.iter_mut().zip(rows) {
                    *a = _mm256_fmadd_ps(x, _mm256_loadu_ps(k.add(c)), *a);
                }
            }
        }
        let mut s = _mm256_mul_ps(fold8x8(acc), _mm256_set1_ps(grp.scale));
        if let Some(m) = hidden {
            let mut bytes = [0u8; 8];
            let n = 8.min(end - j0);
            for (b, &h) in bytes.iter_mut().zip(&m[j0..j0 + n]) {
                *b = h as u8;
            }
            let hid = _mm256_cvtepu8_epi32(_mm_set1_epi64x(i64::from_le_bytes(bytes)));
            let hid = _mm256_castsi256_ps(_mm256_cmpgt_epi32(hid, _mm256_setzero_si256()));
            s = _mm256_blendv_ps(s, neg_inf, hid);
        }
        vmax = _mm256_max_ps(vmax, s);
        // SAFETY: `scores` holds `len` rounded up to 8.
        unsafe { _mm256_storeu_ps(scores.as_mut_ptr().add(j0), s) };
    }
    let max = {
        let mut m = [0f32; 8];
        // SAFETY: `m` holds 8 floats.
        unsafe { _mm256_storeu_ps(m.as_mut_ptr(), vmax) };
        m.into_iter().fold(f32::NEG_INFINITY, f32::max)
    };
    // Weights of the visible keys, packed in order, and their lane sums.
    let mut n = 0;
    for j0 in (0..end).step_by(8) {
        // SAFETY: `scores` and `p` hold `len` rounded up to 8.
        unsafe {
            let e = exp8(_mm256_sub_ps(
                _mm256_loadu_ps(scores.as_ptr().add(j0)),
                _mm256_set1_ps(max),
            ));
            match hidden {
                None => {
                    _mm256_storeu_ps(p.as_mut_ptr().add(j0), e);
                    n = end;
                }
                Some(m) => {
                    let mut w = [0f32; 8];
                    _mm256_storeu_ps(w.as_mut_ptr(), e);
                    for (i, &w) in w.iter().enumerate().take(end - j0) {
                        let j = j0 + i;
                        *p.get_unchecked_mut(n) = w;
                        *keys.get_unchecked_mut(n) = j as u32;
                        n += !m[j] as usize;
                    }
                }
            }
        }
    }
    let mut lanes = _mm256_setzero_ps();
    for j0 in (0..n).step_by(8) {
        // Lanes past the last visible key add nothing.
        let live = _mm256_cmpgt_epi32(
            _mm256_set1_epi32((n - j0) as i32),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        );
        // SAFETY: `p` holds `len` rounded up to 8.
        let w = unsafe { _mm256_loadu_ps(p.as_ptr().add(j0)) };
        lanes = _mm256_add_ps(lanes, _mm256_and_ps(w, _mm256_castsi256_ps(live)));
    }
    let mut l = [0f32; 8];
    // SAFETY: `l` holds 8 floats.
    unsafe { _mm256_storeu_ps(l.as_mut_ptr(), lanes) };
    let inv = 1.0 / fold8(l);
    let keys = hidden.map(|_| &keys[..n]);
    let mut c = 0;
    while c < hd {
        // SAFETY: c + 64 (or 32) <= hd; the caller's target features.
        unsafe {
            if hd - c >= 64 {
                values::<8>(grp, hd, keys, &p[..n], c, inv, &mut o[c..c + 64]);
                c += 64;
            } else {
                values::<4>(grp, hd, keys, &p[..n], c, inv, &mut o[c..c + 32]);
                c += 32;
            }
        }
    }
}

/// `o = (Σ_i p[i] · v[key i][c..c + 8W]) · inv`, the sum key by key in order, in `W`
/// registers (`key i` = `keys[i]`, or `i` without a mask).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn values<const W: usize>(
    grp: Group<'_>,
    hd: usize,
    keys: Option<&[u32]>,
    p: &[f32],
    c: usize,
    inv: f32,
    o: &mut [f32],
) {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_setzero_ps(); W];
    for (i, &w) in p.iter().enumerate() {
        let j = keys.map_or(i, |k| k[i] as usize);
        let vr = grp.value(j, hd)[c..c + 8 * W].as_ptr();
        let w = _mm256_set1_ps(w);
        for (a, acc) in acc.iter_mut().enumerate() {
            // SAFETY: 8 · a + 8 <= 8W values from `vr`.
            *acc = _mm256_fmadd_ps(w, unsafe { _mm256_loadu_ps(vr.add(8 * a)) }, *acc);
        }
    }
    let inv = _mm256_set1_ps(inv);
    for (a, acc) in acc.iter().enumerate() {
        // SAFETY: `o` holds 8W values.
        unsafe { _mm256_storeu_ps(o.as_mut_ptr().add(8 * a), _mm256_mul_ps(*acc, inv)) };
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

    /// The AVX2 row gives the portable row's bits, with and without hidden keys, for
    /// lengths that leave 0..7 keys after the groups of eight.
    #[test]
    fn avx2_rows_equal_portable_rows_bitwise() {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            let mut rng = Rng(9);
            for (hd, len) in [(64, 1), (64, 7), (32, 130), (128, 33), (96, 517)] {
                let (kd, vd) = (rng.vec(2 * len * hd), rng.vec(2 * len * hd));
                // Large queries: peaked softmax weights, some below exp's range.
                let q: Vec<f32> = rng.vec(hd).iter().map(|x| x * 8.0).collect();
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
                let masks: [Option<Vec<bool>>; 3] = [
                    None,
                    Some((0..len).map(|j| j % 3 == 1).collect()),
                    Some((0..len).map(|j| j > len / 2).collect()),
                ];
                let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                let mut scratch = Scratch::new(len);
                for mask in &masks {
                    let m = mask.as_deref();
                    let (mut want, mut got) = (vec![0f32; hd], vec![0f32; hd]);
                    row_portable(grp, &q, m, len, &mut want);
                    // SAFETY: AVX2 and FMA checked above.
                    unsafe { row_avx2(grp, &q, m, len, &mut scratch, &mut got) };
                    assert_eq!(bits(&got), bits(&want), "hd {hd}, len {len}, mask {mask:?}");
                }
            }
        }
    }

    /// A row among hidden keys gets the bits it gets with those keys absent.
    #[test]
    fn hidden_keys_change_nothing() {
        let mut rng = Rng(10);
        let (hd, len) = (64, 300);
        let (kd, vd) = (rng.vec(len * hd), rng.vec(len * hd));
        let q = rng.vec(hd);
        let hidden: Vec<bool> = (0..len)
            .map(|j| j % 7 == 3 || (100..140).contains(&j))
            .collect();
        let keep = |d: &[f32]| -> Vec<f32> {
            (0..len)
                .filter(|&j| !hidden[j])
                .flat_map(|j| d[j * hd..(j + 1) * hd].to_vec())
                .collect()
        };
        let (kk, vk) = (keep(&kd), keep(&vd));
        let view = |data| Kv {
            data,
            offset: 0,
            group_stride: 0,
            row_stride: hd,
        };
        let run = |k, v, n, m| {
            let mut o = vec![0f32; hd];
            let grp = Group {
                k: view(k),
                v: view(v),
                g: 0,
                scale: 0.125,
            };
            row(grp, &q, m, n, &mut Scratch::new(n), &mut o);
            o.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        };
        let n = kk.len() / hd;
        assert_eq!(
            run(&kd, &vd, len, Some(&hidden[..])),
            run(&kk, &vk, n, None)
        );
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
