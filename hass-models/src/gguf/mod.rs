//! GGUF (llama.cpp's model format, versions 2 and 3): a memory-mapped, bounds-checked
//! reader, dequantisation of the common ggml types to f32, the [`ModelConfig`] implied by
//! the metadata, and [`GgufWeights`], a [`crate::WeightSource`] in Hugging Face names
//! and layout (Q/K rows of `llama` files un-permuted).
//!
//! Layout reminders: a tensor's GGUF dims are `ne[0]` (innermost, contiguous) first, so
//! the row-major PyTorch/HF shape is the dims reversed ([`GgufTensorInfo::shape_hf`]);
//! the dequantised values come out already in that row-major order.
//!
//! Robustness: every count, length and offset read from the file is checked against the
//! file size before use; a truncated or corrupt file gives
//! [`HassError::MalformedFile`] naming the file and the problem, never a panic or a
//! huge allocation.
//!
//! [`ModelConfig`]: hass_core::ModelConfig

mod config;
mod dequant;
mod parser;
mod weights;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;

use hass_core::{HassError, Result};

pub use config::config_from_gguf;
pub use dequant::dequantize_raw;
pub use weights::{
    gguf_to_hf_name, hf_to_gguf_name, llama_permute_rows, llama_unpermute_rows, GgufWeights,
    RawTensor,
};

/// Default data alignment when `general.alignment` is absent.
pub const GGUF_DEFAULT_ALIGNMENT: u64 = 32;

/// ggml tensor element types (the `ggml_type` ids stored in GGUF tensor infos).
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
}

impl GgmlType {
    /// The type with ggml id `id`, or `None` for ids this reader does not know.
    pub fn from_id(id: u32) -> Option<Self> {
        use GgmlType::*;
        Some(match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2_K,
            11 => Q3_K,
            12 => Q4_K,
            13 => Q5_K,
            14 => Q6_K,
            15 => Q8_K,
            16 => IQ2_XXS,
            17 => IQ2_XS,
            18 => IQ3_XXS,
            19 => IQ1_S,
            20 => IQ4_NL,
            21 => IQ3_S,
            22 => IQ2_S,
            23 => IQ4_XS,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            29 => IQ1_M,
            30 => BF16,
            34 => TQ1_0,
            35 => TQ2_0,
            39 => MXFP4,
            _ => return None,
        })
    }

    /// The ggml id.
    pub fn id(self) -> u32 {
        use GgmlType::*;
        match self {
            F32 => 0,
            F16 => 1,
            Q4_0 => 2,
            Q4_1 => 3,
            Q5_0 => 6,
            Q5_1 => 7,
            Q8_0 => 8,
            Q8_1 => 9,
            Q2_K => 10,
            Q3_K => 11,
            Q4_K => 12,
            Q5_K => 13,
            Q6_K => 14,
            Q8_K => 15,
            IQ2_XXS => 16,
            IQ2_XS => 17,
            IQ3_XXS => 18,
            IQ1_S => 19,
            IQ4_NL => 20,
            IQ3_S => 21,
            IQ2_S => 22,
            IQ4_XS => 23,
            I8 => 24,
            I16 => 25,
            I32 => 26,
            I64 => 27,
            F64 => 28,
            IQ1_M => 29,
            BF16 => 30,
            TQ1_0 => 34,
            TQ2_0 => 35,
            MXFP4 => 39,
        }
    }

    /// `(elements per block, bytes per block)`, as ggml's `GGML_QUANT_SIZES`.
    pub fn block_layout(self) -> (usize, usize) {
        use GgmlType::*;
        match self {
            F32 => (1, 4),
            F16 => (1, 2),
            Q4_0 => (32, 18),
            Q4_1 => (32, 20),
            Q5_0 => (32, 22),
            Q5_1 => (32, 24),
            Q8_0 => (32, 34),
            Q8_1 => (32, 40),
            Q2_K => (256, 84),
            Q3_K => (256, 110),
            Q4_K => (256, 144),
            Q5_K => (256, 176),
            Q6_K => (256, 210),
            Q8_K => (256, 292),
            IQ2_XXS => (256, 66),
            IQ2_XS => (256, 74),
            IQ3_XXS => (256, 98),
            IQ1_S => (256, 50),
            IQ4_NL => (32, 18),
            IQ3_S => (256, 110),
            IQ2_S => (256, 82),
            IQ4_XS => (256, 136),
            I8 => (1, 1),
            I16 => (1, 2),
            I32 => (1, 4),
            I64 => (1, 8),
            F64 => (1, 8),
            IQ1_M => (256, 56),
            BF16 => (1, 2),
            TQ1_0 => (256, 54),
            TQ2_0 => (256, 66),
            MXFP4 => (32, 17),
        }
    }

    /// Elements per block.
    pub fn block_size(self) -> usize {
        self.block_layout().0
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        self.block_layout().1
    }

    /// Whether [`GgufFile::dequantize`] handles this type.
    pub fn can_dequantize(self) -> bool {
        dequant::supported(self)
    }

    /// ggml's name of the type (`"Q4_K"`, `"F16"`, ...).
    pub fn name(self) -> String {
        format!("{self:?}")
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:?}")
    }
}

/// The type tag of a metadata value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufValueType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl GgufValueType {
    /// The type with GGUF id `id` (0..=12).
    pub fn from_id(id: u32) -> Option<Self> {
        use GgufValueType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(GgufArray),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// A metadata array, stored by element type (so a 150k-entry `tokenizer.ggml.scores`
/// is one `Vec<f32>`, and memory stays within a small multiple of the file size even
/// for a corrupt count).
#[derive(Debug, Clone, PartialEq)]
pub enum GgufArray {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Vec<String>),
    /// Nested arrays (each may have its own element type).
    Array(Vec<GgufArray>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

impl GgufArray {
    /// The element type.
    pub fn elem_type(&self) -> GgufValueType {
        match self {
            GgufArray::U8(_) => GgufValueType::U8,
            GgufArray::I8(_) => GgufValueType::I8,
            GgufArray::U16(_) => GgufValueType::U16,
            GgufArray::I16(_) => GgufValueType::I16,
            GgufArray::U32(_) => GgufValueType::U32,
            GgufArray::I32(_) => GgufValueType::I32,
            GgufArray::F32(_) => GgufValueType::F32,
            GgufArray::Bool(_) => GgufValueType::Bool,
            GgufArray::String(_) => GgufValueType::String,
            GgufArray::Array(_) => GgufValueType::Array,
            GgufArray::U64(_) => GgufValueType::U64,
            GgufArray::I64(_) => GgufValueType::I64,
            GgufArray::F64(_) => GgufValueType::F64,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            GgufArray::U8(v) => v.len(),
            GgufArray::I8(v) => v.len(),
            GgufArray::U16(v) => v.len(),
            GgufArray::I16(v) => v.len(),
            GgufArray::U32(v) => v.len(),
            GgufArray::I32(v) => v.len(),
            GgufArray::F32(v) => v.len(),
            GgufArray::Bool(v) => v.len(),
            GgufArray::String(v) => v.len(),
            GgufArray::Array(v) => v.len(),
            GgufArray::U64(v) => v.len(),
            GgufArray::I64(v) => v.len(),
            GgufArray::F64(v) => v.len(),
        }
    }

    /// Whether the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `i` as a (cloned) [`GgufValue`].
    pub fn get(&self, i: usize) -> Option<GgufValue> {
        Some(match self {
            GgufArray::U8(v) => GgufValue::U8(*v.get(i)?),
            GgufArray::I8(v) => GgufValue::I8(*v.get(i)?),
            GgufArray::U16(v) => GgufValue::U16(*v.get(i)?),
            GgufArray::I16(v) => GgufValue::I16(*v.get(i)?),
            GgufArray::U32(v) => GgufValue::U32(*v.get(i)?),
            GgufArray::I32(v) => GgufValue::I32(*v.get(i)?),
            GgufArray::F32(v) => GgufValue::F32(*v.get(i)?),
            GgufArray::Bool(v) => GgufValue::Bool(*v.get(i)?),
            GgufArray::String(v) => GgufValue::String(v.get(i)?.clone()),
            GgufArray::Array(v) => GgufValue::Array(v.get(i)?.clone()),
            GgufArray::U64(v) => GgufValue::U64(*v.get(i)?),
            GgufArray::I64(v) => GgufValue::I64(*v.get(i)?),
            GgufArray::F64(v) => GgufValue::F64(*v.get(i)?),
        })
    }

    /// All elements as (cloned) [`GgufValue`]s.
    pub fn to_values(&self) -> Vec<GgufValue> {
        (0..self.len()).filter_map(|i| self.get(i)).collect()
    }

    /// Integer elements (any integer element type) as `i128`; `None` otherwise.
    pub fn to_integers(&self) -> Option<Vec<i128>> {
        fn conv<T: Copy + Into<i128>>(v: &[T]) -> Vec<i128> {
            v.iter().map(|&x| x.into()).collect()
        }
        Some(match self {
            GgufArray::U8(v) => conv(v),
            GgufArray::I8(v) => conv(v),
            GgufArray::U16(v) => conv(v),
            GgufArray::I16(v) => conv(v),
            GgufArray::U32(v) => conv(v),
            GgufArray::I32(v) => conv(v),
            GgufArray::U64(v) => conv(v),
            GgufArray::I64(v) => conv(v),
            _ => return None,
        })
    }

    /// The strings, if this is an array of strings.
    pub fn as_strings(&self) -> Option<&[String]> {
        match self {
            GgufArray::String(v) => Some(v),
            _ => None,
        }
    }

    /// The values, if this is an array of f32.
    pub fn as_f32s(&self) -> Option<&[f32]> {
        match self {
            GgufArray::F32(v) => Some(v),
            _ => None,
        }
    }
}

impl GgufValue {
    /// This value's type tag.
    pub fn value_type(&self) -> GgufValueType {
        match self {
            GgufValue::U8(_) => GgufValueType::U8,
            GgufValue::I8(_) => GgufValueType::I8,
            GgufValue::U16(_) => GgufValueType::U16,
            GgufValue::I16(_) => GgufValueType::I16,
            GgufValue::U32(_) => GgufValueType::U32,
            GgufValue::I32(_) => GgufValueType::I32,
            GgufValue::F32(_) => GgufValueType::F32,
            GgufValue::Bool(_) => GgufValueType::Bool,
            GgufValue::String(_) => GgufValueType::String,
            GgufValue::Array(_) => GgufValueType::Array,
            GgufValue::U64(_) => GgufValueType::U64,
            GgufValue::I64(_) => GgufValueType::I64,
            GgufValue::F64(_) => GgufValueType::F64,
        }
    }

    /// Any integer type as `i128` (lossless); `None` for non-integers.
    pub fn as_integer(&self) -> Option<i128> {
        Some(match *self {
            GgufValue::U8(v) => v.into(),
            GgufValue::I8(v) => v.into(),
            GgufValue::U16(v) => v.into(),
            GgufValue::I16(v) => v.into(),
            GgufValue::U32(v) => v.into(),
            GgufValue::I32(v) => v.into(),
            GgufValue::U64(v) => v.into(),
            GgufValue::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// A float (F32 or F64) or integer value as `f64`; `None` otherwise.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v.into()),
            GgufValue::F64(v) => Some(v),
            _ => self.as_integer().map(|i| i as f64),
        }
    }

    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The array, if this is one.
    pub fn as_array(&self) -> Option<&GgufArray> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One tensor's header entry, validated against the file: its bytes lie inside the file.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    /// GGUF name (`blk.0.attn_q.weight`).
    pub name: String,
    /// GGUF dims, innermost (`ne[0]`) first.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset of the data relative to the start of the data section.
    pub offset: u64,
    n_elements: usize,
    n_bytes: usize,
    /// Absolute position of the data in the file.
    start: usize,
}

impl GgufTensorInfo {
    /// Row-major PyTorch/HF shape: the GGUF dims reversed.
    pub fn shape_hf(&self) -> Vec<usize> {
        // dims were checked to fit usize (their product does) when parsing
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// Number of elements.
    pub fn n_elements(&self) -> usize {
        self.n_elements
    }

    /// Number of data bytes.
    pub fn n_bytes(&self) -> usize {
        self.n_bytes
    }

    /// Absolute byte offset of the data in the file.
    pub fn file_offset(&self) -> usize {
        self.start
    }
}

enum Storage {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mmap(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// An open, validated GGUF file (memory-mapped when opened from a path).
pub struct GgufFile {
    name: String,
    storage: Storage,
    version: u32,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensorInfo>,
    index: HashMap<String, usize>,
    alignment: u64,
    data_offset: usize,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .finish()
    }
}

impl GgufFile {
    /// Memory-maps and parses `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let file = std::fs::File::open(path).map_err(|e| HassError::io(path, e))?;
        let len = file.metadata().map_err(|e| HassError::io(path, e))?.len();
        if len < 4 {
            return Err(HassError::malformed(
                &name,
                format!("file is {len} bytes, too short for a GGUF header"),
            ));
        }
        // SAFETY: the map is read-only; like every mmap-based model loader we assume the
        // file is not truncated or rewritten by another process while it is open.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| HassError::io(path, e))?;
        Self::from_storage(name, Storage::Mmap(map))
    }

    /// Parses a GGUF image held in memory; `name` is used in error messages.
    pub fn from_bytes(bytes: Vec<u8>, name: impl Into<String>) -> Result<Self> {
        Self::from_storage(name.into(), Storage::Owned(bytes))
    }

    fn from_storage(name: String, storage: Storage) -> Result<Self> {
        let parsed = parser::parse(storage.bytes(), &name)?;
        let index = parsed
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(GgufFile {
            name,
            storage,
            version: parsed.version,
            metadata: parsed.metadata,
            tensors: parsed.tensors,
            index,
            alignment: parsed.alignment,
            data_offset: parsed.data_offset,
        })
    }

    /// The name used in errors (the path for files).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// GGUF format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Data alignment (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute offset of the (aligned) tensor data section.
    pub fn data_offset(&self) -> usize {
        self.data_offset
    }

    /// Total size of the file in bytes.
    pub fn file_len(&self) -> usize {
        self.storage.bytes().len()
    }

    /// All metadata key/values.
    pub fn metadata(&self) -> &BTreeMap<String, GgufValue> {
        &self.metadata
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    /// Whether `key` is present.
    pub fn contains_key(&self, key: &str) -> bool {
        self.metadata.contains_key(key)
    }

    fn require(&self, key: &str) -> Result<&GgufValue> {
        self.metadata.get(key).ok_or_else(|| {
            HassError::malformed(&self.name, format!("metadata key `{key}` is missing"))
        })
    }

    fn wrong_type(&self, key: &str, want: &str, v: &GgufValue) -> HassError {
        HassError::malformed(
            &self.name,
            format!(
                "metadata key `{key}` should be {want}, found {:?}",
                v.value_type()
            ),
        )
    }

    /// A string value.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        let v = self.require(key)?;
        v.as_str()
            .ok_or_else(|| self.wrong_type(key, "a string", v))
    }

    /// A bool value.
    pub fn get_bool(&self, key: &str) -> Result<bool> {
        match self.require(key)? {
            GgufValue::Bool(b) => Ok(*b),
            v => Err(self.wrong_type(key, "a bool", v)),
        }
    }

    /// Any integer value that fits `u64`.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        let v = self.require(key)?;
        let i = v
            .as_integer()
            .ok_or_else(|| self.wrong_type(key, "an integer", v))?;
        u64::try_from(i).map_err(|_| {
            HassError::malformed(
                &self.name,
                format!("metadata key `{key}` = {i} does not fit u64"),
            )
        })
    }

    /// Any integer value that fits `u32`.
    pub fn get_u32(&self, key: &str) -> Result<u32> {
        let n = self.get_u64(key)?;
        u32::try_from(n).map_err(|_| {
            HassError::malformed(
                &self.name,
                format!("metadata key `{key}` = {n} does not fit u32"),
            )
        })
    }

    /// Any integer value that fits `usize`.
    pub fn get_usize(&self, key: &str) -> Result<usize> {
        let n = self.get_u64(key)?;
        usize::try_from(n).map_err(|_| {
            HassError::malformed(
                &self.name,
                format!("metadata key `{key}` = {n} does not fit usize"),
            )
        })
    }

    /// Any integer value that fits `i64`.
    pub fn get_i64(&self, key: &str) -> Result<i64> {
        let v = self.require(key)?;
        let i = v
            .as_integer()
            .ok_or_else(|| self.wrong_type(key, "an integer", v))?;
        i64::try_from(i).map_err(|_| {
            HassError::malformed(
                &self.name,
                format!("metadata key `{key}` = {i} does not fit i64"),
            )
        })
    }

    /// A float value (F32 or F64) as `f64`; integers are accepted too.
    pub fn get_f64(&self, key: &str) -> Result<f64> {
        let v = self.require(key)?;
        v.as_f64()
            .ok_or_else(|| self.wrong_type(key, "a number", v))
    }

    /// A float value as `f32` (F64 values are rounded).
    pub fn get_f32(&self, key: &str) -> Result<f32> {
        Ok(self.get_f64(key)? as f32)
    }

    /// An array value.
    pub fn get_array(&self, key: &str) -> Result<&GgufArray> {
        let v = self.require(key)?;
        v.as_array()
            .ok_or_else(|| self.wrong_type(key, "an array", v))
    }

    /// An array of strings (e.g. `tokenizer.ggml.tokens`).
    pub fn get_str_array(&self, key: &str) -> Result<&[String]> {
        let a = self.get_array(key)?;
        a.as_strings().ok_or_else(|| {
            HassError::malformed(
                &self.name,
                format!(
                    "metadata key `{key}` should be an array of strings, found an array of {:?}",
                    a.elem_type()
                ),
            )
        })
    }

    /// All tensor infos, in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    /// The info of tensor `name` (GGUF name), if present.
    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    fn info_or_missing(&self, name: &str) -> Result<&GgufTensorInfo> {
        self.tensor_info(name)
            .ok_or_else(|| HassError::MissingTensor {
                file: self.name.clone(),
                name: name.to_string(),
            })
    }

    /// The raw (possibly quantized) data bytes of a tensor.
    pub fn tensor_bytes(&self, info: &GgufTensorInfo) -> Result<&[u8]> {
        info.start
            .checked_add(info.n_bytes)
            .and_then(|end| self.storage.bytes().get(info.start..end))
            .ok_or_else(|| {
                HassError::malformed(
                    &self.name,
                    format!("tensor `{}` data lies outside the file", info.name),
                )
            })
    }

    /// The raw bytes of tensor `name` (GGUF name).
    pub fn tensor_bytes_by_name(&self, name: &str) -> Result<&[u8]> {
        self.tensor_bytes(self.info_or_missing(name)?)
    }

    /// Tensor `name` (GGUF name) as row-major f32 in the HF shape ([`GgufTensorInfo::shape_hf`]).
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>> {
        self.dequantize_info(self.info_or_missing(name)?)
    }

    /// Like [`GgufFile::dequantize`], from an info of this file.
    pub fn dequantize_info(&self, info: &GgufTensorInfo) -> Result<Vec<f32>> {
        let mut out = vec![0f32; info.n_elements];
        self.dequantize_into(info, &mut out)?;
        Ok(out)
    }

    /// Dequantises into `out`, whose length must be the tensor's element count.
    pub fn dequantize_into(&self, info: &GgufTensorInfo, out: &mut [f32]) -> Result<()> {
        if !dequant::supported(info.ggml_type) {
            return Err(HassError::UnsupportedDType {
                file: self.name.clone(),
                name: info.name.clone(),
                dtype: format!("{} (hass dequantises F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K)", info.ggml_type),
            });
        }
        if out.len() != info.n_elements {
            return Err(HassError::InvalidArgument(format!(
                "dequantize_into `{}`: output has {} elements, tensor has {}",
                info.name,
                out.len(),
                info.n_elements
            )));
        }
        let bytes = self.tensor_bytes(info)?;
        dequant::dequantize_parallel(info.ggml_type, bytes, out);
        Ok(())
    }

    /// Tensor `name` (GGUF name) dequantised and rounded to f16.
    pub fn dequantize_to_f16(&self, name: &str) -> Result<Vec<half::f16>> {
        let info = self.info_or_missing(name)?;
        if info.ggml_type == GgmlType::F16 {
            let bytes = self.tensor_bytes(info)?;
            return Ok(bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])))
                .collect());
        }
        Ok(self
            .dequantize_info(info)?
            .into_iter()
            .map(half::f16::from_f32)
            .collect())
    }
}
