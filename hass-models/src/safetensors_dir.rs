//! A Hugging Face model directory as a [`WeightSource`]: `model.safetensors`, or shards
//! listed in `model.safetensors.index.json`. Files are memory-mapped and validated
//! once at open (a truncated or corrupt file fails there, naming the file).
//!
//! A matrix may also be stored as int8 with one scale per row (`name` in `I8` plus
//! `name` + [`ROW_SCALE_SUFFIX`], f32 or f16, one value per row): it reads back as
//! `q · scale` and its scale tensor is not listed as a tensor of its own. Compact draft
//! heads are stored this way (half of f16's size).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use hass_core::{HassError, Result};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::weights::WeightSource;

/// Name suffix of the per-row scales of an int8 matrix.
pub const ROW_SCALE_SUFFIX: &str = ".row_scale";

struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte range inside the file's data section.
    start: usize,
    end: usize,
}

/// Memory-mapped safetensors files of one model.
pub struct SafetensorsDir {
    dir: PathBuf,
    files: Vec<(PathBuf, Mmap, usize)>,
    entries: BTreeMap<String, Entry>,
    /// The scale entries of the int8 matrices in `entries`, by the matrix's name.
    row_scales: BTreeMap<String, Entry>,
}

impl SafetensorsDir {
    /// Opens the weights of the HF model directory `dir`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let paths = if single.exists() {
            vec![single]
        } else if index.exists() {
            shard_paths(&index)?
        } else {
            return Err(HassError::io(
                &single,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "neither model.safetensors nor model.safetensors.index.json exists",
                ),
            ));
        };
        Self::open_files(dir, &paths)
    }

    /// Opens an explicit list of safetensors files.
    pub fn open_files(dir: &Path, paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut entries = BTreeMap::new();
        for (fi, path) in paths.iter().enumerate() {
            let file = File::open(path).map_err(|e| HassError::io(path, e))?;
            // SAFETY: the file is opened read-only; weights files are not modified while loaded.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| HassError::io(path, e))?;
            let (header, meta) = SafeTensors::read_metadata(&mmap)
                .map_err(|e| HassError::malformed(path.display(), e.to_string()))?;
            for (name, info) in meta.tensors() {
                let prev = entries.insert(
                    name.clone(),
                    Entry {
                        file: fi,
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        start: info.data_offsets.0,
                        end: info.data_offsets.1,
                    },
                );
                if prev.is_some() {
                    return Err(HassError::malformed(
                        path.display(),
                        format!("tensor `{name}` appears in more than one shard"),
                    ));
                }
            }
            files.push((path.clone(), mmap, 8 + header));
        }
        let int8: Vec<String> = entries
            .iter()
            .filter(|(n, e)| e.dtype == Dtype::I8 && entries.contains_key(&scale_name(n)))
            .map(|(n, _)| n.clone())
            .collect();
        let mut row_scales = BTreeMap::new();
        for name in int8 {
            let scale = entries.remove(&scale_name(&name)).expect("checked above");
            row_scales.insert(name, scale);
        }
        Ok(SafetensorsDir {
            dir: dir.to_path_buf(),
            files,
            entries,
            row_scales,
        })
    }

    fn bytes(&self, e: &Entry) -> &[u8] {
        let (_, mmap, data_start) = &self.files[e.file];
        &mmap[data_start + e.start..data_start + e.end]
    }

    /// `q · scale` per row of the int8 matrix `name` (`e`) with row scales `s`.
    fn read_int8_rows(&self, name: &str, e: &Entry, s: &Entry) -> Result<Vec<f32>> {
        let scales = self.floats(&scale_name(name), s)?;
        let rows = e.shape.first().copied().unwrap_or(1);
        if scales.len() != rows || e.shape.len() != 2 {
            return Err(HassError::malformed(
                self.files[e.file].0.display(),
                format!(
                    "int8 tensor `{name}` of shape {:?} has {} row scales",
                    e.shape,
                    scales.len()
                ),
            ));
        }
        let cols = e.shape[1];
        let q = self.bytes(e);
        Ok((0..rows * cols)
            .map(|i| q[i] as i8 as f32 * scales[i / cols])
            .collect())
    }

    /// The values of a float tensor (`name`, `e`) as f32.
    fn floats(&self, name: &str, e: &Entry) -> Result<Vec<f32>> {
        let bytes = self.bytes(e);
        decode_floats(e.dtype, bytes).ok_or_else(|| HassError::UnsupportedDType {
            file: self.files[e.file].0.display().to_string(),
            name: name.to_string(),
            dtype: format!("{:?}", e.dtype),
        })
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.entries
            .get(name)
            .ok_or_else(|| HassError::MissingTensor {
                file: self.describe(),
                name: name.to_string(),
            })
    }
}

/// Little-endian f32, f16 or bf16 tensor bytes as f32; `None` for any other dtype.
pub fn decode_floats(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => return None,
    })
}

fn scale_name(matrix: &str) -> String {
    format!("{matrix}{ROW_SCALE_SUFFIX}")
}

fn shard_paths(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| HassError::io(index, e))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| HassError::Json {
        path: index.to_path_buf(),
        source: e,
    })?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| HassError::malformed(index.display(), "no `weight_map` object"))?;
    let mut names: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    let dir = index.parent().unwrap_or(Path::new("."));
    Ok(names.into_iter().map(|n| dir.join(n)).collect())
}

impl WeightSource for SafetensorsDir {
    fn describe(&self) -> String {
        self.dir.display().to_string()
    }

    fn tensor_names(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.entries.get(name).map(|e| e.shape.clone())
    }

    fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let e = self.entry(name)?;
        match self.row_scales.get(name) {
            Some(s) => self.read_int8_rows(name, e, s),
            None => self.floats(name, e),
        }
    }

    fn read_ids(&self, name: &str) -> Result<Vec<i64>> {
        let e = self.entry(name)?;
        let bytes = self.bytes(e);
        Ok(match e.dtype {
            Dtype::I64 => bytes
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
                .collect(),
            Dtype::I32 => bytes
                .chunks_exact(4)
                .map(|b| i32::from_le_bytes(b.try_into().expect("4 bytes")) as i64)
                .collect(),
            Dtype::BOOL | Dtype::U8 => bytes.iter().map(|&b| b as i64).collect(),
            _ => return crate::weights::float_ids(self, name),
        })
    }
}
