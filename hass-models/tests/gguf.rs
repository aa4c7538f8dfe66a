//! GGUF reader tests against fixtures written by `scripts/make_gguf_fixtures.py`
//! (reference values from the `gguf` python package; generated into
//! `$HASS_CACHE/gguf-fixtures/` on first use), plus hand-built corrupt files.

use std::collections::HashSet;
use std::path::PathBuf;

use hass_core::config::{Architecture, RopeScaling};
use hass_core::HassError;
use hass_models::gguf::{
    config_from_gguf, GgmlType, GgufArray, GgufFile, GgufValue, GgufValueType, GgufWeights,
};
use hass_models::WeightSource;
use safetensors::SafeTensors;

fn fixture(name: &str) -> PathBuf {
    hass_models::assets::ensure(hass_models::assets::Asset::GgufFixtures)
        .unwrap()
        .join(name)
}

/// All tensors of a reference safetensors file as (name, shape, f32 values).
fn reference(name: &str) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(fixture(name)).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            assert_eq!(v.dtype(), safetensors::Dtype::F32, "{n}");
            let vals = v
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (n, v.shape().to_vec(), vals)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn assert_malformed(r: Result<GgufFile, HassError>, needle: &str) {
    match r {
        Err(HassError::MalformedFile { file, msg }) => {
            assert!(!file.is_empty());
            assert!(
                msg.to_lowercase().contains(&needle.to_lowercase()),
                "error `{msg}` does not mention `{needle}`"
            );
        }
        Err(e) => panic!("expected MalformedFile mentioning `{needle}`, got {e}"),
        Ok(f) => panic!("expected MalformedFile mentioning `{needle}`, parsed {f:?}"),
    }
}

// ---------------------------------------------------------------- dequantisation

#[test]
fn every_dtype_matches_python_reference() {
    let f = GgufFile::open(fixture("types.gguf")).unwrap();
    let refs = reference("types.ref.safetensors");
    let mut seen = HashSet::new();
    for (name, shape, want) in &refs {
        let info = f
            .tensor_info(name)
            .unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(&info.shape_hf(), shape, "{name}");
        assert_eq!(info.n_elements(), want.len(), "{name}");
        let got = f.dequantize(name).unwrap();
        let mut max_err = 0f32;
        for (g, w) in got.iter().zip(want) {
            max_err = max_err.max((g - w).abs() / w.abs().max(1.0));
        }
        assert!(
            max_err <= 1e-6,
            "{name} ({}): max rel err {max_err}",
            info.ggml_type
        );
        // ggml's reference order of operations is followed exactly: bit-identical
        let exact = got
            .iter()
            .zip(want)
            .all(|(g, w)| g.to_bits() == w.to_bits());
        assert!(
            exact,
            "{name} ({}) is not bit-identical to gguf-py",
            info.ggml_type
        );
        seen.insert(info.ggml_type);
    }
    use GgmlType::*;
    for t in [
        F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K,
    ] {
        assert!(seen.contains(&t), "no fixture tensor of type {t}");
        assert!(t.can_dequantize());
    }
    // a 3-D tensor: GGUF dims reversed
    let t3 = f.tensor_info("t.f32_3d").unwrap();
    assert_eq!(t3.dims, vec![4, 3, 2]);
    assert_eq!(t3.shape_hf(), vec![2, 3, 4]);
}

#[test]
fn f16_corner_cases_are_exact() {
    let f = GgufFile::open(fixture("types.gguf")).unwrap();
    let v = f.dequantize("t.f16").unwrap();
    assert_eq!(v[0], half::f16::from_f32(6e-8).to_f32()); // subnormal
    assert!(v[0] > 0.0);
    assert_eq!(v[2].to_bits(), (-0.0f32).to_bits());
    assert_eq!(v[3], 65504.0);
    let h = f.dequantize_to_f16("t.f16").unwrap();
    assert_eq!(h.len(), v.len());
    assert!(h
        .iter()
        .zip(&v)
        .all(|(h, v)| h.to_f32().to_bits() == v.to_bits()));
}

#[test]
fn unsupported_and_missing_tensors_are_typed_errors() {
    let f = GgufFile::open(fixture("types.gguf")).unwrap();
    let info = f.tensor_info("t.q2_k").unwrap();
    assert_eq!(info.ggml_type, GgmlType::Q2_K);
    assert_eq!(f.tensor_bytes(info).unwrap().len(), 84);
    match f.dequantize("t.q2_k") {
        Err(HassError::UnsupportedDType { name, dtype, .. }) => {
            assert_eq!(name, "t.q2_k");
            assert!(dtype.contains("Q2_K"), "{dtype}");
        }
        other => panic!("expected UnsupportedDType, got {other:?}"),
    }
    assert!(
        matches!(f.dequantize("nope"), Err(HassError::MissingTensor { name, .. }) if name == "nope")
    );
}

#[test]
fn tensor_layout_respects_alignment() {
    let f = GgufFile::open(fixture("types.gguf")).unwrap();
    assert_eq!(f.alignment(), 64);
    assert_eq!(f.data_offset() % 64, 0);
    for t in f.tensors() {
        assert_eq!(t.offset % 64, 0, "{}", t.name);
        assert_eq!(t.file_offset(), f.data_offset() + t.offset as usize);
        let (block, ts) = t.ggml_type.block_layout();
        assert_eq!(t.n_bytes(), t.n_elements() / block * ts);
        assert_eq!(f.tensor_bytes(t).unwrap().len(), t.n_bytes());
    }
    assert_eq!(f.tensors().len(), 13);
    assert_eq!(f.tensors()[0].name, "t.f32");
    let q41 = f.tensor_info("t.q4_1").unwrap();
    assert_eq!(q41.ggml_type, GgmlType::Q4_1);
    assert_eq!(f.tensor_bytes_by_name("t.q4_1").unwrap().len(), 3 * 2 * 20);
}

// ---------------------------------------------------------------- metadata

#[test]
fn metadata_of_every_type() {
    let f = GgufFile::open(fixture("types.gguf")).unwrap();
    assert_eq!(f.version(), 3);
    let m = f.metadata();
    assert_eq!(m["test.u8"], GgufValue::U8(200));
    assert_eq!(m["test.i8"], GgufValue::I8(-100));
    assert_eq!(m["test.u16"], GgufValue::U16(60000));
    assert_eq!(m["test.i16"], GgufValue::I16(-30000));
    assert_eq!(m["test.u32"], GgufValue::U32(4_000_000_000));
    assert_eq!(m["test.i32"], GgufValue::I32(-2_000_000_000));
    assert_eq!(m["test.f32"], GgufValue::F32(0.25));
    assert_eq!(m["test.bool_true"], GgufValue::Bool(true));
    assert_eq!(m["test.bool_false"], GgufValue::Bool(false));
    assert_eq!(m["test.u64"], GgufValue::U64((1 << 40) + 7));
    assert_eq!(m["test.i64"], GgufValue::I64(-(1 << 40) - 7));
    assert_eq!(m["test.f64"], GgufValue::F64(std::f64::consts::PI));
    assert_eq!(f.get_str("test.string").unwrap(), "héllo GGUF ✓");
    assert_eq!(f.get_str("general.architecture").unwrap(), "test");

    // typed getters
    assert_eq!(f.get_u32("test.u32").unwrap(), 4_000_000_000);
    assert_eq!(f.get_u32("test.u8").unwrap(), 200);
    assert_eq!(f.get_usize("test.u64").unwrap(), (1 << 40) + 7);
    assert_eq!(f.get_i64("test.i64").unwrap(), -(1 << 40) - 7);
    assert_eq!(f.get_f32("test.f32").unwrap(), 0.25);
    assert_eq!(f.get_f64("test.f64").unwrap(), std::f64::consts::PI);
    assert!(f.get_bool("test.bool_true").unwrap());
    assert_eq!(f.get_u64("general.alignment").unwrap(), 64);
    assert!(f.contains_key("test.u8"));
    assert!(f.get("nope").is_none());

    // arrays
    let a = f.get_array("test.array_u32").unwrap();
    assert_eq!(a, &GgufArray::U32(vec![1, 2, 3, 4_000_000_000]));
    assert_eq!(a.to_integers().unwrap(), vec![1, 2, 3, 4_000_000_000]);
    assert_eq!((a.len(), a.elem_type()), (4, GgufValueType::U32));
    assert_eq!(a.get(3), Some(GgufValue::U32(4_000_000_000)));
    assert_eq!(a.get(4), None);
    assert_eq!(
        f.get_array("test.array_i32").unwrap(),
        &GgufArray::I32(vec![-1, 0, 7])
    );
    assert_eq!(
        f.get_str_array("test.array_str").unwrap(),
        &["a", "bc", "", "déf"]
    );
    assert_eq!(
        f.get_array("test.array_f32").unwrap().as_f32s().unwrap(),
        &[0.5, -1.5]
    );
    assert_eq!(
        f.get_array("test.array_bool").unwrap().to_values(),
        vec![
            GgufValue::Bool(true),
            GgufValue::Bool(false),
            GgufValue::Bool(true)
        ]
    );
    assert_eq!(
        m["test.array_nested"],
        GgufValue::Array(GgufArray::Array(vec![
            GgufArray::I32(vec![1, 2]),
            GgufArray::I32(vec![3])
        ]))
    );
    assert_eq!(m["test.array_nested"].value_type(), GgufValueType::Array);

    // errors name the key and the problem
    let e = f.get_str("test.u32").unwrap_err().to_string();
    assert!(e.contains("test.u32") && e.contains("string"), "{e}");
    let e = f.get_u32("test.u64").unwrap_err().to_string();
    assert!(e.contains("does not fit"), "{e}");
    let e = f.get_u32("test.i8").unwrap_err().to_string();
    assert!(e.contains("test.i8"), "{e}");
    let e = f.get_f32("test.string").unwrap_err().to_string();
    assert!(e.contains("number"), "{e}");
    let e = f.get_usize("missing.key").unwrap_err().to_string();
    assert!(e.contains("missing.key") && e.contains("missing"), "{e}");
    assert!(f.get_array("test.u8").is_err());
    assert!(f.get_str_array("test.array_u32").is_err());
    assert!(f.get_bool("test.u8").is_err());
}

#[test]
fn version_2_files_parse() {
    let mut bytes = std::fs::read(fixture("types.gguf")).unwrap();
    bytes[4..8].copy_from_slice(&2u32.to_le_bytes());
    let f = GgufFile::from_bytes(bytes, "v2").unwrap();
    assert_eq!(f.version(), 2);
    assert_eq!(f.tensors().len(), 13);
    assert!(f.dequantize("t.q6_k").is_ok());
}

// ---------------------------------------------------------------- robustness

/// Every cut of a fixture before the end of its last tensor's data must be an error
/// (never a panic); cuts in the trailing padding may parse.
fn check_truncations(name: &str, step: usize) {
    let bytes = std::fs::read(fixture(name)).unwrap();
    let full = GgufFile::from_bytes(bytes.clone(), name).unwrap();
    let data_end = full
        .tensors()
        .iter()
        .map(|t| t.file_offset() + t.n_bytes())
        .max()
        .unwrap();
    let mut cuts: Vec<usize> = (0..bytes.len()).step_by(step).collect();
    // every byte of the header region, and the bytes around the data end
    cuts.extend(0..full.data_offset().min(bytes.len()));
    cuts.extend(data_end.saturating_sub(40)..bytes.len());
    for cut in cuts {
        let r = GgufFile::from_bytes(bytes[..cut].to_vec(), format!("{name}[..{cut}]"));
        if cut < data_end {
            match r {
                Err(HassError::MalformedFile { file, msg }) => {
                    assert!(file.contains(name), "{file}");
                    assert!(!msg.is_empty());
                }
                Err(e) => panic!("cut at {cut}: wrong error kind {e}"),
                Ok(_) => panic!("cut at {cut} of {} bytes parsed", bytes.len()),
            }
        } else {
            let f = r.unwrap_or_else(|e| panic!("cut at {cut} (after data end {data_end}): {e}"));
            assert!(f.dequantize(&f.tensors()[0].name).is_ok());
        }
    }
}

#[test]
fn truncated_files_are_errors_never_panics() {
    check_truncations("types.gguf", 1);
    check_truncations("tiny_llama.gguf", 7);
    check_truncations("tiny_qwen2.gguf", 13);
}

#[test]
fn truncated_file_on_disk() {
    let dir = std::env::temp_dir().join(format!("hass-gguf-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bytes = std::fs::read(fixture("types.gguf")).unwrap();
    let p = dir.join("cut.gguf");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = GgufFile::open(&p).unwrap_err().to_string();
    assert!(e.contains("cut.gguf"), "{e}");
    let p0 = dir.join("empty.gguf");
    std::fs::write(&p0, b"").unwrap();
    assert!(matches!(
        GgufFile::open(&p0),
        Err(HassError::MalformedFile { .. })
    ));
    assert!(matches!(
        GgufFile::open(dir.join("absent.gguf")),
        Err(HassError::Io { .. })
    ));
    std::fs::remove_dir_all(&dir).ok();
}

/// A hand-built GGUF image.
#[derive(Default)]
struct Builder {
    version: u32,
    kvs: Vec<u8>,
    n_kv: u64,
    infos: Vec<u8>,
    n_tensors: u64,
    data: Vec<u8>,
    n_tensors_override: Option<u64>,
    n_kv_override: Option<u64>,
}

fn gguf_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s);
}

impl Builder {
    fn new() -> Self {
        Builder {
            version: 3,
            ..Default::default()
        }
    }
    fn kv_raw(mut self, key: &str, ty: u32, value: &[u8]) -> Self {
        gguf_str(&mut self.kvs, key.as_bytes());
        self.kvs.extend_from_slice(&ty.to_le_bytes());
        self.kvs.extend_from_slice(value);
        self.n_kv += 1;
        self
    }
    fn kv_str(self, key: &str, v: &str) -> Self {
        let mut b = vec![];
        gguf_str(&mut b, v.as_bytes());
        self.kv_raw(key, 8, &b)
    }
    fn kv_u32(self, key: &str, v: u32) -> Self {
        self.kv_raw(key, 4, &v.to_le_bytes())
    }
    fn kv_f32(self, key: &str, v: f32) -> Self {
        self.kv_raw(key, 6, &v.to_le_bytes())
    }
    fn tensor(mut self, name: &str, dims: &[u64], ty: u32, offset: u64) -> Self {
        gguf_str(&mut self.infos, name.as_bytes());
        self.infos
            .extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in dims {
            self.infos.extend_from_slice(&d.to_le_bytes());
        }
        self.infos.extend_from_slice(&ty.to_le_bytes());
        self.infos.extend_from_slice(&offset.to_le_bytes());
        self.n_tensors += 1;
        self
    }
    fn data(mut self, bytes: &[u8]) -> Self {
        self.data.extend_from_slice(bytes);
        self
    }
    fn bytes(&self, alignment: usize) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(
            &self
                .n_tensors_override
                .unwrap_or(self.n_tensors)
                .to_le_bytes(),
        );
        out.extend_from_slice(&self.n_kv_override.unwrap_or(self.n_kv).to_le_bytes());
        out.extend_from_slice(&self.kvs);
        out.extend_from_slice(&self.infos);
        while !out.len().is_multiple_of(alignment) {
            out.push(0);
        }
        out.extend_from_slice(&self.data);
        out
    }
    fn parse(&self) -> Result<GgufFile, HassError> {
        GgufFile::from_bytes(self.bytes(32), "built.gguf")
    }
}

#[test]
fn builder_produces_a_valid_file() {
    let data: Vec<u8> = (0..8u32).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let f = Builder::new()
        .kv_str("general.architecture", "x")
        .tensor("a", &[4, 2], 0, 0)
        .data(&data)
        .parse()
        .unwrap();
    assert_eq!(
        f.dequantize("a").unwrap(),
        (0..8).map(|i| i as f32).collect::<Vec<_>>()
    );
    assert_eq!(f.tensor_info("a").unwrap().shape_hf(), vec![2, 4]);
}

#[test]
fn corrupt_headers_are_errors() {
    let ok = || Builder::new().kv_str("general.architecture", "x");
    let f32x8: Vec<u8> = vec![0; 32];

    // magic and version
    let mut b = ok().bytes(32);
    b[0] = b'X';
    assert_malformed(GgufFile::from_bytes(b, "m"), "magic");
    assert_malformed(GgufFile::from_bytes(b"GGU".to_vec(), "m"), "truncated");
    assert_malformed(GgufFile::from_bytes(vec![], "m"), "truncated");
    let mut v = ok();
    v.version = 1;
    assert_malformed(v.parse(), "version 1");
    v.version = 4;
    assert_malformed(v.parse(), "version 4");
    v.version = 3u32.swap_bytes();
    assert_malformed(v.parse(), "big-endian");

    // huge counts fail fast, without allocating
    let mut h = ok();
    h.n_tensors_override = Some(u64::MAX);
    assert_malformed(h.parse(), "tensors");
    let mut h = ok();
    h.n_kv_override = Some(1 << 60);
    assert_malformed(h.parse(), "metadata entries");
    let mut h = ok();
    h.n_kv_override = Some(2); // one more than present (no padding: nothing follows)
    assert_malformed(GgufFile::from_bytes(h.bytes(1), "kv"), "truncated");

    // huge string length (the first key's length)
    let mut b = ok().bytes(32);
    b[24..32].copy_from_slice(&(1u64 << 62).to_le_bytes());
    assert_malformed(GgufFile::from_bytes(b, "s"), "length");
    let mut b = ok().bytes(32);
    b[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
    assert_malformed(GgufFile::from_bytes(b, "s"), "length");

    // huge array length
    let mut arr = 4u32.to_le_bytes().to_vec();
    arr.extend_from_slice(&(u64::MAX / 2).to_le_bytes());
    assert_malformed(ok().kv_raw("a", 9, &arr).parse(), "elements");
    let mut arr = 8u32.to_le_bytes().to_vec(); // array of strings
    arr.extend_from_slice(&(1u64 << 40).to_le_bytes());
    assert_malformed(ok().kv_raw("a", 9, &arr).parse(), "elements");

    // deeply nested arrays
    let mut nested = vec![];
    for _ in 0..100 {
        nested.extend_from_slice(&9u32.to_le_bytes());
        nested.extend_from_slice(&1u64.to_le_bytes());
    }
    nested.extend_from_slice(&0u32.to_le_bytes());
    nested.extend_from_slice(&0u64.to_le_bytes());
    assert_malformed(ok().kv_raw("deep", 9, &nested[..]).parse(), "nested");

    // bad values
    assert_malformed(ok().kv_raw("b", 7, &[2]).parse(), "bool");
    assert_malformed(ok().kv_raw("t", 13, &[0; 8]).parse(), "value type");
    let mut bad_utf8 = vec![];
    gguf_str(&mut bad_utf8, &[0xff, 0xfe]);
    assert_malformed(ok().kv_raw("u", 8, &bad_utf8).parse(), "UTF-8");
    assert_malformed(
        ok().kv_str("general.architecture", "y").parse(),
        "duplicate metadata key",
    );
    assert_malformed(ok().kv_u32("general.alignment", 0).parse(), "alignment");
    assert_malformed(ok().kv_u32("general.alignment", 48).parse(), "alignment");
    assert_malformed(ok().kv_str("general.alignment", "32").parse(), "alignment");

    // tensor infos
    assert_malformed(
        ok().tensor("a", &[8], 0, 64).data(&f32x8).parse(),
        "beyond the end",
    );
    assert_malformed(
        ok().tensor("a", &[8], 0, u64::MAX / 32 * 32)
            .data(&f32x8)
            .parse(),
        "beyond the end",
    );
    assert_malformed(
        ok().tensor("a", &[16], 0, 0).data(&f32x8).parse(),
        "beyond the end",
    );
    assert_malformed(
        ok().tensor("a", &[4], 0, 4).data(&f32x8).parse(),
        "alignment",
    );
    assert_malformed(
        ok().tensor("a", &[1 << 32, 1 << 32, 1 << 32], 0, 0).parse(),
        "overflows",
    );
    assert_malformed(ok().tensor("a", &[u64::MAX, 2], 0, 0).parse(), "overflows");
    assert_malformed(
        ok().tensor("a", &[1, 1, 1, 1, 1], 0, 0)
            .data(&f32x8)
            .parse(),
        "dimensions",
    );
    assert_malformed(
        ok().tensor("a", &[], 0, 0).data(&f32x8).parse(),
        "dimensions",
    );
    assert_malformed(
        ok().tensor("a", &[8], 99, 0).data(&f32x8).parse(),
        "ggml type",
    );
    assert_malformed(
        ok().tensor("a", &[33], 2, 0).data(&[0; 64]).parse(),
        "block size",
    );
    assert_malformed(
        ok().tensor("a", &[4], 0, 0)
            .tensor("a", &[4], 0, 0)
            .data(&f32x8)
            .parse(),
        "duplicate tensor",
    );
    let mut huge_dims = ok().tensor("a", &[8], 0, 0).data(&f32x8);
    // n_dims field of the tensor info: after the name (8 + 1 bytes)
    huge_dims.infos[9..13].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_malformed(huge_dims.parse(), "dimensions");
    // the message names the tensor
    match ok()
        .tensor("blk.0.attn_q.weight", &[8], 0, 4096)
        .data(&f32x8)
        .parse()
    {
        Err(e) => assert!(e.to_string().contains("blk.0.attn_q.weight"), "{e}"),
        Ok(_) => panic!("parsed"),
    }
}

#[test]
fn random_corruption_never_panics() {
    // flip bytes of the header region of a real fixture (xorshift, deterministic)
    let bytes = std::fs::read(fixture("types.gguf")).unwrap();
    let header_len = GgufFile::from_bytes(bytes.clone(), "t")
        .unwrap()
        .data_offset();
    let mut state = 0x9E3779B97F4A7C15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..3000 {
        let mut b = bytes.clone();
        for _ in 0..1 + next() % 4 {
            let at = (next() % header_len as u64) as usize;
            b[at] = next() as u8;
        }
        if let Ok(f) = GgufFile::from_bytes(b, "fuzz") {
            for t in f.tensors() {
                let _ = f.dequantize_info(t);
            }
        }
    }
}

// ---------------------------------------------------------------- model config + weights

#[test]
fn tiny_llama_config_and_unpermuted_weights() {
    let w = GgufWeights::open(fixture("tiny_llama.gguf")).unwrap();
    let c = w.config();
    assert_eq!(c.architecture, Architecture::Llama);
    assert_eq!(
        (c.hidden_size, c.intermediate_size, c.num_hidden_layers),
        (32, 48, 2)
    );
    assert_eq!(
        (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
        (4, 2, 8)
    );
    assert_eq!(c.rms_norm_eps, 1e-5);
    assert_eq!(c.rope_theta, 100000.0);
    assert_eq!(c.rope_scaling, Some(RopeScaling::Linear { factor: 2.0 }));
    assert_eq!(c.max_position_embeddings, 256);
    assert_eq!(c.vocab_size, 40);
    assert!(c.tie_word_embeddings);
    assert!(c.attention_bias, "blk.0.attn_q.bias is present");
    assert_eq!(c.bos_token_id, Some(1));
    assert_eq!(c.eos_token_ids, vec![2, 3]);
    assert_eq!(config_from_gguf(w.file()).unwrap(), *c);

    let refs = reference("tiny_llama.ref.safetensors");
    let names: Vec<String> = refs.iter().map(|r| r.0.clone()).collect();
    assert_eq!(w.tensor_names(), names);
    assert!(w.unmapped_tensors().is_empty());
    assert!(w.shape("lm_head.weight").is_none());
    for (name, shape, want) in &refs {
        assert_eq!(w.shape(name).as_ref(), Some(shape), "{name}");
        let got = w.read_f32(name).unwrap();
        assert!(got == *want, "{name} differs from the HF reference");
    }
    // the fixture really is permuted: the GGUF rows differ from HF, and only q/k are flagged
    for name in [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.self_attn.k_proj.weight",
        "model.layers.0.self_attn.q_proj.bias",
        "model.layers.0.self_attn.k_proj.bias",
    ] {
        assert!(w.is_permuted(name));
        let info = w.info(name).unwrap();
        let raw = w.file().dequantize_info(info).unwrap();
        assert_ne!(raw, w.read_f32(name).unwrap(), "{name}");
    }
    assert!(!w.is_permuted("model.layers.0.self_attn.v_proj.weight"));
    let q = w
        .read_f32("model.layers.0.self_attn.q_proj.weight")
        .unwrap();
    let want = &refs
        .iter()
        .find(|r| r.0 == "model.layers.0.self_attn.q_proj.weight")
        .unwrap()
        .2;
    assert_eq!(&q, want);

    // raw bytes come back in HF row order too
    let raw = w
        .read_raw("model.layers.0.self_attn.q_proj.weight")
        .unwrap();
    assert_eq!(raw.ggml_type, GgmlType::F32);
    assert_eq!(raw.shape_hf, vec![32, 32]);
    let vals: Vec<f32> = raw
        .bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(&vals, want);
    let kb = w.read_raw("model.layers.1.self_attn.k_proj.bias").unwrap();
    let kb: Vec<f32> = kb
        .bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(
        kb,
        w.read_f32("model.layers.1.self_attn.k_proj.bias").unwrap()
    );
    let up = w.read_raw("model.layers.0.mlp.up_proj.weight").unwrap();
    assert_eq!(up.ggml_type, GgmlType::F16);
    assert!(matches!(up.bytes, std::borrow::Cow::Borrowed(_)));

    assert!(matches!(
        w.read_f32("model.layers.9.mlp.up_proj.weight"),
        Err(HassError::MissingTensor { .. })
    ));
}

#[test]
fn tiny_qwen2_config_and_weights() {
    let w = GgufWeights::open(fixture("tiny_qwen2.gguf")).unwrap();
    let c = w.config();
    assert_eq!(c.architecture, Architecture::Qwen2);
    assert_eq!(c.num_hidden_layers, 1);
    assert_eq!(c.rms_norm_eps, 1e-6);
    assert_eq!(c.rope_theta, 1e6);
    assert_eq!(c.rope_scaling, None);
    assert_eq!(
        c.vocab_size, 40,
        "embedding rows win over the 36 token strings"
    );
    assert!(!c.tie_word_embeddings);
    assert!(c.attention_bias);
    assert_eq!(c.eos_token_ids, vec![2]);
    let refs = reference("tiny_qwen2.ref.safetensors");
    assert_eq!(
        w.tensor_names(),
        refs.iter().map(|r| r.0.clone()).collect::<Vec<_>>()
    );
    assert!(w.tensor_names().contains(&"lm_head.weight".to_string()));
    for (name, shape, want) in &refs {
        assert!(!w.is_permuted(name));
        assert_eq!(w.shape(name).as_ref(), Some(shape), "{name}");
        assert!(w.read_f32(name).unwrap() == *want, "{name}");
    }
}

/// Minimal llama-style metadata, without key `{arch}.{skip}`.
fn llama_meta_without(arch: &str, skip: &str) -> Builder {
    let mut b = Builder::new().kv_str("general.architecture", arch);
    for (k, v) in [
        ("embedding_length", 64),
        ("feed_forward_length", 128),
        ("block_count", 2),
        ("attention.head_count", 4),
        ("context_length", 512),
    ] {
        if k != skip {
            b = b.kv_u32(&format!("{arch}.{k}"), v);
        }
    }
    b.kv_f32(&format!("{arch}.attention.layer_norm_rms_epsilon"), 1e-5)
}

fn llama_meta(arch: &str) -> Builder {
    llama_meta_without(arch, "")
}

#[test]
fn config_from_hand_built_metadata() {
    let f = llama_meta("llama")
        .kv_u32("tokenizer.ggml.eos_token_id", 5)
        .parse()
        .unwrap();
    let c = config_from_gguf(&f).unwrap_err();
    assert!(c.to_string().contains("vocabulary"), "{c}");

    let f = llama_meta("llama")
        .kv_u32("llama.vocab_size", 99)
        .parse()
        .unwrap();
    let c = config_from_gguf(&f).unwrap();
    assert_eq!(
        (c.num_key_value_heads, c.head_dim, c.vocab_size),
        (4, 16, 99)
    );
    assert_eq!(c.rope_theta, 10000.0);
    assert!(!c.attention_bias);
    assert!(c.tie_word_embeddings);

    let cfg_err = |b: Builder, needle: &str| {
        let f = b.parse().unwrap();
        match config_from_gguf(&f) {
            Err(HassError::Config { msg, context }) => {
                assert_eq!(context, "built.gguf");
                assert!(msg.contains(needle), "`{msg}` lacks `{needle}`");
            }
            other => panic!("expected a config error about {needle}, got {other:?}"),
        }
    };
    cfg_err(llama_meta("gpt2").kv_u32("gpt2.vocab_size", 9), "gpt2");
    cfg_err(Builder::new(), "general.architecture");
    cfg_err(
        Builder::new()
            .kv_str("general.architecture", "llama")
            .kv_u32("llama.vocab_size", 9),
        "llama.embedding_length",
    );
    cfg_err(
        llama_meta("llama")
            .kv_u32("llama.vocab_size", 9)
            .kv_str("llama.rope.scaling.type", "yarn"),
        "yarn",
    );
    cfg_err(
        llama_meta("llama")
            .kv_u32("llama.vocab_size", 9)
            .kv_u32("llama.rope.dimension_count", 8),
        "partial",
    );
    cfg_err(
        llama_meta("llama")
            .kv_u32("llama.vocab_size", 9)
            .kv_u32("llama.attention.head_count_kv", 3),
        "multiple",
    );
    cfg_err(
        llama_meta_without("llama", "block_count")
            .kv_u32("llama.vocab_size", 9)
            .kv_str("llama.block_count", "2"),
        "block_count",
    );
    cfg_err(
        llama_meta_without("llama", "context_length").kv_u32("llama.vocab_size", 9),
        "llama.context_length",
    );
    cfg_err(
        llama_meta("llama")
            .kv_u32("llama.vocab_size", 9)
            .kv_u32("llama.expert_count", 8),
        "experts",
    );
    // a GgufWeights cannot be built without a config
    let f = llama_meta("bert").parse().unwrap();
    assert!(matches!(
        GgufWeights::from_file(f),
        Err(HassError::Config { .. })
    ));
}

// ---------------------------------------------------------------- the real asset (when present)

/// SmolLM2-135M-Instruct Q4_1, fetched into `$HASS_CACHE` on first use.
#[test]
fn smollm2_q4_1() {
    let path = hass_models::assets::ensure(hass_models::assets::Asset::SmolLm2).unwrap();
    let t0 = std::time::Instant::now();
    let w = GgufWeights::open(&path).unwrap();
    let open_time = t0.elapsed();
    let c = w.config();
    assert_eq!(w.file().version(), 3);
    assert_eq!(c.architecture, Architecture::Llama);
    assert_eq!(
        (c.num_hidden_layers, c.hidden_size, c.intermediate_size),
        (30, 576, 1536)
    );
    assert_eq!(
        (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
        (9, 3, 64)
    );
    assert_eq!(c.rope_theta, 100000.0);
    assert_eq!(c.vocab_size, 49152);
    assert!(c.tie_word_embeddings);
    assert!(!c.attention_bias);
    let names = w.tensor_names();
    assert_eq!(names.len(), 2 + 30 * 9, "{:?}", w.unmapped_tensors());
    let mut types = std::collections::BTreeMap::new();
    let t1 = std::time::Instant::now();
    let mut total = 0usize;
    for name in &names {
        let v = w.read_f32(name).unwrap();
        assert_eq!(v.len(), w.shape(name).unwrap().iter().product::<usize>());
        assert!(v.iter().all(|x| x.is_finite()), "{name}");
        total += v.len();
        *types
            .entry(w.info(name).unwrap().ggml_type.to_string())
            .or_insert(0) += 1;
    }
    eprintln!(
        "SmolLM2: open {:?}, dequantised {} tensors / {total} values in {:?}; types {types:?}; config {c:?}",
        open_time,
        names.len(),
        t1.elapsed()
    );
}
