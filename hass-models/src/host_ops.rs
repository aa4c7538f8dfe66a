//! The small row-wise steps of a decoder layer on host slices: RMS norm, SwiGLU, the
//! q/k/v heads with RoPE, and the heads merged back into rows.
//!
//! On the CPU backend each Burn op costs a few microseconds whatever its size (an
//! allocation, dispatch, and a strided iterator for views), and a SmolLM2 layer ran
//! ~35 of them around its four products: ~1,000 per forward, a quarter of a decode
//! step on one core while the other waited. Here each step is one pass over its rows.
//! Every output row depends on its own input row only, so results stay batch
//! invariant.

/// `x / sqrt(mean(x²) + eps) · w` for each row of `x` (`d` values per row): the sum of
/// squares as 8 lane sums folded pairwise, then `(x · r) · w`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
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

/// `silu(gate) · up` for rows `[gate | up]` of `gu` (`2n` values per row).
pub fn swiglu(gu: &[f32], n: usize, out: &mut [f32]) {
    for (row, or) in gu.chunks_exact(2 * n).zip(out.chunks_exact_mut(n)) {
        let (gate, up) = row.split_at(n);
        for ((o, &g), &u) in or.iter_mut().zip(gate).zip(up) {
            *o = g / (1.0 + (-g).exp()) * u;
        }
    }
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
                    for e in 0..hd {
                        let rot = if e < half {
                            -src[e + half]
                        } else {
                            src[e - half]
                        };
                        dst[e] = src[e] * c[e] + rot * s[e];
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
