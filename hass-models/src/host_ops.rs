//! The small row-wise steps of a decoder layer on host slices: RMS norm, SwiGLU, the
//! q/k/v heads with RoPE, and the heads merged back into rows.
//!
//! On the CPU backend each Burn op costs a few microseconds whatever its size (an
//! allocation, dispatch, and a strided iterator for views), and a SmolLM2 layer ran
//! ~35 of them around its four products: ~1,000 per forward, a quarter of a decode
//! step on one core while the other waited. Here each step is one pass over its rows.
//! Every output row depends on its own input row only, so results stay batch
//! invariant.

use crate::exp::exp;
#[cfg(target_arch = "x86_64")]
use crate::exp::exp8;
use crate::spin_pool::{OutPtr, Pool};

/// `f(x rows, out rows)` over rows of `x` (`x_width` values each) and `out`
/// (`out_width`): many rows (a prefill's) are split over the spin pool's threads, a few
/// stay on the caller. A 4-token verify's RMS norms split over the cores made its
/// forward 0.1–0.3 ms slower when the VM's two vCPUs sat on distant cores (the rows
/// went to the other core and came back, for a few microseconds of work), and no
/// faster otherwise.
fn split_rows(
    x: &[f32],
    x_width: usize,
    out: &mut [f32],
    out_width: usize,
    f: &(dyn Fn(&[f32], &mut [f32]) + Sync),
) {
    let rows = x.len() / x_width.max(1);
    let pool = Pool::global();
    let parts = pool.threads().min(rows);
    if parts < 2 || x.len() < SPLIT_MIN_WORK {
        return f(x, out);
    }
    let per = rows.div_ceil(parts);
    let o = OutPtr(out.as_mut_ptr());
    pool.run(parts, &|p| {
        let rows = p * per..((p + 1) * per).min(rows);
        let xs = &x[rows.start * x_width..rows.end * x_width];
        // SAFETY: the parts' rows are disjoint, inside `out`.
        f(xs, unsafe { o.rows(rows, out_width) })
    });
}

/// Values below which [`split_rows`] keeps the rows on the caller (SmolLM2: 114
/// rows of its RMS norms).
const SPLIT_MIN_WORK: usize = 1 << 16;

/// `x / sqrt(mean(x²) + eps) · w` for each row of `x` (`d` values per row): the sum of
/// squares as 8 lane sums folded pairwise, then `(x · r) · w`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    split_rows(x, d, out, d, &|x, out| rms_norm_rows(x, w, eps, out))
}

fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let mut lanes = [0f32; 8];
        let mut chunks = xr.chunks_exact(8);
        for c in &mut chunks {
            for l in 0..8 {
                lanes[l] += c[l] * c[l];
            }
        }
        for (l, v) in chunks.remainder().iter().enumerate() {
            lanes[l] += v * v;
        }
        let ss = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3]))
            + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
        let r = 1.0 / (ss / d as f32 + eps).sqrt();
        for ((o, &v), &w) in or.iter_mut().zip(xr).zip(w) {
            *o = v * r * w;
        }
    }
}

/// `silu(gate) · up` for rows `[gate | up]` of `gu` (`2n` values per row), with
/// `silu(g) = g · σ(g)` and `σ` from `z = exp(−|g|)` (never overflows): `1 / (1 + z)`
/// for `g ≥ 0`, `z / (1 + z)` below. Eight at a time with AVX2 and FMA, the same bits
/// as [`silu_mul`] (libm's `expf` has no vector form and took most of this step).
pub fn swiglu(gu: &[f32], n: usize, out: &mut [f32]) {
    split_rows(gu, 2 * n, out, n, &|gu, out| swiglu_rows(gu, n, out))
}

/// [`swiglu`] on the calling thread.
pub(crate) fn swiglu_rows(gu: &[f32], n: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    let simd = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
    for (row, or) in gu.chunks_exact(2 * n).zip(out.chunks_exact_mut(n)) {
        let (gate, up) = row.split_at(n);
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: AVX2 and FMA checked above.
            done = unsafe { swiglu_avx2(gate, up, or) };
        }
        for ((o, &g), &u) in or[done..].iter_mut().zip(&gate[done..]).zip(&up[done..]) {
            *o = silu_mul(g, u);
        }
    }
}

/// `silu(g) · u` (see [`swiglu`]).
#[inline(always)]
fn silu_mul(g: f32, u: f32) -> f32 {
    let z = exp(-g.abs());
    let s = if g >= 0.0 { 1.0 } else { z } / (1.0 + z);
    g * s * u
}

/// [`silu_mul`] over the first multiple of eight; returns how many it wrote.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn swiglu_avx2(gate: &[f32], up: &[f32], out: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    let n = out.len() / 8 * 8;
    let (sign, one) = (_mm256_set1_ps(-0.0), _mm256_set1_ps(1.0));
    // Two passes, `exp` into `out` and then the rest: shorter chains of dependent
    // operations per iteration keep more iterations in flight (one row of 1,536 took
    // 0.94 µs instead of 1.13 in one loop, four rows 3.3 µs instead of 3.9).
    for i in (0..n).step_by(8) {
        // SAFETY: i + 8 <= n <= every slice's length.
        unsafe {
            let g = _mm256_loadu_ps(gate.as_ptr().add(i));
            _mm256_storeu_ps(out.as_mut_ptr().add(i), exp8(_mm256_or_ps(g, sign)));
        }
    }
    for i in (0..n).step_by(8) {
        // SAFETY: i + 8 <= n <= every slice's length.
        unsafe {
            let g = _mm256_loadu_ps(gate.as_ptr().add(i));
            let u = _mm256_loadu_ps(up.as_ptr().add(i));
            let z = _mm256_loadu_ps(out.as_ptr().add(i));
            let pos = _mm256_cmp_ps::<_CMP_GE_OQ>(g, _mm256_setzero_ps());
            let s = _mm256_div_ps(_mm256_blendv_ps(z, one, pos), _mm256_add_ps(one, z));
            _mm256_storeu_ps(
                out.as_mut_ptr().add(i),
                _mm256_mul_ps(_mm256_mul_ps(g, s), u),
            );
        }
    }
    n
}

/// Columns `from..from + heads · hd` of `x` (rows of `width`) as `[heads, t, hd]`,
/// rotated by rotate-half RoPE when `rope` (`cos`, `sin`, each `[t, hd]`) is given:
/// `x · cos + rotate_half(x) · sin`, with `rotate_half(x) = [−x₂, x₁]`.
pub fn heads(
    x: &[f32],
    width: usize,
    from: usize,
    heads: usize,
    hd: usize,
    rope: Option<(&[f32], &[f32])>,
    out: &mut [f32],
) {
    let t = x.len() / width;
    let half = hd / 2;
    for h in 0..heads {
        for i in 0..t {
            let src = &x[i * width + from + h * hd..][..hd];
            let dst = &mut out[(h * t + i) * hd..][..hd];
            match rope {
                None => dst.copy_from_slice(src),
                Some((cos, sin)) => {
                    let (c, s) = (&cos[i * hd..][..hd], &sin[i * hd..][..hd]);
                    // The halves apart, so that each loop vectorises (RoPE's head
                    // dimension is even).
                    debug_assert!(hd.is_multiple_of(2), "odd head dimension {hd}");
                    let (lo, hi) = src.split_at(half);
                    let (dlo, dhi) = dst.split_at_mut(half);
                    for e in 0..half {
                        dlo[e] = lo[e] * c[e] + -hi[e] * s[e];
                        dhi[e] = hi[e] * c[half + e] + lo[e] * s[half + e];
                    }
                }
            }
        }
    }
}

/// `[heads, t, hd]` back to rows of `heads · hd`.
pub fn merge_heads(x: &[f32], heads: usize, hd: usize, out: &mut [f32]) {
    let t = x.len() / (heads * hd);
    for h in 0..heads {
        for i in 0..t {
            out[(i * heads + h) * hd..][..hd].copy_from_slice(&x[(h * t + i) * hd..][..hd]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::Rng;

    /// Rows split over the threads (enough of them to be split) get the bits each row
    /// gets alone.
    #[test]
    fn split_rows_change_no_bits() {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let mut rng = Rng(5);
        let (rows, d, n) = (130, 576, 600);
        let (x, w, gu) = (rng.vec(rows * d), rng.vec(d), rng.vec(rows * 2 * n));
        let (mut norms, mut silus) = (vec![0f32; rows * d], vec![0f32; rows * n]);
        rms_norm(&x, &w, 1e-5, &mut norms);
        swiglu(&gu, n, &mut silus);
        for r in 0..rows {
            let (mut norm, mut silu) = (vec![0f32; d], vec![0f32; n]);
            rms_norm(&x[r * d..(r + 1) * d], &w, 1e-5, &mut norm);
            swiglu(&gu[r * 2 * n..(r + 1) * 2 * n], n, &mut silu);
            assert_eq!(
                bits(&norm),
                bits(&norms[r * d..(r + 1) * d]),
                "norm row {r}"
            );
            assert_eq!(
                bits(&silu),
                bits(&silus[r * n..(r + 1) * n]),
                "swiglu row {r}"
            );
        }
    }

    /// Each SwiGLU output against f64 (within 4e-7 relative plus a 1e-30 floor: the
    /// polynomial exp and four roundings), and the same bits in vector bodies and
    /// scalar tails: a row of 8k + 5 values computed whole and one value at a time.
    #[test]
    fn swiglu_is_accurate_and_vectorises_bitwise() {
        let n = 8 * 125 + 5;
        let gate: Vec<f32> = (0..n).map(|i| (i as f32 - 500.0) * 0.2).collect();
        let up: Vec<f32> = (0..n).map(|i| 1.0 + (i % 7) as f32 * 0.25).collect();
        let gu = [gate.clone(), up.clone()].concat();
        let mut out = vec![0f32; n];
        swiglu(&gu, n, &mut out);
        for i in 0..n {
            let (g, u) = (gate[i] as f64, up[i] as f64);
            let want = g / (1.0 + (-g).exp()) * u;
            let got = out[i] as f64;
            assert!(
                (got - want).abs() <= 4e-7 * want.abs() + 1e-30,
                "silu({g}) * {u} = {got}, want {want}"
            );
            let mut one = [0f32];
            swiglu(&[gate[i], up[i]], 1, &mut one);
            assert_eq!(one[0].to_bits(), out[i].to_bits(), "element {i}");
        }
    }
}
