//! The GGUF header parser. Every read goes through [`Cursor`], which checks the length
//! against the bytes left; every count is checked against the bytes left (times the
//! smallest possible encoding of one item) before anything is allocated for it.

use std::collections::{BTreeMap, HashSet};

use hass_core::{HassError, Result};

use super::{
    GgmlType, GgufArray, GgufTensorInfo, GgufValue, GgufValueType, GGUF_DEFAULT_ALIGNMENT,
};

/// ggml's `GGML_MAX_DIMS`.
const MAX_DIMS: u32 = 4;
/// Deepest nesting of arrays accepted (real files use at most 1; a corrupt file could
/// otherwise recurse until the stack overflows).
const MAX_ARRAY_DEPTH: usize = 8;

pub(super) struct Parsed {
    pub version: u32,
    pub metadata: BTreeMap<String, GgufValue>,
    pub tensors: Vec<GgufTensorInfo>,
    pub alignment: u64,
    pub data_offset: usize,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    file: &'a str,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn err(&self, msg: impl Into<String>) -> HassError {
        HassError::malformed(self.file, msg)
    }

    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        if n > self.remaining() as u64 {
            return Err(self.err(format!(
                "truncated: {} needs {n} bytes at offset {}, only {} left (file is {} bytes)",
                what(),
                self.pos,
                self.remaining(),
                self.buf.len()
            )));
        }
        let n = n as usize;
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let len = self.u64(&|| format!("length of {}", what()))?;
        if len > self.remaining() as u64 {
            return Err(self.err(format!(
                "{} claims a length of {len} bytes at offset {}, but only {} bytes are left",
                what(),
                self.pos - 8,
                self.remaining()
            )));
        }
        let at = self.pos;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| self.err(format!("{} at offset {at} is not valid UTF-8", what())))
    }

    fn value_type(&mut self, what: &dyn Fn() -> String) -> Result<GgufValueType> {
        let at = self.pos;
        let id = self.u32(&|| format!("type of {}", what()))?;
        GgufValueType::from_id(id).ok_or_else(|| {
            self.err(format!(
                "{} has unknown value type id {id} at offset {at}",
                what()
            ))
        })
    }

    fn value(
        &mut self,
        ty: GgufValueType,
        depth: usize,
        what: &dyn Fn() -> String,
    ) -> Result<GgufValue> {
        use GgufValueType as T;
        Ok(match ty {
            T::U8 => GgufValue::U8(self.array::<1>(what)?[0]),
            T::I8 => GgufValue::I8(self.array::<1>(what)?[0] as i8),
            T::U16 => GgufValue::U16(u16::from_le_bytes(self.array(what)?)),
            T::I16 => GgufValue::I16(i16::from_le_bytes(self.array(what)?)),
            T::U32 => GgufValue::U32(u32::from_le_bytes(self.array(what)?)),
            T::I32 => GgufValue::I32(i32::from_le_bytes(self.array(what)?)),
            T::F32 => GgufValue::F32(f32::from_le_bytes(self.array(what)?)),
            T::U64 => GgufValue::U64(u64::from_le_bytes(self.array(what)?)),
            T::I64 => GgufValue::I64(i64::from_le_bytes(self.array(what)?)),
            T::F64 => GgufValue::F64(f64::from_le_bytes(self.array(what)?)),
            T::Bool => {
                let at = self.pos;
                match self.array::<1>(what)?[0] {
                    0 => GgufValue::Bool(false),
                    1 => GgufValue::Bool(true),
                    b => {
                        return Err(
                            self.err(format!("{} at offset {at}: invalid bool byte {b}", what()))
                        )
                    }
                }
            }
            T::String => GgufValue::String(self.string(what)?),
            T::Array => GgufValue::Array(self.array_value(depth, what)?),
        })
    }

    /// An array (after its value-type tag): element type, count, elements.
    fn array_value(&mut self, depth: usize, what: &dyn Fn() -> String) -> Result<GgufArray> {
        if depth >= MAX_ARRAY_DEPTH {
            return Err(self.err(format!(
                "{}: arrays nested deeper than {MAX_ARRAY_DEPTH} levels",
                what()
            )));
        }
        let elem_type = self.value_type(&|| format!("element of {}", what()))?;
        let len = self.u64(&|| format!("length of {}", what()))?;
        let min = min_encoded_size(elem_type) as u64;
        if len.saturating_mul(min) > self.remaining() as u64 {
            return Err(self.err(format!(
                "{} claims {len} elements of type {elem_type:?} (at least {min} bytes each) at offset {}, \
                 but only {} bytes are left",
                what(),
                self.pos - 8,
                self.remaining()
            )));
        }
        // len * min <= remaining: the allocations below are bounded by the file size
        let n = len as usize;
        macro_rules! numeric {
            ($variant:ident, $t:ty) => {{
                const W: usize = std::mem::size_of::<$t>();
                let bytes = self.take((n * W) as u64, what)?;
                GgufArray::$variant(
                    bytes
                        .chunks_exact(W)
                        .map(|b| <$t>::from_le_bytes(b.try_into().unwrap()))
                        .collect(),
                )
            }};
        }
        use GgufValueType as T;
        Ok(match elem_type {
            T::U8 => numeric!(U8, u8),
            T::I8 => numeric!(I8, i8),
            T::U16 => numeric!(U16, u16),
            T::I16 => numeric!(I16, i16),
            T::U32 => numeric!(U32, u32),
            T::I32 => numeric!(I32, i32),
            T::F32 => numeric!(F32, f32),
            T::U64 => numeric!(U64, u64),
            T::I64 => numeric!(I64, i64),
            T::F64 => numeric!(F64, f64),
            T::Bool => {
                let at = self.pos;
                let bytes = self.take(n as u64, what)?;
                let mut v = Vec::with_capacity(n);
                for (i, &b) in bytes.iter().enumerate() {
                    match b {
                        0 => v.push(false),
                        1 => v.push(true),
                        _ => {
                            return Err(self.err(format!(
                                "{}[{i}] at offset {}: invalid bool byte {b}",
                                what(),
                                at + i
                            )))
                        }
                    }
                }
                GgufArray::Bool(v)
            }
            T::String => {
                let mut v = Vec::with_capacity(n);
                for i in 0..n {
                    v.push(self.string(&|| format!("{}[{i}]", what()))?);
                }
                GgufArray::String(v)
            }
            T::Array => {
                let mut v = Vec::with_capacity(n);
                for i in 0..n {
                    v.push(self.array_value(depth + 1, &|| format!("{}[{i}]", what()))?);
                }
                GgufArray::Array(v)
            }
        })
    }
}

/// Smallest number of bytes one value of `ty` takes in the file.
fn min_encoded_size(ty: GgufValueType) -> usize {
    use GgufValueType as T;
    match ty {
        T::U8 | T::I8 | T::Bool => 1,
        T::U16 | T::I16 => 2,
        T::U32 | T::I32 | T::F32 => 4,
        T::U64 | T::I64 | T::F64 | T::String => 8,
        T::Array => 12,
    }
}

pub(super) fn parse(buf: &[u8], file: &str) -> Result<Parsed> {
    let mut c = Cursor { buf, pos: 0, file };
    let magic = c.array::<4>(&|| "magic".into())?;
    if &magic != b"GGUF" {
        return Err(c.err(format!(
            "bad magic {magic:02x?} (expected \"GGUF\"): not a GGUF file"
        )));
    }
    let version = c.u32(&|| "version".into())?;
    match version {
        2 | 3 => {}
        1 => return Err(c.err("GGUF version 1 is not supported (only 2 and 3)")),
        v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => {
            return Err(c.err("big-endian GGUF files are not supported"))
        }
        v => return Err(c.err(format!("unsupported GGUF version {v} (only 2 and 3)"))),
    }
    let n_tensors = c.u64(&|| "tensor count".into())?;
    let n_kv = c.u64(&|| "metadata count".into())?;
    // A key/value takes at least 8 (key length) + 4 (type) + 1 bytes; a tensor info at
    // least 8 (name length) + 4 (n_dims) + 4 (type) + 8 (offset).
    if n_kv.saturating_mul(13) > c.remaining() as u64 {
        return Err(c.err(format!(
            "header claims {n_kv} metadata entries, more than the {} bytes left can hold",
            c.remaining()
        )));
    }
    if n_tensors.saturating_mul(24) > c.remaining() as u64 {
        return Err(c.err(format!(
            "header claims {n_tensors} tensors, more than the {} bytes left can hold",
            c.remaining()
        )));
    }

    let mut metadata = BTreeMap::new();
    for i in 0..n_kv {
        let key = c.string(&|| format!("key of metadata entry {i}"))?;
        let ty = c.value_type(&|| format!("metadata `{key}`"))?;
        let value = c.value(ty, 0, &|| format!("metadata `{key}`"))?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(c.err(format!("duplicate metadata key `{key}`")));
        }
    }

    let alignment = match metadata.get("general.alignment") {
        None => GGUF_DEFAULT_ALIGNMENT,
        Some(v) => match v.as_integer() {
            Some(a) if a > 0 && a <= u32::MAX as i128 && (a as u64).is_power_of_two() => a as u64,
            _ => {
                return Err(c.err(format!(
                    "general.alignment must be a positive power of two, found {v:?}"
                )))
            }
        },
    };

    let mut raw_tensors = Vec::with_capacity(n_tensors as usize);
    let mut seen = HashSet::new();
    for i in 0..n_tensors {
        let name = c.string(&|| format!("name of tensor {i}"))?;
        let what = || format!("tensor `{name}`");
        if !seen.insert(name.clone()) {
            return Err(c.err(format!("duplicate tensor name `{name}`")));
        }
        let n_dims = c.u32(&|| format!("dimension count of {}", what()))?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(c.err(format!(
                "{} has {n_dims} dimensions (must be 1..={MAX_DIMS})",
                what()
            )));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            dims.push(c.u64(&|| format!("dimension {d} of {}", what()))?);
        }
        let type_id = c.u32(&|| format!("type of {}", what()))?;
        let ggml_type = GgmlType::from_id(type_id)
            .ok_or_else(|| c.err(format!("{} has unknown ggml type id {type_id}", what())))?;
        let offset = c.u64(&|| format!("data offset of {}", what()))?;
        raw_tensors.push((name, dims, ggml_type, offset));
    }

    let info_end = c.pos as u64;
    let data_offset = info_end
        .div_ceil(alignment)
        .checked_mul(alignment)
        .ok_or_else(|| c.err("data section offset overflows"))?;
    let file_len = buf.len() as u64;

    let mut tensors = Vec::with_capacity(raw_tensors.len());
    for (name, dims, ggml_type, offset) in raw_tensors {
        let n_elements = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n <= i64::MAX as u64 && usize::try_from(n).is_ok())
            .ok_or_else(|| {
                c.err(format!(
                    "tensor `{name}`: element count of dims {dims:?} overflows"
                ))
            })?;
        let (block, type_size) = ggml_type.block_layout();
        if dims[0] % block as u64 != 0 {
            return Err(c.err(format!(
                "tensor `{name}`: row length {} is not a multiple of the {ggml_type} block size {block}",
                dims[0]
            )));
        }
        let n_bytes = (n_elements / block as u64)
            .checked_mul(type_size as u64)
            .ok_or_else(|| c.err(format!("tensor `{name}`: byte size overflows")))?;
        if offset % alignment != 0 {
            return Err(c.err(format!(
                "tensor `{name}`: data offset {offset} is not a multiple of the alignment {alignment}"
            )));
        }
        let start = data_offset.checked_add(offset);
        let end = start.and_then(|s| s.checked_add(n_bytes));
        match (start, end) {
            (Some(start), Some(end)) if end <= file_len => tensors.push(GgufTensorInfo {
                name,
                dims,
                ggml_type,
                offset,
                n_elements: n_elements as usize,
                n_bytes: n_bytes as usize,
                start: start as usize,
            }),
            _ => {
                return Err(c.err(format!(
                    "tensor `{name}` ({ggml_type}, dims {dims:?}): data at offset {offset} + {n_bytes} bytes \
                     (data section starts at {data_offset}) extends beyond the end of the file ({file_len} bytes)"
                )))
            }
        }
    }

    Ok(Parsed {
        version,
        metadata,
        tensors,
        alignment,
        // only used as an offset; clamp so a tensor-less file whose padded header would
        // end past EOF still parses
        data_offset: data_offset.min(file_len) as usize,
    })
}
