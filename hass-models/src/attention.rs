//! Attention of a few query rows over the KV cache on the host, one row at a time.
//!
//! Burn's batched matmul blocks its products by shape: the same query row attended
//! alone (a decode step) and among 27 rows (a 9-node tree with 3 query heads per KV
//! head) rounded differently (up to 4e-5 in SmolLM2's f32 logits, and whole int8
//! steps once activations are quantized), which broke greedy speculative decoding's
//! token-for-token equality with vanilla decoding. Here every output row is one fixed
//! sequence of operations over the visible keys whatever the other rows: scores as
//! 8-lane partial sums folded in a fixed order, a sequential softmax, and the values
//! summed key by key.

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
    fn row(&self, g: usize, j: usize, hd: usize) -> &[f32] {
        let at = self.offset + g * self.group_stride + j * self.row_stride;
        &self.data[at..at + hd]
    }
}

/// `q [groups, rows, hd]` (contiguous) attending over `len` keys: `out [groups, rows,
/// hd]`. `visible(r, j)` says whether row `r` of every group may see key `j`. The
/// (group, row) pairs are split over the spin pool's threads; each pair is computed by
/// one thread, the same way whatever the split.
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
    visible: &(dyn Fn(usize, usize) -> bool + Sync),
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
        let mut scores = vec![0f32; len];
        for pair in p * per..((p + 1) * per).min(pairs) {
            let (g, r) = (pair / rows, pair % rows);
            // SAFETY: each pair's output row belongs to one part; `out` outlives the job.
            let o = unsafe { std::slice::from_raw_parts_mut(out.get().add(pair * hd), hd) };
            let qr = &q[pair * hd..(pair + 1) * hd];
            row(qr, k, v, g, r, hd, scale, visible, &mut scores, o);
        }
    };
    match parts {
        1 => part(0),
        _ => pool.run(parts, &part),
    }
}

/// Below this many multiply-adds a call stays on the calling thread.
const PAR_MIN_WORK: usize = 1 << 16;

/// One query row of group `g` (row index `r` for `visible`) into `o`.
#[allow(clippy::too_many_arguments)]
fn row(
    qr: &[f32],
    k: Kv<'_>,
    v: Kv<'_>,
    g: usize,
    r: usize,
    hd: usize,
    scale: f32,
    visible: &(dyn Fn(usize, usize) -> bool + Sync),
    scores: &mut [f32],
    o: &mut [f32],
) {
    let mut max = f32::NEG_INFINITY;
    for (j, s) in scores.iter_mut().enumerate() {
        *s = if visible(r, j) {
            dot(qr, k.row(g, j, hd)) * scale
        } else {
            f32::NEG_INFINITY
        };
        max = max.max(*s);
    }
    o.fill(0.0);
    let mut sum = 0f32;
    for (j, s) in scores.iter().enumerate() {
        if *s == f32::NEG_INFINITY {
            continue;
        }
        let p = (*s - max).exp();
        sum += p;
        for (o, &x) in o.iter_mut().zip(v.row(g, j, hd)) {
            *o += p * x;
        }
    }
    let inv = 1.0 / sum;
    o.iter_mut().for_each(|x| *x *= inv);
}

/// `Σ a·b` as 8 lane sums (element `i` in lane `i % 8`) folded `8 → 4 → 2 → 1`.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    for (l, (x, y)) in ca.remainder().iter().zip(cb.remainder()).enumerate() {
        lanes[l] += x * y;
    }
    let l4: [f32; 4] = std::array::from_fn(|i| lanes[i] + lanes[i + 4]);
    (l4[0] + l4[2]) + (l4[1] + l4[3])
}
