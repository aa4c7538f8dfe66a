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

/// A read-only f32 matrix in place: element `(r, c)` at
/// `data[offset + r·row_stride + c·col_stride]` (a transposed view swaps the strides).
#[derive(Clone, Copy, Debug)]
pub(crate) struct View<'a> {
    pub data: &'a [f32],
    pub offset: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl View<'_> {
    /// Whether every element of a `[rows, cols]` matrix lies inside `data`.
    fn covers(&self, rows: usize, cols: usize) -> bool {
        rows == 0
            || cols == 0
            || self.offset + (rows - 1) * self.row_stride + (cols - 1) * self.col_stride
                < self.data.len()
    }
}

/// `out [m, n] = x [m, k] · w [k, n]`, `out` row-major; the operands are strided views
/// (training's backward products read transposed operands in place).
pub(crate) fn matmul_views(
    x: View<'_>,
    m: usize,
    k: usize,
    w: View<'_>,
    n: usize,
    out: &mut [f32],
) {
    assert!(x.covers(m, k) && w.covers(k, n) && out.len() == m * n);
    let pool = Pool::global();
    // At most one column slice per thread and per 64 columns; slice widths are
    // multiples of 16 (the last one takes the rest).
    let parts = pool.threads().min(n.div_ceil(64)).max(1);
    let per = n.div_ceil(parts).next_multiple_of(16);
    let dst = OutPtr(out.as_mut_ptr());
    let part = |p: usize| {
        let (c0, c1) = (p * per, ((p + 1) * per).min(n));
        if c0 >= c1 || m == 0 {
            return;
        }
        // SAFETY: part `p` writes only columns c0..c1 of `out` (row stride n), which
        // no other part touches; `x` and `w` are read-only and outlive the job; every
        // element the strides reach is inside its slice (`covers`, asserted above).
        unsafe {
            gemm::gemm(
                m,
                c1 - c0,
                k,
                dst.get().add(c0),
                1,
                n as isize,
                false,
                x.data.as_ptr().add(x.offset),
                x.col_stride as isize,
                x.row_stride as isize,
                w.data.as_ptr().add(w.offset + c0 * w.col_stride),
                w.col_stride as isize,
                w.row_stride as isize,
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
    use super::View;
    use crate::test_rng::Rng;

    /// Against an f64 reference, for shapes whose columns split unevenly.
    #[test]
    fn matches_an_f64_reference() {
        let mut rng = Rng(3);
        for (m, k, n) in [(65, 64, 17), (130, 576, 1536), (200, 96, 64 * 3 + 5)] {
            let (x, w) = (rng.vec(m * k), rng.vec(k * n));
            let row_major = |data, cols| View {
                data,
                offset: 0,
                row_stride: cols,
                col_stride: 1,
            };
            let mut out = vec![0f32; m * n];
            super::matmul_views(row_major(&x, k), m, k, row_major(&w, n), n, &mut out);
            check(&x, &w, m, k, n, &out);
            // The same product from transposed storage (xᵀ [k, m], wᵀ [n, k]) read as
            // strided views, at an offset: bitwise the same result.
            let xt: Vec<f32> = [0.5; 3]
                .into_iter()
                .chain((0..k * m).map(|i| x[(i % m) * k + i / m]))
                .collect();
            let wt: Vec<f32> = (0..n * k).map(|i| w[(i % k) * n + i / k]).collect();
            let xv = View {
                data: &xt,
                offset: 3,
                row_stride: 1,
                col_stride: m,
            };
            let wv = View {
                data: &wt,
                offset: 0,
                row_stride: 1,
                col_stride: k,
            };
            let mut strided = vec![0f32; m * n];
            super::matmul_views(xv, m, k, wv, n, &mut strided);
            check(&x, &w, m, k, n, &strided);
        }
    }

    fn check(x: &[f32], w: &[f32], m: usize, k: usize, n: usize, out: &[f32]) {
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
