//! Batch-invariant CPU matmul for a few rows (`m` ≈ 1..64) against a large weight
//! matrix: the target's projections during decoding and speculative verification.
//!
//! Lossless verification needs every output row to be bitwise identical to the
//! row computed alone. Each element is therefore one fused-multiply-add chain,
//! `acc = 0.0; for kk in 0..k { acc = fma(x[i, kk], w[kk, j], acc) }`, in every
//! path (AVX2 tiles, portable fallback, column tails), whatever `m`, the tiling or
//! the thread count. Blocking only decides when a partial sum is parked in memory
//! (exactly, as `f32`) and picked up again.
//!
//! Few-row products are memory-bound, so the weights are streamed once for all
//! rows: threads (the caller and the private `spin_pool` module's helpers) own column ranges;
//! inside a range each weight tile (`KB` rows × `NR` columns) is read once, by
//! register tiles covering every row of `x`, with partial sums parked in `out`
//! between `k` blocks. Block shapes, the one- and two-row `sweep`, the packing rule
//! and the threading thresholds follow what measured fastest on cold weights (a
//! 2-vCPU AMD EPYC VM with AVX-512, ~25 GB/s).

use half::f16;

use crate::spin_pool::{OutPtr, Pool};

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
    if k == 0 {
        out.fill(0.0);
        return;
    }
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

/// `f32` lanes per vector (one `__m256`).
const LANES: usize = 8;
/// Columns per column tile: eight vectors, so even a one-row register tile has
/// the 8 independent FMA chains that hide the FMA latency.
const NR: usize = 64;
/// Rows per full register tile: 6 rows × 2 vectors = 12 accumulators, plus 2
/// weight vectors and a broadcast, fit the 16 AVX2 registers.
const MR: usize = 6;
/// Weight rows per `k` block when tiles are read in place. These rows are read
/// side by side, as that many memory streams `n` apart, and the partial sums go
/// to memory after each block; 8 measured fastest on cold weights.
const KB: usize = 8;
/// Weight rows per `k` block of packed tiles, which amortise their copy.
const KC: usize = 16;
/// Partial sums (`f32` bytes) a one-row sweep keeps in L1 (see `sweep`).
const L1_SUMS_BYTES: usize = 16 << 10;
/// Partial sums per column block (`m ×` block width `f32`s), kept in L2 across
/// `k` blocks; the wider the block, the longer the runs read from each weight row.
const BLOCK_SUMS_BYTES: usize = 128 << 10;
/// One row: below this many multiply-adds a single thread's sequential `sweep`
/// is as fast as column parts on all threads (whose strided reads stream worse);
/// above it, as for a vocabulary projection, two threads stream more bandwidth
/// than one (SmolLM2's LM head, 1 row, f16: 1.6 ms vs 2.2 ms on a 2-vCPU EPYC VM).
const PAR_MIN_WORK: usize = 1 << 22;
/// Several rows (those too wide for the `sweep`): with f16 weights a core spends
/// as long converting each weight to f32 as multiplying it, so these products are
/// compute-bound and parts pay from ~0.1 M multiply-adds, with helpers that spin
/// (see the private `spin_pool` module). SmolLM2's 120 layer projections, cold f16 weights,
/// 2 rows: ~12 ms with these rules vs ~16 ms all in `k` blocks on one thread (one
/// row: ~9–10 ms).
const PAR_MIN_WORK_ROWS: usize = 1 << 17;
/// Whether `m` rows over `cols` columns take the [`sweep`]: one or two rows whose
/// partial sums fit L1. Such products also stay on one thread: column parts would
/// turn the sweep's single stream into strided reads, which measured slower on two
/// threads than the whole sweep on one.
fn sweeps(m: usize, cols: usize) -> bool {
    m <= 2 && m * cols * size_of::<f32>() <= L1_SUMS_BYTES
}

/// Minimum columns per thread.
const PAR_MIN_COLS: usize = 256;

/// One product with `m, k, n >= 1`, shared by the column parts.
#[derive(Clone, Copy)]
struct Job<'a> {
    x: &'a [f32],
    m: usize,
    k: usize,
    n: usize,
    out: OutPtr,
}

impl Job<'_> {
    /// Splits the columns of big products into one contiguous part per thread
    /// (multiples of `NR`, so only the last part has a partial tile) and runs them
    /// on the spin pool.
    fn run<E: Elem>(&self, w: &[E]) {
        let (m, k, n) = (self.m, self.k, self.n);
        let pool = Pool::global();
        let min_work = if m == 1 {
            PAR_MIN_WORK
        } else {
            PAR_MIN_WORK_ROWS
        };
        let parts = if m.saturating_mul(k).saturating_mul(n) < min_work || sweeps(m, n) {
            1
        } else {
            let threads = rayon::current_num_threads().min(pool.threads());
            threads.min(n / PAR_MIN_COLS).max(1)
        };
        let width = n.div_ceil(parts).next_multiple_of(NR);
        let part = |p: usize| self.columns(w, p * width, ((p + 1) * width).min(n));
        match n.div_ceil(width) {
            1 => part(0),
            parts => pool.run(parts, &part),
        }
    }

    /// Computes `out[.., c0..c1]` with the fastest kernel this CPU has.
    fn columns<E: Elem>(&self, w: &[E], c0: usize, c1: usize) {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            // SAFETY: `run` passes disjoint ranges starting at multiples of `NR`;
            // the CPU has the features `columns_avx2` is compiled for.
            unsafe { columns_avx2(self, w, c0, c1) };
            return;
        }
        // SAFETY: as above.
        unsafe { blocked::<Portable, E>(self, w, c0, c1) };
    }
}

/// Weight element, converted exactly to `f32` before the multiply-add.
trait Elem: Copy + Sync {
    fn to_f32(self) -> f32;
    /// Loads `LANES` consecutive weights as `f32` lanes.
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

/// One `k` block of register tiles: `x` points at `x[i0, k0]`, `w` at
/// `w[k0, j0]`, `out` at `out[i0, j0]`, each with its row stride.
#[derive(Clone, Copy)]
struct Step<E> {
    x: *const f32,
    ldx: usize,
    w: *const E,
    ldw: usize,
    kc: usize,
    out: *mut f32,
    ldo: usize,
    /// Start from zero (first `k` block), else from the partial sums in `out`.
    first: bool,
}

impl<E: Copy> Step<E> {
    /// The same step `rows` rows down and `cols` columns right.
    #[inline(always)]
    unsafe fn at(self, rows: usize, cols: usize) -> Self {
        unsafe {
            Step {
                x: self.x.add(rows * self.ldx),
                w: self.w.add(cols),
                out: self.out.add(rows * self.ldo + cols),
                ..self
            }
        }
    }
}

/// The innermost kernels.
trait Tile {
    /// Register tile of `R` rows × `V` vectors: runs `s.kc` multiply-add steps
    /// and stores the sums to `s.out`.
    unsafe fn tile<const R: usize, const V: usize, E: Elem>(s: Step<E>);

    /// Copies the first `cols` columns of the `kc`-row weight tile at `w` (row
    /// stride `ldw`) into `packed` as `f32`, zero-padded to `NR` columns.
    unsafe fn pack<E: Elem>(w: *const E, ldw: usize, kc: usize, cols: usize, packed: &mut Packed) {
        for (kk, row) in packed.0.iter_mut().take(kc).enumerate() {
            for (c, v) in row.iter_mut().enumerate() {
                *v = if c < cols {
                    unsafe { *w.add(kk * ldw + c) }.to_f32()
                } else {
                    0.0
                };
            }
        }
    }
}

/// A weight tile copied to contiguous `f32` rows.
struct Packed([[f32; NR]; KC]);

/// Loop nest shared by all kernels: column blocks, `k` blocks, column tiles, row
/// tiles (after `sweep` for the one or two rows that allow it).
///
/// A partial last column tile is packed zero-padded and its sums kept in a side
/// buffer of full tiles; only its valid columns reach `out`.
///
/// # Safety
/// `job` is valid (slice lengths checked in `matmul`), `w.len() == k * n`,
/// `c0 <= c1 <= n`, `c0` is a multiple of `NR`, and no other thread touches
/// `out[.., c0..c1]`.
#[inline(always)]
unsafe fn blocked<T: Tile, E: Elem>(job: &Job<'_>, w: &[E], c0: usize, c1: usize) {
    let Job { x, m, k, n, out } = *job;
    let w = w.as_ptr();
    let tail_cols = (c1 - c0) % NR;
    let mut c0 = c0;
    if sweeps(m, n) {
        let c = c1 - tail_cols;
        match m {
            1 => unsafe { sweep::<T, E, 1, 8>(job, w, c0, c) },
            _ => unsafe { sweep::<T, E, 2, 4>(job, w, c0, c) },
        }
        c0 = c;
    }
    // Pack when two or more full row tiles re-read a weight tile whose rows all
    // map to the same L1 sets (row stride a multiple of 4 KiB, as in a vocabulary
    // projection) and would evict each other; otherwise reading in place is cheaper.
    let pack = m >= 2 * MR && (n * size_of::<E>()).is_multiple_of(4096);
    let kb = if pack { KC } else { KB };
    let nc = (BLOCK_SUMS_BYTES / size_of::<f32>() / m)
        .next_multiple_of(NR)
        .max(NR);
    let mut packed = Packed([[0.0; NR]; KC]);
    let mut tail = vec![0.0f32; if tail_cols > 0 { m * NR } else { 0 }];
    for b0 in (c0..c1).step_by(nc) {
        let b1 = (b0 + nc).min(c1);
        for k0 in (0..k).step_by(kb) {
            for j in (b0..b1).step_by(NR) {
                let cols = NR.min(b1 - j);
                let s = Step {
                    x: unsafe { x.as_ptr().add(k0) },
                    ldx: k,
                    w: unsafe { w.add(k0 * n + j) },
                    ldw: n,
                    kc: kb.min(k - k0),
                    out: unsafe { out.0.add(j) },
                    ldo: n,
                    first: k0 == 0,
                };
                if cols == NR && !pack {
                    unsafe { row_tiles::<T, E>(s, m) };
                    continue;
                }
                unsafe { T::pack(s.w, n, s.kc, cols, &mut packed) };
                let (out, ldo) = if cols == NR {
                    (s.out, n)
                } else {
                    (tail.as_mut_ptr(), NR)
                };
                let p = Step {
                    x: s.x,
                    ldx: k,
                    w: packed.0.as_ptr().cast::<f32>(),
                    ldw: NR,
                    kc: s.kc,
                    out,
                    ldo,
                    first: s.first,
                };
                unsafe { row_tiles::<T, f32>(p, m) };
            }
        }
    }
    let j = c1 - tail_cols;
    for (i, sums) in tail.chunks_exact(NR).enumerate() {
        let o = unsafe { std::slice::from_raw_parts_mut(out.0.add(i * n + j), tail_cols) };
        o.copy_from_slice(&sums[..tail_cols]);
    }
}

/// One or two rows over whole column tiles `c0..c1` whose partial sums fit L1,
/// swept one weight row at a time: the weights are then read as one sequential
/// stream, measurably the fastest pattern for a memory-bound product (f16, two
/// rows, SmolLM2's narrow layer matrices: ~1.4× faster than `k` blocks).
///
/// # Safety
/// As `blocked`, with `m == R` and `c1 - c0` a multiple of `NR`.
#[inline(always)]
unsafe fn sweep<T: Tile, E: Elem, const R: usize, const V: usize>(
    job: &Job<'_>,
    w: *const E,
    c0: usize,
    c1: usize,
) {
    let Job { x, k, n, out, .. } = *job;
    for kk in 0..k {
        for j in (c0..c1).step_by(NR) {
            let s = Step {
                x: unsafe { x.as_ptr().add(kk) },
                ldx: k,
                w: unsafe { w.add(kk * n + j) },
                ldw: 0,
                kc: 1,
                out: unsafe { out.0.add(j) },
                ldo: n,
                first: kk == 0,
            };
            unsafe { passes::<T, R, V, E>(s) };
        }
    }
}

/// Runs the register tiles of all `m` rows over one `NR`-column weight tile:
/// full tiles of `MR` rows, then the rows left, in shapes with at least 8
/// accumulators (independent FMA chains).
#[inline(always)]
unsafe fn row_tiles<T: Tile, E: Elem>(s: Step<E>, m: usize) {
    let mut i = 0;
    unsafe {
        while i + MR <= m {
            passes::<T, MR, 2, E>(s.at(i, 0));
            i += MR;
        }
        let s = s.at(i, 0);
        match m - i {
            1 => passes::<T, 1, 8, E>(s),
            2 => passes::<T, 2, 4, E>(s),
            3 => passes::<T, 3, 4, E>(s),
            4 => passes::<T, 4, 2, E>(s),
            5 => passes::<T, 5, 2, E>(s),
            _ => {}
        }
    }
}

/// Covers the `NR` columns with `R × V`-vector register tiles, left to right.
#[inline(always)]
unsafe fn passes<T: Tile, const R: usize, const V: usize, E: Elem>(s: Step<E>) {
    for c in (0..NR).step_by(V * LANES) {
        unsafe { T::tile::<R, V, E>(s.at(0, c)) };
    }
}

/// `blocked` compiled for AVX2 + FMA + F16C. Everything it calls is
/// `#[inline(always)]` and closure-free: code outside this function, closures
/// included, is compiled without the features and would not inline intrinsics.
///
/// # Safety
/// As `blocked`, and the CPU supports avx2, fma and f16c.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn columns_avx2<E: Elem>(job: &Job<'_>, w: &[E], c0: usize, c1: usize) {
    unsafe { blocked::<Avx2, E>(job, w, c0, c1) }
}

/// `__m256` tiles; only called from `columns_avx2`.
#[cfg(target_arch = "x86_64")]
struct Avx2;

#[cfg(target_arch = "x86_64")]
impl Tile for Avx2 {
    #[inline(always)]
    unsafe fn tile<const R: usize, const V: usize, E: Elem>(s: Step<E>) {
        use std::arch::x86_64::*;
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); V]; R];
            if !s.first {
                for (r, a) in acc.iter_mut().enumerate() {
                    for (v, a) in a.iter_mut().enumerate() {
                        *a = _mm256_loadu_ps(s.out.add(r * s.ldo + v * LANES));
                    }
                }
            }
            for kk in 0..s.kc {
                let wp = s.w.add(kk * s.ldw);
                let mut wv = [_mm256_setzero_ps(); V];
                for (v, wv) in wv.iter_mut().enumerate() {
                    *wv = E::load8(wp.add(v * LANES));
                }
                for (r, a) in acc.iter_mut().enumerate() {
                    let xv = _mm256_broadcast_ss(&*s.x.add(r * s.ldx + kk));
                    for (a, &wv) in a.iter_mut().zip(&wv) {
                        *a = _mm256_fmadd_ps(xv, wv, *a);
                    }
                }
            }
            for (r, a) in acc.iter().enumerate() {
                for (v, a) in a.iter().enumerate() {
                    _mm256_storeu_ps(s.out.add(r * s.ldo + v * LANES), *a);
                }
            }
        }
    }

    #[inline(always)]
    unsafe fn pack<E: Elem>(w: *const E, ldw: usize, kc: usize, cols: usize, packed: &mut Packed) {
        use std::arch::x86_64::*;
        if cols < NR {
            return unsafe { Portable::pack(w, ldw, kc, cols, packed) };
        }
        for (kk, row) in packed.0.iter_mut().take(kc).enumerate() {
            for v in 0..NR / LANES {
                unsafe {
                    let wv = E::load8(w.add(kk * ldw + v * LANES));
                    _mm256_storeu_ps(row.as_mut_ptr().add(v * LANES), wv);
                }
            }
        }
    }
}

/// Plain-Rust tiles: `f32::mul_add`, a fused multiply-add everywhere (vectorised
/// where the target has FMA, a correctly rounded libm call elsewhere).
struct Portable;

impl Tile for Portable {
    #[inline(always)]
    unsafe fn tile<const R: usize, const V: usize, E: Elem>(s: Step<E>) {
        unsafe {
            let mut acc = [[[0.0f32; LANES]; V]; R];
            if !s.first {
                for (r, a) in acc.iter_mut().enumerate() {
                    let o = std::slice::from_raw_parts(s.out.add(r * s.ldo), V * LANES);
                    a.as_flattened_mut().copy_from_slice(o);
                }
            }
            for kk in 0..s.kc {
                let wr: [[f32; LANES]; V] = std::array::from_fn(|v| {
                    std::array::from_fn(|l| (*s.w.add(kk * s.ldw + v * LANES + l)).to_f32())
                });
                for (r, a) in acc.iter_mut().enumerate() {
                    let xv = *s.x.add(r * s.ldx + kk);
                    for (a, wv) in a.as_flattened_mut().iter_mut().zip(wr.as_flattened()) {
                        *a = xv.mul_add(*wv, *a);
                    }
                }
            }
            for (r, a) in acc.iter().enumerate() {
                let o = std::slice::from_raw_parts_mut(s.out.add(r * s.ldo), V * LANES);
                o.copy_from_slice(a.as_flattened());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::Rng;

    fn run(x: &[f32], m: usize, k: usize, w: Weights<'_>, n: usize) -> Vec<f32> {
        let mut out = vec![f32::NAN; m * n];
        matmul(x, m, k, w, n, &mut out);
        out
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|v| v.to_bits()).collect()
    }

    fn to_f16(v: &[f32]) -> Vec<f16> {
        v.iter().map(|&v| f16::from_f32(v)).collect()
    }

    /// Checks `got` against an f64 reference, relative to the sum of |terms|.
    fn check_reference(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, got: &[f32]) {
        for i in 0..m {
            for j in 0..n {
                let (mut dot, mut mag) = (0f64, 0f64);
                for kk in 0..k {
                    let p = x[i * k + kk] as f64 * w[kk * n + j] as f64;
                    dot += p;
                    mag += p.abs();
                }
                let g = got[i * n + j];
                let err = (g as f64 - dot).abs();
                assert!(
                    err <= 1e-5 * mag,
                    "m={m} k={k} n={n} [{i},{j}]: {g} vs {dot}"
                );
            }
        }
    }

    /// The exact per-element chain the kernel promises.
    fn fma_chain(x: &[f32], w: &[f32], k: usize, n: usize, i: usize, j: usize) -> f32 {
        (0..k).fold(0.0f32, |acc, kk| x[i * k + kk].mul_add(w[kk * n + j], acc))
    }

    /// Odd and even shapes; 1024 columns (a 4 KiB row) with `m >= 12` packs tiles.
    const KS: [usize; 5] = [1, 3, 16, 64, 577];
    const NS: [usize; 8] = [1, 15, 17, 33, 64, 520, 1024, 1536 + 7];
    const MS: [usize; 6] = [1, 2, 5, 7, 12, 13];

    #[test]
    fn f32_is_the_fma_chain_and_matches_reference() {
        let mut rng = Rng(1);
        for k in KS {
            for n in NS {
                for m in MS {
                    let (x, w) = (rng.vec(m * k), rng.vec(k * n));
                    let got = run(&x, m, k, Weights::F32(&w), n);
                    check_reference(&x, m, k, &w, n, &got);
                    for (e, g) in got.iter().enumerate() {
                        let want = fma_chain(&x, &w, k, n, e / n, e % n);
                        assert_eq!(g.to_bits(), want.to_bits(), "m={m} k={k} n={n} at {e}");
                    }
                }
            }
        }
    }

    #[test]
    fn f16_is_f32_on_the_same_values_and_matches_reference() {
        let mut rng = Rng(2);
        for k in KS {
            for n in NS.into_iter().chain([2048]) {
                for m in [1, 6, 12] {
                    let x = rng.vec(m * k);
                    let w16 = to_f16(&rng.vec(k * n));
                    let w32: Vec<f32> = w16.iter().map(|v| v.to_f32()).collect();
                    let got = run(&x, m, k, Weights::F16(&w16), n);
                    check_reference(&x, m, k, &w32, n, &got);
                    let want = run(&x, m, k, Weights::F32(&w32), n);
                    assert_eq!(bits(&got), bits(&want), "m={m} k={k} n={n}");
                }
            }
        }
    }

    /// Each row is bitwise the same alone or at any position in any batch
    /// (which switches tile shapes, `k` blocks, packing and threading).
    #[test]
    fn batch_invariant() {
        let mut rng = Rng(3);
        for (k, n) in [(577, 1536 + 7), (64, 1024), (64, 33), (3, 17), (576, 4096)] {
            let w = rng.vec(k * n);
            let w16 = to_f16(&w);
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
                    assert_eq!(bits(got), bits(want), "k={k} n={n} m={m} row {pos}");
                }
            }
        }
    }

    /// A one-thread pool gives the same bits as the global pool.
    #[test]
    fn thread_invariant() {
        let mut rng = Rng(4);
        let (m, k, n) = (7, 300, 2000 + 3);
        let (x, w) = (rng.vec(m * k), rng.vec(k * n));
        let many = run(&x, m, k, Weights::F32(&w), n);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let one = pool.install(|| run(&x, m, k, Weights::F32(&w), n));
        assert_eq!(bits(&many), bits(&one));
    }

    /// The AVX2 kernel and the portable fallback give the same bits.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn portable_is_avx2() {
        let mut rng = Rng(5);
        for (m, k, n) in [(1, 577, 1543), (9, 40, 100), (13, 20, 1024), (13, 20, 2048)] {
            let (x, w) = (rng.vec(m * k), rng.vec(k * n));
            let w16 = to_f16(&w);
            for w in [Weights::F32(&w), Weights::F16(&w16)] {
                let fast = run(&x, m, k, w, n);
                let mut slow = vec![f32::NAN; m * n];
                let job = Job {
                    x: &x,
                    m,
                    k,
                    n,
                    out: OutPtr(slow.as_mut_ptr()),
                };
                // SAFETY: valid job over all columns, on this thread only.
                match w {
                    Weights::F32(w) => unsafe { blocked::<Portable, _>(&job, w, 0, n) },
                    Weights::F16(w) => unsafe { blocked::<Portable, _>(&job, w, 0, n) },
                }
                assert_eq!(bits(&fast), bits(&slow), "m={m} k={k} n={n}");
            }
        }
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
