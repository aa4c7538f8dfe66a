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
//! * `p = exp(s − max)` with [`exp`](crate::exp::exp), a fixed polynomial (so eight at a time, with
//!   the same bits as one at a time);
//! * `sum` as 8 lane sums, the `o`-th visible key in lane `o % 8`, folded by [`fold8`];
//!   the values multiply-added key by key over the visible keys in order, then scaled
//!   by `1 / sum`.

use crate::exp::exp;
#[cfg(target_arch = "x86_64")]
use crate::exp::exp8;
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

/// What one query row attends over: group `g`'s keys and values, and the score scale;
/// `warm`, the group this thread attends next, whose keys and values are prefetched
/// while these are multiplied (its first tile would otherwise wait on memory).
#[derive(Clone, Copy)]
struct Group<'a> {
    k: Kv<'a>,
    v: Kv<'a>,
    g: usize,
    scale: f32,
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    warm: Option<usize>,
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

    /// Prefetches key and value row `j` (`hd` values each) of the group to warm.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn warm(&self, j: usize, hd: usize) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        if let Some(g) = self.warm {
            for kv in [&self.k, &self.v] {
                let row = kv.row(g, j, hd).as_ptr();
                for l in (0..hd).step_by(16) {
                    // SAFETY: a prefetch never faults; the address is in the row.
                    unsafe { _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(l).cast()) };
                }
            }
        }
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
/// not see key `j`; every row sees at least one key.
///
/// Rows of one group are taken a tile at a time (up to [`TILE`] rows where the CPU has
/// the registers for it): the tile's rows share every key and value load, so a
/// group's cache is read from L2 once per tile rather than once per row (at decode,
/// its three query heads; in a tree verify, every node's three). The tiles are split
/// over the spin pool's threads. Each row's operations are those of
/// [`row_portable`], whatever its tile, the tiling or the split.
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
    let kernel = Kernel::detect(hd);
    let pool = Pool::global();
    let threads = if groups * rows * len * hd < PAR_MIN_WORK {
        1
    } else {
        pool.threads()
    };
    // The widest tile that still leaves two tiles per thread (fewer, wider tiles
    // would leave a thread idle: at decode, 3 groups of 3 rows on 2 threads).
    let tile = (1..=kernel.max_tile())
        .rev()
        .find(|&t| groups * rows.div_ceil(t) >= 2 * threads)
        .unwrap_or(1);
    let per_group = rows.div_ceil(tile);
    let tiles = groups * per_group;
    let parts = threads.min(tiles);
    let per = tiles.div_ceil(parts);
    let out = OutPtr(out.as_mut_ptr());
    let part = |p: usize| {
        let mut scratch: [Scratch; TILE] = std::array::from_fn(|_| Scratch::new(len));
        for t in p * per..((p + 1) * per).min(tiles) {
            let (g, r0) = (t / per_group, t % per_group * tile);
            let r1 = (r0 + tile).min(rows);
            let last = t + 1 == ((p + 1) * per).min(tiles);
            let warm = (!last && (t + 1) / per_group != g).then_some(g + 1);
            let rows_of = |r: usize| {
                let pair = g * rows + r;
                TileRow {
                    q: &q[pair * hd..(pair + 1) * hd],
                    hidden: hidden.map(|m| &m[r * len..(r + 1) * len]),
                    // SAFETY: each (group, row) output belongs to one tile, each tile
                    // to one part; `out` outlives the job.
                    out: unsafe { std::slice::from_raw_parts_mut(out.get().add(pair * hd), hd) },
                }
            };
            kernel.run(
                Group {
                    k,
                    v,
                    g,
                    scale,
                    warm,
                },
                r0..r1,
                &rows_of,
                len,
                &mut scratch,
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

/// Most rows in one tile: 3 rows × 8 keys of score lanes (or 3 rows × 64 value
/// outputs) take 24 of AVX-512's 32 vector registers.
const TILE: usize = 3;

/// One query row of a tile: its query, the keys it may not see, its output.
struct TileRow<'a> {
    q: &'a [f32],
    hidden: Option<&'a [bool]>,
    out: &'a mut [f32],
}

/// The row kernels this CPU runs for a head dimension.
#[derive(Clone, Copy)]
enum Kernel {
    Portable,
    /// AVX2 and FMA, one row at a time (16 vector registers).
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// The same instructions with AVX-512VL's 32 registers: tiles of up to [`TILE`].
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Kernel {
    fn detect(hd: usize) -> Kernel {
        let simd = hd.is_multiple_of(32);
        #[cfg(target_arch = "x86_64")]
        if simd && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vl") {
                return Kernel::Avx512;
            }
            return Kernel::Avx2;
        }
        let _ = simd;
        Kernel::Portable
    }

    fn max_tile(self) -> usize {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => TILE,
            _ => 1,
        }
    }

    /// Rows `rows` (at most [`Self::max_tile`]) of group `grp`; `row(r)` gives row `r`.
    fn run<'a>(
        self,
        grp: Group<'_>,
        rows: std::ops::Range<usize>,
        row: &dyn Fn(usize) -> TileRow<'a>,
        len: usize,
        scratch: &mut [Scratch; TILE],
    ) {
        match self {
            Kernel::Portable => rows.for_each(|r| {
                let TileRow { q, hidden, out } = row(r);
                row_portable(grp, q, hidden, len, out)
            }),
            // SAFETY (both): `detect` found the features and `hd` a multiple of 32.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => {
                rows.for_each(|r| unsafe { tile_avx2(grp, [row(r)], len, &mut scratch[..1]) })
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => unsafe {
                let s = rows.start;
                match rows.len() {
                    1 => tile_avx512(grp, [row(s)], len, &mut scratch[..1]),
                    2 => tile_avx512(grp, [row(s), row(s + 1)], len, &mut scratch[..2]),
                    _ => tile_avx512(
                        grp,
                        [row(s), row(s + 1), row(s + 2)],
                        len,
                        &mut scratch[..3],
                    ),
                }
            },
        }
    }
}

/// One past the last key `hidden` lets the row see (`len` without a mask).
fn visible_end(hidden: Option<&[bool]>, len: usize) -> usize {
    match hidden {
        Some(m) => m[..len].iter().rposition(|&h| !h).map_or(0, |j| j + 1),
        None => len,
    }
}

/// The index of the first `true` in `m` (`m.len()` if none), eight flags at a time: a
/// verify row's mask is a few hidden keys after hundreds of visible ones.
fn first_hidden(m: &[bool]) -> usize {
    let mut chunks = m.chunks_exact(8);
    let mut at = 0;
    for c in &mut chunks {
        let word = u64::from_ne_bytes(std::array::from_fn(|i| c[i] as u8));
        if word != 0 {
            return at + c.iter().position(|&h| h).unwrap_or(8);
        }
        at += 8;
    }
    at + chunks
        .remainder()
        .iter()
        .position(|&h| h)
        .unwrap_or(chunks.remainder().len())
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

/// [`tile`] for one row with AVX2 and FMA.
///
/// # Safety
/// The CPU has AVX2 and FMA; `hd` is a multiple of 32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2(grp: Group<'_>, rows: [TileRow<'_>; 1], len: usize, s: &mut [Scratch]) {
    unsafe { tile(grp, rows, len, s) }
}

/// [`tile`] with AVX-512VL's 32 registers (the same AVX2 instructions).
///
/// # Safety
/// The CPU has AVX2, FMA, AVX-512F and VL; `hd` is a multiple of 32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
unsafe fn tile_avx512<const R: usize>(
    grp: Group<'_>,
    rows: [TileRow<'_>; R],
    len: usize,
    s: &mut [Scratch],
) {
    unsafe { tile(grp, rows, len, s) }
}

/// [`row_portable`] for `R` rows of one group (`hd` a multiple of 32): the scores of
/// eight keys at once (their lanes folded together), each key's load shared by the
/// rows; keys a row may not see masked and the maxima taken in vectors; [`exp`] eight
/// at a time and each row's visible weights packed (so the sum and the value loop never
/// test the mask); then the values multiply-added 64 outputs at a time in registers,
/// each value load shared by the rows over the keys they all see, the rest row by row.
///
/// # Safety
/// Inlined into functions compiled with AVX2 and FMA (at least); `s` holds `R`
/// scratches for `len` keys.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn tile<const R: usize>(
    grp: Group<'_>,
    mut rows: [TileRow<'_>; R],
    len: usize,
    s: &mut [Scratch],
) {
    use std::arch::x86_64::*;
    let hd = rows[0].q.len();
    // Each row sees keys `..lead` (all of them), then some of `lead..end`.
    let (mut ends, mut lead) = ([0usize; R], [0usize; R]);
    for r in 0..R {
        ends[r] = visible_end(rows[r].hidden, len);
        lead[r] = rows[r]
            .hidden
            .map_or(ends[r], |m| first_hidden(&m[..ends[r]]));
    }
    let end = ends.iter().copied().max().unwrap_or(0);
    let neg_inf = _mm256_set1_ps(f32::NEG_INFINITY);
    let mut vmax = [neg_inf; R];
    // Scores, eight keys at a time; a last partial eight repeats key `end - 1`.
    for j0 in (0..end).step_by(8) {
        let mut keys = [std::ptr::null::<f32>(); 8];
        for (i, k) in keys.iter_mut().enumerate() {
            *k = grp.key((j0 + i).min(end - 1), hd).as_ptr();
            grp.warm((j0 + i).min(end - 1), hd);
        }
        let mut acc = [[_mm256_setzero_ps(); 8]; R];
        for c in (0..hd).step_by(8) {
            // SAFETY: c + 8 <= hd = every query's and key row's length.
            unsafe {
                let mut x = [_mm256_setzero_ps(); R];
                for r in 0..R {
                    x[r] = _mm256_loadu_ps(rows[r].q.as_ptr().add(c));
                }
                for (i, k) in keys.iter().enumerate() {
                    let kv = _mm256_loadu_ps(k.add(c));
                    for r in 0..R {
                        acc[r][i] = _mm256_fmadd_ps(x[r], kv, acc[r][i]);
                    }
                }
            }
        }
        for r in 0..R {
            let mut sc = _mm256_mul_ps(fold8x8(acc[r]), _mm256_set1_ps(grp.scale));
            // Keys at or past the row's end, or hidden from it, score -inf: the
            // maximum is that of the visible keys.
            if j0 + 8 > lead[r] {
                let mut bytes = [0u8; 8];
                for (i, b) in bytes.iter_mut().enumerate() {
                    let j = j0 + i;
                    *b = (j >= ends[r] || rows[r].hidden.is_some_and(|m| m[j])) as u8;
                }
                let hid = _mm256_cvtepu8_epi32(_mm_set1_epi64x(i64::from_le_bytes(bytes)));
                let hid = _mm256_castsi256_ps(_mm256_cmpgt_epi32(hid, _mm256_setzero_si256()));
                sc = _mm256_blendv_ps(sc, neg_inf, hid);
            }
            vmax[r] = _mm256_max_ps(vmax[r], sc);
            // SAFETY: `scores` holds `len` rounded up to 8.
            unsafe { _mm256_storeu_ps(s[r].scores.as_mut_ptr().add(j0), sc) };
        }
    }
    let mut n = [0usize; R];
    let mut inv = [0f32; R];
    // The keys every row sees from the first on: their weights share value loads.
    let mut shared = end;
    for r in 0..R {
        let max = {
            let mut m = [0f32; 8];
            // SAFETY: `m` holds 8 floats.
            unsafe { _mm256_storeu_ps(m.as_mut_ptr(), vmax[r]) };
            m.into_iter().fold(f32::NEG_INFINITY, f32::max)
        };
        // SAFETY: the caller's target features.
        (n[r], inv[r]) = unsafe { weights(&mut s[r], rows[r].hidden, lead[r], ends[r], max) };
        shared = shared.min(lead[r]);
    }
    let mut c = 0;
    while c < hd {
        // SAFETY: c + 64 (or 32) <= hd; the caller's target features.
        unsafe {
            if hd - c >= 64 {
                values::<R, 8>(grp, &mut rows, s, &n, shared, c, &inv);
                c += 64;
            } else {
                values::<R, 4>(grp, &mut rows, s, &n, shared, c, &inv);
                c += 32;
            }
        }
    }
}

/// Row `s`'s softmax weights: `exp(score − max)` of its visible keys before `end`,
/// packed in order into `s.p` (their keys into `s.keys` when `hidden` is given), and
/// `1 / Σ` with the sum in 8 lanes by visible ordinal. Keys `..lead` are all visible
/// (their ordinal is their index: eight stored at once). Returns the count and `1 / Σ`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn weights(
    s: &mut Scratch,
    hidden: Option<&[bool]>,
    lead: usize,
    end: usize,
    max: f32,
) -> (usize, f32) {
    use std::arch::x86_64::*;
    let Scratch { scores, p, keys } = s;
    let mut n = 0;
    for j0 in (0..end).step_by(8) {
        // SAFETY: `scores`, `p` and `keys` hold `len` rounded up to 8.
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
                Some(_) if j0 + 8 <= lead => {
                    _mm256_storeu_ps(p.as_mut_ptr().add(j0), e);
                    let idx = _mm256_add_epi32(
                        _mm256_set1_epi32(j0 as i32),
                        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                    );
                    _mm256_storeu_si256(keys.as_mut_ptr().add(j0).cast(), idx);
                    n = j0 + 8;
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
    (n, 1.0 / fold8(l))
}

/// Outputs `c..c + 8W` of each row: `(Σ_i p[i] · v[key i]) · inv`, the sum key by key
/// in order in `W` registers per row. The first `shared` keys (visible to every row,
/// so ordinal = key) go once through the value loads for all rows; each row then goes
/// on alone over the rest of its `n` visible keys (`key i` = `keys[i]` with a mask,
/// else `i`).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
// Register arrays indexed by row and by vector: the indices read better than zips.
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
unsafe fn values<const R: usize, const W: usize>(
    grp: Group<'_>,
    rows: &mut [TileRow<'_>; R],
    s: &mut [Scratch],
    n: &[usize; R],
    shared: usize,
    c: usize,
    inv: &[f32; R],
) {
    use std::arch::x86_64::*;
    let hd = rows[0].q.len();
    let mut acc = [[_mm256_setzero_ps(); W]; R];
    if shared > 0 {
        // Value rows `0..shared` lie `row_stride` apart: bounds checked once, for the
        // last (a plain pointer walk keeps the 3 × W accumulators in registers).
        let _ = &grp.value(shared - 1, hd)[c..c + 8 * W];
        let v0 = grp.value(0, hd)[c..].as_ptr();
        let stride = grp.v.row_stride;
        let mut p = [std::ptr::null::<f32>(); R];
        for r in 0..R {
            // `shared <= n[r]` weights each.
            p[r] = s[r].p[..shared].as_ptr();
        }
        for i in 0..shared {
            // SAFETY: row i < shared is inside the value view (checked above); every
            // `p[r]` holds `shared` weights.
            unsafe {
                let vr = v0.add(i * stride);
                let mut w = [_mm256_setzero_ps(); R];
                for r in 0..R {
                    w[r] = _mm256_set1_ps(*p[r].add(i));
                }
                for a in 0..W {
                    let v = _mm256_loadu_ps(vr.add(8 * a));
                    for r in 0..R {
                        acc[r][a] = _mm256_fmadd_ps(w[r], v, acc[r][a]);
                    }
                }
            }
        }
    }
    for r in 0..R {
        let mut acc = acc[r];
        let masked = rows[r].hidden.is_some();
        for i in shared..n[r] {
            let j = if masked { s[r].keys[i] as usize } else { i };
            let vr = grp.value(j, hd)[c..c + 8 * W].as_ptr();
            let w = _mm256_set1_ps(s[r].p[i]);
            for (a, acc) in acc.iter_mut().enumerate() {
                // SAFETY: 8 · a + 8 <= 8W values from `vr`.
                *acc = _mm256_fmadd_ps(w, unsafe { _mm256_loadu_ps(vr.add(8 * a)) }, *acc);
            }
        }
        let inv = _mm256_set1_ps(inv[r]);
        let o = rows[r].out[c..c + 8 * W].as_mut_ptr();
        for (a, acc) in acc.iter().enumerate() {
            // SAFETY: `o` holds 8W values of the row's output.
            unsafe { _mm256_storeu_ps(o.add(8 * a), _mm256_mul_ps(*acc, inv)) };
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::Rng;

    /// The kernels this CPU runs, the portable one first.
    fn kernels(hd: usize) -> Vec<Kernel> {
        #[allow(unused_mut)]
        let mut ks = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        match Kernel::detect(hd) {
            Kernel::Avx512 => ks.extend([Kernel::Avx2, Kernel::Avx512]),
            Kernel::Avx2 => ks.push(Kernel::Avx2),
            Kernel::Portable => {}
        }
        ks
    }

    fn bits(x: &[f32]) -> Vec<u32> {
        x.iter().map(|v| v.to_bits()).collect()
    }

    /// Masks over `len` keys: none, scattered, a hidden tail, and a tree's (the
    /// prefix visible, its last keys hidden by row).
    fn masks(len: usize, r: usize) -> Vec<Option<Vec<bool>>> {
        vec![
            None,
            Some((0..len).map(|j| j % 3 == 1).collect()),
            Some((0..len).map(|j| j > len / 2).collect()),
            Some(
                (0..len)
                    .map(|j| j + 6 > len && (j + r) % 2 == 0 && j > 0)
                    .collect(),
            ),
        ]
    }

    /// Every kernel's tiles of 1..=its widest rows give each row the portable row's
    /// bits, with the rows' masks and ends differing inside a tile, for lengths that
    /// leave 0..7 keys after the groups of eight.
    #[test]
    fn tiles_equal_portable_rows_bitwise() {
        let mut rng = Rng(9);
        for (hd, len) in [(64, 1), (64, 7), (32, 130), (128, 33), (96, 517)] {
            let (kd, vd) = (rng.vec(2 * len * hd), rng.vec(2 * len * hd));
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
                warm: Some(0),
            };
            // Large queries: peaked softmax weights, some below exp's range.
            let qs: Vec<Vec<f32>> = (0..TILE)
                .map(|_| rng.vec(hd).iter().map(|x| x * 8.0).collect())
                .collect();
            for kernel in kernels(hd) {
                for rows in 1..=kernel.max_tile() {
                    for pick in 0..16usize {
                        let ms: Vec<Option<Vec<bool>>> = (0..rows)
                            .map(|r| masks(len, r)[(pick >> r) % 4].clone())
                            .collect();
                        let want: Vec<Vec<u32>> = (0..rows)
                            .map(|r| {
                                let mut o = vec![0f32; hd];
                                row_portable(grp, &qs[r], ms[r].as_deref(), len, &mut o);
                                bits(&o)
                            })
                            .collect();
                        let mut out = vec![f32::NAN; rows * hd];
                        let outs = std::cell::RefCell::new(
                            out.chunks_mut(hd).map(Some).collect::<Vec<_>>(),
                        );
                        let row_of = |r: usize| TileRow {
                            q: &qs[r],
                            hidden: ms[r].as_deref(),
                            out: outs.borrow_mut()[r].take().expect("each row once"),
                        };
                        let mut scratch = std::array::from_fn(|_| Scratch::new(len));
                        kernel.run(grp, 0..rows, &row_of, len, &mut scratch);
                        drop(outs);
                        for r in 0..rows {
                            assert_eq!(
                                bits(&out[r * hd..(r + 1) * hd]),
                                want[r],
                                "hd {hd}, len {len}, rows {rows}, row {r}, masks {pick}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// `attend` over every (group, row) — tiles and threads as it picks them — gives
    /// the portable rows' bits.
    #[test]
    fn attend_equals_portable_rows_bitwise() {
        let mut rng = Rng(11);
        let (hd, len, groups) = (64, 600, 3);
        let (kd, vd) = (rng.vec(groups * len * hd), rng.vec(groups * len * hd));
        let view = |data| Kv {
            data,
            offset: 0,
            group_stride: len * hd,
            row_stride: hd,
        };
        for rows in [1, 2, 3, 4, 7, 12, 27] {
            let q = rng.vec(groups * rows * hd);
            // A tree over the last `rows` keys: row r sees the prefix and every
            // second of the tree's keys up to its own.
            let tree = len - rows;
            let hidden: Vec<bool> = (0..rows)
                .flat_map(|r| {
                    (0..len).map(move |j| {
                        j >= tree && (j > tree + r || (j - tree) % 2 == 1 && j != tree + r)
                    })
                })
                .collect();
            for mask in [None, Some(&hidden[..])] {
                let mut out = vec![f32::NAN; groups * rows * hd];
                attend(
                    &q,
                    view(&kd),
                    view(&vd),
                    groups,
                    rows,
                    hd,
                    len,
                    0.125,
                    mask,
                    &mut out,
                );
                for g in 0..groups {
                    let grp = Group {
                        k: view(&kd),
                        v: view(&vd),
                        g,
                        scale: 0.125,
                        warm: None,
                    };
                    for r in 0..rows {
                        let pair = g * rows + r;
                        let mut want = vec![0f32; hd];
                        let m = mask.map(|m| &m[r * len..(r + 1) * len]);
                        row_portable(grp, &q[pair * hd..(pair + 1) * hd], m, len, &mut want);
                        assert_eq!(
                            bits(&out[pair * hd..(pair + 1) * hd]),
                            bits(&want),
                            "rows {rows}, group {g}, row {r}, masked {}",
                            mask.is_some()
                        );
                    }
                }
            }
        }
    }

    /// A row among hidden keys gets the bits it gets with those keys absent.
    #[test]
    fn first_hidden_finds_the_first() {
        for len in [0, 1, 7, 8, 9, 31, 517] {
            for first in 0..=len {
                let m: Vec<bool> = (0..len).map(|j| j >= first && j % 2 == first % 2).collect();
                let want = m.iter().position(|&h| h).unwrap_or(len);
                assert_eq!(first_hidden(&m), want, "len {len}, first {first}");
            }
        }
    }

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
            attend(&q, view(k), view(v), 1, 1, hd, n, 0.125, m, &mut o);
            bits(&o)
        };
        let n = kk.len() / hd;
        assert_eq!(
            run(&kd, &vd, len, Some(&hidden[..])),
            run(&kk, &vk, n, None)
        );
    }
}
