//! Weight matrices kept in ggml's block-quantized formats (Q8_0, Q4_0, Q4_1), as a GGUF
//! file stores them, and the products `x · Wᵀ` over them ([`qmatmul`]).
//!
//! A decode step of a small model is memory-bound: streaming SmolLM2's Q4_1 blocks
//! reads 0.625 bytes per weight where f16 reads 2. Blocks are kept byte for byte as
//! ggml lays them out (`block_q8_0`, `block_q4_0`, `block_q4_1`: 32 weights each), so
//! a file's tensors load without requantisation (only their order changes: sixteen rows
//! are interleaved for the kernels, see `panel`); other types are quantised once at
//! load with ggml's reference quantisers ([`QMatrix::quantize`]).

mod kernel;
mod panel;

use hass_core::{HassError, Result};

use crate::gguf::{dequantize_raw, GgmlType};
use panel::Panels;

pub use kernel::{qmatmul, qmatmul_swiglu_uninit, qmatmul_uninit};

/// Weights per block, for every type here.
pub const BLOCK: usize = 32;

/// A block-quantized type with a kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QType {
    /// `d · q`, q an int8: 34 bytes per block.
    Q8_0,
    /// `d · (q − 8)`, q a nibble: 18 bytes per block.
    Q4_0,
    /// `d · q + m`, q a nibble: 20 bytes per block.
    Q4_1,
}

impl QType {
    /// The ggml type with this block layout.
    pub fn ggml(self) -> GgmlType {
        match self {
            QType::Q8_0 => GgmlType::Q8_0,
            QType::Q4_0 => GgmlType::Q4_0,
            QType::Q4_1 => GgmlType::Q4_1,
        }
    }

    /// The type of ggml type `t`, when it has a kernel here.
    pub fn from_ggml(t: GgmlType) -> Option<QType> {
        match t {
            GgmlType::Q8_0 => Some(QType::Q8_0),
            GgmlType::Q4_0 => Some(QType::Q4_0),
            GgmlType::Q4_1 => Some(QType::Q4_1),
            _ => None,
        }
    }

    /// Bytes per block of [`BLOCK`] weights.
    pub fn block_bytes(self) -> usize {
        self.ggml().type_size()
    }
}

impl std::fmt::Display for QType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            QType::Q8_0 => "q8_0",
            QType::Q4_0 => "q4_0",
            QType::Q4_1 => "q4_1",
        })
    }
}

/// How a loader keeps projection matrices quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantMode {
    /// Tensors stored in a type with a kernel stay as they are; the others (K-quants,
    /// f16, ...) become Q8_0.
    AsStored,
    /// Every matrix in this type (kept as stored when it already is).
    To(QType),
}

impl QuantMode {
    /// Whether a tensor stored as `t` is kept as stored.
    pub fn keeps(self, t: GgmlType) -> bool {
        match self {
            QuantMode::AsStored => QType::from_ggml(t).is_some(),
            QuantMode::To(q) => q.ggml() == t,
        }
    }

    /// The type a tensor not kept as stored is quantised to.
    pub fn fallback(self) -> QType {
        match self {
            QuantMode::AsStored => QType::Q8_0,
            QuantMode::To(q) => q,
        }
    }
}

/// Consecutive rows of one type, interleaved for the kernels.
#[derive(Debug, Clone)]
struct Segment(Panels);

/// A `[rows, cols]` matrix (HF `[out, in]` layout: row `j` holds the weights of output
/// `j`) of quantized blocks along `cols`. Rows may change type between segments (a
/// fused q/k/v matrix whose parts a file stores in different types).
#[derive(Debug, Clone)]
pub struct QMatrix {
    rows: usize,
    cols: usize,
    segments: Vec<Segment>,
}

impl QMatrix {
    /// Wraps ggml blocks as a file stores them: `rows × cols` weights of type `ty`.
    pub fn from_blocks(ty: QType, bytes: Vec<u8>, rows: usize, cols: usize) -> Result<Self> {
        check_cols(cols)?;
        let want = rows
            .checked_mul(cols / BLOCK)
            .and_then(|b| b.checked_mul(ty.block_bytes()));
        if want != Some(bytes.len()) {
            return Err(HassError::InvalidArgument(format!(
                "{rows}×{cols} {ty} weights need {} bytes, got {}",
                want.map_or("too many".to_string(), |w| w.to_string()),
                bytes.len()
            )));
        }
        Ok(QMatrix {
            rows,
            cols,
            segments: vec![Segment(Panels::pack(ty, &bytes, rows, cols / BLOCK))],
        })
    }

    /// Quantises row-major f32 `values` (`rows × cols`) with ggml's reference
    /// quantiser of `ty` (`quantize_row_*_ref`): what `llama-quantize` writes.
    pub fn quantize(ty: QType, values: &[f32], rows: usize, cols: usize) -> Result<Self> {
        check_cols(cols)?;
        if rows.checked_mul(cols) != Some(values.len()) {
            return Err(HassError::InvalidArgument(format!(
                "{} values for a {rows}×{cols} matrix",
                values.len()
            )));
        }
        let mut bytes = Vec::with_capacity(values.len() / BLOCK * ty.block_bytes());
        for block in values.chunks_exact(BLOCK) {
            quantize_block(ty, block.try_into().expect("32 values"), &mut bytes);
        }
        Self::from_blocks(ty, bytes, rows, cols)
    }

    /// The rows of `parts` one after another (all with the same `cols`); consecutive
    /// rows of one type share a segment.
    pub fn stack(parts: Vec<QMatrix>) -> Result<Self> {
        let cols = parts.first().map_or(BLOCK, |p| p.cols);
        // (type, rows, ggml blocks) of each run of one type.
        let mut runs: Vec<(QType, usize, Vec<u8>)> = Vec::new();
        for p in &parts {
            if p.cols != cols {
                return Err(HassError::InvalidArgument(format!(
                    "stacking matrices of {} and {cols} columns",
                    p.cols
                )));
            }
            for Segment(s) in &p.segments {
                match runs.last_mut() {
                    Some((ty, rows, bytes)) if *ty == s.ty => {
                        *rows += s.rows;
                        bytes.extend(s.to_blocks());
                    }
                    _ => runs.push((s.ty, s.rows, s.to_blocks())),
                }
            }
        }
        Ok(QMatrix {
            rows: runs.iter().map(|r| r.1).sum(),
            cols,
            segments: runs
                .into_iter()
                .map(|(ty, rows, bytes)| Segment(Panels::pack(ty, &bytes, rows, cols / BLOCK)))
                .collect(),
        })
    }

    /// Output rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input columns (a multiple of 32).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes of blocks (what one product streams, the last group's padding included).
    pub fn bytes(&self) -> usize {
        self.segments.iter().map(|s| s.0.bytes()).sum()
    }

    /// The types of the segments, first to last.
    pub fn types(&self) -> Vec<QType> {
        self.segments.iter().map(|s| s.0.ty).collect()
    }

    /// Rows `ids` dequantised exactly as ggml does, row-major `[ids.len(), cols]`
    /// (an embedding lookup). Errors on a row out of range.
    pub fn dequantize_rows(&self, ids: &[usize]) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(ids.len() * self.cols);
        for &id in ids {
            let (seg, r) = self.locate(id).ok_or_else(|| {
                HassError::InvalidArgument(format!("row {id} of a {}-row matrix", self.rows))
            })?;
            out.extend(dequantize_raw(
                seg.ty.ggml(),
                &seg.row_blocks(r),
                self.cols,
            )?);
        }
        Ok(out)
    }

    /// Every row dequantised, row-major `[rows, cols]`.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for Segment(s) in &self.segments {
            out.extend(
                dequantize_raw(s.ty.ggml(), &s.to_blocks(), s.rows * self.cols)
                    .expect("segment sizes are checked at construction"),
            );
        }
        out
    }

    /// Groups of sixteen interleaved rows, over every segment.
    fn groups(&self) -> usize {
        self.segments.iter().map(|s| s.0.groups()).sum()
    }

    /// The segment holding row `j` and the row's index inside it.
    fn locate(&self, mut j: usize) -> Option<(&Panels, usize)> {
        for Segment(s) in &self.segments {
            if j < s.rows {
                return Some((s, j));
            }
            j -= s.rows;
        }
        None
    }
}

fn check_cols(cols: usize) -> Result<()> {
    if cols == 0 || !cols.is_multiple_of(BLOCK) {
        return Err(HassError::InvalidArgument(format!(
            "quantized rows of {cols} weights (needs a positive multiple of {BLOCK})"
        )));
    }
    Ok(())
}

fn push_f16(bytes: &mut Vec<u8>, v: f32) {
    bytes.extend_from_slice(&half::f16::from_f32(v).to_le_bytes());
}

/// ggml's `quantize_row_{q8_0,q4_0,q4_1}_ref` for one block, appended to `bytes`.
fn quantize_block(ty: QType, x: &[f32; BLOCK], bytes: &mut Vec<u8>) {
    match ty {
        QType::Q8_0 => {
            let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            push_f16(bytes, d);
            bytes.extend(x.iter().map(|&v| (v * id).round() as i8 as u8));
        }
        QType::Q4_0 => {
            // The value of largest magnitude, with its sign, maps to -8.
            let (mut amax, mut max) = (0f32, 0f32);
            for &v in x {
                if amax < v.abs() {
                    amax = v.abs();
                    max = v;
                }
            }
            let d = max / -8.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            push_f16(bytes, d);
            let q = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
            bytes.extend((0..16).map(|j| q(x[j]) | q(x[j + 16]) << 4));
        }
        QType::Q4_1 => {
            let min = x.iter().fold(f32::MAX, |a, &v| a.min(v));
            let max = x.iter().fold(f32::MIN, |a, &v| a.max(v));
            let d = (max - min) / 15.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            push_f16(bytes, d);
            push_f16(bytes, min);
            let q = |v: f32| (((v - min) * id + 0.5) as i8).min(15) as u8;
            bytes.extend((0..16).map(|j| q(x[j]) | q(x[j + 16]) << 4));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32)
            .map(|v| v / (1u32 << 24) as f32 * 2.0 - 1.0)
            .collect()
    }

    #[test]
    fn quantize_then_dequantize_is_close() {
        for (ty, tol) in [
            (QType::Q8_0, 0.01),
            (QType::Q4_0, 0.15),
            (QType::Q4_1, 0.07),
        ] {
            let x = ramp(4 * 64, 7);
            let q = QMatrix::quantize(ty, &x, 4, 64).unwrap();
            assert_eq!(q.bytes(), 16 * 2 * ty.block_bytes(), "one padded group");
            let y = q.dequantize();
            for (a, b) in x.iter().zip(&y) {
                assert!((a - b).abs() <= tol, "{ty}: {a} vs {b}");
            }
            assert_eq!(q.dequantize_rows(&[2, 0]).unwrap()[..64], y[128..192]);
            assert!(q.dequantize_rows(&[4]).is_err());
        }
    }

    #[test]
    fn known_blocks() {
        // Q4_0: the largest magnitude (-2) maps to -8, so d = 0.25.
        let mut x = [0f32; 32];
        x[0] = -2.0;
        x[16] = 1.0;
        let q = QMatrix::quantize(QType::Q4_0, &x, 1, 32).unwrap();
        let y = q.dequantize();
        assert_eq!((y[0], y[16], y[1]), (-2.0, 1.0, 0.0));
        // Q4_1: min 0, max 15 -> d 1, m 0; every integer is exact.
        let x: Vec<f32> = (0..32).map(|i| (i % 16) as f32).collect();
        let q = QMatrix::quantize(QType::Q4_1, &x, 1, 32).unwrap();
        assert_eq!(q.dequantize(), x);
    }

    #[test]
    fn stack_merges_segments_and_checks_columns() {
        let a = QMatrix::quantize(QType::Q4_1, &ramp(64, 1), 2, 32).unwrap();
        let b = QMatrix::quantize(QType::Q4_1, &ramp(32, 2), 1, 32).unwrap();
        let c = QMatrix::quantize(QType::Q8_0, &ramp(32, 3), 1, 32).unwrap();
        let s = QMatrix::stack(vec![a.clone(), b.clone(), c.clone()]).unwrap();
        assert_eq!((s.rows(), s.types()), (4, vec![QType::Q4_1, QType::Q8_0]));
        let want: Vec<f32> = [a.dequantize(), b.dequantize(), c.dequantize()].concat();
        assert_eq!(s.dequantize(), want);
        let wide = QMatrix::quantize(QType::Q8_0, &ramp(64, 4), 1, 64).unwrap();
        assert!(QMatrix::stack(vec![a, wide]).is_err());
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(QMatrix::quantize(QType::Q8_0, &[0.0; 48], 1, 48).is_err());
        assert!(QMatrix::quantize(QType::Q8_0, &[0.0; 32], 2, 32).is_err());
        assert!(QMatrix::from_blocks(QType::Q4_1, vec![0; 19], 1, 32).is_err());
        assert!(QMatrix::from_blocks(QType::Q4_1, vec![0; 20], 1, 32).is_ok());
    }
}
