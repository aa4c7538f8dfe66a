//! Weight rows repacked for the kernels: [`LANES`] rows interleaved so that one
//! 64-byte load holds the same four weights of sixteen rows.
//!
//! ggml stores a row's blocks one after another; a product over them needs a
//! horizontal sum per block and row. Interleaved, one `vpdpbusd` with a broadcast
//! activation quad updates sixteen output rows at once, and a block's integer dot
//! products for sixteen rows end in sixteen lanes with no shuffles: the layout
//! llama.cpp's repacked formats and the ARM `i8mm` kernels use. Repacking happens once,
//! at load; the blocks keep their bytes (only their order changes), so
//! [`Panels::row_blocks`] gives back what the file stored.
//!
//! For group `g` (rows `16g..16g+16`) and block `b`:
//! * `lines[(g · nb + b) · L + c]` (`L` = 4 for Q4, 8 for Q8_0) holds, at byte `4j + t`,
//!   byte `4c + t` of row `16g + j`'s quants: for Q4 the low nibbles are weights
//!   `4c..4c+4` and the high nibbles weights `16+4c..16+4c+4`; for Q8_0 the bytes are
//!   weights `4c..4c+4` plus 128 (unsigned, as `vpdpbusd` wants them).
//! * `scales[(g · nb + b) · S ..]` holds the 16 rows' `d` (f16 bits), then for Q4_1
//!   their 16 `m`.
//!
//! Rows past the matrix's end (the last group's padding) are zero blocks.

use super::{QType, BLOCK};

/// Weight rows per group: one AVX-512 register of int32 lanes.
pub const LANES: usize = 16;

/// One cache line of interleaved quants.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub struct Line(pub [u8; 64]);

/// A matrix of one type in the interleaved layout.
#[derive(Clone)]
pub struct Panels {
    pub ty: QType,
    pub rows: usize,
    /// Blocks per row.
    pub nb: usize,
    pub lines: Vec<Line>,
    pub scales: Vec<u16>,
}

impl std::fmt::Debug for Panels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Panels({} × {} blocks of {})",
            self.rows, self.nb, self.ty
        )
    }
}

/// Lines per group and block.
pub const fn lines_per_block(ty: QType) -> usize {
    match ty {
        QType::Q8_0 => 8,
        QType::Q4_0 | QType::Q4_1 => 4,
    }
}

/// f16 scales per group and block.
pub const fn scales_per_block(ty: QType) -> usize {
    match ty {
        QType::Q4_1 => 2 * LANES,
        QType::Q8_0 | QType::Q4_0 => LANES,
    }
}

/// Bytes of quants per ggml block (after its scales).
const fn quant_bytes(ty: QType) -> usize {
    match ty {
        QType::Q8_0 => BLOCK,
        QType::Q4_0 | QType::Q4_1 => BLOCK / 2,
    }
}

/// Bytes of scales (`d`, then `m` for Q4_1) at the start of a ggml block.
const fn scale_bytes(ty: QType) -> usize {
    match ty {
        QType::Q4_1 => 4,
        QType::Q8_0 | QType::Q4_0 => 2,
    }
}

/// What a quant byte becomes in a line: Q8_0's int8 gets its sign bit flipped (+128).
const fn flip(ty: QType) -> u8 {
    match ty {
        QType::Q8_0 => 0x80,
        QType::Q4_0 | QType::Q4_1 => 0,
    }
}

impl Panels {
    /// Repacks `rows` rows of ggml blocks (`nb` per row, row-major). The caller has
    /// checked that `bytes` holds exactly that many.
    pub fn pack(ty: QType, bytes: &[u8], rows: usize, nb: usize) -> Panels {
        let (bb, sb, qb) = (ty.block_bytes(), scale_bytes(ty), quant_bytes(ty));
        let (l, s) = (lines_per_block(ty), scales_per_block(ty));
        let groups = rows.div_ceil(LANES);
        let mut p = Panels {
            ty,
            rows,
            nb,
            lines: vec![Line([0; 64]); groups * nb * l],
            scales: vec![0; groups * nb * s],
        };
        for (row, blocks) in bytes.chunks_exact(nb * bb).enumerate() {
            let (g, j) = (row / LANES, row % LANES);
            for (b, blk) in blocks.chunks_exact(bb).enumerate() {
                let gb = g * nb + b;
                for (e, &q) in blk[sb..sb + qb].iter().enumerate() {
                    p.lines[gb * l + e / 4].0[4 * j + e % 4] = q ^ flip(ty);
                }
                for (h, v) in blk[..sb].chunks_exact(2).enumerate() {
                    p.scales[gb * s + h * LANES + j] = u16::from_le_bytes([v[0], v[1]]);
                }
            }
        }
        p
    }

    /// Row `row`'s blocks as ggml stores them (`nb` blocks).
    pub fn row_blocks(&self, row: usize) -> Vec<u8> {
        let ty = self.ty;
        let (sb, qb) = (scale_bytes(ty), quant_bytes(ty));
        let (l, s) = (lines_per_block(ty), scales_per_block(ty));
        let (g, j) = (row / LANES, row % LANES);
        let mut out = Vec::with_capacity(self.nb * ty.block_bytes());
        for b in 0..self.nb {
            let gb = g * self.nb + b;
            for h in 0..sb / 2 {
                out.extend_from_slice(&self.scales[gb * s + h * LANES + j].to_le_bytes());
            }
            out.extend((0..qb).map(|e| self.lines[gb * l + e / 4].0[4 * j + e % 4] ^ flip(ty)));
        }
        out
    }

    /// Every row's blocks as ggml stores them, row-major.
    pub fn to_blocks(&self) -> Vec<u8> {
        (0..self.rows).flat_map(|r| self.row_blocks(r)).collect()
    }

    /// Bytes held (what one product streams, padding included).
    pub fn bytes(&self) -> usize {
        self.lines.len() * 64 + self.scales.len() * 2
    }

    /// Groups of [`LANES`] rows.
    pub fn groups(&self) -> usize {
        self.rows.div_ceil(LANES)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_round_trips_every_type() {
        for ty in [QType::Q8_0, QType::Q4_0, QType::Q4_1] {
            let (rows, nb) = (37, 3);
            let bytes: Vec<u8> = (0..rows * nb * ty.block_bytes())
                .map(|i| (i as u32).wrapping_mul(2654435761).rotate_right(13) as u8)
                .collect();
            let p = Panels::pack(ty, &bytes, rows, nb);
            assert_eq!(p.groups(), 3);
            assert_eq!(p.bytes(), 3 * LANES * nb * ty.block_bytes());
            assert_eq!(p.to_blocks(), bytes, "{ty}");
        }
    }
}
