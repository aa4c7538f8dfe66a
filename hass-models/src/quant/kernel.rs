//! `out = x · Wᵀ` for f32 activations `x [m, k]` and a quantized `W [n, k]`, batch
//! invariant by construction.
//!
//! Each row of `x` is quantised on its own to int8 blocks of 32 with an f32 scale
//! (ggml's Q8 scheme, the scale kept in f32 rather than f16), so the integer dot
//! product of a weight block with an activation block is exact. Output `(i, j)` is then
//! one fixed sequence of f32 operations over the blocks `b` of row `j`:
//!
//! * `acc = fma(f32(Σ_e w_e · x_e), d_w · d_x, acc)`, the block's exact integer dot
//!   product scaled once;
//! * for Q4_1, `macc = fma(m_w, d_x · Σ_e x_e, macc)`;
//! * the end is `acc + macc` (`macc` = 0 for the other types).
//!
//! Nothing in it depends on `m`, the row's position, the tiling or the threads, so a
//! token verified in a tree gets bitwise the logits it gets decoded alone, and greedy
//! speculative decoding stays token-identical to vanilla decoding. Weight rows are
//! interleaved sixteen at a time (`panel`), so the lanes of a vector register are
//! sixteen output columns: the AVX-512 VNNI kernel (`vpdpbusd` with a broadcast
//! activation quad), the AVX2 kernel (`vpmaddubsw` + `vpmaddwd`, eight lanes at a time)
//! and the portable fallback compute the same integer sums and then that same
//! sequence, bit for bit.
//!
//! Threads own contiguous ranges of sixteen-row groups (each streams its weights once
//! for all rows of `x`); activations are taken `MC` rows at a time so that the
//! quantised rows a group meets stay in L2, and `MR` at a time in registers.

use super::panel::{lines_per_block, scales_per_block, Line, Panels, LANES};
use super::{QMatrix, QType, BLOCK};
use std::mem::MaybeUninit;

use crate::spin_pool::{OutPtr, Pool};

/// Activation rows per register tile.
const MR: usize = 4;
/// Activation rows per pass over the weights (their int8 blocks stay in L2).
const MC: usize = 64;
/// Blocks ahead of the one being multiplied whose weights are prefetched.
const PREFETCH: usize = 16;
/// Products below this many multiply-adds run on the calling thread alone (a part on
/// a helper costs a few microseconds to hand out and join).
const PAR_MIN_WORK: usize = 1 << 17;

/// Activations quantised per row: int8 blocks, their scales and sums.
#[derive(Default)]
struct QActs {
    nb: usize,
    q: Vec<i8>,
    d: Vec<f32>,
    /// `Σq` per block: the unsigned weight bytes' offset term.
    sum: Vec<i32>,
    /// `d · Σq` per block (Q4_1's `m` term).
    t: Vec<f32>,
}

/// [`quantize_into`] fresh buffers.
#[cfg(test)]
fn quantize_acts(x: &[f32], m: usize, k: usize) -> QActs {
    let mut a = QActs::default();
    quantize_into(x, m, k, &mut a);
    a
}

thread_local! {
    /// Each thread's activation buffers, reused from product to product: a
    /// forward runs ~120 products, and fresh zeroed buffers for each cost more than
    /// quantising into them.
    static ACTS: std::cell::RefCell<QActs> = std::cell::RefCell::default();
}

/// Quantises each row of `x [m, k]` into `a`'s int8 blocks of 32: `d = max|x| / 127`,
/// `q = round_ties_even(clamp(x · (1 / d), ±127))` (NaN to 0), `Σq` and `d · Σq`.
/// With AVX-512 sixteen values at a time ([`quantize_block_avx512`], the same bits).
/// `a`'s buffers grow as needed and may stay longer than `m` rows (their tail is never
/// read).
fn quantize_into(x: &[f32], m: usize, k: usize, a: &mut QActs) {
    let nb = k / BLOCK;
    a.nb = nb;
    if a.q.len() < m * k {
        a.q.resize(m * k, 0);
    }
    if a.d.len() < m * nb {
        a.d.resize(m * nb, 0.0);
        a.sum.resize(m * nb, 0);
        a.t.resize(m * nb, 0.0);
    }
    #[cfg(target_arch = "x86_64")]
    let simd = is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw");
    for (bi, (xb, qb)) in x
        .chunks_exact(BLOCK)
        .zip(a.q.chunks_exact_mut(BLOCK))
        .enumerate()
    {
        let (xb, qb) = (
            xb.try_into().expect("a block"),
            qb.try_into().expect("a block"),
        );
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512F and BW checked above.
        let (d, sum) = if simd {
            unsafe { quantize_block_avx512(xb, qb) }
        } else {
            quantize_block(xb, qb)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let (d, sum) = quantize_block(xb, qb);
        a.d[bi] = d;
        a.sum[bi] = sum;
        a.t[bi] = d * sum as f32;
    }
}

/// One block of [`quantize_into`]: its scale `d` and `Σq`.
fn quantize_block(xb: &[f32; BLOCK], qb: &mut [i8; BLOCK]) -> (f32, i32) {
    let amax = xb.iter().fold(0f32, |acc, v| acc.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (q, &v) in qb.iter_mut().zip(xb) {
        // Adding and subtracting 1.5 · 2²³ rounds |v| ≤ 127 to the nearest integer,
        // ties to even; a NaN stays NaN through both and `as` makes it 0.
        const ROUND: f32 = 12_582_912.0;
        *q = (((v * id).clamp(-127.0, 127.0) + ROUND) - ROUND) as i8;
        sum += *q as i32;
    }
    (d, sum)
}

/// [`quantize_block`] sixteen values at a time: `vcvtps2dq` rounds ties to even, as
/// the `ROUND` trick does, and the maximum of |x| is exact in any order.
///
/// # Safety
/// The CPU has AVX-512F and BW.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_block_avx512(xb: &[f32; BLOCK], qb: &mut [i8; BLOCK]) -> (f32, i32) {
    use std::arch::x86_64::*;
    // SAFETY: two loads and stores of sixteen inside the 32-value blocks.
    unsafe {
        // NaN lanes as 0 (the scalar path ignores them in the maximum and gives 0).
        let load = |p: *const f32| {
            let v = _mm512_loadu_ps(p);
            _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_ORD_Q>(v, v), v)
        };
        let x = [load(xb.as_ptr()), load(xb.as_ptr().add(16))];
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x[0]), _mm512_abs_ps(x[1])));
        let d = amax / 127.0;
        let id = _mm512_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
        let mut sum = _mm512_setzero_si512();
        for (h, &v) in x.iter().enumerate() {
            let c = _mm512_mul_ps(v, id);
            let c = _mm512_min_ps(
                _mm512_max_ps(c, _mm512_set1_ps(-127.0)),
                _mm512_set1_ps(127.0),
            );
            let q = _mm512_cvtps_epi32(c);
            sum = _mm512_add_epi32(sum, q);
            _mm_storeu_si128(qb.as_mut_ptr().add(16 * h).cast(), _mm512_cvtepi32_epi8(q));
        }
        (d, _mm512_reduce_add_epi32(sum))
    }
}

/// `out[m×n] = x[m×k] · Wᵀ` with `W = w` (`n × k`), all row-major; `out` is
/// overwritten. Panics (assert!) on slice lengths inconsistent with the shapes.
pub fn qmatmul(x: &[f32], m: usize, w: &QMatrix, out: &mut [f32]) {
    // SAFETY: `MaybeUninit<f32>` has `f32`'s layout, and only f32 values are written.
    let out = unsafe { &mut *(out as *mut [f32] as *mut [MaybeUninit<f32>]) };
    qmatmul_uninit(x, m, w, out);
}

/// [`qmatmul`] into a buffer not yet initialised (an output tensor's fresh storage,
/// which would otherwise be zeroed only to be overwritten): every element of `out`
/// is written.
pub fn qmatmul_uninit(x: &[f32], m: usize, w: &QMatrix, out: &mut [MaybeUninit<f32>]) {
    let (n, k) = (w.rows, w.cols);
    check_shapes(x, m, k, out.len(), n);
    if m == 0 || n == 0 {
        return;
    }
    let (out, isa) = (OutPtr(out.as_mut_ptr().cast()), Isa::detect());
    let groups = w.groups();
    let parts = parts(m * k * n, groups);
    let per = groups.div_ceil(parts);
    // Every part quantises the activations itself, into its thread's buffers: the
    // threads do it at the same time, and no core reads int8 rows that the other has
    // just written. With the caller quantising for both, a 4-row 576 × 576 product
    // took 12.6–13.0 µs in cache, against 5.1–6.6 µs so.
    let part = |p: usize| {
        ACTS.with_borrow_mut(|acts| {
            quantize_into(x, m, k, acts);
            let job = Job {
                w,
                acts,
                m,
                out,
                stride: n,
                shift: 0,
                isa,
            };
            job.groups(p * per, ((p + 1) * per).min(groups))
        })
    };
    run_parts(parts, &part);
}

/// Panics (assert!) unless `x` holds `m × k` values and the output `m × n`.
fn check_shapes(x: &[f32], m: usize, k: usize, out_len: usize, n: usize) {
    assert_eq!(Some(x.len()), m.checked_mul(k), "x must hold m*k values");
    assert_eq!(Some(out_len), m.checked_mul(n), "out must hold m*n values");
}

/// How many threads share a product of `work` multiply-adds over `units` units.
fn parts(work: usize, units: usize) -> usize {
    if work < PAR_MIN_WORK {
        1
    } else {
        rayon::current_num_threads()
            .min(Pool::global().threads())
            .min(units)
            .max(1)
    }
}

/// `part(0..parts)`, on the spin pool's threads when there are several.
fn run_parts(parts: usize, part: &(dyn Fn(usize) + Sync)) {
    match parts {
        1 => part(0),
        _ => Pool::global().run(parts, part),
    }
}

thread_local! {
    /// Each thread's gate and up columns of [`qmatmul_swiglu_uninit`] and a row of
    /// their SwiGLU, reused.
    static GATE_UP: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const {
        std::cell::RefCell::new((Vec::new(), Vec::new()))
    };
}

/// `silu(x · Gᵀ) · (x · Uᵀ)` for `w` holding the gate rows `G` then the up rows `U`
/// (`2n` rows): `out [m, n]`, every element written, the bits of [`qmatmul`] then
/// [`host_ops::swiglu`](crate::host_ops::swiglu). Each thread computes the gate and up
/// columns of its own outputs and applies SwiGLU to them, so the `[m, 2n]` product
/// never crosses between the cores (a separate SwiGLU read half of every row from the
/// core that had computed it) and takes no pass of its own. With `n` not a multiple
/// of 16 (a group holding gate and up rows) it is that product and SwiGLU.
pub fn qmatmul_swiglu_uninit(x: &[f32], m: usize, w: &QMatrix, out: &mut [MaybeUninit<f32>]) {
    let (k, n) = (w.cols, w.rows / 2);
    assert!(w.rows.is_multiple_of(2), "gate and up rows: an even count");
    check_shapes(x, m, k, out.len(), n);
    if m == 0 || n == 0 {
        return;
    }
    if !n.is_multiple_of(LANES) {
        let mut gu = vec![0f32; m * 2 * n];
        qmatmul(x, m, w, &mut gu);
        let mut silu = vec![0f32; m * n];
        crate::host_ops::swiglu(&gu, n, &mut silu);
        out.iter_mut().zip(silu).for_each(|(o, v)| {
            o.write(v);
        });
        return;
    }
    let (out, isa) = (OutPtr(out.as_mut_ptr().cast()), Isa::detect());
    // Pair `g`: gate group `g` and up group `pairs + g`, output columns `16g..16g + 16`.
    let pairs = n / LANES;
    let parts = parts(m * k * 2 * n, pairs);
    let per = pairs.div_ceil(parts);
    let part = |p: usize| {
        let (g0, g1) = (p * per, ((p + 1) * per).min(pairs));
        let width = g1.saturating_sub(g0) * LANES;
        if width == 0 {
            return;
        }
        GATE_UP.with_borrow_mut(|(gu, silu)| {
            if gu.len() < m * 2 * width {
                gu.resize(m * 2 * width, 0.0);
            }
            silu.resize(width, 0.0);
            let scratch = OutPtr(gu.as_mut_ptr());
            ACTS.with_borrow_mut(|acts| {
                quantize_into(x, m, k, acts);
                // Rows of `[gate | up]` for this part's columns: the gate columns
                // `16 g0..` go to 0.., the up columns `n + 16 g0..` to `width..`.
                let job = |shift| Job {
                    w,
                    acts,
                    m,
                    out: scratch,
                    stride: 2 * width,
                    shift,
                    isa,
                };
                job(g0 * LANES).groups(g0, g1);
                job(n + g0 * LANES - width).groups(pairs + g0, pairs + g1);
            });
            for (r, row) in gu.chunks_exact(2 * width).take(m).enumerate() {
                crate::host_ops::swiglu_rows(row, width, silu);
                // SAFETY: row `r`'s columns `16 g0..16 g1` are inside `out` and this
                // part's alone; a raw copy (`out` is not yet initialised).
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        silu.as_ptr(),
                        out.get().add(r * n + g0 * LANES),
                        width,
                    )
                };
            }
        })
    };
    run_parts(parts, &part);
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
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni")
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
    /// Output `(i, j)` goes to `out[i · stride + j − shift]`.
    out: OutPtr,
    stride: usize,
    shift: usize,
    isa: Isa,
}

impl Job<'_> {
    /// Groups `g0..g1`, counted over the segments one after another.
    fn groups(&self, g0: usize, g1: usize) {
        let (mut first_group, mut first_row) = (0, 0);
        for seg in &self.w.segments {
            let p = &seg.0;
            let (a, b) = (g0.max(first_group), g1.min(first_group + p.groups()));
            if a < b {
                let span = Span {
                    p,
                    g0: a - first_group,
                    g1: b - first_group,
                    col0: first_row,
                };
                // SAFETY: the groups are inside the segment; their output columns are
                // this part's alone; the ISA was detected on this CPU.
                unsafe { self.span(span) };
            }
            first_group += p.groups();
            first_row += p.rows;
        }
    }

    unsafe fn span(&self, s: Span) {
        unsafe {
            match (self.isa, s.p.ty) {
                (Isa::Portable, QType::Q8_0) => span::<Portable, Q8>(self, s),
                (Isa::Portable, QType::Q4_0) => span::<Portable, Q40>(self, s),
                (Isa::Portable, QType::Q4_1) => span::<Portable, Q41>(self, s),
                #[cfg(target_arch = "x86_64")]
                (Isa::Avx2, _) => span_avx2(self, s),
                #[cfg(target_arch = "x86_64")]
                (Isa::Vnni, _) => span_vnni(self, s),
            }
        }
    }
}

/// Groups `g0..g1` of one segment, whose first row is output column `col0`.
#[derive(Clone, Copy)]
struct Span<'a> {
    p: &'a Panels,
    g0: usize,
    g1: usize,
    col0: usize,
}

/// A block type's layout in the panels.
trait Kind {
    const TY: QType;
    const LINES: usize = lines_per_block(Self::TY);
    const SCALES: usize = scales_per_block(Self::TY);
    /// Two weights per byte.
    const NIBBLES: bool;
    /// What the unsigned bytes of the lines exceed the weights by: the integer dot
    /// product is `Σ u · x − OFFSET · Σx`.
    const OFFSET: i32;
    /// Q4_1's `m` term.
    const MIN: bool;
}

struct Q8;
struct Q40;
struct Q41;

impl Kind for Q8 {
    const TY: QType = QType::Q8_0;
    const NIBBLES: bool = false;
    const OFFSET: i32 = 128;
    const MIN: bool = false;
}

impl Kind for Q40 {
    const TY: QType = QType::Q4_0;
    const NIBBLES: bool = true;
    const OFFSET: i32 = 8;
    const MIN: bool = false;
}

impl Kind for Q41 {
    const TY: QType = QType::Q4_1;
    const NIBBLES: bool = true;
    const OFFSET: i32 = 0;
    const MIN: bool = true;
}

/// The unsigned byte of weight `e` (0..32) of lane `j` in one block's lines.
#[inline(always)]
fn unsigned_weight<K: Kind>(lines: &[Line], j: usize, e: usize) -> i32 {
    if K::NIBBLES {
        let byte = lines[(e % 16) / 4].0[4 * j + e % 4];
        (if e < 16 { byte & 0x0F } else { byte >> 4 }) as i32
    } else {
        lines[e / 4].0[4 * j + e % 4] as i32
    }
}

/// f16 bits as f32.
#[inline(always)]
fn f16(bits: u16) -> f32 {
    half::f16::from_bits(bits).to_f32()
}

/// The row-tile kernels of one instruction set.
trait Tile {
    /// Outputs `(r0 + r, 16g + j)` for `r < R`, `j < 16` of group `g`.
    unsafe fn tile<K: Kind, const R: usize>(
        p: &Panels,
        g: usize,
        a: &QActs,
        r0: usize,
    ) -> [[f32; LANES]; R];
}

/// Loop nest shared by every instruction set: `MC`-row chunks, then groups, each with
/// `MR`-row tiles and one tile of the rows left (1..3).
#[inline(always)]
unsafe fn span<T: Tile, K: Kind>(job: &Job<'_>, s: Span<'_>) {
    let (m, n, a) = (job.m, job.stride, job.acts);
    for c0 in (0..m).step_by(MC) {
        let c1 = (c0 + MC).min(m);
        for g in s.g0..s.g1 {
            let j0 = s.col0 + g * LANES - job.shift;
            let width = LANES.min(s.p.rows - g * LANES);
            let put = |r0: usize, v: &[[f32; LANES]]| {
                for (r, v) in v.iter().enumerate() {
                    // SAFETY: row `r0 + r` < m; columns `j0..j0 + width` are inside
                    // `out` and in this part's groups.
                    unsafe {
                        let to = job.out.0.add((r0 + r) * n + j0);
                        // A whole group's copy has a constant size: inlined, where a
                        // variable one called `memcpy` per row and group.
                        if width == LANES {
                            to.cast::<[f32; LANES]>().write_unaligned(*v);
                        } else {
                            std::ptr::copy_nonoverlapping(v.as_ptr(), to, width);
                        }
                    };
                }
            };
            let mut r0 = c0;
            unsafe {
                while r0 + MR <= c1 {
                    put(r0, &T::tile::<K, MR>(s.p, g, a, r0));
                    r0 += MR;
                }
                match c1 - r0 {
                    1 => put(r0, &T::tile::<K, 1>(s.p, g, a, r0)),
                    2 => put(r0, &T::tile::<K, 2>(s.p, g, a, r0)),
                    3 => put(r0, &T::tile::<K, 3>(s.p, g, a, r0)),
                    _ => {}
                }
            }
        }
    }
}

/// Plain Rust: the reference the SIMD kernels match bit for bit.
struct Portable;

impl Tile for Portable {
    #[inline(always)]
    unsafe fn tile<K: Kind, const R: usize>(
        p: &Panels,
        g: usize,
        a: &QActs,
        r0: usize,
    ) -> [[f32; LANES]; R] {
        let nb = a.nb;
        let mut acc = [[0f32; LANES]; R];
        let mut macc = [[0f32; LANES]; R];
        for b in 0..nb {
            let gb = g * nb + b;
            let lines = &p.lines[gb * K::LINES..(gb + 1) * K::LINES];
            let sc = &p.scales[gb * K::SCALES..(gb + 1) * K::SCALES];
            for r in 0..R {
                let i = (r0 + r) * nb + b;
                let xq = &a.q[i * BLOCK..(i + 1) * BLOCK];
                for j in 0..LANES {
                    let u: i32 = (0..BLOCK)
                        .map(|e| unsigned_weight::<K>(lines, j, e) * xq[e] as i32)
                        .sum();
                    let dot = u - K::OFFSET * a.sum[i];
                    acc[r][j] = (dot as f32).mul_add(f16(sc[j]) * a.d[i], acc[r][j]);
                    if K::MIN {
                        macc[r][j] = f16(sc[LANES + j]).mul_add(a.t[i], macc[r][j]);
                    }
                }
            }
        }
        std::array::from_fn(|r| std::array::from_fn(|j| acc[r][j] + macc[r][j]))
    }
}

// Register arrays indexed by activation row `r`: several arrays per row, so the index
// reads better than zipped iterators.
#[allow(clippy::needless_range_loop)]
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::*;

    /// Bytes `o..o + 4` of the quantised activation block `i`, in every int32 lane
    /// (an embedded-broadcast operand of the dot product).
    #[inline(always)]
    unsafe fn quad<V>(a: &QActs, i: usize, o: usize, set1: impl Fn(i32) -> V) -> V {
        unsafe { set1((a.q.as_ptr().add(i * BLOCK + o) as *const i32).read_unaligned()) }
    }

    /// AVX-512 VNNI: all sixteen lanes of a group in one register.
    pub(super) struct Vnni;

    impl Tile for Vnni {
        #[inline(always)]
        unsafe fn tile<K: Kind, const R: usize>(
            p: &Panels,
            g: usize,
            a: &QActs,
            r0: usize,
        ) -> [[f32; LANES]; R] {
            unsafe {
                let nb = a.nb;
                let lines = p.lines.as_ptr().add(g * nb * K::LINES);
                let sc = p.scales.as_ptr().add(g * nb * K::SCALES);
                let low = _mm512_set1_epi8(0x0F);
                let mut acc = [_mm512_setzero_ps(); R];
                let mut macc = [_mm512_setzero_ps(); R];
                for b in 0..nb {
                    let i = |r: usize| (r0 + r) * nb + b;
                    // Two chains of `vpdpbusd` per row; integer sums, so any split is
                    // exact.
                    let mut s0 = [_mm512_setzero_si512(); R];
                    let mut s1 = [_mm512_setzero_si512(); R];
                    if K::OFFSET != 0 {
                        for r in 0..R {
                            s0[r] = _mm512_set1_epi32(-K::OFFSET * *a.sum.get_unchecked(i(r)));
                        }
                    }
                    for c in 0..K::LINES {
                        _mm_prefetch::<_MM_HINT_T0>(
                            lines.wrapping_add((b + PREFETCH) * K::LINES + c).cast(),
                        );
                        let wv = _mm512_load_si512(lines.add(b * K::LINES + c).cast());
                        if K::NIBBLES {
                            let lo = _mm512_and_si512(wv, low);
                            let hi = _mm512_and_si512(_mm512_srli_epi16(wv, 4), low);
                            for r in 0..R {
                                let xl = quad(a, i(r), 4 * c, |v| _mm512_set1_epi32(v));
                                let xh = quad(a, i(r), 16 + 4 * c, |v| _mm512_set1_epi32(v));
                                s0[r] = _mm512_dpbusd_epi32(s0[r], lo, xl);
                                s1[r] = _mm512_dpbusd_epi32(s1[r], hi, xh);
                            }
                        } else {
                            for r in 0..R {
                                let x = quad(a, i(r), 4 * c, |v| _mm512_set1_epi32(v));
                                if c % 2 == 0 {
                                    s0[r] = _mm512_dpbusd_epi32(s0[r], wv, x);
                                } else {
                                    s1[r] = _mm512_dpbusd_epi32(s1[r], wv, x);
                                }
                            }
                        }
                    }
                    let scales = sc.add(b * K::SCALES);
                    let dw = _mm512_cvtph_ps(_mm256_loadu_si256(scales.cast()));
                    for r in 0..R {
                        let dot = _mm512_cvtepi32_ps(_mm512_add_epi32(s0[r], s1[r]));
                        let s = _mm512_mul_ps(dw, _mm512_set1_ps(*a.d.get_unchecked(i(r))));
                        acc[r] = _mm512_fmadd_ps(dot, s, acc[r]);
                    }
                    if K::MIN {
                        let mw = _mm512_cvtph_ps(_mm256_loadu_si256(scales.add(LANES).cast()));
                        for r in 0..R {
                            let t = _mm512_set1_ps(*a.t.get_unchecked(i(r)));
                            macc[r] = _mm512_fmadd_ps(mw, t, macc[r]);
                        }
                    }
                }
                // Plain loops: a closure (`array::from_fn`) is compiled without this
                // function's target features.
                let mut out = [[0f32; LANES]; R];
                for r in 0..R {
                    _mm512_storeu_ps(out[r].as_mut_ptr(), _mm512_add_ps(acc[r], macc[r]));
                }
                out
            }
        }
    }

    /// AVX2: the group's lanes eight at a time (each half of every line).
    pub(super) struct Avx2;

    impl Tile for Avx2 {
        #[inline(always)]
        unsafe fn tile<K: Kind, const R: usize>(
            p: &Panels,
            g: usize,
            a: &QActs,
            r0: usize,
        ) -> [[f32; LANES]; R] {
            unsafe {
                let nb = a.nb;
                let lines = p.lines.as_ptr().add(g * nb * K::LINES) as *const u8;
                let sc = p.scales.as_ptr().add(g * nb * K::SCALES);
                let low = _mm256_set1_epi8(0x0F);
                let ones = _mm256_set1_epi16(1);
                let mut out = [[0f32; LANES]; R];
                for h in 0..2 {
                    let mut acc = [_mm256_setzero_ps(); R];
                    let mut macc = [_mm256_setzero_ps(); R];
                    for b in 0..nb {
                        let i = |r: usize| (r0 + r) * nb + b;
                        let mut s = [_mm256_setzero_si256(); R];
                        // Q8_0 takes the signs over to the activations (`vpmaddubsw`
                        // needs unsigned × signed, and 255 · 127 · 2 would saturate),
                        // so only the nibbles keep their offset.
                        if K::NIBBLES && K::OFFSET != 0 {
                            for r in 0..R {
                                s[r] = _mm256_set1_epi32(-K::OFFSET * *a.sum.get_unchecked(i(r)));
                            }
                        }
                        for c in 0..K::LINES {
                            if h == 0 {
                                _mm_prefetch::<_MM_HINT_T0>(
                                    lines
                                        .wrapping_add((b + PREFETCH) * K::LINES * 64 + c * 64)
                                        .cast(),
                                );
                            }
                            let wv = _mm256_load_si256(
                                lines.add((b * K::LINES + c) * 64 + 32 * h).cast(),
                            );
                            let dot = |u: __m256i, x: __m256i| {
                                _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), ones)
                            };
                            if K::NIBBLES {
                                let lo = _mm256_and_si256(wv, low);
                                let hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), low);
                                for r in 0..R {
                                    let xl = quad(a, i(r), 4 * c, |v| _mm256_set1_epi32(v));
                                    let xh = quad(a, i(r), 16 + 4 * c, |v| _mm256_set1_epi32(v));
                                    let d = _mm256_add_epi32(dot(lo, xl), dot(hi, xh));
                                    s[r] = _mm256_add_epi32(s[r], d);
                                }
                            } else {
                                let w = _mm256_xor_si256(wv, _mm256_set1_epi8(-128));
                                let u = _mm256_abs_epi8(w);
                                for r in 0..R {
                                    let x = quad(a, i(r), 4 * c, |v| _mm256_set1_epi32(v));
                                    let d = dot(u, _mm256_sign_epi8(x, w));
                                    s[r] = _mm256_add_epi32(s[r], d);
                                }
                            }
                        }
                        let scales = sc.add(b * K::SCALES + 8 * h);
                        let dw = _mm256_cvtph_ps(_mm_loadu_si128(scales.cast()));
                        for r in 0..R {
                            let sd = _mm256_mul_ps(dw, _mm256_set1_ps(*a.d.get_unchecked(i(r))));
                            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[r]), sd, acc[r]);
                        }
                        if K::MIN {
                            let mw = _mm256_cvtph_ps(_mm_loadu_si128(scales.add(LANES).cast()));
                            for r in 0..R {
                                let t = _mm256_set1_ps(*a.t.get_unchecked(i(r)));
                                macc[r] = _mm256_fmadd_ps(mw, t, macc[r]);
                            }
                        }
                    }
                    for r in 0..R {
                        let v = _mm256_add_ps(acc[r], macc[r]);
                        _mm256_storeu_ps(out[r].as_mut_ptr().add(8 * h), v);
                    }
                }
                out
            }
        }
    }
}

/// `span` compiled for AVX2 + FMA + F16C.
///
/// # Safety
/// As `span`, on a CPU with those features.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn span_avx2(job: &Job<'_>, s: Span<'_>) {
    unsafe {
        match s.p.ty {
            QType::Q8_0 => span::<x86::Avx2, Q8>(job, s),
            QType::Q4_0 => span::<x86::Avx2, Q40>(job, s),
            QType::Q4_1 => span::<x86::Avx2, Q41>(job, s),
        }
    }
}

/// `span` compiled for AVX-512 (F, BW) and VNNI on top of AVX2.
///
/// # Safety
/// As `span`, on a CPU with those features.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
unsafe fn span_vnni(job: &Job<'_>, s: Span<'_>) {
    unsafe {
        match s.p.ty {
            QType::Q8_0 => span::<x86::Vnni, Q8>(job, s),
            QType::Q4_0 => span::<x86::Vnni, Q40>(job, s),
            QType::Q4_1 => span::<x86::Vnni, Q41>(job, s),
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
            stride: w.rows,
            shift: 0,
            isa,
        };
        job.groups(0, w.groups());
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

    /// The fused SwiGLU product gives the product's bits passed through
    /// `host_ops::swiglu`: each type, a gate and up of different types, row counts
    /// across tiles, chunks and threads, and a width that is not a multiple of 16.
    #[test]
    fn swiglu_product_is_product_then_swiglu() {
        let mut rng = Rng(6);
        let pairs = [
            (QType::Q4_1, QType::Q4_1),
            (QType::Q8_0, QType::Q8_0),
            (QType::Q4_0, QType::Q4_0),
            (QType::Q4_1, QType::Q8_0),
        ];
        for (gate, up) in pairs {
            for (n, k) in [(48, 64), (40, 96), (192, 576)] {
                let w = QMatrix::stack(vec![
                    QMatrix::quantize(gate, &rng.vec(n * k), n, k).unwrap(),
                    QMatrix::quantize(up, &rng.vec(n * k), n, k).unwrap(),
                ])
                .unwrap();
                for m in [1, 4, 5, 70] {
                    let x = rng.vec(m * k);
                    let mut want = vec![0f32; m * n];
                    crate::host_ops::swiglu(&run(&x, m, &w), n, &mut want);
                    let mut got = vec![MaybeUninit::new(f32::NAN); m * n];
                    qmatmul_swiglu_uninit(&x, m, &w, &mut got);
                    // SAFETY: initialised above (and overwritten).
                    let got: Vec<f32> = got.iter().map(|v| unsafe { v.assume_init() }).collect();
                    assert_eq!(bits(&got), bits(&want), "{gate}/{up} n={n} k={k} m={m}");
                }
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

    /// The vector activation quantiser gives the scalar one's bits: ties, the clamp,
    /// zero and NaN blocks.
    #[test]
    fn activation_quantisers_agree() {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
            let mut rng = Rng(4);
            let mut blocks: Vec<[f32; BLOCK]> = (0..200)
                .map(|i| {
                    let v = rng.vec(BLOCK);
                    std::array::from_fn(|e| v[e] * 10f32.powi(i % 7 - 3))
                })
                .collect();
            // Ties at the scale: values 0.5, 1.5, ... steps of d = 127 / 127 = 1.
            blocks.push(std::array::from_fn(|e| {
                if e == 0 {
                    127.0
                } else {
                    e as f32 - 15.5
                }
            }));
            blocks.push([0.0; BLOCK]);
            // NaNs in both sixteen-value halves.
            blocks.push(std::array::from_fn(|e| {
                if e % 16 == 3 {
                    f32::NAN
                } else {
                    e as f32
                }
            }));
            blocks.push(std::array::from_fn(|e| {
                if e == 5 {
                    -0.0
                } else {
                    -(e as f32) * 1e30
                }
            }));
            for xb in &blocks {
                let (mut want, mut got) = ([0i8; BLOCK], [0i8; BLOCK]);
                let a = quantize_block(xb, &mut want);
                // SAFETY: checked above.
                let b = unsafe { quantize_block_avx512(xb, &mut got) };
                assert_eq!(
                    (a.0.to_bits(), a.1, want),
                    (b.0.to_bits(), b.1, got),
                    "{xb:?}"
                );
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
