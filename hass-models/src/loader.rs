//! Reading checked tensors from a [`WeightSource`] into the layouts the models use,
//! remembering which names were used so that leftovers can be reported.

use std::cell::RefCell;
use std::collections::HashSet;

use burn::prelude::*;
use burn::tensor::DType;
use hass_core::{HassError, Result};

use std::sync::Arc;

use crate::linear::Linear;
use crate::quant::{QMatrix, QType, QuantMode};
use crate::weights::WeightSource;

/// Checked reads from a [`WeightSource`] (shared by every model that loads weights).
pub struct Loader<'a> {
    pub source: &'a dyn WeightSource,
    /// Storage dtype of the dense matrices.
    pub dtype: DType,
    /// How [`Loader::linear`] keeps projections: dense (`None`) or quantized.
    pub quant: Option<QuantMode>,
    used: RefCell<HashSet<String>>,
}

impl<'a> Loader<'a> {
    pub fn new(source: &'a dyn WeightSource, dtype: DType) -> Self {
        Loader {
            source,
            dtype,
            quant: None,
            used: RefCell::new(HashSet::new()),
        }
    }

    /// A loader whose projections ([`Loader::linear`]) stay block-quantized.
    pub fn quantized(source: &'a dyn WeightSource, dtype: DType, mode: QuantMode) -> Self {
        Loader {
            quant: Some(mode),
            ..Self::new(source, dtype)
        }
    }

    /// Marks `name` as consumed without reading it (a redundant copy).
    pub fn skip(&self, name: &str) {
        self.used.borrow_mut().insert(name.to_string());
    }

    /// Reads `name` as f32, checking presence and shape.
    pub fn read(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.checked(name, shape, |n| self.source.read_f32(n))
    }

    /// Reads integer / bool tensor `name` as ids, checking presence and shape.
    pub fn read_ids(&self, name: &str, shape: &[usize]) -> Result<Vec<i64>> {
        self.checked(name, shape, |n| self.source.read_ids(n))
    }

    /// `read(name)` after checking presence and shape, then its length; marks it used.
    fn checked<T>(
        &self,
        name: &str,
        shape: &[usize],
        read: impl FnOnce(&str) -> Result<Vec<T>>,
    ) -> Result<Vec<T>> {
        self.check_shape(name, shape)?;
        let data = read(name)?;
        if data.len() != shape.iter().product::<usize>() {
            return Err(HassError::malformed(
                self.source.describe(),
                format!(
                    "tensor `{name}` holds {} values for shape {shape:?}",
                    data.len()
                ),
            ));
        }
        self.skip(name);
        Ok(data)
    }

    /// Errors unless `name` is present with `shape`.
    fn check_shape(&self, name: &str, shape: &[usize]) -> Result<()> {
        let found = self
            .source
            .shape(name)
            .ok_or_else(|| HassError::MissingTensor {
                file: self.source.describe(),
                name: name.to_string(),
            })?;
        if found != shape {
            return Err(HassError::ShapeMismatch {
                file: self.source.describe(),
                name: name.to_string(),
                expected: shape.to_vec(),
                found,
            });
        }
        Ok(())
    }

    /// A 1-D f32 tensor (norm weights and biases stay f32).
    pub fn vector<B: Backend>(
        &self,
        name: &str,
        len: usize,
        dev: &B::Device,
    ) -> Result<Tensor<B, 1>> {
        Ok(Tensor::from_data(
            TensorData::new(self.read(name, &[len])?, [len]),
            dev,
        ))
    }

    /// A matrix kept in the HF layout `[rows, cols]`, in the storage dtype.
    pub fn matrix<B: Backend>(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        dev: &B::Device,
    ) -> Result<Tensor<B, 2>> {
        let data = self.read(name, &[rows, cols])?;
        Ok(Tensor::from_data(
            TensorData::new(data, [rows, cols]),
            (dev, self.dtype),
        ))
    }

    /// Reads HF `[out, in]` matrices with the same `in` and returns them transposed and
    /// fused column-wise, `[in, Σ out]`, so one matmul computes all of them.
    pub fn fused_in_out<B: Backend>(
        &self,
        names: &[(String, usize)],
        d_in: usize,
        dev: &B::Device,
    ) -> Result<Tensor<B, 2>> {
        let total: usize = names.iter().map(|(_, o)| o).sum();
        let mut out = vec![0f32; d_in * total];
        let mut col0 = 0;
        for (name, d_out) in names {
            let w = self.read(name, &[*d_out, d_in])?;
            for o in 0..*d_out {
                for i in 0..d_in {
                    out[i * total + col0 + o] = w[o * d_in + i];
                }
            }
            col0 += d_out;
        }
        Ok(Tensor::from_data(
            TensorData::new(out, [d_in, total]),
            (dev, self.dtype),
        ))
    }

    /// HF `[out, in]` matrices with the same `in` as one projection `x · [W₁ W₂ …]`:
    /// dense and fused ([`Loader::fused_in_out`]), or quantized rows one after another.
    pub fn linear<B: Backend>(
        &self,
        names: &[(String, usize)],
        d_in: usize,
        dev: &B::Device,
    ) -> Result<Linear<B>> {
        let Some(mode) = self.quant else {
            return Ok(Linear::Dense(self.fused_in_out(names, d_in, dev)?));
        };
        let parts = names
            .iter()
            .map(|(name, d_out)| self.qmatrix(name, *d_out, d_in, mode))
            .collect::<Result<Vec<_>>>()?;
        Ok(Linear::Quant(Arc::new(QMatrix::stack(parts)?)))
    }

    /// `name` (`[rows, cols]`) as quantized blocks: as stored when the source keeps it
    /// in a type `mode` accepts, else quantised from its values.
    pub fn qmatrix(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        mode: QuantMode,
    ) -> Result<QMatrix> {
        self.check_shape(name, &[rows, cols])?;
        let malformed =
            |e: HassError| HassError::malformed(self.source.describe(), format!("`{name}`: {e}"));
        let q = match self.source.read_blocks(name)? {
            Some((t, bytes)) if mode.keeps(t) => {
                let ty = QType::from_ggml(t).expect("kept types have kernels");
                QMatrix::from_blocks(ty, bytes, rows, cols)
            }
            _ => QMatrix::quantize(
                mode.fallback(),
                &self.read(name, &[rows, cols])?,
                rows,
                cols,
            ),
        };
        self.skip(name);
        q.map_err(malformed)
    }

    /// Concatenated f32 vectors.
    pub fn fused_vector<B: Backend>(
        &self,
        names: &[(String, usize)],
        dev: &B::Device,
    ) -> Result<Tensor<B, 1>> {
        let mut out = Vec::new();
        for (name, len) in names {
            out.extend(self.read(name, &[*len])?);
        }
        let n = out.len();
        Ok(Tensor::from_data(TensorData::new(out, [n]), dev))
    }

    /// Errors on the first tensor of the source that was neither read nor skipped and
    /// that `ignorable` does not excuse: a tensor the model would silently drop.
    pub fn check_all_used(&self, ignorable: impl Fn(&str) -> bool) -> Result<()> {
        let used = self.used.borrow();
        match self
            .source
            .tensor_names()
            .into_iter()
            .find(|n| !used.contains(n) && !ignorable(n))
        {
            Some(name) => Err(HassError::UnexpectedTensor {
                file: self.source.describe(),
                name,
            }),
            None => Ok(()),
        }
    }
}

/// Splits a fused `[in, Σ out]` matrix back into HF `[out, in]` row-major matrices.
pub(crate) fn unfuse<B: Backend>(w: &Tensor<B, 2>, outs: &[usize]) -> Vec<Vec<f32>> {
    let [d_in, total] = w.dims();
    let data: Vec<f32> = w
        .clone()
        .into_data()
        .convert::<f32>()
        .into_vec()
        .expect("f32 data");
    let mut col0 = 0;
    outs.iter()
        .map(|&d_out| {
            let mut m = vec![0f32; d_out * d_in];
            for o in 0..d_out {
                for i in 0..d_in {
                    m[o * d_in + i] = data[i * total + col0 + o];
                }
            }
            col0 += d_out;
            m
        })
        .collect()
}
