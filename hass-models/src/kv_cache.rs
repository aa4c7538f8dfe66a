//! A preallocated KV cache with the three operations speculative decoding needs:
//! append (a forward writes its new rows), truncate (drop a rejected tail), and
//! compaction (move the accepted tree slots to a contiguous range).
//!
//! Buffers are allocated once at full capacity. On `burn-flex` a uniquely owned
//! tensor is written in place by `slice_assign`, so a decode step copies only the new
//! rows, never the whole cache.

use burn::prelude::*;
use hass_core::{HassError, Result};

use crate::backend::HassBackend;

/// Keys and values of every layer, `[1, n_kv_heads, capacity, head_dim]` each.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    keys: Vec<Tensor<B, 4>>,
    values: Vec<Tensor<B, 4>>,
    len: usize,
    capacity: usize,
}

impl<B: HassBackend> KvCache<B> {
    /// Allocates a zeroed cache for `layers` layers holding up to `capacity` positions.
    pub fn new(
        layers: usize,
        n_kv_heads: usize,
        head_dim: usize,
        capacity: usize,
        device: &B::Device,
    ) -> Self {
        let zeros = || Tensor::<B, 4>::zeros([1, n_kv_heads, capacity, head_dim], device);
        KvCache {
            keys: (0..layers).map(|_| zeros()).collect(),
            values: (0..layers).map(|_| zeros()).collect(),
            len: 0,
            capacity,
        }
    }

    /// Number of committed positions.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Maximum number of positions.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Number of layers.
    pub fn layers(&self) -> usize {
        self.keys.len()
    }

    /// Errors unless `extra` more positions fit after the committed ones.
    pub fn check_room(&self, extra: usize) -> Result<()> {
        if self.len + extra > self.capacity {
            return Err(HassError::PromptTooLong {
                prompt: self.len + extra,
                context: self.capacity,
            });
        }
        Ok(())
    }

    /// Writes `k`, `v` (`[1, n_kv, t, hd]`) of `layer` at slots `len..len+t` and returns
    /// views of slots `0..len+t` for attention. The committed length is unchanged:
    /// call [`KvCache::advance`] once every layer has been written.
    pub fn append(
        &mut self,
        layer: usize,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [_, h, t, d] = k.dims();
        let end = self.len + t;
        // Take the buffers out so they are uniquely owned and written in place.
        let keys = std::mem::replace(&mut self.keys[layer], k.clone());
        self.keys[layer] = B::write_rows(keys, self.len, k);
        let values = std::mem::replace(&mut self.values[layer], v.clone());
        self.values[layer] = B::write_rows(values, self.len, v);
        let view = [0..1, 0..h, 0..end, 0..d];
        (
            self.keys[layer].clone().slice(view.clone()),
            self.values[layer].clone().slice(view),
        )
    }

    /// Commits `t` positions written by the last [`KvCache::append`] calls.
    pub fn advance(&mut self, t: usize) {
        self.len += t;
        debug_assert!(self.len <= self.capacity);
    }

    /// Drops every position at or after `len`.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Copies the positions at absolute slots `src` (each `< capacity`) to the contiguous
    /// range `dst_start..dst_start + src.len()` and sets the length to its end. This is
    /// how a verified tree path becomes the committed continuation.
    pub fn compact(&mut self, src: &[usize], dst_start: usize) -> Result<()> {
        if src.is_empty() {
            self.len = dst_start;
            return Ok(());
        }
        let dst_end = dst_start + src.len();
        if dst_end > self.capacity || src.iter().any(|&s| s >= self.capacity) {
            return Err(HassError::InvalidArgument(format!(
                "KV compaction {src:?} -> {dst_start}.. exceeds capacity {}",
                self.capacity
            )));
        }
        let contiguous = src.iter().enumerate().all(|(i, &s)| s == dst_start + i);
        if !contiguous {
            let device = self.keys[0].device();
            let idx = Tensor::<B, 1, Int>::from_data(
                TensorData::new(
                    src.iter().map(|&s| s as i32).collect::<Vec<_>>(),
                    [src.len()],
                ),
                &device,
            );
            for buf in self.keys.iter_mut().chain(self.values.iter_mut()) {
                let rows = buf.clone().select(2, idx.clone());
                let owned = std::mem::replace(buf, rows.clone());
                *buf = B::write_rows(owned, dst_start, rows);
            }
        }
        self.len = dst_end;
        Ok(())
    }

    /// Keys of `layer` at slots `0..end` (for tests and inspection).
    pub fn keys(&self, layer: usize, end: usize) -> Tensor<B, 4> {
        let [_, h, _, d] = self.keys[layer].dims();
        self.keys[layer].clone().slice([0..1, 0..h, 0..end, 0..d])
    }

    /// Values of `layer` at slots `0..end`.
    pub fn values(&self, layer: usize, end: usize) -> Tensor<B, 4> {
        let [_, h, _, d] = self.values[layer].dims();
        self.values[layer].clone().slice([0..1, 0..h, 0..end, 0..d])
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::Flex;

    use super::*;

    /// The address of layer 0's key buffer.
    fn keys_ptr(c: &KvCache<Flex>) -> usize {
        let t = c.keys[0].clone().into_primitive().tensor();
        t.as_slice::<f32>().expect("f32").as_ptr() as usize
    }

    /// Appending writes the new rows into the preallocated buffers: a decode step must
    /// not copy the whole cache (on burn-flex a buffer is written in place only while
    /// nothing else holds it).
    #[test]
    fn append_writes_in_place() {
        let dev = Default::default();
        let mut c = KvCache::<Flex>::new(1, 2, 4, 16, &dev);
        let mut ptrs = Vec::new();
        for _ in 0..4 {
            let kv = Tensor::<Flex, 4>::ones([1, 2, 1, 4], &dev);
            let (k, v) = c.append(0, kv.clone(), kv);
            drop((k, v));
            c.advance(1);
            ptrs.push(keys_ptr(&c));
        }
        assert!(ptrs.windows(2).all(|w| w[0] == w[1]), "{ptrs:?}");
    }
}
