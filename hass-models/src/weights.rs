//! Where weights come from. The model is built once, from any [`WeightSource`]:
//! a HF safetensors directory or a GGUF file. Names and shapes are always in the
//! Hugging Face convention (`model.layers.0.self_attn.q_proj.weight`, `[out, in]`).

use hass_core::{HassError, Result};

use crate::gguf::GgmlType;

/// A read-only store of named tensors in the Hugging Face naming and layout.
pub trait WeightSource {
    /// What to call this source in error messages (usually a path).
    fn describe(&self) -> String;
    /// Every tensor name the source holds (HF convention).
    fn tensor_names(&self) -> Vec<String>;
    /// Row-major shape of `name`, or `None` when absent.
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    /// The values of `name` as row-major f32 (dequantised or widened as needed).
    fn read_f32(&self, name: &str) -> Result<Vec<f32>>;
    /// The values of an integer or bool tensor (index maps such as a draft
    /// vocabulary's `d2t`). The default reads float values and requires them integral.
    fn read_ids(&self, name: &str) -> Result<Vec<i64>> {
        float_ids(self, name)
    }
    /// Whether the source stores block-quantized tensors (what `auto` weights keep).
    fn is_quantized(&self) -> bool {
        false
    }
    /// `name`'s ggml blocks as stored, rows in HF order, when the source keeps
    /// block-quantized tensors (a GGUF file); `None` when it holds plain values.
    fn read_blocks(&self, name: &str) -> Result<Option<(GgmlType, Vec<u8>)>> {
        let _ = name;
        Ok(None)
    }
}

/// `name`'s float values as ids, each required integral (and exact in f32).
pub(crate) fn float_ids<S: WeightSource + ?Sized>(source: &S, name: &str) -> Result<Vec<i64>> {
    source
        .read_f32(name)?
        .into_iter()
        .map(|v| {
            if v.fract() == 0.0 && v.abs() < (1u32 << 24) as f32 {
                Ok(v as i64)
            } else {
                Err(HassError::malformed(
                    source.describe(),
                    format!("tensor `{name}` holds {v}, not an integer id"),
                ))
            }
        })
        .collect()
}

/// Tensors held in memory (random initialisation, conversions, tests).
#[derive(Debug, Clone, Default)]
pub struct MemoryWeights {
    name: String,
    tensors: std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

impl MemoryWeights {
    pub fn new(name: impl Into<String>) -> Self {
        MemoryWeights {
            name: name.into(),
            tensors: Default::default(),
        }
    }

    /// Adds (or replaces) a row-major tensor.
    pub fn insert(&mut self, name: impl Into<String>, shape: Vec<usize>, data: Vec<f32>) {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        self.tensors.insert(name.into(), (shape, data));
    }

    /// Every tensor, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &(Vec<usize>, Vec<f32>))> {
        self.tensors.iter()
    }
}

impl WeightSource for MemoryWeights {
    fn describe(&self) -> String {
        self.name.clone()
    }

    fn tensor_names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors.get(name).map(|(s, _)| s.clone())
    }

    fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        self.tensors
            .get(name)
            .map(|(_, d)| d.clone())
            .ok_or_else(|| hass_core::HassError::MissingTensor {
                file: self.name.clone(),
                name: name.to_string(),
            })
    }
}
