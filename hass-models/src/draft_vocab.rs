//! A reduced draft vocabulary (EAGLE-3's convention, used here with an EAGLE/HASS
//! head): the head predicts over the `N` target tokens most frequent under the
//! training data's loss mask, with its own `[N, H]` output projection, and maps its
//! choices back to target ids. Drafting then reads an `N`-row LM head instead of the
//! target's `V` rows. Verification is unchanged, so output stays lossless; a token
//! outside the set can only be drafted never, which costs acceptance, not
//! correctness.
//!
//! Checkpoint tensors: `lm_head.weight` `[N, H]`, `d2t` `[N]` int64 with
//! `target_id = i + d2t[i]` (ids sorted ascending), `t2d` `[V]` bool (membership);
//! config field `draft_vocab_size`.

use burn::prelude::*;
use hass_core::{HassError, Result};

use crate::backend::HassBackend;
use crate::layer::mm;
use crate::llama::Llama;
use crate::loader::{unfuse, Loader};
use crate::weights::MemoryWeights;

/// The draft's own output vocabulary.
#[derive(Debug, Clone)]
pub struct DraftVocab<B: Backend> {
    /// `[H, N]`, the layout `mm` takes.
    lm_head_t: Tensor<B, 2>,
    /// Target id of each draft index, strictly ascending.
    ids: Vec<u32>,
    target_vocab: usize,
}

/// The `n` ids with the largest `counts` (ties: lower id first), sorted by id. Ids
/// never counted fill up in id order when fewer than `n` were seen.
pub fn most_frequent(counts: &[u64], n: usize) -> Result<Vec<u32>> {
    if n == 0 || n > counts.len() {
        return Err(HassError::InvalidArgument(format!(
            "draft vocabulary size {n} must be in 1..={}",
            counts.len()
        )));
    }
    let mut order: Vec<u32> = (0..counts.len() as u32).collect();
    order.sort_by(|&a, &b| counts[b as usize].cmp(&counts[a as usize]).then(a.cmp(&b)));
    order.truncate(n);
    order.sort_unstable();
    Ok(order)
}

/// EAGLE-3's `d2t` for ascending `ids`: `d2t[i] = ids[i] − i` (as f32 values; the
/// checkpoint writer stores them as int64).
pub fn d2t_offsets(ids: &[u32]) -> Vec<f32> {
    (ids.iter().enumerate())
        .map(|(i, &id)| id as f32 - i as f32)
        .collect()
}

fn check_ids(ids: &[u32], target_vocab: usize, ctx: &str) -> Result<()> {
    if ids.is_empty() || ids.len() > target_vocab {
        return Err(HassError::config(
            ctx,
            format!(
                "draft vocabulary of {} ids for a target vocabulary of {target_vocab}",
                ids.len()
            ),
        ));
    }
    if let Some(w) = ids.windows(2).find(|w| w[0] >= w[1]) {
        return Err(HassError::config(
            ctx,
            format!(
                "d2t ids must be strictly ascending ({} then {})",
                w[0], w[1]
            ),
        ));
    }
    if *ids.last().expect("non-empty") as usize >= target_vocab {
        return Err(HassError::config(
            ctx,
            format!(
                "d2t maps to id {} outside the target vocabulary of {target_vocab}",
                ids.last().expect("non-empty")
            ),
        ));
    }
    Ok(())
}

/// A head's own vocabulary from `ld`'s source: `lm_head.weight` `[N, H]` (row-major)
/// and the target ids from `d2t` (required unless `N = V`), with `t2d`, when present,
/// checked against them. `None` when the source has neither `lm_head.weight` nor `d2t`.
pub fn read_vocab(
    ld: &Loader,
    hidden: usize,
    target_vocab: usize,
) -> Result<Option<(Vec<f32>, Vec<u32>)>> {
    let src = ld.source;
    if src.shape("lm_head.weight").is_none() && src.shape("d2t").is_none() {
        return Ok(None);
    }
    let ctx = src.describe();
    let n = match src.shape("lm_head.weight").as_deref() {
        Some([n, _]) => *n,
        Some(other) => {
            return Err(HassError::ShapeMismatch {
                file: ctx,
                name: "lm_head.weight".into(),
                expected: vec![0, hidden],
                found: other.to_vec(),
            })
        }
        None => {
            return Err(HassError::MissingTensor {
                file: ctx,
                name: "lm_head.weight".into(),
            })
        }
    };
    let lm_head = ld.read("lm_head.weight", &[n, hidden])?;
    let ids: Vec<u32> = if src.shape("d2t").is_some() {
        let offsets = ld.read_ids("d2t", &[n])?;
        offsets
            .iter()
            .enumerate()
            .map(|(i, &o)| {
                u32::try_from(i as i64 + o).map_err(|_| {
                    HassError::config(&ctx, format!("d2t[{i}] = {o} is not a valid id offset"))
                })
            })
            .collect::<Result<_>>()?
    } else if n == target_vocab {
        (0..n as u32).collect()
    } else {
        return Err(HassError::MissingTensor {
            file: ctx,
            name: "d2t".into(),
        });
    };
    check_ids(&ids, target_vocab, &ctx)?;
    if src.shape("t2d").is_some() {
        let member = ld.read_ids("t2d", &[target_vocab])?;
        let mut expect = vec![false; target_vocab];
        for &i in &ids {
            expect[i as usize] = true;
        }
        if let Some(v) = (0..target_vocab).find(|&v| (member[v] != 0) != expect[v]) {
            return Err(HassError::config(
                &ctx,
                format!("t2d[{v}] disagrees with d2t"),
            ));
        }
    }
    Ok(Some((lm_head, ids)))
}

/// Rows `ids` of the target's LM head, `[ids.len(), H]` in the target's dtype: where a
/// reduced vocabulary's own head starts, and what training scores the target over.
pub fn target_rows<B: HassBackend>(target: &Llama<B>, ids: &[u32]) -> Result<Tensor<B, 2>> {
    check_ids(ids, target.config().vocab_size, "draft vocabulary")?;
    let idx = Tensor::<B, 1, Int>::from_data(
        TensorData::new(ids.iter().map(|&i| i as i64).collect(), [ids.len()]),
        target.device(),
    );
    Ok(target.lm_head().select(0, idx))
}

impl<B: HassBackend> DraftVocab<B> {
    /// From an `[N, H]` projection (kept in its dtype) and the `N` target ids it scores.
    pub fn new(lm_head: Tensor<B, 2>, ids: Vec<u32>, target_vocab: usize) -> Result<Self> {
        check_ids(&ids, target_vocab, "draft vocabulary")?;
        let [n, _] = lm_head.dims();
        if n != ids.len() {
            return Err(HassError::InvalidArgument(format!(
                "draft LM head has {n} rows for {} ids",
                ids.len()
            )));
        }
        let (device, dtype) = (lm_head.device(), lm_head.dtype());
        Ok(DraftVocab {
            lm_head_t: Tensor::from_data(lm_head.transpose().into_data(), (&device, dtype)),
            ids,
            target_vocab,
        })
    }

    /// `ids`' rows of the target's LM head: where training starts from.
    pub fn from_target(target: &Llama<B>, ids: Vec<u32>) -> Result<Self> {
        Self::new(target_rows(target, &ids)?, ids, target.config().vocab_size)
    }

    /// The vocabulary stored in `ld`'s source, if any ([`read_vocab`]).
    pub(crate) fn load(
        ld: &Loader,
        hidden: usize,
        target_vocab: usize,
        device: &B::Device,
    ) -> Result<Option<Self>> {
        read_vocab(ld, hidden, target_vocab)?
            .map(|(lm_head, ids)| {
                let data = TensorData::new(lm_head, [ids.len(), hidden]);
                let rows = Tensor::from_data(data, (device, ld.dtype));
                Self::new(rows, ids, target_vocab)
            })
            .transpose()
    }

    /// Draft logits `[rows, N]` of head outputs `x` (`[rows, H]`).
    pub fn logits(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        mm(x, &self.lm_head_t)
    }

    /// `N`.
    pub fn size(&self) -> usize {
        self.ids.len()
    }

    /// The target id of each draft index.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// The `[N, H]` projection, row-major.
    pub fn lm_head(&self) -> Vec<f32> {
        unfuse(&self.lm_head_t, &[self.size()]).remove(0)
    }

    /// Adds `lm_head.weight`, `d2t` (offsets) and `t2d` (0/1) to `w`; the writer
    /// stores the last two as int64 and bool.
    pub(crate) fn export(&self, w: &mut MemoryWeights) {
        let [h, n] = self.lm_head_t.dims();
        w.insert("lm_head.weight", vec![n, h], self.lm_head());
        w.insert("d2t", vec![n], d2t_offsets(&self.ids));
        let mut t2d = vec![0f32; self.target_vocab];
        for &i in &self.ids {
            t2d[i as usize] = 1.0;
        }
        w.insert("t2d", vec![self.target_vocab], t2d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn most_frequent_picks_counts_then_ids_and_sorts() {
        let counts = [5, 0, 9, 5, 1, 0];
        assert_eq!(most_frequent(&counts, 3).unwrap(), vec![0, 2, 3]);
        // Fewer seen than asked: unseen ids fill in id order.
        assert_eq!(most_frequent(&counts, 6).unwrap(), vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(most_frequent(&counts, 5).unwrap(), vec![0, 1, 2, 3, 4]);
        assert!(most_frequent(&counts, 0).is_err());
        assert!(most_frequent(&counts, 7).is_err());
    }

    #[test]
    fn ids_are_checked() {
        assert!(check_ids(&[0, 3, 7], 8, "t").is_ok());
        assert!(check_ids(&[0, 3, 3], 8, "t").is_err());
        assert!(check_ids(&[3, 1], 8, "t").is_err());
        assert!(check_ids(&[1, 8], 8, "t").is_err());
        assert!(check_ids(&[], 8, "t").is_err());
    }
}
