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

    /// Prefetches row `j` (`hd` values) of group `g` into L2.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn prefetch(&self, g: usize, j: usize, hd: usize) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
        let row = self.row(g, j, hd).as_ptr();
        for l in (0..hd).step_by(16) {
            // SAFETY: a prefetch never faults; the address is in the row.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(row.wrapping_add(l).cast()) };
        }
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
#[derive(Default)]
struct Scratch {
    scores: Vec<f32>,
    p: Vec<f32>,
    keys: Vec<u32>,
}

impl Scratch {
    /// Room for `len` keys (rounded up to 8); grows, never shrinks.
    fn fit(&mut self, len: usize) {
        let n = len.next_multiple_of(8);
        if self.scores.len() < n {
            self.scores.resize(n, 0.0);
            self.p.resize(n, 0.0);
            self.keys.resize(n, 0);
        }
    }
}

thread_local! {
    /// Each thread's scratches, kept between calls: a forward attends once per layer,
    /// and fresh buffers would cost an allocation (and page faults) each time.
    static SCRATCH: std::cell::RefCell<Vec<Scratch>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `q [groups, rows, hd]` (contiguous) attending over `len` keys: `out [groups, rows,
/// hd]`. `hidden` (`[rows, len]`, when given) is true where row `r` of every group may
/// not see key `j`; every row sees at least one key.
///
/// Rows of one group are taken a tile at a time (up to [`TILE`] rows where the CPU has
/// the registers for it): the tile's rows share every key and value load. A thread
/// runs up to [`BATCH`] tiles of one group together, a chunk of keys at a time (then
/// of values): each chunk comes from memory once and stays in L1 while every tile
/// multiplies it, so reading the cache overlaps the arithmetic instead of preceding
/// it (a verify step's 12 rows per group would otherwise read each group from L2 four
/// times after waiting for it once). The tiles are split over the spin pool's
/// threads. Each row's operations are those of [`row_portable`], whatever its tile,
/// batch, chunking or thread.
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
        SCRATCH.with_borrow_mut(|scratch| {
            let (first, end) = (p * per, ((p + 1) * per).min(tiles));
            let most = (end - first).min(BATCH) * TILE;
            if scratch.len() < most {
                scratch.resize_with(most, Scratch::default);
            }
            scratch[..most].iter_mut().for_each(|s| s.fit(len));
            // Batches: runs of up to BATCH tiles of one group.
            let mut batches = Vec::new();
            let mut t = first;
            while t < end {
                let g = t / per_group;
                let batch_end = end.min((g + 1) * per_group).min(t + BATCH);
                batches.push((g, t..batch_end));
                t = batch_end;
            }
            // A group split between two parts is the first part's last and the next
            // part's first; odd parts go backwards so that both reach it last, at
            // about the same time, and read it from memory once between them (the
            // next part would otherwise fetch it at its start while the first part
            // found it in L3 at its end: a third more memory on one core).
            if p % 2 == 1 {
                batches.reverse();
            }
            for (g, ts) in batches {
                let row_of = |r: usize| {
                    let pair = g * rows + r;
                    TileRow {
                        q: &q[pair * hd..(pair + 1) * hd],
                        hidden: hidden.map(|m| &m[r * len..(r + 1) * len]),
                        // SAFETY: each (group, row) output belongs to one tile, each
                        // tile to one part; `out` outlives the job.
                        out: unsafe {
                            std::slice::from_raw_parts_mut(out.get().add(pair * hd), hd)
                        },
                    }
                };
                let tiles_rows = ts.map(|t| {
                    let r0 = t % per_group * tile;
                    r0..(r0 + tile).min(rows)
                });
                kernel.run(Group { k, v, g, scale }, tiles_rows, &row_of, len, scratch);
            }
        })
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

/// Most tiles of one group a thread runs together over each chunk of keys and values
/// (their scratches take `12 B × len` per row).
const BATCH: usize = 8;

/// Bytes of keys (or values) in one chunk: a quarter of a 32 KB L1 data cache (the
/// next chunk is meanwhile fetched into L2).
#[cfg(target_arch = "x86_64")]
const CHUNK_BYTES: usize = 8 << 10;

/// One query row of a tile: its query, the keys it may not see, its output.
#[derive(Default)]
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

    /// One batch of tiles of group `grp`: each item of `tiles` is a tile's rows (at
    /// most [`Self::max_tile`], at most [`BATCH`] tiles); `row(r)` gives row `r`;
    /// `scratch` holds a scratch for `len` keys per row of the batch.
    fn run<'a>(
        self,
        grp: Group<'_>,
        tiles: impl Iterator<Item = std::ops::Range<usize>>,
        row: &dyn Fn(usize) -> TileRow<'a>,
        len: usize,
        scratch: &mut [Scratch],
    ) {
        match self {
            Kernel::Portable => tiles.flatten().for_each(|r| {
                let TileRow { q, hidden, out } = row(r);
                row_portable(grp, q, hidden, len, out)
            }),
            #[cfg(target_arch = "x86_64")]
            _ => {
                let mut batch: [Tile<'a>; BATCH] = Default::default();
                let mut n = 0;
                for rows in tiles {
                    let t = &mut batch[n];
                    t.n = rows.len();
                    for (slot, r) in t.rows.iter_mut().zip(rows) {
                        *slot = row(r);
                    }
                    n += 1;
                }
                // SAFETY: `detect` found the features and `hd` a multiple of 32; tiles
                // hold at most `max_tile` rows.
                unsafe {
                    match self {
                        Kernel::Avx2 => batch_avx2(grp, &mut batch[..n], len, scratch),
                        _ => batch_avx512(grp, &mut batch[..n], len, scratch),
                    }
                }
            }
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
    // SAFETY: a `bool` is a byte holding 0 or 1.
    let bytes: &[u8] = unsafe { std::slice::from_raw_parts(m.as_ptr().cast(), m.len()) };
    let mut chunks = bytes.chunks_exact(8);
    let mut at = 0;
    for c in &mut chunks {
        let word = u64::from_ne_bytes(c.try_into().expect("8 bytes"));
        if word != 0 {
            return at + c.iter().position(|&h| h != 0).unwrap_or(8);
        }
        at += 8;
    }
    at + chunks
        .remainder()
        .iter()
        .position(|&h| h != 0)
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

/// A tile's rows and what its passes carry from one chunk of keys to the next.
#[cfg(target_arch = "x86_64")]
#[derive(Default)]
struct Tile<'a> {
    rows: [TileRow<'a>; TILE],
    /// Rows in use.
    n: usize,
    /// Row `r` sees keys `..lead[r]` (all of them), then some of `lead[r]..ends[r]`.
    ends: [usize; TILE],
    lead: [usize; TILE],
    /// The tile's last key: `max(ends)`.
    end: usize,
    /// Each row's score maximum so far, in 8 lanes.
    vmax: [[f32; 8]; TILE],
    /// Each row's visible keys and `1 / Σ weights`, once its scores are done.
    count: [usize; TILE],
    inv: [f32; TILE],
    /// Keys every row sees from the first on: their weights share value loads.
    shared: usize,
}

/// Which rows of the next chunk a tile prefetches (into L2: in L1 they would evict the
/// chunk the batch is still multiplying) while it multiplies this one: the tiles of a
/// batch take turns by eight keys, so the fetches spread over the chunk's whole
/// arithmetic (the first tile fetching it all stalled on memory while the others had
/// nothing in flight). On this CPU's 2-core VM, against the same kernel without
/// chunks that prefetched the next group whole: a SmolLM2 forward's attention over
/// 512 cached keys went from 1.55 to 1.24 ms for 1 new token and from 2.72 to 2.10 ms
/// for 4 (medians of 15 runs, cache cold as in a forward).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Prefetch {
    /// Keys ahead (0: none).
    ahead: usize,
    part: usize,
    parts: usize,
}

#[cfg(target_arch = "x86_64")]
impl Prefetch {
    /// Whose turn key `j` (a multiple of 8) is.
    fn turn(self, j: usize) -> usize {
        (j / 8) % self.parts
    }

    /// Whether the eight keys of `turn` are this tile's to fetch; moves on by eight.
    #[inline(always)]
    fn mine(self, turn: &mut usize) -> bool {
        let mine = self.ahead > 0 && *turn == self.part;
        *turn += 1;
        if *turn == self.parts {
            *turn = 0;
        }
        mine
    }
}

/// [`batch`] for tiles of one row with AVX2 and FMA.
///
/// # Safety
/// The CPU has AVX2 and FMA; `hd` is a multiple of 32; every tile has one row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn batch_avx2(grp: Group<'_>, tiles: &mut [Tile<'_>], len: usize, s: &mut [Scratch]) {
    unsafe { batch::<1>(grp, tiles, len, s) }
}

/// [`batch`] with AVX-512VL's 32 registers (the same AVX2 instructions).
///
/// # Safety
/// The CPU has AVX2, FMA, AVX-512F and VL; `hd` is a multiple of 32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
unsafe fn batch_avx512(grp: Group<'_>, tiles: &mut [Tile<'_>], len: usize, s: &mut [Scratch]) {
    unsafe { batch::<TILE>(grp, tiles, len, s) }
}

/// Calls `$f::<R>` for a tile of `$n <= MAX` rows (`R` = `$n`), its rows as an array.
#[cfg(target_arch = "x86_64")]
macro_rules! by_rows {
    ($max:expr, $n:expr, $f:ident :: < _ $(, $w:literal)? > ($($a:expr),*)) => {
        match $n {
            1 => $f::<1 $(, $w)?>($($a),*),
            2 if $max >= 2 => $f::<2 $(, $w)?>($($a),*),
            _ if $max >= 3 => $f::<3 $(, $w)?>($($a),*),
            _ => unreachable!("a tile wider than its kernel"),
        }
    };
}

/// [`row_portable`] for a batch of tiles (of at most `MAX` rows) of one group (`hd` a
/// multiple of 32), in passes over chunks of [`CHUNK_BYTES`]: every tile's scores of
/// the chunk's keys (eight keys at once, their lanes folded together, each key's load
/// shared by the tile's rows; keys a row may not see masked and the maxima taken in
/// vectors); then each row's weights ([`exp`] eight at a time, visible weights
/// packed, so the sum and the value loop never test the mask); then every tile's
/// value sums over the chunk's values that all its rows see, 64 outputs at a time in
/// registers (kept in the rows' outputs between chunks); last, each row alone over the
/// rest of its visible keys.
///
/// # Safety
/// Inlined into functions compiled with AVX2 and FMA (at least, and 32 registers for
/// `MAX` above 1); `s` holds `TILE` scratches for `len` keys per tile.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
// Rows index the tile's arrays and its scratches alike.
#[allow(clippy::needless_range_loop)]
unsafe fn batch<const MAX: usize>(
    grp: Group<'_>,
    tiles: &mut [Tile<'_>],
    len: usize,
    s: &mut [Scratch],
) {
    let hd = tiles[0].rows[0].q.len();
    let chunk = (CHUNK_BYTES / size_of_val(tiles[0].rows[0].q)).next_multiple_of(8);
    let mut end = 0;
    for t in tiles.iter_mut() {
        for r in 0..t.n {
            let hidden = t.rows[r].hidden;
            t.ends[r] = visible_end(hidden, len);
            t.lead[r] = hidden.map_or(t.ends[r], |m| first_hidden(&m[..t.ends[r]]));
            t.vmax[r] = [f32::NEG_INFINITY; 8];
        }
        t.end = t.ends[..t.n].iter().copied().max().unwrap_or(0);
        end = end.max(t.end);
    }
    // The tiles of the batch take turns prefetching the next chunk.
    let parts = tiles.len();
    for from in (0..end).step_by(chunk) {
        for (part, (t, s)) in tiles.iter_mut().zip(s.chunks_mut(TILE)).enumerate() {
            let to = (from + chunk).min(t.end);
            let pf = Prefetch {
                ahead: chunk,
                part,
                parts,
            };
            if from < to {
                // SAFETY: the caller's target features; `from` is a multiple of 8.
                unsafe { by_rows!(MAX, t.n, scores::<_>(grp, t, s, from, to, pf)) };
            }
        }
    }
    let mut shared = 0;
    for (t, s) in tiles.iter_mut().zip(s.chunks_mut(TILE)) {
        t.shared = t.end;
        for r in 0..t.n {
            let max = t.vmax[r].into_iter().fold(f32::NEG_INFINITY, f32::max);
            // SAFETY: the caller's target features.
            (t.count[r], t.inv[r]) =
                unsafe { weights(&mut s[r], t.rows[r].hidden, t.lead[r], t.ends[r], max) };
            t.shared = t.shared.min(t.lead[r]);
        }
        shared = shared.max(t.shared);
    }
    for from in (0..shared).step_by(chunk) {
        for (part, (t, s)) in tiles.iter_mut().zip(s.chunks_mut(TILE)).enumerate() {
            let to = (from + chunk).min(t.shared);
            let mut pf = Prefetch {
                ahead: chunk,
                part,
                parts,
            };
            let mut c = 0;
            while from < to && c < hd {
                // SAFETY: c + 64 (or 32) <= hd; the caller's target features.
                unsafe {
                    if hd - c >= 64 {
                        by_rows!(MAX, t.n, values::<_, 8>(grp, t, s, from, to, c, pf));
                        c += 64;
                    } else {
                        by_rows!(MAX, t.n, values::<_, 4>(grp, t, s, from, to, c, pf));
                        c += 32;
                    }
                }
                pf.ahead = 0;
            }
        }
    }
    for (t, s) in tiles.iter_mut().zip(s.chunks_mut(TILE)) {
        for r in 0..t.n {
            let mut c = 0;
            while c < hd {
                // SAFETY: c + 64 (or 32) <= hd; the caller's target features.
                unsafe {
                    if hd - c >= 64 {
                        rest::<8>(grp, t, r, &s[r], c);
                        c += 64;
                    } else {
                        rest::<4>(grp, t, r, &s[r], c);
                        c += 32;
                    }
                }
            }
        }
    }
}

/// The scores of keys `from..to` (`from` a multiple of 8) for the `R` rows of tile
/// `t`, into the rows' scratches, and their running maxima; a last partial eight
/// repeats the tile's last key.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
// Register arrays indexed by row: the indices read better than zips.
#[allow(clippy::needless_range_loop)]
unsafe fn scores<const R: usize>(
    grp: Group<'_>,
    t: &mut Tile<'_>,
    s: &mut [Scratch],
    from: usize,
    to: usize,
    pf: Prefetch,
) {
    use std::arch::x86_64::*;
    let rows = &t.rows[..R];
    let hd = rows[0].q.len();
    let neg_inf = _mm256_set1_ps(f32::NEG_INFINITY);
    let mut vmax = [neg_inf; R];
    for r in 0..R {
        // SAFETY: `vmax` holds 8 floats per row.
        vmax[r] = unsafe { _mm256_loadu_ps(t.vmax[r].as_ptr()) };
    }
    let stride = grp.k.row_stride;
    let mut turn = pf.turn(from);
    for j0 in (from..to).step_by(8) {
        // Rows j0..=last lie `stride` apart: bounds checked for the last only.
        let last = (j0 + 7).min(t.end - 1);
        let _ = grp.key(last, hd);
        let k0 = grp.key(j0, hd).as_ptr();
        let mut keys = [std::ptr::null::<f32>(); 8];
        for (i, k) in keys.iter_mut().enumerate() {
            *k = k0.wrapping_add(((j0 + i).min(last) - j0) * stride);
        }
        if pf.mine(&mut turn) {
            for u in j0 + pf.ahead..j0 + pf.ahead + 8 {
                // Past the keys, the stream goes on into the values.
                if u < t.end {
                    grp.k.prefetch(grp.g, u, hd);
                } else if u - t.end < t.end {
                    grp.v.prefetch(grp.g, u - t.end, hd);
                }
            }
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
            if j0 + 8 > t.lead[r] {
                let mut bytes = [0u8; 8];
                for (i, b) in bytes.iter_mut().enumerate() {
                    let j = j0 + i;
                    *b = (j >= t.ends[r] || rows[r].hidden.is_some_and(|m| m[j])) as u8;
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
    for r in 0..R {
        // SAFETY: `vmax` holds 8 floats per row.
        unsafe { _mm256_storeu_ps(t.vmax[r].as_mut_ptr(), vmax[r]) };
    }
}

/// Row `s`'s softmax weights: `exp(score − max)` of its visible keys before `end`,
/// packed in order into `s.p`, and `1 / Σ` with the sum in 8 lanes by visible ordinal.
/// Keys `..lead` are all visible, so their ordinal is their index: eight are stored
/// and summed at once, and their indices are not written (readers take `i < lead` as
/// key `i`); after `lead`, each visible key's index goes into `s.keys` (when `hidden`
/// is given). Returns the count and `1 / Σ`.
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
    let max = _mm256_set1_ps(max);
    let mut lanes = _mm256_setzero_ps();
    // Ordinals `..summed` are in `lanes` already; `..n` are stored.
    let (mut n, mut summed) = (0, 0);
    for j0 in (0..end).step_by(8) {
        // SAFETY: `scores`, `p` and `keys` hold `len` rounded up to 8.
        unsafe {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores.as_ptr().add(j0)), max));
            if j0 + 8 <= lead {
                _mm256_storeu_ps(p.as_mut_ptr().add(j0), e);
                lanes = _mm256_add_ps(lanes, e);
                (n, summed) = (j0 + 8, j0 + 8);
                continue;
            }
            match hidden {
                // The last eight of an unmasked row, past `end` in part.
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
    for j0 in (summed..n).step_by(8) {
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

/// Outputs `c..c + 8W` of tile `t`'s rows summed over the values of keys `from..to`,
/// all visible to every row (ordinal = key): `Σ p[i] · v[i]` key by key in order in
/// `W` registers per row, each value load shared by the rows; the sums so far are
/// read from and left in the rows' outputs.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
// Register arrays indexed by row and by vector: the indices read better than zips.
#[allow(clippy::needless_range_loop)]
unsafe fn values<const R: usize, const W: usize>(
    grp: Group<'_>,
    t: &mut Tile<'_>,
    s: &[Scratch],
    from: usize,
    to: usize,
    c: usize,
    pf: Prefetch,
) {
    use std::arch::x86_64::*;
    let rows = &mut t.rows[..R];
    let hd = rows[0].q.len();
    let mut acc = [[_mm256_setzero_ps(); W]; R];
    if from > 0 {
        for r in 0..R {
            let o = rows[r].out[c..c + 8 * W].as_ptr();
            for a in 0..W {
                // SAFETY: `o` holds 8W values of the row's output.
                acc[r][a] = unsafe { _mm256_loadu_ps(o.add(8 * a)) };
            }
        }
    }
    // Value rows `from..to` lie `row_stride` apart: bounds checked once, for the last
    // (a plain pointer walk keeps the R × W accumulators in registers).
    let _ = &grp.value(to - 1, hd)[c..c + 8 * W];
    let v0 = grp.value(from, hd)[c..].as_ptr();
    let stride = grp.v.row_stride;
    let mut p = [std::ptr::null::<f32>(); R];
    for r in 0..R {
        // `to <= shared <= count[r]` weights each.
        p[r] = s[r].p[from..to].as_ptr();
    }
    // `from` is a multiple of 8: whether a key's row ahead is this tile's to fetch
    // is decided once per eight.
    let (mut mine, mut turn) = (false, pf.turn(from));
    for i in 0..to - from {
        if i % 8 == 0 {
            mine = pf.mine(&mut turn);
        }
        // SAFETY: row from + i < to is inside the value view (checked above); every
        // `p[r]` holds `to - from` weights.
        unsafe {
            let vr = v0.add(i * stride);
            if mine && from + i + pf.ahead < t.end {
                grp.v.prefetch(grp.g, from + i + pf.ahead, hd);
            }
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
    for r in 0..R {
        let o = rows[r].out[c..c + 8 * W].as_mut_ptr();
        for a in 0..W {
            // SAFETY: `o` holds 8W values of the row's output.
            unsafe { _mm256_storeu_ps(o.add(8 * a), acc[r][a]) };
        }
    }
}

/// Outputs `c..c + 8W` of row `r` of tile `t`: the sums over the shared keys (in its
/// output, by [`values`]) go on alone over the rest of its visible keys (`key i` =
/// `i` before the row's `lead`, else `keys[i]`), then are scaled by `1 / Σ`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn rest<const W: usize>(grp: Group<'_>, t: &mut Tile<'_>, r: usize, s: &Scratch, c: usize) {
    use std::arch::x86_64::*;
    let row = &mut t.rows[r];
    let hd = row.q.len();
    let o = row.out[c..c + 8 * W].as_mut_ptr();
    let mut acc = [_mm256_setzero_ps(); W];
    if t.shared > 0 {
        for (a, acc) in acc.iter_mut().enumerate() {
            // SAFETY: `o` holds 8W values of the row's output.
            *acc = unsafe { _mm256_loadu_ps(o.add(8 * a)) };
        }
    }
    for i in t.shared..t.count[r] {
        // Keys before `lead` are all visible: the ordinal is the key.
        let j = if i < t.lead[r] { i } else { s.keys[i] as usize };
        let vr = grp.value(j, hd)[c..c + 8 * W].as_ptr();
        let w = _mm256_set1_ps(s.p[i]);
        for (a, acc) in acc.iter_mut().enumerate() {
            // SAFETY: 8 · a + 8 <= 8W values from `vr`.
            *acc = _mm256_fmadd_ps(w, unsafe { _mm256_loadu_ps(vr.add(8 * a)) }, *acc);
        }
    }
    let inv = _mm256_set1_ps(t.inv[r]);
    for (a, acc) in acc.iter().enumerate() {
        // SAFETY: `o` holds 8W values of the row's output.
        unsafe { _mm256_storeu_ps(o.add(8 * a), _mm256_mul_ps(*acc, inv)) };
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
                    .map(|j| j + 6 > len && (j + r).is_multiple_of(2) && j > 0)
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
                        let mut scratch: Vec<Scratch> = (0..TILE)
                            .map(|_| {
                                let mut s = Scratch::default();
                                s.fit(len);
                                s
                            })
                            .collect();
                        kernel.run(grp, std::iter::once(0..rows), &row_of, len, &mut scratch);
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

    /// `attend` over every (group, row) — tiles, batches, chunks and threads as it
    /// picks them — gives the portable rows' bits.
    #[test]
    fn attend_equals_portable_rows_bitwise() {
        let mut rng = Rng(11);
        let (len, groups) = (600, 3);
        // Head sizes whose chunks of keys are 32 and 24 keys (600 is a multiple of
        // neither), and row counts up to batches of several tiles.
        for (hd, rows) in [64, 96]
            .into_iter()
            .flat_map(|hd| [1, 2, 3, 4, 7, 12, 27, 50].map(|rows| (hd, rows)))
        {
            let (kd, vd) = (rng.vec(groups * len * hd), rng.vec(groups * len * hd));
            let view = |data| Kv {
                data,
                offset: 0,
                group_stride: len * hd,
                row_stride: hd,
            };
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

    /// `first_hidden` against `position`, for lengths around multiples of eight.
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
