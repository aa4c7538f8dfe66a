//! [`GgufWeights`]: a GGUF file seen as a [`WeightSource`] in Hugging Face names and
//! layout.
//!
//! llama.cpp's `convert_hf_to_gguf.py` permutes the rows of `q_proj` / `k_proj` (weights
//! and biases) of `llama`-architecture models (`LlamaModel.permute`) so that ggml's
//! interleaved ("normal") RoPE matches HF's rotate-half RoPE. hass applies rotate-half
//! RoPE, so those rows are permuted back here. `qwen2` files are not permuted (ggml uses
//! NeoX RoPE for them).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;

use hass_core::config::Architecture;
use hass_core::{HassError, ModelConfig, Result};

use super::{config_from_gguf, GgmlType, GgufFile, GgufTensorInfo};
use crate::WeightSource;

const LAYER_TABLE: &[(&str, &str)] = &[
    ("self_attn.q_proj.weight", "attn_q.weight"),
    ("self_attn.k_proj.weight", "attn_k.weight"),
    ("self_attn.v_proj.weight", "attn_v.weight"),
    ("self_attn.q_proj.bias", "attn_q.bias"),
    ("self_attn.k_proj.bias", "attn_k.bias"),
    ("self_attn.v_proj.bias", "attn_v.bias"),
    ("self_attn.o_proj.weight", "attn_output.weight"),
    ("mlp.gate_proj.weight", "ffn_gate.weight"),
    ("mlp.up_proj.weight", "ffn_up.weight"),
    ("mlp.down_proj.weight", "ffn_down.weight"),
    ("input_layernorm.weight", "attn_norm.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
];

const GLOBAL_TABLE: &[(&str, &str)] = &[
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
];

/// Splits `prefix{N}.rest` into `(N, rest)` when N is a plain decimal layer index.
fn split_layer<'a>(name: &'a str, prefix: &str) -> Option<(&'a str, &'a str)> {
    let rest = name.strip_prefix(prefix)?;
    let (n, rest) = rest.split_once('.')?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) || (n.len() > 1 && n.starts_with('0'))
    {
        return None;
    }
    Some((n, rest))
}

/// The GGUF name of a HF tensor name (`model.layers.3.mlp.up_proj.weight` →
/// `blk.3.ffn_up.weight`), or `None` when hass has no mapping for it.
pub fn hf_to_gguf_name(hf: &str) -> Option<String> {
    if let Some(&(_, g)) = GLOBAL_TABLE.iter().find(|(h, _)| *h == hf) {
        return Some(g.to_string());
    }
    let (n, rest) = split_layer(hf, "model.layers.")?;
    let &(_, g) = LAYER_TABLE.iter().find(|(h, _)| *h == rest)?;
    Some(format!("blk.{n}.{g}"))
}

/// The HF name of a GGUF tensor name (inverse of [`hf_to_gguf_name`]).
pub fn gguf_to_hf_name(gguf: &str) -> Option<String> {
    if let Some(&(h, _)) = GLOBAL_TABLE.iter().find(|(_, g)| *g == gguf) {
        return Some(h.to_string());
    }
    let (n, rest) = split_layer(gguf, "blk.")?;
    let &(h, _) = LAYER_TABLE.iter().find(|(_, g)| *g == rest)?;
    Some(format!("model.layers.{n}.{h}"))
}

fn check_permute_shape(n_rows: usize, row_len: usize, len: usize, n_head: usize) -> Result<()> {
    if n_rows.checked_mul(row_len) != Some(len) {
        return Err(HassError::InvalidArgument(format!(
            "llama row permutation: {len} values are not {n_rows} rows of {row_len}"
        )));
    }
    if n_head == 0 || !n_rows.is_multiple_of(2 * n_head) {
        return Err(HassError::InvalidArgument(format!(
            "llama row permutation: {n_rows} rows do not split into {n_head} heads of an even size"
        )));
    }
    Ok(())
}

/// Row `src` of the converter's permuted tensor that becomes row `dst` of the HF tensor:
/// HF row `h*D + s*D/2 + j` is GGUF row `h*D + 2*j + s` (D = rows / n_head).
fn gguf_row_of_hf_row(hf_row: usize, head_rows: usize) -> usize {
    let half = head_rows / 2;
    let (h, r) = (hf_row / head_rows, hf_row % head_rows);
    let (s, j) = (r / half, r % half);
    h * head_rows + 2 * j + s
}

/// Row gather on plain elements or on whole quantized rows: `out row i = data row map(i)`.
fn gather_rows<T: Copy>(data: &[T], n_rows: usize, map: impl Fn(usize) -> usize) -> Vec<T> {
    let row_len = data.len() / n_rows.max(1);
    let mut out = Vec::with_capacity(data.len());
    for i in 0..n_rows {
        let src = map(i);
        out.extend_from_slice(&data[src * row_len..(src + 1) * row_len]);
    }
    out
}

/// llama.cpp's `LlamaModel.permute(w, n_head, n_head)` on a row-major `[n_rows, row_len]`
/// tensor (`row_len = 1` for a bias): `w.reshape(n_head, 2, n_rows/n_head/2, row_len)
/// .swapaxes(1, 2).reshape(n_rows, row_len)`. For K pass the KV head count.
pub fn llama_permute_rows(
    data: &[f32],
    n_rows: usize,
    row_len: usize,
    n_head: usize,
) -> Result<Vec<f32>> {
    check_permute_shape(n_rows, row_len, data.len(), n_head)?;
    let head_rows = n_rows / n_head;
    // GGUF row g = h*D + 2j + s takes HF row h*D + s*D/2 + j
    let half = head_rows / 2;
    Ok(gather_rows(data, n_rows, |g| {
        let (h, r) = (g / head_rows, g % head_rows);
        let (j, s) = (r / 2, r % 2);
        h * head_rows + s * half + j
    }))
}

/// Inverse of [`llama_permute_rows`]: recovers the HF rows from a converted tensor.
pub fn llama_unpermute_rows(
    data: &[f32],
    n_rows: usize,
    row_len: usize,
    n_head: usize,
) -> Result<Vec<f32>> {
    check_permute_shape(n_rows, row_len, data.len(), n_head)?;
    let head_rows = n_rows / n_head;
    Ok(gather_rows(data, n_rows, |i| {
        gguf_row_of_hf_row(i, head_rows)
    }))
}

/// A tensor's raw ggml data, rows already in HF order.
#[derive(Debug, Clone)]
pub struct RawTensor<'a> {
    pub ggml_type: GgmlType,
    /// HF (row-major) shape; the last dimension is the quantized (blocked) one.
    pub shape_hf: Vec<usize>,
    /// Borrowed from the map, or owned when rows had to be un-permuted.
    pub bytes: Cow<'a, [u8]>,
}

/// A GGUF file as a [`WeightSource`] in HF names and layout, with its [`ModelConfig`].
pub struct GgufWeights {
    file: GgufFile,
    config: ModelConfig,
    /// HF name → index into `file.tensors()`.
    names: BTreeMap<String, usize>,
    unmapped: Vec<String>,
}

impl std::fmt::Debug for GgufWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufWeights")
            .field("file", &self.file)
            .field("config", &self.config)
            .field("tensors", &self.names.len())
            .field("unmapped", &self.unmapped)
            .finish()
    }
}

impl GgufWeights {
    /// Opens `path` and reads its config.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::from_file(GgufFile::open(path)?)
    }

    /// Wraps an open file; fails when its config cannot be read.
    pub fn from_file(file: GgufFile) -> Result<Self> {
        let config = config_from_gguf(&file)?;
        let mut names = BTreeMap::new();
        let mut unmapped = Vec::new();
        for (i, t) in file.tensors().iter().enumerate() {
            match gguf_to_hf_name(&t.name) {
                Some(hf) => {
                    names.insert(hf, i);
                }
                None => unmapped.push(t.name.clone()),
            }
        }
        Ok(GgufWeights {
            file,
            config,
            names,
            unmapped,
        })
    }

    /// The model configuration from the metadata.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The underlying file.
    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// GGUF tensors with no HF counterpart (e.g. `rope_freqs.weight`); not listed by
    /// [`WeightSource::tensor_names`].
    pub fn unmapped_tensors(&self) -> &[String] {
        &self.unmapped
    }

    /// The GGUF tensor behind HF name `name`.
    pub fn info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.names.get(name).map(|&i| &self.file.tensors()[i])
    }

    fn info_or_missing(&self, name: &str) -> Result<&GgufTensorInfo> {
        self.info(name).ok_or_else(|| HassError::MissingTensor {
            file: self.file.name().to_string(),
            name: name.to_string(),
        })
    }

    /// The head count whose rows the converter permuted in HF tensor `name`, if any.
    fn permute_heads(&self, name: &str) -> Option<usize> {
        if self.config.architecture != Architecture::Llama {
            return None;
        }
        let (_, rest) = split_layer(name, "model.layers.")?;
        match rest {
            "self_attn.q_proj.weight" | "self_attn.q_proj.bias" => {
                Some(self.config.num_attention_heads)
            }
            "self_attn.k_proj.weight" | "self_attn.k_proj.bias" => {
                Some(self.config.num_key_value_heads)
            }
            _ => None,
        }
    }

    /// Whether reading `name` undoes llama.cpp's Q/K row permutation.
    pub fn is_permuted(&self, name: &str) -> bool {
        self.permute_heads(name).is_some()
    }

    fn shape_err(&self, name: &str, info: &GgufTensorInfo, heads: usize) -> HassError {
        let found = info.shape_hf();
        HassError::ShapeMismatch {
            file: self.file.name().to_string(),
            name: name.to_string(),
            expected: vec![
                heads * self.config.head_dim,
                found.get(1).copied().unwrap_or(1),
            ],
            found,
        }
    }

    /// The raw ggml bytes of HF tensor `name` with rows in HF order (Q/K of `llama`
    /// files un-permuted row by row; quantized rows move as whole rows).
    pub fn read_raw(&self, name: &str) -> Result<RawTensor<'_>> {
        let info = self.info_or_missing(name)?;
        let bytes = self.file.tensor_bytes(info)?;
        let shape_hf = info.shape_hf();
        let bytes = match self.permute_heads(name) {
            None => Cow::Borrowed(bytes),
            Some(heads) => {
                let n_rows = shape_hf[0];
                if heads == 0 || n_rows % (2 * heads) != 0 {
                    return Err(self.shape_err(name, info, heads));
                }
                if shape_hf.len() == 1 {
                    // a bias: one element per row, only unquantized types are row-separable
                    let (block, ts) = info.ggml_type.block_layout();
                    if block != 1 {
                        return Err(HassError::UnsupportedDType {
                            file: self.file.name().to_string(),
                            name: name.to_string(),
                            dtype: format!(
                                "{} (block-quantized bias cannot be un-permuted)",
                                info.ggml_type
                            ),
                        });
                    }
                    let rows: Vec<&[u8]> = bytes.chunks_exact(ts).collect();
                    let head_rows = n_rows / heads;
                    Cow::Owned(
                        (0..n_rows)
                            .flat_map(|i| rows[gguf_row_of_hf_row(i, head_rows)].iter().copied())
                            .collect(),
                    )
                } else {
                    let head_rows = n_rows / heads;
                    Cow::Owned(gather_rows(bytes, n_rows, |i| {
                        gguf_row_of_hf_row(i, head_rows)
                    }))
                }
            }
        };
        Ok(RawTensor {
            ggml_type: info.ggml_type,
            shape_hf,
            bytes,
        })
    }
}

impl WeightSource for GgufWeights {
    fn describe(&self) -> String {
        self.file.name().to_string()
    }

    fn tensor_names(&self) -> Vec<String> {
        self.names.keys().cloned().collect()
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.info(name).map(GgufTensorInfo::shape_hf)
    }

    fn is_quantized(&self) -> bool {
        self.names
            .values()
            .any(|&i| self.file.tensors()[i].ggml_type.block_size() > 1)
    }

    fn read_blocks(&self, name: &str) -> Result<Option<(GgmlType, Vec<u8>)>> {
        let raw = self.read_raw(name)?;
        Ok(Some((raw.ggml_type, raw.bytes.into_owned())))
    }

    fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let info = self.info_or_missing(name)?;
        let values = self.file.dequantize_info(info)?;
        match self.permute_heads(name) {
            None => Ok(values),
            Some(heads) => {
                let shape = info.shape_hf();
                let n_rows = shape[0];
                let row_len = shape[1..].iter().product::<usize>();
                if heads == 0 || n_rows % (2 * heads) != 0 {
                    return Err(self.shape_err(name, info, heads));
                }
                llama_unpermute_rows(&values, n_rows, row_len, heads)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The converter's numpy expression, spelled out index by index:
    /// out.reshape(n_head, D/2, 2, rest)[h, j, s] = w.reshape(n_head, 2, D/2, rest)[h, s, j].
    fn converter_permute(w: &[f32], n_rows: usize, row_len: usize, n_head: usize) -> Vec<f32> {
        let d = n_rows / n_head;
        let half = d / 2;
        let mut out = vec![0.0; w.len()];
        for h in 0..n_head {
            for s in 0..2 {
                for j in 0..half {
                    for c in 0..row_len {
                        let src = ((h * 2 + s) * half + j) * row_len + c;
                        let dst = ((h * half + j) * 2 + s) * row_len + c;
                        out[dst] = w[src];
                    }
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_inverts_converter_permute() {
        for &(n_head, head_dim, row_len) in &[
            (4usize, 8usize, 3usize),
            (9, 64, 5),
            (3, 64, 1),
            (1, 2, 1),
            (2, 6, 4),
        ] {
            let n_rows = n_head * head_dim;
            let w: Vec<f32> = (0..n_rows * row_len).map(|i| i as f32).collect();
            let p = converter_permute(&w, n_rows, row_len, n_head);
            assert_eq!(llama_permute_rows(&w, n_rows, row_len, n_head).unwrap(), p);
            assert_eq!(
                llama_unpermute_rows(&p, n_rows, row_len, n_head).unwrap(),
                w
            );
            if head_dim > 2 {
                assert_ne!(
                    p, w,
                    "permutation is not the identity for head_dim {head_dim}"
                );
            }
        }
    }

    #[test]
    fn permute_known_small_case() {
        // one head, D = 4: HF rows [a0 a1 | b0 b1] -> GGUF [a0 b0 a1 b1]
        let w = [0.0, 1.0, 2.0, 3.0];
        assert_eq!(
            llama_permute_rows(&w, 4, 1, 1).unwrap(),
            vec![0.0, 2.0, 1.0, 3.0]
        );
        assert_eq!(
            llama_unpermute_rows(&[0.0, 2.0, 1.0, 3.0], 4, 1, 1).unwrap(),
            w.to_vec()
        );
        assert!(llama_unpermute_rows(&w, 4, 1, 3).is_err());
        assert!(llama_unpermute_rows(&w, 3, 1, 1).is_err());
    }

    #[test]
    fn name_mapping_round_trips() {
        for (hf, gg) in [
            ("model.embed_tokens.weight", "token_embd.weight"),
            ("model.norm.weight", "output_norm.weight"),
            ("lm_head.weight", "output.weight"),
            (
                "model.layers.0.self_attn.q_proj.weight",
                "blk.0.attn_q.weight",
            ),
            (
                "model.layers.12.self_attn.k_proj.bias",
                "blk.12.attn_k.bias",
            ),
            (
                "model.layers.3.self_attn.o_proj.weight",
                "blk.3.attn_output.weight",
            ),
            (
                "model.layers.29.mlp.down_proj.weight",
                "blk.29.ffn_down.weight",
            ),
            (
                "model.layers.1.input_layernorm.weight",
                "blk.1.attn_norm.weight",
            ),
            (
                "model.layers.1.post_attention_layernorm.weight",
                "blk.1.ffn_norm.weight",
            ),
        ] {
            assert_eq!(hf_to_gguf_name(hf).as_deref(), Some(gg));
            assert_eq!(gguf_to_hf_name(gg).as_deref(), Some(hf));
        }
        for bad in [
            "rope_freqs.weight",
            "blk.x.attn_q.weight",
            "blk.01.attn_q.weight",
            "blk..attn_q.weight",
            "blk.0.attn_q",
        ] {
            assert_eq!(gguf_to_hf_name(bad), None, "{bad}");
        }
        assert_eq!(
            hf_to_gguf_name("model.layers.0.self_attn.rotary_emb.inv_freq"),
            None
        );
    }
}
