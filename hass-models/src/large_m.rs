//! Prefill-sized f32 products (long prompts, datagen over whole conversations) on
//! every core: `gemm`'s single-threaded kernel on column slices of the weights, one
//! slice per spin-pool thread.
//!
//! Burn's own matmul (the same `gemm` crate) runs on one core here, because
//! burn-flex's `rayon` feature stays off for decoding's sake (its parallel ops slowed
//! small verifications). Splitting the output columns keeps the threads independent:
//! each packs its own weight columns, and the activations, a few hundred KB, are
//! packed by both.

use crate::spin_pool::{OutPtr, Pool};

/// `out [m, n] = x [m, k] · w [k, n]`, all row-major f32.
pub(crate) fn matmul(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, out: &mut [f32]) {
    assert!(x.len() == m * k && w.len() == k * n && out.len() == m * n);
    let pool = Pool::global();
    // At most one column slice per thread and per 64 columns; slice widths are
    // multiples of 16 (the last one takes the rest).
    let parts = pool.threads().min(n.div_ceil(64)).max(1);
    let per = n.div_ceil(parts).next_multiple_of(16);
    let dst = OutPtr(out.as_mut_ptr());
    let part = |p: usize| {
        let (c0, c1) = (p * per, ((p + 1) * per).min(n));
        if c0 >= c1 {
            return;
        }
        // SAFETY: part `p` writes only columns c0..c1 of `out` (row stride n), which
        // no other part touches; `x` and `w` are read-only and outlive the job; the
        // strides describe the row-major layouts asserted above.
        unsafe {
            gemm::gemm(
                m,
                c1 - c0,
                k,
                dst.get().add(c0),
                1,
                n as isize,
                false,
                x.as_ptr(),
                1,
                k as isize,
                w.as_ptr().add(c0),
                1,
                n as isize,
                0.0f32,
                1.0f32,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    };
    match parts {
        1 => part(0),
        _ => pool.run(parts, &part),
    }
}

#[cfg(test)]
mod tests {
    use crate::test_rng::Rng;

    /// Against an f64 reference, for shapes whose columns split unevenly.
    #[test]
    fn matches_an_f64_reference() {
        let mut rng = Rng(3);
        for (m, k, n) in [(65, 64, 17), (130, 576, 1536), (200, 96, 64 * 3 + 5)] {
            let (x, w) = (rng.vec(m * k), rng.vec(k * n));
            let mut out = vec![0f32; m * n];
            super::matmul(&x, m, k, &w, n, &mut out);
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k)
                        .map(|t| x[i * k + t] as f64 * w[t * n + j] as f64)
                        .sum();
                    let got = out[i * n + j] as f64;
                    // k products of magnitude < 1, each rounded to f32: 1e-6 · k bounds it.
                    assert!(
                        (got - want).abs() <= 1e-6 * k as f64,
                        "{m}x{k}x{n} [{i},{j}]: {got} vs {want}"
                    );
                }
            }
        }
    }
}
