//! Batch-invariant CPU matmul for a few rows (`m` ≈ 1..64) against a large weight
//! matrix: the target's linear layers during speculative-decoding verification.
//!
//! Lossless verification needs every output row to be bitwise identical to the
//! row computed alone. Each element is therefore one fused-multiply-add chain,
//! `acc = 0.0; for kk in 0..k { acc = fma(x[i, kk], w[kk, j], acc) }`, in every
//! path (AVX2 tiles, scalar column tail, portable fallback), whatever `m`, the
//! tiling or the thread count.
//!
//! Small-`m` products are memory-bound, so the weights are streamed exactly once
//! for all rows: threads own column ranges; inside a range a block of `KC` weight
//! rows × 16 columns is loaded into L1 and consumed by every row tile of `x`
//! before moving on, with partial sums parked in `out` between `k` blocks.

use half::f16;
use rayon::prelude::*;

/// Weight matrix `[k, n]`, row-major (y = x · w).
#[derive(Clone, Copy)]
pub enum Weights<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

impl Weights<'_> {
    fn len(&self) -> usize {
        match self {
            Weights::F32(w) => w.len(),
            Weights::F16(w) => w.len(),
        }
    }
}

/// Columns per register tile: two 8-lane vectors.
const NR: usize = 16;
/// Rows of `x` per register tile: 4 rows × 2 vectors = 8 accumulators.
const MR: usize = 4;
/// Weight rows per `k` block; a `KC × NR` weight tile stays in L1 for all row tiles.
const KC: usize = 64;
/// Columns per cache block, so the `m × NC` partial sums stay in L1/L2 across `k` blocks.
const NC: usize = 512;
/// Below this many weights a rayon fork costs more than it saves.
const PAR_MIN_WEIGHTS: usize = 1 << 16;
/// Minimum columns per parallel part, so each part streams whole cache lines in runs.
const PAR_MIN_COLS: usize = 128;
/// Parts per thread, so work stealing evens out cores slowed by other processes.
const PARTS_PER_THREAD: usize = 2;

/// out[m×n] = x[m×k] · w[k×n], all row-major; `out` is overwritten.
/// Panics (assert!) on slice lengths inconsistent with m, k, n.
pub fn matmul(x: &[f32], m: usize, k: usize, w: Weights<'_>, n: usize, out: &mut [f32]) {
    assert_eq!(Some(x.len()), m.checked_mul(k), "x must hold m*k values");
    assert_eq!(Some(w.len()), k.checked_mul(n), "w must hold k*n values");
    assert_eq!(
        Some(out.len()),
        m.checked_mul(n),
        "out must hold m*n values"
    );
    if m == 0 || n == 0 {
        return;
    }
    let job = Job {
        x,
        m,
        k,
        n,
        out: OutPtr(out.as_mut_ptr()),
    };
    match w {
        Weights::F32(w) => job.run(w),
        Weights::F16(w) => job.run(w),
    }
}

/// Raw `out` pointer shared by the threads; each writes only its own columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: parts write disjoint column ranges of `out`, which outlives the rayon scope.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// One product, shared by the column parts.
#[derive(Clone, Copy)]
struct Job<'a> {
    x: &'a [f32],
    m: usize,
    k: usize,
    n: usize,
    out: OutPtr,
}

impl Job<'_> {
    /// Splits the columns into parts (multiples of `NR`, so only the last one has a
    /// scalar tail) and runs them on the rayon pool.
    fn run<E: Elem>(&self, w: &[E]) {
        let (k, n) = (self.k, self.n);
        let parts = if k * n < PAR_MIN_WEIGHTS {
            1
        } else {
            (rayon::current_num_threads() * PARTS_PER_THREAD)
                .min(n / PAR_MIN_COLS)
                .max(1)
        };
        let width = n.div_ceil(parts).next_multiple_of(NR);
        let parts = n.div_ceil(width);
        let part = |p: usize| self.columns(w, p * width, ((p + 1) * width).min(n));
        if parts == 1 {
            part(0);
        } else {
            (0..parts).into_par_iter().for_each(part);
        }
    }

    /// Computes `out[.., c0..c1]` with the fastest kernel this CPU has.
    fn columns<E: Elem>(&self, w: &[E], c0: usize, c1: usize) {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            // SAFETY: the CPU supports the features `columns_avx2` is compiled for.
            unsafe { columns_avx2(self, w, c0, c1) };
            return;
        }
        // SAFETY: `Job` invariants (slice lengths checked in `matmul`).
        unsafe { blocked::<Portable, E>(self, w, c0, c1) };
    }
}

/// Weight element: converted exactly to `f32` before the multiply-add.
trait Elem: Copy + Sync {
    fn to_f32(self) -> f32;
    /// Loads 8 consecutive weights as `f32` lanes.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl Elem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }
}

impl Elem for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
    }
}

/// A register tile: `R` rows × `NR` columns over one `k` block.
trait Tile {
    /// `x` points at `x[i0, k0]` (row stride `ldx`), `w` at `w[k0, j0]` and `out` at
    /// `out[i0, j0]` (row stride `ldw` for both). Starts from zero when `first`,
    /// else from the partial sums in `out`; stores the sums after `kc` steps.
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<const R: usize, E: Elem>(
        x: *const f32,
        ldx: usize,
        w: *const E,
        ldw: usize,
        kc: usize,
        out: *mut f32,
        first: bool,
    );
}

/// Loop nest shared by all kernels: column blocks, `k` blocks, column tiles, row
/// tiles; columns past the last whole tile go through the scalar tail.
///
/// # Safety
/// `job` slices match its shape, `w.len() == k * n`, `c0 <= c1 <= n`, and no other
/// thread writes `out[.., c0..c1]`.
#[inline(always)]
unsafe fn blocked<T: Tile, E: Elem>(job: &Job<'_>, w: &[E], c0: usize, c1: usize) {
    let Job { x, m, k, n, out } = *job;
    let (x, w, out) = (x.as_ptr(), w.as_ptr(), out.0);
    if k == 0 {
        for i in 0..m {
            for j in c0..c1 {
                unsafe { *out.add(i * n + j) = 0.0 };
            }
        }
        return;
    }
    for b0 in (c0..c1).step_by(NC) {
        let b1 = (b0 + NC).min(c1);
        let tail = b1 - (b1 - b0) % NR;
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            let first = k0 == 0;
            for j in (b0..tail).step_by(NR) {
                let w = unsafe { w.add(k0 * n + j) };
                let mut i = 0;
                while i + MR <= m {
                    unsafe {
                        T::tile::<MR, E>(x.add(i * k + k0), k, w, n, kc, out.add(i * n + j), first)
                    };
                    i += MR;
                }
                let (x, out) = unsafe { (x.add(i * k + k0), out.add(i * n + j)) };
                unsafe {
                    match m - i {
                        3 => T::tile::<3, E>(x, k, w, n, kc, out, first),
                        2 => T::tile::<2, E>(x, k, w, n, kc, out, first),
                        1 => T::tile::<1, E>(x, k, w, n, kc, out, first),
                        _ => {}
                    }
                }
            }
            for i in 0..m {
                for j in tail..b1 {
                    let o = unsafe { &mut *out.add(i * n + j) };
                    let mut acc = if first { 0.0 } else { *o };
                    for kk in k0..k0 + kc {
                        let (xv, wv) =
                            unsafe { (*x.add(i * k + kk), (*w.add(kk * n + j)).to_f32()) };
                        acc = xv.mul_add(wv, acc);
                    }
                    *o = acc;
                }
            }
        }
    }
}

/// `blocked` compiled for AVX2 + FMA + F16C (the intrinsic tiles and `mul_add`
/// tails inline into it).
///
/// # Safety
/// As `blocked`, and the CPU supports avx2, fma and f16c.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn columns_avx2<E: Elem>(job: &Job<'_>, w: &[E], c0: usize, c1: usize) {
    unsafe { blocked::<Avx2, E>(job, w, c0, c1) }
}

/// Tiles of two `__m256` per row; only called from `columns_avx2`.
#[cfg(target_arch = "x86_64")]
struct Avx2;

#[cfg(target_arch = "x86_64")]
impl Tile for Avx2 {
    #[inline(always)]
    unsafe fn tile<const R: usize, E: Elem>(
        x: *const f32,
        ldx: usize,
        w: *const E,
        ldw: usize,
        kc: usize,
        out: *mut f32,
        first: bool,
    ) {
        use std::arch::x86_64::*;
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            if !first {
                for (r, a) in acc.iter_mut().enumerate() {
                    a[0] = _mm256_loadu_ps(out.add(r * ldw));
                    a[1] = _mm256_loadu_ps(out.add(r * ldw + 8));
                }
            }
            for kk in 0..kc {
                let wp = w.add(kk * ldw);
                let (w0, w1) = (E::load8(wp), E::load8(wp.add(8)));
                for (r, a) in acc.iter_mut().enumerate() {
                    let xv = _mm256_broadcast_ss(&*x.add(r * ldx + kk));
                    a[0] = _mm256_fmadd_ps(xv, w0, a[0]);
                    a[1] = _mm256_fmadd_ps(xv, w1, a[1]);
                }
            }
            for (r, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(out.add(r * ldw), a[0]);
                _mm256_storeu_ps(out.add(r * ldw + 8), a[1]);
            }
        }
    }
}

/// Plain-Rust tiles (`f32::mul_add`, which compilers vectorise where FMA exists).
struct Portable;

impl Tile for Portable {
    #[inline(always)]
    unsafe fn tile<const R: usize, E: Elem>(
        x: *const f32,
        ldx: usize,
        w: *const E,
        ldw: usize,
        kc: usize,
        out: *mut f32,
        first: bool,
    ) {
        unsafe {
            let mut acc = [[0.0f32; NR]; R];
            if !first {
                for (r, a) in acc.iter_mut().enumerate() {
                    a.copy_from_slice(std::slice::from_raw_parts(out.add(r * ldw), NR));
                }
            }
            for kk in 0..kc {
                let wr: [f32; NR] = std::array::from_fn(|c| (*w.add(kk * ldw + c)).to_f32());
                for (r, a) in acc.iter_mut().enumerate() {
                    let xv = *x.add(r * ldx + kk);
                    for (a, wv) in a.iter_mut().zip(wr) {
                        *a = xv.mul_add(wv, *a);
                    }
                }
            }
            for (r, a) in acc.iter().enumerate() {
                std::slice::from_raw_parts_mut(out.add(r * ldw), NR).copy_from_slice(a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Small deterministic PRNG (xorshift64*), values in [-1, 1).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> f32 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let bits = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40;
            bits as f32 / (1u64 << 23) as f32 - 1.0
        }
        fn vec(&mut self, len: usize) -> Vec<f32> {
            (0..len).map(|_| self.next()).collect()
        }
    }

    fn run(x: &[f32], m: usize, k: usize, w: Weights<'_>, n: usize) -> Vec<f32> {
        let mut out = vec![f32::NAN; m * n];
        matmul(x, m, k, w, n, &mut out);
        out
    }

    /// Checks `got` against an f64 reference on the (f32-converted) weights.
    fn check_reference(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, got: &[f32]) {
        for i in 0..m {
            for j in 0..n {
                let (mut dot, mut mag) = (0f64, 0f64);
                for kk in 0..k {
                    let p = x[i * k + kk] as f64 * w[kk * n + j] as f64;
                    dot += p;
                    mag += p.abs();
                }
                let err = (got[i * n + j] as f64 - dot).abs();
                assert!(
                    err <= 1e-5 * mag + 1e-30,
                    "m={m} k={k} n={n} [{i},{j}]: got {} want {dot} (|terms| {mag})",
                    got[i * n + j]
                );
            }
        }
    }

    /// The exact per-element chain the kernel promises.
    fn fma_chain(x: &[f32], w: &[f32], k: usize, n: usize, i: usize, j: usize) -> f32 {
        (0..k).fold(0.0f32, |acc, kk| x[i * k + kk].mul_add(w[kk * n + j], acc))
    }

    const KS: [usize; 5] = [1, 3, 16, 64, 577];
    const NS: [usize; 7] = [1, 15, 16, 17, 33, 520, 1536 + 7];

    #[test]
    fn f32_matches_reference_and_fma_chain() {
        let mut rng = Rng(1);
        for k in KS {
            for n in NS {
                for m in [1, 2, 5, 9] {
                    let (x, w) = (rng.vec(m * k), rng.vec(k * n));
                    let got = run(&x, m, k, Weights::F32(&w), n);
                    check_reference(&x, m, k, &w, n, &got);
                    for (e, g) in got.iter().enumerate() {
                        let want = fma_chain(&x, &w, k, n, e / n, e % n);
                        assert_eq!(g.to_bits(), want.to_bits(), "m={m} k={k} n={n} elem {e}");
                    }
                }
            }
        }
    }

    #[test]
    fn f16_matches_reference_on_f16_values() {
        let mut rng = Rng(2);
        for k in KS {
            for n in NS {
                let m = 6;
                let x = rng.vec(m * k);
                let w16: Vec<f16> = rng.vec(k * n).into_iter().map(f16::from_f32).collect();
                let w32: Vec<f32> = w16.iter().map(|v| v.to_f32()).collect();
                let got = run(&x, m, k, Weights::F16(&w16), n);
                check_reference(&x, m, k, &w32, n, &got);
                let from_f32 = run(&x, m, k, Weights::F32(&w32), n);
                assert_eq!(
                    got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    from_f32.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "k={k} n={n}: f16 weights must give the f32 result on the same values"
                );
            }
        }
    }

    /// Each row is bitwise the same alone or at any position in any batch.
    #[test]
    fn batch_invariant() {
        let mut rng = Rng(3);
        for (k, n) in [(577, 1536 + 7), (64, 33), (3, 17), (576, 256 * 1024 / 576)] {
            let w = rng.vec(k * n);
            let w16: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            let row = rng.vec(k);
            let alone = run(&row, 1, k, Weights::F32(&w), n);
            let alone16 = run(&row, 1, k, Weights::F16(&w16), n);
            for m in 1..=17 {
                let pos = rng.0 as usize % m;
                let mut x = rng.vec(m * k);
                x[pos * k..(pos + 1) * k].copy_from_slice(&row);
                for (w, want) in [(Weights::F32(&w), &alone), (Weights::F16(&w16), &alone16)] {
                    let got = run(&x, m, k, w, n);
                    let got = &got[pos * n..(pos + 1) * n];
                    assert!(
                        got.iter()
                            .zip(want.iter())
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "k={k} n={n} m={m} row {pos} differs from m=1"
                    );
                }
            }
        }
    }

    /// Thread count does not change results (a one-thread pool vs the global one).
    #[test]
    fn thread_invariant() {
        let mut rng = Rng(4);
        let (m, k, n) = (7, 300, 2000);
        let (x, w) = (rng.vec(m * k), rng.vec(k * n));
        let many = run(&x, m, k, Weights::F32(&w), n);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let one = pool.install(|| run(&x, m, k, Weights::F32(&w), n));
        assert!(many
            .iter()
            .zip(&one)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    #[test]
    fn empty_shapes() {
        assert_eq!(run(&[], 2, 0, Weights::F32(&[]), 3), vec![0.0; 6]);
        assert!(run(&[], 0, 4, Weights::F32(&[0.0; 12]), 3).is_empty());
        assert!(run(&[1.0; 8], 2, 4, Weights::F32(&[]), 0).is_empty());
    }

    #[test]
    #[should_panic(expected = "x must hold")]
    fn panics_on_bad_x() {
        matmul(&[0.0; 5], 2, 3, Weights::F32(&[0.0; 6]), 2, &mut [0.0; 4]);
    }

    #[test]
    #[should_panic(expected = "w must hold")]
    fn panics_on_bad_w() {
        matmul(
            &[0.0; 6],
            2,
            3,
            Weights::F16(&[f16::ZERO; 5]),
            2,
            &mut [0.0; 4],
        );
    }

    #[test]
    #[should_panic(expected = "out must hold")]
    fn panics_on_bad_out() {
        matmul(&[0.0; 6], 2, 3, Weights::F32(&[0.0; 6]), 2, &mut [0.0; 5]);
    }
}
