//! `out = x · Wᵀ` for f32 activations `x [m, k]` and a quantized `W [n, k]`, batch
//! invariant by construction.
//!
//! Each row of `x` is quantised on its own to int8 blocks of 32 with an f32 scale
//! (ggml's Q8 scheme, the scale kept in f32 rather than f16), so the integer dot
//! product of a weight block with an activation block is exact. Output `(i, j)` is then
//! one fixed sequence of f32 operations over the blocks of row `j`:
//!
//! * lane `l` (0..8) of block `b` is the exact integer sum over weights `4l..4l+4`;
//! * it is multiply-added, `fma(lane, d_w · d_x, acc)`, into accumulator lane `l` of
//!   the even or the odd blocks (two chains, as two vector registers);
//! * Q4_1's offsets add `fma(m_w, d_x · Σq_x, macc)` into an even and an odd chain;
//! * the end is `((even + odd)` folded `8 → 4 → 2 → 1) + (macc_even + macc_odd)`.
//!
//! Nothing in it depends on `m`, the row's position, the tiling or the threads, so a
//! token verified in a tree gets bitwise the logits it gets decoded alone, and greedy
//! speculative decoding stays token-identical to vanilla decoding. The AVX-512 VNNI
//! kernel (`vpdpbusd`), the AVX2 kernel (`vpmaddubsw` + `vpmaddwd`: the same exact lane
//! sums) and the portable fallback compute that same sequence, bit for bit.
//!
//! Threads own contiguous ranges of weight rows (each streams its blocks once for all
//! rows of `x`); activations are taken `MC` rows at a time so that the quantised rows a
//! weight row meets stay in L2.

use super::{QMatrix, QType, BLOCK};
use crate::spin_pool::{OutPtr, Pool};

/// Activation rows per register tile.
const MR: usize = 4;
/// Activation rows per pass over the weights (their int8 blocks stay in L2).
const MC: usize = 64;
/// Products below this many multiply-adds run on the calling thread alone (a part on
/// a helper costs a few microseconds to hand out and join).
const PAR_MIN_WORK: usize = 1 << 17;

/// Activations quantised per row: int8 blocks, their scales and Σq · scale.
struct QActs {
    nb: usize,
    q: Vec<i8>,
    d: Vec<f32>,
    /// `d · Σq` per block (Q4_1's offset term).
    t: Vec<f32>,
}

/// Quantises each row of `x [m, k]` to int8 blocks of 32: `d = max|x| / 127`,
/// `q = round_ties_even(x / d)`.
fn quantize_acts(x: &[f32], m: usize, k: usize) -> QActs {
    let nb = k / BLOCK;
    let mut a = QActs {
        nb,
        q: vec![0; m * k],
        d: vec![0.0; m * nb],
        t: vec![0.0; m * nb],
    };
    for (bi, (xb, qb)) in x
        .chunks_exact(BLOCK)
        .zip(a.q.chunks_exact_mut(BLOCK))
        .enumerate()
    {
        let amax = xb.iter().fold(0f32, |acc, v| acc.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in qb.iter_mut().zip(xb) {
            // Adding and subtracting 1.5 · 2²³ rounds |v| < 2²² to the nearest integer,
            // ties to even: `round_ties_even` without a libm call, so it vectorises.
            const ROUND: f32 = 12_582_912.0;
            *q = (((v * id).clamp(-127.0, 127.0) + ROUND) - ROUND) as i8;
            sum += *q as i32;
        }
        a.d[bi] = d;
        a.t[bi] = d * sum as f32;
    }
    a
}

/// `out[m×n] = x[m×k] · Wᵀ` with `W = w` (`n × k`), all row-major; `out` is
/// overwritten. Panics (assert!) on slice lengths inconsistent with the shapes.
pub fn qmatmul(x: &[f32], m: usize, w: &QMatrix, out: &mut [f32]) {
    let (n, k) = (w.rows, w.cols);
    assert_eq!(Some(x.len()), m.checked_mul(k), "x must hold m*k values");
    assert_eq!(
        Some(out.len()),
        m.checked_mul(n),
        "out must hold m*n values"
    );
    if m == 0 || n == 0 {
        return;
    }
    let acts = quantize_acts(x, m, k);
    let job = Job {
        w,
        acts: &acts,
        m,
        out: OutPtr(out.as_mut_ptr()),
        isa: Isa::detect(),
    };
    let pool = Pool::global();
    let parts = if m * k * n < PAR_MIN_WORK {
        1
    } else {
        rayon::current_num_threads()
            .min(pool.threads())
            .min(n)
            .max(1)
    };
    let per = n.div_ceil(parts);
    let part = |p: usize| job.rows(p * per, ((p + 1) * per).min(n));
    match parts {
        1 => part(0),
        _ => pool.run(parts, &part),
    }
}

/// The instruction sets with a kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Vnni,
}

impl Isa {
    fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            if avx2
                && is_x86_feature_detected!("avx512vnni")
                && is_x86_feature_detected!("avx512vl")
            {
                return Isa::Vnni;
            }
            if avx2 {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }
}

/// One product, shared by the parts.
struct Job<'a> {
    w: &'a QMatrix,
    acts: &'a QActs,
    m: usize,
    out: OutPtr,
    isa: Isa,
}

impl Job<'_> {
    /// Output columns (weight rows) `j0..j1`, segment by segment.
    fn rows(&self, j0: usize, j1: usize) {
        let mut first = 0; // global index of the segment's first row
        for seg in &self.w.segments {
            let (a, b) = (j0.max(first), j1.min(first + seg.rows));
            if a < b {
                let rb = self.acts.nb * seg.ty.block_bytes();
                let span = Span {
                    w: seg.bytes[(a - first) * rb..].as_ptr(),
                    row_bytes: rb,
                    rows: b - a,
                    col0: a,
                };
                // SAFETY: `span` lies inside the segment; columns `a..b` are this
                // part's alone; the ISA was detected on this CPU.
                unsafe { self.span(seg.ty, span) };
            }
            first += seg.rows;
        }
    }

    unsafe fn span(&self, ty: QType, s: Span) {
        unsafe {
            match (self.isa, ty) {
                (Isa::Portable, QType::Q8_0) => span::<Portable, Q8>(self, s),
                (Isa::Portable, QType::Q4_0) => span::<Portable, Q40>(self, s),
                (Isa::Portable, QType::Q4_1) => span::<Portable, Q41>(self, s),
                #[cfg(target_arch = "x86_64")]
                (Isa::Avx2, _) => span_avx2(self, ty, s),
                #[cfg(target_arch = "x86_64")]
                (Isa::Vnni, _) => span_vnni(self, ty, s),
            }
        }
    }
}

/// Weight rows of one type: `rows` rows from `w`, output columns from `col0`.
#[derive(Clone, Copy)]
struct Span {
    w: *const u8,
    row_bytes: usize,
    rows: usize,
    col0: usize,
}

/// A block type's layout.
trait Kind {
    const BYTES: usize;
    /// Offset of the nibbles / int8s.
    const QS: usize;
    /// Weights are signed (Q8_0, Q4_0), else unsigned nibbles with an offset `m`.
    const SIGNED: bool;
    /// Weight `e` (0..32) of the block at `p` as an integer.
    fn weight(p: &[u8], e: usize) -> i32;
}

struct Q8;
struct Q40;
struct Q41;

impl Kind for Q8 {
    const BYTES: usize = 34;
    const QS: usize = 2;
    const SIGNED: bool = true;
    #[inline(always)]
    fn weight(p: &[u8], e: usize) -> i32 {
        p[Self::QS + e] as i8 as i32
    }
}

/// Nibble `e` of a Q4 block: bytes hold weights `e` (low) and `e + 16` (high).
#[inline(always)]
fn nibble(qs: &[u8], e: usize) -> i32 {
    if e < 16 {
        (qs[e] & 0x0F) as i32
    } else {
        (qs[e - 16] >> 4) as i32
    }
}

impl Kind for Q40 {
    const BYTES: usize = 18;
    const QS: usize = 2;
    const SIGNED: bool = true;
    #[inline(always)]
    fn weight(p: &[u8], e: usize) -> i32 {
        nibble(&p[Self::QS..], e) - 8
    }
}

impl Kind for Q41 {
    const BYTES: usize = 20;
    const QS: usize = 4;
    const SIGNED: bool = false;
    #[inline(always)]
    fn weight(p: &[u8], e: usize) -> i32 {
        nibble(&p[Self::QS..], e)
    }
}

/// f16 at byte offset `o` of `p`, as f32.
#[inline(always)]
fn f16_at(p: &[u8], o: usize) -> f32 {
    half::f16::from_le_bytes([p[o], p[o + 1]]).to_f32()
}

/// The row-tile kernels of one instruction set.
trait Tile {
    /// Outputs `(r0 + r, j + c)` for `r < R`, `c < RW`: `RW` weight rows from `w`,
    /// `row_bytes` apart (`nb` blocks of kind `K` each). Several weight rows give a one-
    /// or two-row product independent chains to overlap.
    unsafe fn tile<K: Kind, const R: usize, const RW: usize>(
        w: *const u8,
        row_bytes: usize,
        a: &QActs,
        r0: usize,
    ) -> [[f32; R]; RW];
}

/// Loop nest shared by every instruction set: `MC`-row chunks, then weight rows, each
/// with full `MR`-row tiles; the rows left (1..3) take several weight rows at once.
#[inline(always)]
unsafe fn span<T: Tile, K: Kind>(job: &Job<'_>, s: Span) {
    let (m, n, a) = (job.m, job.w.rows, job.acts);
    let put = |r0: usize, j: usize, v: &[f32]| {
        for (r, &v) in v.iter().enumerate() {
            // SAFETY: `(r0 + r, j)` is inside `out`, in this part's columns.
            unsafe { *job.out.0.add((r0 + r) * n + j) = v };
        }
    };
    for c0 in (0..m).step_by(MC) {
        let c1 = (c0 + MC).min(m);
        let left = c0 + (c1 - c0) / MR * MR;
        let mut jr = 0;
        while jr < s.rows {
            let w = unsafe { s.w.add(jr * s.row_bytes) };
            let j = s.col0 + jr;
            let rb = s.row_bytes;
            let mut r0 = c0;
            unsafe {
                while r0 < left {
                    put(r0, j, &T::tile::<K, MR, 1>(w, rb, a, r0)[0]);
                    r0 += MR;
                }
                let wide = s.rows - jr >= 4;
                let done = match (c1 - left, wide) {
                    (1, true) => {
                        for (c, v) in T::tile::<K, 1, 4>(w, rb, a, r0).iter().enumerate() {
                            put(r0, j + c, v);
                        }
                        4
                    }
                    (2, true) => {
                        for (c, v) in T::tile::<K, 2, 2>(w, rb, a, r0).iter().enumerate() {
                            put(r0, j + c, v);
                        }
                        2
                    }
                    (1, false) => {
                        put(r0, j, &T::tile::<K, 1, 1>(w, rb, a, r0)[0]);
                        1
                    }
                    (2, false) => {
                        put(r0, j, &T::tile::<K, 2, 1>(w, rb, a, r0)[0]);
                        1
                    }
                    (3, _) => {
                        put(r0, j, &T::tile::<K, 3, 1>(w, rb, a, r0)[0]);
                        1
                    }
                    _ => 1,
                };
                // Weight rows the wide tile covered have their full tiles still to do.
                for c in 1..done {
                    let wc = w.add(c * rb);
                    let mut r0 = c0;
                    while r0 < left {
                        put(r0, j + c, &T::tile::<K, MR, 1>(wc, rb, a, r0)[0]);
                        r0 += MR;
                    }
                }
                jr += done;
            }
        }
    }
}

/// The end of every output: `((even + odd)` folded `8 → 4 → 2 → 1) + (macc_even +
/// macc_odd)`.
#[inline(always)]
fn finish(even: [f32; 8], odd: [f32; 8], macc: [f32; 2]) -> f32 {
    let v: [f32; 8] = std::array::from_fn(|l| even[l] + odd[l]);
    let v4: [f32; 4] = std::array::from_fn(|l| v[l] + v[l + 4]);
    let v2 = [v4[0] + v4[2], v4[1] + v4[3]];
    (v2[0] + v2[1]) + (macc[0] + macc[1])
}

/// Plain Rust: the reference the SIMD kernels match bit for bit.
struct Portable;

impl Tile for Portable {
    #[inline(always)]
    unsafe fn tile<K: Kind, const R: usize, const RW: usize>(
        w: *const u8,
        row_bytes: usize,
        a: &QActs,
        r0: usize,
    ) -> [[f32; R]; RW] {
        let nb = a.nb;
        std::array::from_fn(|c| {
            let w = unsafe { std::slice::from_raw_parts(w.add(c * row_bytes), nb * K::BYTES) };
            let mut acc = [[[0f32; 8]; 2]; R];
            let mut macc = [[0f32; 2]; R];
            for (b, blk) in w.chunks_exact(K::BYTES).enumerate() {
                let dw = f16_at(blk, 0);
                let wq: [i32; BLOCK] = std::array::from_fn(|e| K::weight(blk, e));
                for r in 0..R {
                    let i = (r0 + r) * nb + b;
                    let xq = &a.q[i * BLOCK..(i + 1) * BLOCK];
                    let s = dw * a.d[i];
                    for l in 0..8 {
                        let p: i32 = (4 * l..4 * l + 4).map(|e| wq[e] * xq[e] as i32).sum();
                        acc[r][b & 1][l] = (p as f32).mul_add(s, acc[r][b & 1][l]);
                    }
                    if !K::SIGNED {
                        macc[r][b & 1] = f16_at(blk, 2).mul_add(a.t[i], macc[r][b & 1]);
                    }
                }
            }
            std::array::from_fn(|r| finish(acc[r][0], acc[r][1], macc[r]))
        })
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::*;

    /// Products of 32 unsigned × 32 signed bytes, summed in 8 lanes of 4: with VNNI
    /// one `vpdpbusd`, else `vpmaddubsw` (pairs; no saturation: |u · s| ≤ 128 · 127)
    /// then `vpmaddwd` with ones.
    #[inline(always)]
    unsafe fn dot<const VNNI: bool>(u: __m256i, s: __m256i) -> __m256i {
        unsafe {
            if VNNI {
                _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s)
            } else {
                _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
            }
        }
    }

    /// The 32 weights of the block at `p` as bytes in element order: int8 for the
    /// signed kinds, nibbles (0..15) for Q4_1.
    #[inline(always)]
    unsafe fn weights<K: Kind>(p: *const u8) -> __m256i {
        unsafe {
            if K::BYTES == Q8::BYTES {
                return _mm256_loadu_si256(p.add(K::QS).cast());
            }
            let raw = _mm_loadu_si128(p.add(K::QS).cast());
            let low = _mm_set1_epi8(0x0F);
            let lo = _mm_and_si128(raw, low);
            let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low);
            let w = _mm256_set_m128i(hi, lo);
            if K::SIGNED {
                _mm256_sub_epi8(w, _mm256_set1_epi8(8))
            } else {
                w
            }
        }
    }

    /// A broadcast load: `_mm_cvtsi32_si128` let LLVM insert the bits into a live
    /// register (`vpinsrw`), chaining every block's scale on the previous one.
    #[inline(always)]
    unsafe fn f16_at(p: *const u8) -> f32 {
        unsafe {
            let bits = (p as *const i16).read_unaligned();
            _mm_cvtss_f32(_mm_cvtph_ps(_mm_set1_epi16(bits)))
        }
    }

    /// `finish` on vector registers.
    #[inline(always)]
    unsafe fn finish(even: __m256, odd: __m256, macc: [f32; 2]) -> f32 {
        unsafe {
            let v = _mm256_add_ps(even, odd);
            let v4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let v2 = _mm_add_ps(v4, _mm_movehl_ps(v4, v4));
            let v1 = _mm_add_ss(v2, _mm_shuffle_ps(v2, v2, 1));
            _mm_cvtss_f32(v1) + (macc[0] + macc[1])
        }
    }

    /// Block `b` of `RW` weight rows into the accumulators of parity `P` of every
    /// row.
    #[inline(always)]
    unsafe fn block<K: Kind, const R: usize, const RW: usize, const VNNI: bool, const P: usize>(
        w: *const u8,
        row_bytes: usize,
        a: &QActs,
        r0: usize,
        b: usize,
        acc: &mut [[[__m256; 2]; R]; RW],
        macc: &mut [[[f32; 2]; R]; RW],
    ) {
        unsafe {
            for c in 0..RW {
                let blk = w.add(c * row_bytes + b * K::BYTES);
                let wv = weights::<K>(blk);
                let u = if K::SIGNED {
                    _mm256_sign_epi8(wv, wv)
                } else {
                    wv
                };
                let dw = f16_at(blk);
                let mw = if K::SIGNED { 0.0 } else { f16_at(blk.add(2)) };
                for r in 0..R {
                    let i = (r0 + r) * a.nb + b;
                    let x = _mm256_loadu_si256(a.q.as_ptr().add(i * BLOCK).cast());
                    let x = if K::SIGNED {
                        _mm256_sign_epi8(x, wv)
                    } else {
                        x
                    };
                    let p = _mm256_cvtepi32_ps(dot::<VNNI>(u, x));
                    let s = _mm256_set1_ps(dw * *a.d.get_unchecked(i));
                    acc[c][r][P] = _mm256_fmadd_ps(p, s, acc[c][r][P]);
                    if !K::SIGNED {
                        macc[c][r][P] = mw.mul_add(*a.t.get_unchecked(i), macc[c][r][P]);
                    }
                }
            }
        }
    }

    #[inline(always)]
    unsafe fn tile<K: Kind, const R: usize, const RW: usize, const VNNI: bool>(
        w: *const u8,
        rb: usize,
        a: &QActs,
        r0: usize,
    ) -> [[f32; R]; RW] {
        unsafe {
            let mut acc = [[[_mm256_setzero_ps(); 2]; R]; RW];
            let mut macc = [[[0f32; 2]; R]; RW];
            let nb = a.nb;
            let mut b = 0;
            while b + 2 <= nb {
                block::<K, R, RW, VNNI, 0>(w, rb, a, r0, b, &mut acc, &mut macc);
                block::<K, R, RW, VNNI, 1>(w, rb, a, r0, b + 1, &mut acc, &mut macc);
                b += 2;
            }
            if b < nb {
                block::<K, R, RW, VNNI, 0>(w, rb, a, r0, b, &mut acc, &mut macc);
            }
            // Plain loops: a closure (`array::from_fn`) is compiled without this
            // function's target features, so `acc` would live in memory, stored and
            // reloaded every block.
            let mut out = [[0f32; R]; RW];
            for c in 0..RW {
                for r in 0..R {
                    out[c][r] = finish(acc[c][r][0], acc[c][r][1], macc[c][r]);
                }
            }
            out
        }
    }

    /// The AVX2 (`VNNI = false`) or AVX-512 VNNI kernels.
    pub(super) struct X86<const VNNI: bool>;

    impl<const VNNI: bool> Tile for X86<VNNI> {
        #[inline(always)]
        unsafe fn tile<K: Kind, const R: usize, const RW: usize>(
            w: *const u8,
            rb: usize,
            a: &QActs,
            r0: usize,
        ) -> [[f32; R]; RW] {
            unsafe { tile::<K, R, RW, VNNI>(w, rb, a, r0) }
        }
    }
}

/// `span` compiled for AVX2 + FMA + F16C.
///
/// # Safety
/// As `span`, on a CPU with those features.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn span_avx2(job: &Job<'_>, ty: QType, s: Span) {
    unsafe {
        match ty {
            QType::Q8_0 => span::<x86::X86<false>, Q8>(job, s),
            QType::Q4_0 => span::<x86::X86<false>, Q40>(job, s),
            QType::Q4_1 => span::<x86::X86<false>, Q41>(job, s),
        }
    }
}

/// `span` compiled for AVX-512 VNNI (256-bit forms) on top of AVX2.
///
/// # Safety
/// As `span`, on a CPU with those features.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
unsafe fn span_vnni(job: &Job<'_>, ty: QType, s: Span) {
    unsafe {
        match ty {
            QType::Q8_0 => span::<x86::X86<true>, Q8>(job, s),
            QType::Q4_0 => span::<x86::X86<true>, Q40>(job, s),
            QType::Q4_1 => span::<x86::X86<true>, Q41>(job, s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::Rng;

    const TYPES: [QType; 3] = [QType::Q8_0, QType::Q4_0, QType::Q4_1];

    fn run_isa(x: &[f32], m: usize, w: &QMatrix, isa: Isa) -> Vec<f32> {
        let mut out = vec![f32::NAN; m * w.rows];
        let acts = quantize_acts(x, m, w.cols);
        let job = Job {
            w,
            acts: &acts,
            m,
            out: OutPtr(out.as_mut_ptr()),
            isa,
        };
        job.rows(0, w.rows);
        out
    }

    fn run(x: &[f32], m: usize, w: &QMatrix) -> Vec<f32> {
        let mut out = vec![f32::NAN; m * w.rows];
        qmatmul(x, m, w, &mut out);
        out
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|v| v.to_bits()).collect()
    }

    /// Every output against the f64 product of the dequantised weights and the
    /// activations: the error is the activations' int8 rounding, ≤ ~1% of Σ|terms|.
    #[test]
    fn matches_dequantised_reference() {
        let mut rng = Rng(1);
        for ty in TYPES {
            for (m, k, n) in [(1, 32, 1), (3, 64, 5), (5, 576, 37), (9, 1536, 70)] {
                let w = QMatrix::quantize(ty, &rng.vec(n * k), n, k).unwrap();
                let wf = w.dequantize();
                let x = rng.vec(m * k);
                let got = run(&x, m, &w);
                for i in 0..m {
                    for j in 0..n {
                        let (mut dot, mut mag) = (0f64, 0f64);
                        for e in 0..k {
                            let p = x[i * k + e] as f64 * wf[j * k + e] as f64;
                            dot += p;
                            mag += p.abs();
                        }
                        let g = got[i * n + j] as f64;
                        assert!(
                            (g - dot).abs() <= 0.01 * mag + 1e-6,
                            "{ty} m={m} k={k} n={n} ({i},{j}): {g} vs {dot}"
                        );
                    }
                }
            }
        }
    }

    /// A row's outputs are bitwise the same alone and at any position of any batch,
    /// across row tiles, `MC` chunks and threads.
    #[test]
    fn batch_invariant() {
        let mut rng = Rng(2);
        for ty in TYPES {
            let (k, n) = (576, 960 + 3);
            let w = QMatrix::quantize(ty, &rng.vec(n * k), n, k).unwrap();
            let row = rng.vec(k);
            let alone = run(&row, 1, &w);
            for m in [2, 3, 4, 5, 8, 17, 64, 65, 130] {
                let pos = (rng.0 as usize) % m;
                let mut x = rng.vec(m * k);
                x[pos * k..(pos + 1) * k].copy_from_slice(&row);
                let got = run(&x, m, &w);
                assert_eq!(
                    bits(&got[pos * n..(pos + 1) * n]),
                    bits(&alone),
                    "{ty} m={m}"
                );
            }
        }
    }

    /// Every kernel this CPU can run gives the portable kernel's bits.
    #[test]
    fn isas_agree_bitwise() {
        let mut rng = Rng(3);
        let have = Isa::detect();
        #[allow(unused_mut)]
        let mut isas = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if have != Isa::Portable {
                isas.push(Isa::Avx2);
            }
            if have == Isa::Vnni {
                isas.push(Isa::Vnni);
            }
        }
        eprintln!("kernels checked: {isas:?}");
        for ty in TYPES {
            for (m, k, n) in [(1, 32, 3), (6, 96, 9), (13, 1536, 17)] {
                let mut parts = Vec::new();
                for t in [ty, QType::Q8_0] {
                    parts.push(QMatrix::quantize(t, &rng.vec(n * k), n, k).unwrap());
                }
                let w = QMatrix::stack(parts).unwrap();
                // Large activations (saturation) and a zero block (scale 0).
                let mut x: Vec<f32> = rng.vec(m * k).iter().map(|v| v * 1e4).collect();
                x[..BLOCK].fill(0.0);
                let want = run_isa(&x, m, &w, Isa::Portable);
                for &isa in &isas[1..] {
                    assert_eq!(bits(&run_isa(&x, m, &w, isa)), bits(&want), "{ty} {isa:?}");
                }
                assert_eq!(bits(&run(&x, m, &w)), bits(&want), "{ty} threaded");
            }
        }
    }

    #[test]
    fn empty_and_bad_shapes() {
        let w = QMatrix::quantize(QType::Q8_0, &[0.5; 64], 2, 32).unwrap();
        assert!(run(&[], 0, &w).is_empty());
        let y = run(&[1.0; 32], 1, &w);
        assert!(y.iter().all(|v| (v - 16.0).abs() < 0.01), "{y:?}");
        let r = std::panic::catch_unwind(|| qmatmul(&[0.0; 31], 1, &w, &mut [0.0; 2]));
        assert!(r.is_err());
    }
}
