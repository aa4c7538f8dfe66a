//! The on-disk format of generated training data, and reading it back.
//!
//! A directory holds `datagen.json` (the manifest, see [`super::datagen`]) and shards
//! `shard_00000.safetensors`, `shard_00001.safetensors`, ... Shard `k` holds samples
//! `k·shard_size ..` of the corpus; sample `i` of a shard is three tensors:
//!
//! | tensor | dtype | shape |
//! | --- | --- | --- |
//! | `{i}.input_ids` | I32 | `[L]` |
//! | `{i}.loss_mask` | U8 | `[L]` |
//! | `{i}.hidden_state` | F16 or BF16 | `[L, H]`, the target's post-norm features |
//!
//! and the `__metadata__` map has `format`, `model`, `hidden_size`, `dtype`,
//! `num_samples`, `first_sample` and `samples_hash` (of the shard's ids and masks).
//! The tensor data is laid out ids, then hidden states, then masks, so every tensor is
//! aligned to its element size and the writer can stream hidden states sample by
//! sample. The files are plain safetensors: Python's `safetensors.safe_open` reads
//! them.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use hass_core::{HassError, Result};
use safetensors::tensor::Metadata;
use safetensors::Dtype;
use serde::{Deserialize, Serialize};

use super::render::Sample;

/// Value of the `format` metadata entry and of the manifest's `format` field.
pub const FORMAT: &str = "hass-datagen-v1";

/// Storage dtype of the hidden states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FeatureDtype {
    /// IEEE half, as the reference stores them.
    #[default]
    F16,
    /// bfloat16 (wider range, 3 fewer mantissa bits).
    Bf16,
}

impl FeatureDtype {
    pub fn as_str(self) -> &'static str {
        match self {
            FeatureDtype::F16 => "f16",
            FeatureDtype::Bf16 => "bf16",
        }
    }

    fn st_dtype(self) -> Dtype {
        match self {
            FeatureDtype::F16 => Dtype::F16,
            FeatureDtype::Bf16 => Dtype::BF16,
        }
    }

    /// Appends `values` as little-endian 2-byte floats.
    pub fn encode_into(self, values: &[f32], out: &mut Vec<u8>) {
        out.reserve(values.len() * 2);
        match self {
            FeatureDtype::F16 => {
                for &v in values {
                    out.extend_from_slice(&half::f16::from_f32(v).to_le_bytes());
                }
            }
            FeatureDtype::Bf16 => {
                for &v in values {
                    out.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes());
                }
            }
        }
    }
}

impl std::fmt::Display for FeatureDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for FeatureDtype {
    type Err = HassError;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f16" | "fp16" | "float16" => Ok(FeatureDtype::F16),
            "bf16" | "bfloat16" => Ok(FeatureDtype::Bf16),
            other => Err(HassError::InvalidArgument(format!(
                "feature dtype `{other}` (use f16 or bf16)"
            ))),
        }
    }
}

/// File name of shard `k`.
pub fn shard_file_name(k: usize) -> String {
    format!("shard_{k:05}.safetensors")
}

fn shard_index(name: &str) -> Option<usize> {
    let digits = name.strip_prefix("shard_")?.strip_suffix(".safetensors")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The shards of `dir`, sorted by index (temporary files are ignored).
pub fn list_shards(dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| HassError::io(dir, e))? {
        let entry = entry.map_err(|e| HassError::io(dir, e))?;
        let name = entry.file_name();
        if let Some(k) = name.to_str().and_then(shard_index) {
            out.push((k, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// 64-bit FNV-1a, for corpus and shard fingerprints (not cryptographic).
#[derive(Debug, Clone, Copy)]
pub struct Fnv64(u64);

impl Default for Fnv64 {
    fn default() -> Self {
        Fnv64(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv64 {
    pub fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    /// Hashes one sample: its length, ids and mask.
    pub fn write_sample(&mut self, s: &Sample) {
        self.write(&(s.input_ids.len() as u64).to_le_bytes());
        for &id in &s.input_ids {
            self.write(&id.to_le_bytes());
        }
        self.write(&s.loss_mask);
    }

    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

/// Fingerprint of a run of samples.
pub fn samples_hash(samples: &[Sample]) -> String {
    let mut h = Fnv64::default();
    for s in samples {
        h.write_sample(s);
    }
    h.hex()
}

/// Shard-level metadata written into `__metadata__`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardMeta {
    pub model: String,
    pub hidden_size: usize,
    pub dtype: FeatureDtype,
    pub first_sample: usize,
    pub samples_hash: String,
}

#[derive(Serialize)]
struct TensorEntry {
    dtype: Dtype,
    shape: Vec<usize>,
    data_offsets: (usize, usize),
}

/// Writes one shard to `path` atomically (a `.tmp` file renamed into place), pulling
/// each sample's features `[L·H]` (f32, row-major) from `features` in order, so only
/// one sample's features are in memory at a time.
pub fn write_shard(
    path: &Path,
    samples: &[Sample],
    meta: &ShardMeta,
    mut features: impl FnMut(usize, &Sample) -> Result<Vec<f32>>,
) -> Result<()> {
    let h = meta.hidden_size;
    let fsz = 2usize;
    let mut header: serde_json::Map<String, serde_json::Value> = serde_json::Map::new();
    let mut md = HashMap::new();
    md.insert("format".to_string(), FORMAT.to_string());
    md.insert("model".to_string(), meta.model.clone());
    md.insert("hidden_size".to_string(), h.to_string());
    md.insert("dtype".to_string(), meta.dtype.as_str().to_string());
    md.insert("num_samples".to_string(), samples.len().to_string());
    md.insert("first_sample".to_string(), meta.first_sample.to_string());
    md.insert("samples_hash".to_string(), meta.samples_hash.clone());
    header.insert(
        "__metadata__".into(),
        serde_json::to_value(&md).expect("map"),
    );
    let mut off = 0usize;
    let mut add = |name: String, dtype: Dtype, shape: Vec<usize>, bytes: usize| {
        let e = TensorEntry {
            dtype,
            shape,
            data_offsets: (off, off + bytes),
        };
        off += bytes;
        header.insert(name, serde_json::to_value(e).expect("entry"));
    };
    for (i, s) in samples.iter().enumerate() {
        add(
            format!("{i}.input_ids"),
            Dtype::I32,
            vec![s.len()],
            4 * s.len(),
        );
    }
    for (i, s) in samples.iter().enumerate() {
        add(
            format!("{i}.hidden_state"),
            meta.dtype.st_dtype(),
            vec![s.len(), h],
            fsz * s.len() * h,
        );
    }
    for (i, s) in samples.iter().enumerate() {
        add(format!("{i}.loss_mask"), Dtype::U8, vec![s.len()], s.len());
    }
    let mut header_bytes = serde_json::to_vec(&header).expect("header serialises");
    while !header_bytes.len().is_multiple_of(8) {
        header_bytes.push(b' ');
    }

    let tmp = path.with_extension("safetensors.tmp");
    let io = |e| HassError::io(&tmp, e);
    let file = File::create(&tmp).map_err(io)?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    w.write_all(&(header_bytes.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(&header_bytes).map_err(io)?;
    for s in samples {
        let mut buf = Vec::with_capacity(4 * s.len());
        for &id in &s.input_ids {
            buf.extend_from_slice(&(id as i32).to_le_bytes());
        }
        w.write_all(&buf).map_err(io)?;
    }
    let mut buf = Vec::new();
    for (i, s) in samples.iter().enumerate() {
        let f = features(i, s)?;
        if f.len() != s.len() * h {
            return Err(HassError::ShapeMismatch {
                file: tmp.display().to_string(),
                name: format!("{i}.hidden_state"),
                expected: vec![s.len(), h],
                found: vec![f.len() / h.max(1), f.len() % h.max(1)],
            });
        }
        buf.clear();
        meta.dtype.encode_into(&f, &mut buf);
        w.write_all(&buf).map_err(io)?;
    }
    for s in samples {
        w.write_all(&s.loss_mask).map_err(io)?;
    }
    let file = w.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(|e| HassError::io(path, e))?;
    Ok(())
}

/// A parsed shard header.
#[derive(Debug, Clone)]
pub struct ShardHeader {
    pub path: PathBuf,
    /// Byte offset of the data section in the file.
    pub data_start: u64,
    pub metadata: Metadata,
}

impl ShardHeader {
    /// Reads and validates the header of `path`: a sane header length, a parseable
    /// safetensors header with contiguous offsets, and a file exactly as long as the
    /// header says (a truncated file is [`HassError::MalformedFile`]).
    pub fn read(path: &Path) -> Result<Self> {
        let name = path.display().to_string();
        let mut f = File::open(path).map_err(|e| HassError::io(path, e))?;
        let file_len = f.metadata().map_err(|e| HassError::io(path, e))?.len();
        let mut n = [0u8; 8];
        f.read_exact(&mut n)
            .map_err(|_| HassError::malformed(&name, "shorter than the 8-byte header length"))?;
        let n = u64::from_le_bytes(n);
        if n > 100_000_000 || 8 + n > file_len {
            return Err(HassError::malformed(
                &name,
                format!("header length {n} does not fit the file of {file_len} bytes (truncated?)"),
            ));
        }
        let mut header = vec![0u8; n as usize];
        f.read_exact(&mut header)
            .map_err(|e| HassError::malformed(&name, format!("reading the header: {e}")))?;
        let metadata: Metadata = serde_json::from_slice(&header)
            .map_err(|e| HassError::malformed(&name, format!("bad safetensors header: {e}")))?;
        let want = 8 + n + metadata.data_len() as u64;
        if want != file_len {
            return Err(HassError::malformed(
                &name,
                format!(
                    "the header describes {want} bytes but the file has {file_len} \
                     (truncated or corrupt; delete it and rerun datagen to regenerate it)"
                ),
            ));
        }
        Ok(Self {
            path: path.to_path_buf(),
            data_start: 8 + n,
            metadata,
        })
    }

    /// A `__metadata__` entry.
    pub fn meta(&self, key: &str) -> Option<&str> {
        self.metadata
            .metadata()
            .as_ref()
            .and_then(|m| m.get(key))
            .map(String::as_str)
    }

    /// A numeric `__metadata__` entry.
    pub fn meta_usize(&self, key: &str) -> Result<usize> {
        let v = self.meta(key).ok_or_else(|| {
            HassError::malformed(self.path.display(), format!("no `{key}` in __metadata__"))
        })?;
        v.parse().map_err(|_| {
            HassError::malformed(
                self.path.display(),
                format!("__metadata__ `{key}` = `{v}` is not a number"),
            )
        })
    }
}

/// Where one sample lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SampleRef {
    /// Index into [`ShardDataset::shard_paths`].
    pub shard: usize,
    /// Index of the sample within its shard.
    pub index: usize,
    /// Number of tokens.
    pub len: usize,
}

#[derive(Debug, Clone)]
struct Located {
    ids: (u64, Dtype),
    mask: (u64, Dtype),
    hidden: (u64, Dtype),
}

/// One training sample read back: ids, mask (0/1) and the target features.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSample {
    pub input_ids: Vec<u32>,
    pub loss_mask: Vec<f32>,
    /// `[L, H]` row-major.
    pub hidden: Vec<f32>,
    pub hidden_size: usize,
}

impl TrainSample {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// The features of position `t`.
    pub fn feature(&self, t: usize) -> &[f32] {
        &self.hidden[t * self.hidden_size..(t + 1) * self.hidden_size]
    }
}

/// A deterministic train/test split of sample indices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    pub train: Vec<usize>,
    pub test: Vec<usize>,
}

/// The samples of a datagen directory. `open` reads every shard header (not the
/// data) and checks each sample's tensors; `get` reads one sample.
#[derive(Debug, Clone)]
pub struct ShardDataset {
    dir: PathBuf,
    hidden_size: usize,
    shards: Vec<PathBuf>,
    samples: Vec<SampleRef>,
    located: Vec<Located>,
}

fn tensor_info<'a>(h: &'a ShardHeader, name: &str) -> Result<&'a safetensors::tensor::TensorInfo> {
    h.metadata
        .info(name)
        .ok_or_else(|| HassError::MissingTensor {
            file: h.path.display().to_string(),
            name: name.to_string(),
        })
}

fn check_dtype(h: &ShardHeader, name: &str, dtype: Dtype, allowed: &[Dtype]) -> Result<()> {
    if allowed.contains(&dtype) {
        Ok(())
    } else {
        Err(HassError::UnsupportedDType {
            file: h.path.display().to_string(),
            name: name.to_string(),
            dtype: format!("{dtype:?}"),
        })
    }
}

impl ShardDataset {
    /// Opens the shards in `dir` (sorted by shard index), checking that every sample
    /// has `input_ids` `[L]`, `loss_mask` `[L]` and `hidden_state` `[L, expected_hidden]`.
    ///
    /// Errors: no shard ([`HassError::InvalidArgument`]); a truncated or corrupt file
    /// ([`HassError::MalformedFile`] naming it); a missing tensor
    /// ([`HassError::MissingTensor`]); features of another hidden size than the target's
    /// ([`HassError::ShapeMismatch`] naming the shard and tensor).
    pub fn open(dir: impl AsRef<Path>, expected_hidden: usize) -> Result<Self> {
        let dir = dir.as_ref();
        let listed = list_shards(dir)?;
        if listed.is_empty() {
            return Err(HassError::InvalidArgument(format!(
                "{}: no shard_*.safetensors files (run datagen first)",
                dir.display()
            )));
        }
        let mut shards = Vec::new();
        let mut samples = Vec::new();
        let mut located = Vec::new();
        for (s, (_, path)) in listed.into_iter().enumerate() {
            let h = ShardHeader::read(&path)?;
            let file = path.display().to_string();
            let n = match h.meta("num_samples") {
                Some(_) => h.meta_usize("num_samples")?,
                None => h
                    .metadata
                    .offset_keys()
                    .iter()
                    .filter(|k| k.ends_with(".input_ids"))
                    .count(),
            };
            for i in 0..n {
                let ids_name = format!("{i}.input_ids");
                let mask_name = format!("{i}.loss_mask");
                let hid_name = format!("{i}.hidden_state");
                let ids = tensor_info(&h, &ids_name)?;
                let mask = tensor_info(&h, &mask_name)?;
                let hid = tensor_info(&h, &hid_name)?;
                check_dtype(
                    &h,
                    &ids_name,
                    ids.dtype,
                    &[Dtype::I32, Dtype::I64, Dtype::U32],
                )?;
                check_dtype(
                    &h,
                    &mask_name,
                    mask.dtype,
                    &[Dtype::U8, Dtype::BOOL, Dtype::I32, Dtype::I64],
                )?;
                check_dtype(
                    &h,
                    &hid_name,
                    hid.dtype,
                    &[Dtype::F16, Dtype::BF16, Dtype::F32],
                )?;
                if ids.shape.len() != 1 {
                    return Err(HassError::ShapeMismatch {
                        file,
                        name: ids_name,
                        expected: vec![ids.shape.iter().product()],
                        found: ids.shape.clone(),
                    });
                }
                let len = ids.shape[0];
                if mask.shape != [len] {
                    return Err(HassError::ShapeMismatch {
                        file,
                        name: mask_name,
                        expected: vec![len],
                        found: mask.shape.clone(),
                    });
                }
                if hid.shape != [len, expected_hidden] {
                    return Err(HassError::ShapeMismatch {
                        file,
                        name: hid_name,
                        expected: vec![len, expected_hidden],
                        found: hid.shape.clone(),
                    });
                }
                let at = |t: &safetensors::tensor::TensorInfo| {
                    (h.data_start + t.data_offsets.0 as u64, t.dtype)
                };
                located.push(Located {
                    ids: at(ids),
                    mask: at(mask),
                    hidden: at(hid),
                });
                samples.push(SampleRef {
                    shard: s,
                    index: i,
                    len,
                });
            }
            shards.push(path);
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            hidden_size: expected_hidden,
            shards,
            samples,
            located,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn hidden_size(&self) -> usize {
        self.hidden_size
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Every sample's location and length, in dataset order.
    pub fn samples(&self) -> &[SampleRef] {
        &self.samples
    }

    pub fn shard_paths(&self) -> &[PathBuf] {
        &self.shards
    }

    /// Reads sample `i`.
    pub fn get(&self, i: usize) -> Result<TrainSample> {
        let r = self.samples.get(i).ok_or_else(|| {
            HassError::InvalidArgument(format!("sample {i} of a dataset of {}", self.len()))
        })?;
        let loc = &self.located[i];
        let path = &self.shards[r.shard];
        let mut f = File::open(path).map_err(|e| HassError::io(path, e))?;
        let len = r.len;
        let h = self.hidden_size;
        let mut read = |(off, dtype): (u64, Dtype), count: usize| -> Result<Vec<u8>> {
            let mut buf = vec![0u8; count * dtype.bitsize() / 8];
            f.seek(SeekFrom::Start(off))
                .and_then(|_| f.read_exact(&mut buf))
                .map_err(|e| {
                    HassError::malformed(path.display(), format!("reading sample {}: {e}", r.index))
                })?;
            Ok(buf)
        };
        let ids_b = read(loc.ids, len)?;
        let input_ids = match loc.ids.1 {
            Dtype::I64 => ids_b
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
                .collect(),
            _ => ids_b
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        };
        let mask_b = read(loc.mask, len)?;
        let loss_mask = match loc.mask.1 {
            Dtype::I64 => mask_b
                .chunks_exact(8)
                .map(|c| (i64::from_le_bytes(c.try_into().unwrap()) != 0) as u8 as f32)
                .collect(),
            Dtype::I32 => mask_b
                .chunks_exact(4)
                .map(|c| (i32::from_le_bytes(c.try_into().unwrap()) != 0) as u8 as f32)
                .collect(),
            _ => mask_b.iter().map(|&b| (b != 0) as u8 as f32).collect(),
        };
        let hid_b = read(loc.hidden, len * h)?;
        let hidden = hass_models::safetensors_dir::decode_floats(loc.hidden.1, &hid_b)
            .expect("feature dtype checked at open: f16, bf16 or f32");
        Ok(TrainSample {
            input_ids,
            loss_mask,
            hidden,
            hidden_size: h,
        })
    }

    /// Splits the samples into train and test: the first `⌊n·(1 − holdout)⌋` samples (at
    /// least one) train, the rest test, in dataset order (shard by shard). This mirrors
    /// the reference, which takes the first 95% of its file list as train and the last
    /// 5% as test (`holdout = 0.05`); the reference's order is the filesystem's, ours
    /// is the corpus order, so shuffle the corpus before datagen (as the reference
    /// does, seed 42) for a random split.
    pub fn split(&self, holdout: f64) -> Split {
        split_indices(self.len(), holdout)
    }
}

/// The split of [`ShardDataset::split`] for `n` samples.
pub fn split_indices(n: usize, holdout: f64) -> Split {
    let holdout = holdout.clamp(0.0, 1.0);
    let mut n_train = ((n as f64) * (1.0 - holdout) + 1e-9).floor() as usize;
    n_train = n_train.min(n);
    if n > 0 && n_train == 0 {
        n_train = 1;
    }
    Split {
        train: (0..n_train).collect(),
        test: (n_train..n).collect(),
    }
}
