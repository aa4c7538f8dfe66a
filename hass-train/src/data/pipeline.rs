//! The training-side view of a sample (spec §2.1, §3.1, §3.2), backend free:
//! truncation, the shift by one, feature noise and padding into a batch.

use rand::Rng;

use super::shards::TrainSample;

/// One sample shifted for the draft: row `t` pairs feature `f_t` with token
/// `x_{t+1}` and is trained to predict `f_{t+1}` (spec §2.1).
#[derive(Debug, Clone, PartialEq)]
pub struct ShiftedSample {
    /// `x_1 .. x_{L-1}, 0`.
    pub input_ids: Vec<u32>,
    /// `f_0 .. f_{L-1}`, `[L, H]` (the draft's input features; noise goes here).
    pub hidden: Vec<f32>,
    /// `f_1 .. f_{L-1}, 0`, `[L, H]`.
    pub target: Vec<f32>,
    /// The stored mask, **not** shifted, with the last position forced to 0.
    pub loss_mask: Vec<f32>,
    pub hidden_size: usize,
}

impl ShiftedSample {
    /// Truncates `s` to `max_len` positions and shifts it as the reference
    /// `CustomDataset` does.
    pub fn new(s: &TrainSample, max_len: usize) -> Self {
        let h = s.hidden_size;
        let l = s.len().min(max_len);
        let mut input_ids: Vec<u32> = s.input_ids[..l].iter().skip(1).copied().collect();
        input_ids.push(0);
        let hidden = s.hidden[..l * h].to_vec();
        let mut target = if l > 0 {
            s.hidden[h..l * h].to_vec()
        } else {
            Vec::new()
        };
        target.resize(l * h, 0.0);
        let mut loss_mask = s.loss_mask[..l].to_vec();
        if let Some(last) = loss_mask.last_mut() {
            *last = 0.0;
        }
        if l == 0 {
            input_ids.clear();
        }
        Self {
            input_ids,
            hidden,
            target,
            loss_mask,
            hidden_size: h,
        }
    }

    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Adds the reference's uniform feature noise to the input features (train split
    /// only; never to the targets): `F += (U[0,1) − 0.5) · std · 512 / L`, with `L` this
    /// sample's length (spec §3.2; the reference uses `std = 0.2`). The noise shrinks
    /// with length, as in the reference.
    pub fn add_uniform_noise(&mut self, std: f32, rng: &mut impl Rng) {
        let l = self.len();
        if l == 0 {
            return;
        }
        let scale = std * 512.0 / l as f32;
        for v in &mut self.hidden {
            *v += (rng.random::<f32>() - 0.5) * scale;
        }
    }
}

/// Shifted samples padded to the longest (spec §3.1): ids, features and targets with
/// 0, the loss and attention masks with 0. All row-major, batch first.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub batch: usize,
    /// Padded length.
    pub len: usize,
    pub hidden_size: usize,
    /// `[B, len]`.
    pub input_ids: Vec<u32>,
    /// `[B, len, H]`.
    pub hidden: Vec<f32>,
    /// `[B, len, H]`.
    pub target: Vec<f32>,
    /// `[B, len]`.
    pub loss_mask: Vec<f32>,
    /// `[B, len]`, 1 over each sample's valid length.
    pub attention_mask: Vec<f32>,
    /// Each sample's valid length.
    pub lens: Vec<usize>,
}

impl Batch {
    /// Pads `samples` (all with the same hidden size) into one batch.
    pub fn collate(samples: &[ShiftedSample]) -> Self {
        let b = samples.len();
        let len = samples.iter().map(ShiftedSample::len).max().unwrap_or(0);
        let h = samples.first().map_or(0, |s| s.hidden_size);
        let mut out = Batch {
            batch: b,
            len,
            hidden_size: h,
            input_ids: vec![0; b * len],
            hidden: vec![0.0; b * len * h],
            target: vec![0.0; b * len * h],
            loss_mask: vec![0.0; b * len],
            attention_mask: vec![0.0; b * len],
            lens: samples.iter().map(ShiftedSample::len).collect(),
        };
        for (i, s) in samples.iter().enumerate() {
            assert_eq!(
                s.hidden_size, h,
                "samples of one batch share the hidden size"
            );
            let l = s.len();
            out.input_ids[i * len..i * len + l].copy_from_slice(&s.input_ids);
            out.loss_mask[i * len..i * len + l].copy_from_slice(&s.loss_mask);
            out.attention_mask[i * len..i * len + l].fill(1.0);
            out.hidden[i * len * h..(i * len + l) * h].copy_from_slice(&s.hidden);
            out.target[i * len * h..(i * len + l) * h].copy_from_slice(&s.target);
        }
        out
    }
}
