//! Shared helpers of the hass-models integration tests: fixture paths and reading
//! the reference tensors written by `scripts/make_hf_fixtures.py`.
#![allow(dead_code)]

use std::path::PathBuf;

use burn::prelude::*;
use hass_models::{Llama, LogitRows};
use safetensors::{Dtype, SafeTensors};

/// The backend the cargo features pick (the CPU unless `wgpu` or `cuda` is on), so the
/// backend-generic tests run on a GPU backend when built with its feature.
pub type B = hass_models::DefaultBackend;

pub fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/models")
        .join(name)
}

/// The reference tensors of one fixture model.
pub struct Expected {
    bytes: Vec<u8>,
}

impl Expected {
    pub fn load(model: &str) -> Self {
        Self::load_from(fixture_dir(model).join("expected.safetensors"))
    }

    pub fn load_from(path: PathBuf) -> Self {
        Expected {
            bytes: std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
        }
    }

    fn view(&self, name: &str) -> (Dtype, Vec<usize>, Vec<u8>) {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        (t.dtype(), t.shape().to_vec(), t.data().to_vec())
    }

    pub fn f32(&self, name: &str) -> (Vec<f32>, Vec<usize>) {
        let (dt, shape, data) = self.view(name);
        assert_eq!(dt, Dtype::F32, "{name}");
        (
            data.chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            shape,
        )
    }

    pub fn i64(&self, name: &str) -> Vec<i64> {
        let (dt, _, data) = self.view(name);
        assert_eq!(dt, Dtype::I64, "{name}");
        data.chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }

    pub fn ids(&self, name: &str) -> Vec<u32> {
        self.i64(name).into_iter().map(|x| x as u32).collect()
    }
}

/// Greedy continuation of `ids` by `n` tokens through the KV cache.
pub fn greedy(m: &Llama<B>, ids: &[u32], n: usize) -> Vec<u32> {
    let mut cache = m.new_cache(ids.len() + n);
    let pos: Vec<usize> = (0..ids.len()).collect();
    let mut out = Vec::new();
    let mut logits = m
        .forward(ids, &pos, &mut cache, None, LogitRows::Last)
        .unwrap()
        .logits
        .unwrap();
    for _ in 0..n {
        let t = hass_core::sampling::argmax(&to_vec(logits));
        out.push(t);
        let p = cache.len();
        logits = m
            .forward(&[t], &[p], &mut cache, None, LogitRows::Last)
            .unwrap()
            .logits
            .unwrap();
    }
    out
}

pub fn to_vec<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
}

/// Largest absolute difference; panics on a length mismatch.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
