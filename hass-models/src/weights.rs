//! Where weights come from. The model is built once, from any [`WeightSource`]:
//! a HF safetensors directory or a GGUF file. Names and shapes are always in the
//! Hugging Face convention (`model.layers.0.self_attn.q_proj.weight`, `[out, in]`).

use hass_core::Result;

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
