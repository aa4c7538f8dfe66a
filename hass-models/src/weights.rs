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
