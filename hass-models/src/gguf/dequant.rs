//! Dequantisation of ggml blocks to f32, following ggml's reference
//! `dequantize_row_*` (ggml-quants.c) operation for operation, so results are
//! bit-identical to ggml's and to the `gguf` python package's.

use half::f16;
use hass_core::{HassError, Result};

use super::GgmlType;

/// Whether `ty` can be dequantised.
pub(super) fn supported(ty: GgmlType) -> bool {
    use GgmlType::*;
    matches!(
        ty,
        F32 | F16 | BF16 | Q8_0 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q4_K | Q5_K | Q6_K
    )
}

/// Dequantises `n_elements` values of type `ty` from raw block bytes (a tensor's data, or
/// any whole number of blocks). Errors when the type is unsupported or the byte count
/// does not match.
pub fn dequantize_raw(ty: GgmlType, bytes: &[u8], n_elements: usize) -> Result<Vec<f32>> {
    if !supported(ty) {
        return Err(HassError::InvalidArgument(format!(
            "cannot dequantise ggml type {ty}"
        )));
    }
    let (block, type_size) = ty.block_layout();
    if !n_elements.is_multiple_of(block) || n_elements / block * type_size != bytes.len() {
        return Err(HassError::InvalidArgument(format!(
            "{n_elements} {ty} values need {} bytes in whole blocks of {block}, got {}",
            n_elements.div_ceil(block) * type_size,
            bytes.len()
        )));
    }
    let mut out = vec![0f32; n_elements];
    dequantize_parallel(ty, bytes, &mut out);
    Ok(out)
}

/// Below this many elements a tensor is dequantised on the calling thread.
const PARALLEL_MIN: usize = 1 << 18;

/// Dequantises on up to `available_parallelism` threads. The caller has checked that
/// `ty` is supported and that `src` holds exactly `dst.len()` values.
pub(super) fn dequantize_parallel(ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    let (block, type_size) = ty.block_layout();
    let n_blocks = dst.len() / block;
    // Small inputs (an embedding row per token) skip `available_parallelism`, which
    // reads the cgroup files: tens of microseconds, more than the work.
    let threads = match dst.len() / PARALLEL_MIN {
        0 | 1 => 1,
        most => std::thread::available_parallelism().map_or(1, |n| n.get().min(most)),
    };
    if threads == 1 {
        dequantize_blocks(ty, src, dst);
        return;
    }
    let blocks_per = n_blocks.div_ceil(threads);
    std::thread::scope(|s| {
        for (src, dst) in src
            .chunks(blocks_per * type_size)
            .zip(dst.chunks_mut(blocks_per * block))
        {
            s.spawn(move || dequantize_blocks(ty, src, dst));
        }
    });
}

#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// Dequantises whole blocks: `src.len() / type_size == dst.len() / block_size`.
fn dequantize_blocks(ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    use GgmlType::*;
    let (block, type_size) = ty.block_layout();
    debug_assert_eq!(src.len() / type_size, dst.len() / block);
    let blocks = src.chunks_exact(type_size).zip(dst.chunks_exact_mut(block));
    match ty {
        F32 => {
            for (b, y) in blocks {
                y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        F16 => {
            for (b, y) in blocks {
                y[0] = f16_at(b, 0);
            }
        }
        BF16 => {
            for (b, y) in blocks {
                y[0] = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
            }
        }
        Q8_0 => blocks.for_each(|(b, y)| q8_0(b, y)),
        Q4_0 => blocks.for_each(|(b, y)| q4_0(b, y)),
        Q4_1 => blocks.for_each(|(b, y)| q4_1(b, y)),
        Q5_0 => blocks.for_each(|(b, y)| q5_0(b, y)),
        Q5_1 => blocks.for_each(|(b, y)| q5_1(b, y)),
        Q4_K => blocks.for_each(|(b, y)| q4_k(b, y)),
        Q5_K => blocks.for_each(|(b, y)| q5_k(b, y)),
        Q6_K => blocks.for_each(|(b, y)| q6_k(b, y)),
        _ => unreachable!("dequantize_blocks called for unsupported type {ty}"),
    }
}

/// `block_q8_0`: d (f16), qs[32] (i8).
#[inline]
fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (y, &q) in y.iter_mut().zip(&b[2..34]) {
        *y = (q as i8) as f32 * d;
    }
}

/// `block_q4_0`: d (f16), qs[16]; low nibbles are elements 0..16, high 16..32.
#[inline]
fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        let x0 = (qs[j] & 0x0F) as i32 - 8;
        let x1 = (qs[j] >> 4) as i32 - 8;
        y[j] = x0 as f32 * d;
        y[j + 16] = x1 as f32 * d;
    }
}

/// `block_q4_1`: d (f16), m (f16), qs[16].
#[inline]
fn q4_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..20];
    for j in 0..16 {
        let x0 = (qs[j] & 0x0F) as f32;
        let x1 = (qs[j] >> 4) as f32;
        y[j] = x0 * d + m;
        y[j + 16] = x1 * d + m;
    }
}

/// `block_q5_0`: d (f16), qh[4] (5th bits, little-endian u32), qs[16].
#[inline]
fn q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..16 {
        let xh0 = (((qh >> j) << 4) & 0x10) as u8;
        let xh1 = ((qh >> (j + 12)) & 0x10) as u8;
        let x0 = ((qs[j] & 0x0F) | xh0) as i32 - 16;
        let x1 = ((qs[j] >> 4) | xh1) as i32 - 16;
        y[j] = x0 as f32 * d;
        y[j + 16] = x1 as f32 * d;
    }
}

/// `block_q5_1`: d (f16), m (f16), qh[4], qs[16].
#[inline]
fn q5_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for j in 0..16 {
        let xh0 = (((qh >> j) << 4) & 0x10) as u8;
        let xh1 = ((qh >> (j + 12)) & 0x10) as u8;
        let x0 = ((qs[j] & 0x0F) | xh0) as f32;
        let x1 = ((qs[j] >> 4) | xh1) as f32;
        y[j] = x0 * d + m;
        y[j + 16] = x1 * d + m;
    }
}

/// ggml's `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` (0..8).
#[inline(always)]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// `block_q4_K`: d (f16), dmin (f16), scales[12], qs[128].
#[inline]
fn q4_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let min = f16_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for (n, (q, y)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * n, scales);
        let (sc2, m2) = scale_min_k4(2 * n + 1, scales);
        let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
        let (lo, hi) = y.split_at_mut(32);
        for l in 0..32 {
            lo[l] = d1 * (q[l] & 0x0F) as f32 - m1;
            hi[l] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

/// `block_q5_K`: d (f16), dmin (f16), scales[12], qh[32], qs[128].
#[inline]
fn q5_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let min = f16_at(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for (n, (ql, y)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * n, scales);
        let (sc2, m2) = scale_min_k4(2 * n + 1, scales);
        let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
        let u1 = 1u8 << (2 * n);
        let u2 = 2u8 << (2 * n);
        let (lo, hi) = y.split_at_mut(32);
        for l in 0..32 {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            lo[l] = d1 * ((ql[l] & 0x0F) + h1) as f32 - m1;
            hi[l] = d2 * ((ql[l] >> 4) + h2) as f32 - m2;
        }
    }
}

/// `block_q6_K`: ql[128], qh[64], scales[16] (i8), d (f16).
#[inline]
fn q6_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 208);
    for half in 0..2 {
        let ql = &b[64 * half..64 * half + 64];
        let qh = &b[128 + 32 * half..128 + 32 * half + 32];
        let sc = &b[192 + 8 * half..192 + 8 * half + 8];
        let y = &mut y[128 * half..128 * half + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16_le(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_bits().to_le_bytes()
    }

    #[test]
    fn q8_0_block() {
        let mut b = vec![0u8; 34];
        b[..2].copy_from_slice(&f16_le(0.5));
        for i in 0..32 {
            b[2 + i] = (i as i8 - 16) as u8;
        }
        let y = dequantize_raw(GgmlType::Q8_0, &b, 32).unwrap();
        for (i, v) in y.iter().enumerate() {
            assert_eq!(*v, (i as f32 - 16.0) * 0.5);
        }
    }

    #[test]
    fn q4_0_nibble_order() {
        let mut b = vec![0u8; 18];
        b[..2].copy_from_slice(&f16_le(1.0));
        b[2] = 0xF0; // element 0 -> 0 - 8, element 16 -> 15 - 8
        let y = dequantize_raw(GgmlType::Q4_0, &b, 32).unwrap();
        assert_eq!(y[0], -8.0);
        assert_eq!(y[16], 7.0);
        assert_eq!(y[1], -8.0);
    }

    #[test]
    fn q5_0_high_bits() {
        let mut b = vec![0u8; 22];
        b[..2].copy_from_slice(&f16_le(1.0));
        // bit 0 -> element 0, bit 16 -> element 16, bit 31 -> element 31
        b[2..6].copy_from_slice(&(1u32 | 1 << 16 | 1 << 31).to_le_bytes());
        let y = dequantize_raw(GgmlType::Q5_0, &b, 32).unwrap();
        assert_eq!(y[0], 0.0);
        assert_eq!(y[16], 0.0);
        assert_eq!(y[31], 0.0);
        assert_eq!(y[1], -16.0);
    }

    #[test]
    fn scale_min_k4_matches_python_unpacking() {
        // gguf-py's Q4_K.get_scale_min formulation, independently
        let q: Vec<u8> = (0..12u8)
            .map(|i| i.wrapping_mul(37).wrapping_add(11))
            .collect();
        for j in 0..8 {
            let (sc, m) = scale_min_k4(j, &q);
            let (esc, em) = if j < 4 {
                (q[j] & 0x3F, q[4 + j] & 0x3F)
            } else {
                (
                    (q[8 + j - 4] & 0x0F) | ((q[j - 4] >> 2) & 0x30),
                    (q[8 + j - 4] >> 4) | ((q[4 + j - 4] >> 2) & 0x30),
                )
            };
            assert_eq!((sc, m), (esc, em), "j = {j}");
        }
    }

    #[test]
    fn parallel_matches_serial() {
        let n = PARALLEL_MIN * 2 + 256 * 3;
        let bytes: Vec<u8> = (0..n / 256 * 210)
            .map(|i| ((i * 2654435761usize) >> 13) as u8)
            .collect();
        // keep scales finite: rewrite every block's d
        let mut bytes = bytes;
        for blk in bytes.chunks_exact_mut(210) {
            blk[208..210].copy_from_slice(&f16_le(0.01));
        }
        let par = dequantize_raw(GgmlType::Q6_K, &bytes, n).unwrap();
        let mut ser = vec![0f32; n];
        dequantize_blocks(GgmlType::Q6_K, &bytes, &mut ser);
        assert_eq!(par, ser);
    }

    #[test]
    fn raw_rejects_bad_lengths_and_types() {
        assert!(dequantize_raw(GgmlType::Q4_0, &[0u8; 17], 32).is_err());
        assert!(dequantize_raw(GgmlType::Q4_0, &[0u8; 18], 31).is_err());
        assert!(dequantize_raw(GgmlType::Q2_K, &[0u8; 84], 256).is_err());
    }
}
