//! A projection's weights: a dense Burn tensor, or ggml blocks kept quantized.

use std::sync::Arc;

use burn::prelude::*;

use crate::backend::HassBackend;
use crate::quant::QMatrix;

/// The weights of `y = x · W`.
#[derive(Debug, Clone)]
pub enum Linear<B: Backend> {
    /// `[in, out]` in the storage dtype (f32 or f16).
    Dense(Tensor<B, 2>),
    /// `[out, in]` blocks (HF layout: one row per output), on the host.
    Quant(Arc<QMatrix>),
}

impl<B: HassBackend> Linear<B> {
    /// `x [m, in] · W` in f32.
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        match self {
            Linear::Dense(w) => B::project(x, w),
            Linear::Quant(w) => B::project_quant(x, w),
        }
    }

    /// SwiGLU of `x · W` for `W` holding the gate outputs then the up outputs.
    pub fn forward_swiglu(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        match self {
            Linear::Dense(w) => B::swiglu(B::project(x, w)),
            Linear::Quant(w) => B::project_quant_swiglu(x, w),
        }
    }

    /// Bytes one product reads.
    pub fn bytes(&self) -> usize {
        match self {
            Linear::Dense(w) => w.shape().num_elements() * w.dtype().size(),
            Linear::Quant(q) => q.bytes(),
        }
    }

    /// The weights as HF `[out, in]` matrices, split at the given output counts (a
    /// fused matrix's parts), in f32.
    pub fn hf_parts(&self, outs: &[usize]) -> Vec<Vec<f32>> {
        match self {
            Linear::Dense(w) => crate::loader::unfuse(w, outs),
            Linear::Quant(q) => {
                let all = q.dequantize();
                let mut at = 0;
                outs.iter()
                    .map(|&o| {
                        let part = all[at..at + o * q.cols()].to_vec();
                        at += o * q.cols();
                        part
                    })
                    .collect()
            }
        }
    }
}
