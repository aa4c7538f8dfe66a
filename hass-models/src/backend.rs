//! The backend picked by cargo features: `cuda` > `wgpu` > CPU (`burn-flex`, default),
//! and [`HassBackend`], Burn's backend-extension pattern for the one operation hass
//! needs faster than Burn provides it on the CPU.
//! Library code stays generic over `B: HassBackend`; binaries and tests use the alias.

use std::mem::MaybeUninit;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{binary, Backward, Ops, OpsKind};
use burn::backend::autodiff::NodeId;
use burn::backend::flex::FlexTensor;
use burn::backend::{Autodiff, Flex};
use burn::prelude::*;
use burn::tensor::activation::{silu, softmax};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, TensorPrimitive};

use crate::attention;
use crate::host_ops;
use crate::large_m;
use crate::quant::{qmatmul_swiglu_uninit, qmatmul_uninit, QMatrix};
use crate::small_m::{self, Weights};

#[cfg(feature = "cuda")]
pub type DefaultBackend = burn::backend::Cuda;
#[cfg(all(feature = "wgpu", not(feature = "cuda")))]
pub type DefaultBackend = burn::backend::Wgpu;
#[cfg(not(any(feature = "cuda", feature = "wgpu")))]
pub type DefaultBackend = burn::backend::Flex;

/// A Burn backend with hass's projection `x · w`. The default is Burn's matmul; the CPU
/// backend overrides it for the few-row products of decoding and tree verification.
pub trait HassBackend: Backend {
    /// `x [m, k] · w [k, n]` for f32 activations and f32 or f16 weights; the result is
    /// f32.
    fn project(x: Tensor<Self, 2>, w: &Tensor<Self, 2>) -> Tensor<Self, 2> {
        matmul(x, w)
    }

    /// `buf` (`[1, heads, capacity, d]`) with `rows` (`[1, heads, t, d]`) written at
    /// positions `start..start + t`: how the KV cache appends. The default is Burn's
    /// `slice_assign`.
    fn write_rows(buf: Tensor<Self, 4>, start: usize, rows: Tensor<Self, 4>) -> Tensor<Self, 4> {
        assign_rows(buf, start, rows)
    }

    /// Attention of `q` (`[1, groups, rows, hd]`, a KV group's query heads stacked as
    /// rows) over `k`, `v` (`[1, groups, len, hd]`); `mask` (`[1, 1, rows, len]`) is
    /// true where attention is forbidden. Returns `[1, groups, rows, hd]`.
    fn attention(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        mask: Option<&Tensor<Self, 4, Bool>>,
        scale: f64,
    ) -> Tensor<Self, 4> {
        default_attention(q, k, v, mask, scale)
    }

    /// RMS norm of each row of `x [t, d]`, times `w [d]`.
    fn rms_norm(x: Tensor<Self, 2>, w: &Tensor<Self, 1>, eps: f64) -> Tensor<Self, 2> {
        rms_norm_default(x, w, eps)
    }

    /// `silu(gate) · up` of `gu = [gate | up]` (`[t, 2n]`): `[t, n]`.
    fn swiglu(gu: Tensor<Self, 2>) -> Tensor<Self, 2> {
        swiglu_default(gu)
    }

    /// Columns `from..from + heads · hd` of `x [t, _]` as `[1, heads, t, hd]`, rotated
    /// by rotate-half RoPE when `rope` (`cos`, `sin`: `[1, heads, t, hd]`) is given.
    fn heads(
        x: Tensor<Self, 2>,
        from: usize,
        heads: usize,
        hd: usize,
        rope: Option<(&Tensor<Self, 4>, &Tensor<Self, 4>)>,
    ) -> Tensor<Self, 4> {
        heads_default(x, from, heads, hd, rope)
    }

    /// `[1, heads, t, hd]` back to rows `[t, heads · hd]`.
    fn merge_heads(x: Tensor<Self, 4>) -> Tensor<Self, 2> {
        merge_heads_default(x)
    }

    /// Whether [`HassBackend::project_quant`] has a kernel of its own here: `auto`
    /// weights stay quantized only where it does.
    const QUANT_KERNELS: bool = false;

    /// Whether tensors live in host memory, so reading one on the CPU is a copy, not
    /// a device transfer: where host-side loops over `[rows, vocab]` data (the fused
    /// training losses) beat tensor ops.
    const HOST_MEMORY: bool = false;

    /// `x [m, k] · Wᵀ` for a quantized `W [n, k]`; the result is f32. The default
    /// dequantises `W` on every call (correct everywhere, fast nowhere).
    fn project_quant(x: Tensor<Self, 2>, w: &QMatrix) -> Tensor<Self, 2> {
        let dense = Tensor::<Self, 2>::from_data(
            TensorData::new(w.dequantize(), [w.rows(), w.cols()]),
            &x.device(),
        );
        x.matmul(dense.transpose())
    }

    /// [`HassBackend::swiglu`] of [`HassBackend::project_quant`]`(x, w)`, for `w` holding
    /// the gate rows then the up rows: a backend may fuse the two.
    fn project_quant_swiglu(x: Tensor<Self, 2>, w: &QMatrix) -> Tensor<Self, 2> {
        Self::swiglu(Self::project_quant(x, w))
    }
}

/// The layer steps in Burn's ops: the trait's defaults, and the fallbacks of
/// overrides.
fn rms_norm_default<B: Backend>(x: Tensor<B, 2>, w: &Tensor<B, 1>, eps: f64) -> Tensor<B, 2> {
    let var = (x.clone() * x.clone()).mean_dim(1);
    x * (var + eps).sqrt().recip() * w.clone().unsqueeze::<2>()
}

fn swiglu_default<B: Backend>(gu: Tensor<B, 2>) -> Tensor<B, 2> {
    let [t, n2] = gu.dims();
    let gate = gu.clone().slice([0..t, 0..n2 / 2]);
    silu(gate) * gu.slice([0..t, n2 / 2..n2])
}

fn heads_default<B: Backend>(
    x: Tensor<B, 2>,
    from: usize,
    heads: usize,
    hd: usize,
    rope: Option<(&Tensor<B, 4>, &Tensor<B, 4>)>,
) -> Tensor<B, 4> {
    let t = x.dims()[0];
    let x = x
        .slice([0..t, from..from + heads * hd])
        .reshape([1, t, heads, hd])
        .swap_dims(1, 2);
    let Some((cos, sin)) = rope else {
        return x;
    };
    let x1 = x.clone().slice([0..1, 0..heads, 0..t, 0..hd / 2]);
    let x2 = x.clone().slice([0..1, 0..heads, 0..t, hd / 2..hd]);
    x * cos.clone() + Tensor::cat(vec![x2.neg(), x1], 3) * sin.clone()
}

fn merge_heads_default<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 2> {
    let [_, heads, t, hd] = x.dims();
    x.swap_dims(1, 2).reshape([t, heads * hd])
}

/// Burn's matmul, computing in the weights' dtype.
fn matmul<B: Backend>(x: Tensor<B, 2>, w: &Tensor<B, 2>) -> Tensor<B, 2> {
    let dt = w.dtype();
    if x.dtype() == dt {
        x.matmul(w.clone())
    } else {
        x.cast(dt).matmul(w.clone()).cast(DType::F32)
    }
}

/// Revision of the CPU kernels and their threading: part of the key of anything cached
/// from timings (the tree tuner's cost profiles), so an engine whose costs changed
/// measures again. Bump it with every change that moves a decode or verify cost.
pub const COST_REVISION: u32 = 10;

/// Products with at most this many rows use [`small_m`] on the CPU. Tree verification
/// stays below it, so decode steps and verifications share one kernel — whose rows do
/// not depend on each other bit for bit, which keeps greedy speculative decoding
/// token-identical to vanilla decoding (also with f16 weights).
pub const SMALL_M_MAX_ROWS: usize = 64;

/// [`SMALL_M_MAX_ROWS`], or `$HASS_SMALL_M_MAX_ROWS` when set (0 turns the kernel off:
/// for before/after measurements; trees above the limit lose batch invariance).
fn small_m_max_rows() -> usize {
    static ROWS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *ROWS.get_or_init(|| {
        std::env::var("HASS_SMALL_M_MAX_ROWS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(SMALL_M_MAX_ROWS)
    })
}

impl HassBackend for Flex {
    fn project(x: Tensor<Self, 2>, w: &Tensor<Self, 2>) -> Tensor<Self, 2> {
        let ([m, k], [wk, n]) = (x.dims(), w.dims());
        if k != wk || x.dtype() != DType::F32 {
            return matmul(x, w);
        }
        let wp = w.clone().into_primitive().tensor();
        if m > small_m_max_rows() {
            // Operands read in place, transposed views included (training's backward).
            let xp: FlexTensor = x.clone().into_primitive().tensor();
            let (Some(xv), Some(wv)) = (view_2d(&xp), view_2d(&wp)) else {
                return matmul(x, w);
            };
            let mut out = vec![0.0f32; m * n];
            large_m::matmul_views(xv, m, k, wv, n, &mut out);
            return host_tensor(out, [m, n], &x.device());
        }
        let weights = match wp.dtype() {
            DType::F32 => wp.as_slice::<f32>().map(Weights::F32),
            DType::F16 => wp.as_slice::<half::f16>().map(Weights::F16),
            _ => None,
        };
        let Some(weights) = weights else {
            return matmul(x, w);
        };
        on_host(x, n, |xs, out| small_m::matmul(xs, m, k, weights, n, out))
    }

    /// In place when `buf` is uniquely owned: burn-flex 0.21's `slice_assign` always
    /// copies the whole buffer (it clones its input to make it contiguous, then writes
    /// through a shared handle), which made every decode step copy the whole KV cache.
    fn write_rows(buf: Tensor<Self, 4>, start: usize, rows: Tensor<Self, 4>) -> Tensor<Self, 4> {
        let ([_, h, cap, d], [_, rh, t, rd]) = (buf.dims(), rows.dims());
        let mut bp: FlexTensor = buf.into_primitive().tensor();
        let rp: FlexTensor = rows.clone().into_primitive().tensor().to_contiguous();
        let fits = rh == h && rd == d && start + t <= cap && bp.layout().start_offset() == 0;
        if let (true, DType::F32, DType::F32, true) =
            (fits, bp.dtype(), rp.dtype(), bp.is_contiguous())
        {
            let src = rp.as_slice::<f32>().expect("contiguous");
            if let Some(dst) = bp.try_storage_mut::<f32>() {
                for head in 0..h {
                    dst[(head * cap + start) * d..(head * cap + start + t) * d]
                        .copy_from_slice(&src[head * t * d..(head + 1) * t * d]);
                }
                return Tensor::from_primitive(TensorPrimitive::Float(bp));
            }
        }
        assign_rows(
            Tensor::from_primitive(TensorPrimitive::Float(bp)),
            start,
            rows,
        )
    }

    /// f32 queries attend row by row on the host ([`crate::attention`], both cores):
    /// batch invariant for decode steps, tree verification and draft steps, and no
    /// copy of the cache. Long prefills gain most: Burn's batched matmuls materialise
    /// every `[rows, len]` score matrix (37 MB per SmolLM2 layer at 1,024 tokens) on
    /// one core, where a row here keeps its scores in cache and skips hidden keys.
    fn attention(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        mask: Option<&Tensor<Self, 4, Bool>>,
        scale: f64,
    ) -> Tensor<Self, 4> {
        let ([_, groups, rows, hd], [_, _, len, _]) = (q.dims(), k.dims());
        let kp: FlexTensor = k.clone().into_primitive().tensor();
        let vp: FlexTensor = v.clone().into_primitive().tensor();
        let f32_q = q.dtype() == DType::F32;
        let (Some(kv_k), Some(kv_v), true) = (kv_view(&kp), kv_view(&vp), f32_q) else {
            return default_attention(q, k, v, mask, scale);
        };
        let device = q.device();
        let qp: FlexTensor = q.into_primitive().tensor().to_contiguous();
        let qs = qp.as_slice::<f32>().expect("contiguous f32");
        // Flex stores flags as bytes: read in place (every layer of a forward shares
        // the mask), once checked to be 0 or 1; copied out otherwise.
        let mp: Option<FlexTensor> = mask.map(|m| m.clone().into_primitive());
        let in_place = mp.as_ref().and_then(|p| {
            use burn::tensor::BoolStore::{Native, U8};
            if !matches!(p.dtype(), DType::Bool(Native | U8)) {
                return None;
            }
            let (start, end) = p.layout().contiguous_offsets()?;
            let bytes = p.storage::<u8>().get(start..end)?;
            // An OR over all bytes vectorises (an early-exit `all` ran byte by byte:
            // ~6,000 per layer in a verify).
            let ok = bytes.len() == rows * len && bytes.iter().fold(0, |a, &b| a | b) <= 1;
            // SAFETY: `bool` has `u8`'s layout, and every byte is 0 or 1.
            ok.then(|| unsafe {
                std::slice::from_raw_parts(bytes.as_ptr().cast::<bool>(), bytes.len())
            })
        });
        let copied: Option<Vec<bool>> = match (mask, in_place) {
            (Some(m), None) => Some(
                m.clone()
                    .into_data()
                    .convert::<bool>()
                    .into_vec::<bool>()
                    .expect("bool mask"),
            ),
            _ => None,
        };
        let mask = in_place.or(copied.as_deref());
        let mut out = vec![0f32; groups * rows * hd];
        attention::attend(
            qs,
            kv_k,
            kv_v,
            groups,
            rows,
            hd,
            len,
            scale as f32,
            mask,
            &mut out,
        );
        host_tensor(out, [1, groups, rows, hd], &device)
    }

    fn rms_norm(x: Tensor<Self, 2>, w: &Tensor<Self, 1>, eps: f64) -> Tensor<Self, 2> {
        let [t, d] = x.dims();
        let wp: FlexTensor = w.clone().into_primitive().tensor();
        let (DType::F32, Some(ws)) = (x.dtype(), wp.as_slice::<f32>()) else {
            return rms_norm_default(x, w, eps);
        };
        on_host(x, d, |xs, out| host_ops::rms_norm(xs, ws, eps as f32, out)).reshape([t, d])
    }

    fn swiglu(gu: Tensor<Self, 2>) -> Tensor<Self, 2> {
        if gu.dtype() != DType::F32 {
            return swiglu_default(gu);
        }
        let n = gu.dims()[1] / 2;
        on_host(gu, n, |xs, out| host_ops::swiglu(xs, n, out))
    }

    fn heads(
        x: Tensor<Self, 2>,
        from: usize,
        heads: usize,
        hd: usize,
        rope: Option<(&Tensor<Self, 4>, &Tensor<Self, 4>)>,
    ) -> Tensor<Self, 4> {
        let [t, width] = x.dims();
        let tables = rope.map(|(c, s)| (contiguous(c.clone()), contiguous(s.clone())));
        if x.dtype() != DType::F32
            || tables
                .as_ref()
                .is_some_and(|(c, s)| c.dtype() != DType::F32 || s.dtype() != DType::F32)
        {
            return heads_default(x, from, heads, hd, rope);
        }
        // The tables repeat one `[t, hd]` block per head: the first is enough.
        let rope = tables
            .as_ref()
            .map(|(c, s)| (first_block(c, t * hd), first_block(s, t * hd)));
        let device = x.device();
        let xp = contiguous(x);
        let xs = xp.as_slice::<f32>().expect("contiguous");
        let mut out = vec![0f32; heads * t * hd];
        host_ops::heads(xs, width, from, heads, hd, rope, &mut out);
        host_tensor(out, [1, heads, t, hd], &device)
    }

    fn merge_heads(x: Tensor<Self, 4>) -> Tensor<Self, 2> {
        let [_, heads, t, hd] = x.dims();
        if x.dtype() != DType::F32 {
            return merge_heads_default(x);
        }
        let device = x.device();
        let xp = contiguous(x);
        let mut out = vec![0f32; t * heads * hd];
        host_ops::merge_heads(
            xp.as_slice::<f32>().expect("contiguous"),
            heads,
            hd,
            &mut out,
        );
        host_tensor(out, [t, heads * hd], &device)
    }

    const QUANT_KERNELS: bool = true;
    const HOST_MEMORY: bool = true;

    fn project_quant(x: Tensor<Self, 2>, w: &QMatrix) -> Tensor<Self, 2> {
        quant_on_host(x, w, w.rows(), qmatmul_uninit)
    }

    /// Each thread applies SwiGLU to the gate and up columns it computed
    /// ([`qmatmul_swiglu_uninit`]).
    fn project_quant_swiglu(x: Tensor<Self, 2>, w: &QMatrix) -> Tensor<Self, 2> {
        quant_on_host(x, w, w.rows() / 2, qmatmul_swiglu_uninit)
    }
}

/// Keys or values `[1, groups, len, hd]` read in place: f32 with contiguous rows.
fn kv_view(t: &FlexTensor) -> Option<attention::Kv<'_>> {
    let s = t.layout().strides();
    (t.dtype() == DType::F32 && s[3] == 1 && s[1] >= 0 && s[2] >= 0).then(|| attention::Kv {
        data: t.storage::<f32>(),
        offset: t.layout().start_offset(),
        group_stride: s[1] as usize,
        row_stride: s[2] as usize,
    })
}

/// An f32 matrix in place, whatever its (non-negative) strides.
fn view_2d(t: &FlexTensor) -> Option<large_m::View<'_>> {
    let s = t.layout().strides();
    (t.dtype() == DType::F32 && s.len() == 2 && s[0] >= 0 && s[1] >= 0).then(|| large_m::View {
        data: t.storage::<f32>(),
        offset: t.layout().start_offset(),
        row_stride: s[0] as usize,
        col_stride: s[1] as usize,
    })
}

/// Burn's `slice_assign` of `rows` at positions `start..` of `buf`.
fn assign_rows<B: Backend>(buf: Tensor<B, 4>, start: usize, rows: Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, h, t, d] = rows.dims();
    buf.slice_assign([0..b, 0..h, start..start + t, 0..d], rows)
}

/// `[m, n]` from `product(x, out)`, which fills `out` (zeroed) from `x`'s f32 values.
fn on_host(
    x: Tensor<Flex, 2>,
    n: usize,
    product: impl FnOnce(&[f32], &mut [f32]),
) -> Tensor<Flex, 2> {
    // SAFETY: every value is written (zero) before `product` sees them.
    unsafe {
        on_host_uninit(x, n, |xs, out| {
            out.fill(MaybeUninit::new(0.0));
            product(xs, &mut *(out as *mut [MaybeUninit<f32>] as *mut [f32]))
        })
    }
}

/// [`on_host`] with the output's fresh storage not zeroed first, for a product that
/// overwrites it anyway (a verify's 4 × 49,152 logits were 786 KB of memset).
///
/// # Safety
/// `product` writes every value of `out`.
unsafe fn on_host_uninit(
    x: Tensor<Flex, 2>,
    n: usize,
    product: impl FnOnce(&[f32], &mut [MaybeUninit<f32>]),
) -> Tensor<Flex, 2> {
    let m = x.dims()[0];
    let device = x.device();
    let xp = contiguous(x);
    let mut out = Vec::with_capacity(m * n);
    product(
        xp.as_slice::<f32>().expect("contiguous f32"),
        &mut out.spare_capacity_mut()[..m * n],
    );
    // SAFETY: the caller's `product` wrote all `m · n` values.
    unsafe { out.set_len(m * n) };
    host_tensor(out, [m, n], &device)
}

/// `[m, n]` from a quantized product `kernel(x, m, w, out)` that writes every value of
/// `out`.
fn quant_on_host(
    x: Tensor<Flex, 2>,
    w: &QMatrix,
    n: usize,
    kernel: fn(&[f32], usize, &QMatrix, &mut [MaybeUninit<f32>]),
) -> Tensor<Flex, 2> {
    let [m, k] = x.dims();
    assert_eq!(
        k,
        w.cols(),
        "{k} activation columns for {} weight columns",
        w.cols()
    );
    // SAFETY: the kernels write every output value.
    unsafe { on_host_uninit(x.cast(DType::F32), n, |xs, out| kernel(xs, m, w, out)) }
}

/// The first `n` values of a contiguous f32 primitive.
fn first_block(p: &FlexTensor, n: usize) -> &[f32] {
    &p.as_slice::<f32>().expect("contiguous f32")[..n]
}

/// `x`'s primitive with its values row-major from offset 0 (a copy only for views).
fn contiguous<const D: usize>(x: Tensor<Flex, D>) -> FlexTensor {
    let xp: FlexTensor = x.into_primitive().tensor();
    let dense = match xp.dtype() {
        DType::F32 => xp.as_slice::<f32>().is_some(),
        _ => xp.is_contiguous() && xp.layout().start_offset() == 0,
    };
    if dense {
        xp
    } else {
        xp.to_contiguous()
    }
}

/// A kernel's row-major f32 output as a tensor on `device`.
fn host_tensor<const D: usize>(
    data: Vec<f32>,
    shape: [usize; D],
    device: &Device<Flex>,
) -> Tensor<Flex, D> {
    Tensor::from_primitive(TensorPrimitive::Float(FlexTensor::from_data(
        TensorData::new(data, shape),
    )))
    .to_device(device)
}

/// Burn's batched attention: the trait's default, and the fallback of overrides.
fn default_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Option<&Tensor<B, 4, Bool>>,
    scale: f64,
) -> Tensor<B, 4> {
    let mut scores = q.matmul(k.swap_dims(2, 3)) * scale;
    if let Some(m) = mask {
        scores = scores.mask_fill(m.clone(), f32::NEG_INFINITY);
    }
    softmax(scores, 3).matmul(v)
}

/// Training differentiates through the inner backend's kernels: `project` is recorded
/// as a matmul below; the rest is Burn's autodiff.
impl<B: HassBackend, C: CheckpointStrategy> HassBackend for Autodiff<B, C> {
    const HOST_MEMORY: bool = B::HOST_MEMORY;

    /// Differentiable, the forward and both backward products through the inner
    /// backend's `project`: on the CPU, training's products then run on every core
    /// (Burn's own matmul, and so its autodiff, runs on one there).
    fn project(x: Tensor<Self, 2>, w: &Tensor<Self, 2>) -> Tensor<Self, 2> {
        let (x, w) = (
            x.into_primitive().tensor(),
            w.clone().into_primitive().tensor(),
        );
        Tensor::from_primitive(TensorPrimitive::Float(project_tracked::<B, C>(x, w)))
    }
}

/// [`HassBackend::project`] of the inner backend on primitives.
fn inner_project<B: HassBackend>(x: FloatTensor<B>, w: FloatTensor<B>) -> FloatTensor<B> {
    let w = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(w));
    B::project(Tensor::from_primitive(TensorPrimitive::Float(x)), &w)
        .into_primitive()
        .tensor()
}

/// `x · w` recorded for autodiff as Burn records a matmul: `∂x = g · wᵀ`,
/// `∂w = xᵀ · g`, each operand kept only when the other one needs a gradient.
fn project_tracked<B: HassBackend, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
    w: FloatTensor<Autodiff<B, C>>,
) -> FloatTensor<Autodiff<B, C>> {
    #[derive(Debug)]
    struct Project;

    impl<B: HassBackend> Backward<B, 2> for Project {
        type State = (Option<NodeId>, Option<NodeId>);

        fn backward(
            self,
            ops: Ops<Self::State, 2>,
            grads: &mut Gradients,
            ckpt: &mut Checkpointer,
        ) {
            let (x, w) = ops.state;
            let x = x.map(|id| ckpt.retrieve_node_output::<FloatTensor<B>>(id));
            let w = w.map(|id| ckpt.retrieve_node_output::<FloatTensor<B>>(id));
            binary::<B, _, _>(
                ops.parents,
                ops.node,
                grads,
                |g| inner_project::<B>(g, B::float_transpose(w.expect("kept for ∂x"))),
                |g| inner_project::<B>(B::float_transpose(x.expect("kept for ∂w")), g),
            );
        }
    }

    let (x_tracked, w_tracked) = (x.is_tracked(), w.is_tracked());
    match Project
        .prepare::<C>([x.node.clone(), w.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(mut prep) => {
            let xs = w_tracked.then(|| prep.checkpoint(&x));
            let ws = x_tracked.then(|| prep.checkpoint(&w));
            prep.finish((xs, ws), inner_project::<B>(x.primitive, w.primitive))
        }
        OpsKind::UnTracked(prep) => prep.finish(inner_project::<B>(x.primitive, w.primitive)),
    }
}

#[cfg(feature = "cuda")]
impl HassBackend for burn::backend::Cuda {}
#[cfg(feature = "wgpu")]
impl HassBackend for burn::backend::Wgpu {}

/// Checks that `device` can run a computation, so that a GPU build on a machine without
/// the GPU, driver or Vulkan adapter it needs fails with an error naming the backend
/// rather than a panic inside it (cubecl's runtime thread dies without a CUDA driver and
/// the caller sees only `RecvError`). Loading a model calls it first.
pub fn check_device<B: Backend>(device: &B::Device) -> hass_core::Result<()> {
    use std::panic::{self, AssertUnwindSafe};
    use std::sync::{Arc, Mutex};

    // The backend may panic on its own threads: collect every panic message of the
    // probe instead of printing them, then restore the caller's hook.
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let hook = panic::take_hook();
    let sink = seen.clone();
    panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        sink.lock().unwrap_or_else(|e| e.into_inner()).push(msg);
    }));
    let probe = panic::catch_unwind(AssertUnwindSafe(|| {
        Tensor::<B, 1>::from_floats([1.0], device).into_data()
    }));
    panic::set_hook(hook);
    if probe.is_ok() {
        return Ok(());
    }
    let msgs = seen.lock().unwrap_or_else(|e| e.into_inner()).join("; ");
    Err(hass_core::HassError::Device {
        // Not `B::name`: a cubecl backend's name asks the runtime that just failed. Only
        // the GPU backends can fail here, and only one is compiled in.
        backend: backend_name().into(),
        device: format!("{device:?}"),
        msg: msgs,
        hint: "A build without GPU features runs on the CPU; `cuda` needs an NVIDIA GPU \
               and driver, `wgpu` a Vulkan, Metal or DX12 adapter (lavapipe, Mesa's \
               software Vulkan, works without a GPU)"
            .into(),
    })
}

/// The default device of [`DefaultBackend`] (first GPU, or the CPU).
pub fn default_device() -> burn::tensor::Device<DefaultBackend> {
    Default::default()
}

/// A human-readable name of the compiled-in backend.
pub fn backend_name() -> &'static str {
    if cfg!(feature = "cuda") {
        "cuda"
    } else if cfg!(feature = "wgpu") {
        "wgpu"
    } else {
        "cpu (burn-flex)"
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, Flex};
    use burn::prelude::*;

    use super::HassBackend;
    use crate::test_rng::Rng;

    type AD = Autodiff<Flex>;

    fn host<const D: usize>(t: Tensor<Flex, D>) -> Vec<f32> {
        t.into_data().into_vec::<f32>().unwrap()
    }

    fn close(a: &[f32], b: &[f32], tol: f32, what: &str) {
        assert_eq!(a.len(), b.len(), "{what}");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= tol * (1.0 + y.abs()),
                "{what}[{i}]: {x} vs {y}"
            );
        }
    }

    /// The CPU's host-side layer steps give the Burn-op defaults' values (to f32
    /// rounding: the sums run in another order), on rows taken from a wider tensor.
    #[test]
    fn host_layer_steps_match_burn_ops() {
        let mut rng = Rng(8);
        let dev = Default::default();
        let (t, hd, heads) = (5, 8, 3);
        let width = 2 * heads * hd + 7;
        let tensor = |v: Vec<f32>, shape: [usize; 2]| {
            Tensor::<Flex, 2>::from_data(TensorData::new(v, shape), &dev)
        };
        let x = tensor(rng.vec(t * width), [t, width]);
        let w = Tensor::<Flex, 1>::from_data(TensorData::new(rng.vec(width), [width]), &dev);
        close(
            &host(Flex::rms_norm(x.clone(), &w, 1e-5)),
            &host(super::rms_norm_default(x.clone(), &w, 1e-5)),
            1e-6,
            "rms_norm",
        );
        let gu = tensor(rng.vec(t * 2 * 40), [t, 80]);
        close(
            &host(Flex::swiglu(gu.clone())),
            &host(super::swiglu_default(gu)),
            1e-6,
            "swiglu",
        );
        let table = |v: Vec<f32>| {
            Tensor::<Flex, 4>::from_data(TensorData::new(v, [1, 1, t, hd]), &dev)
                .repeat_dim(1, heads)
        };
        let (cos, sin) = (table(rng.vec(t * hd)), table(rng.vec(t * hd)));
        for rope in [None, Some((&cos, &sin))] {
            let got = Flex::heads(x.clone(), hd + 3, heads, hd, rope);
            let want = super::heads_default(x.clone(), hd + 3, heads, hd, rope);
            close(&host(got.clone()), &host(want), 1e-6, "heads");
            let merged = Flex::merge_heads(got.clone());
            close(
                &host(merged),
                &host(super::merge_heads_default(got)),
                0.0,
                "merge_heads",
            );
        }
    }

    /// The autodiff `project` (every core on the CPU, forward and backward) gives
    /// Burn's matmul value and gradients, for few-row and many-row products, with
    /// operands that are transposed views, and with only one side tracked.
    #[test]
    fn autodiff_project_matches_matmul() {
        let mut rng = Rng(5);
        let dev = Default::default();
        for (m, k, n) in [(3, 40, 24), (130, 96, 200)] {
            let xd = rng.vec(m * k);
            let wd = rng.vec(n * k);
            let make = || {
                let x = Tensor::<AD, 2>::from_data(TensorData::new(xd.clone(), [m, k]), &dev)
                    .require_grad();
                // w as the transposed view of an [n, k] tensor.
                let wt = Tensor::<AD, 2>::from_data(TensorData::new(wd.clone(), [n, k]), &dev)
                    .require_grad();
                (x, wt)
            };
            let (x0, w0) = make();
            let want = x0.clone().matmul(w0.clone().transpose());
            let g_want = (want.clone() * want.clone()).sum().backward();
            let (x1, w1) = make();
            let got = AD::project(x1.clone(), &w1.clone().transpose());
            let g_got = (got.clone() * got.clone()).sum().backward();
            let close = |a: Vec<f32>, b: Vec<f32>, what: &str| {
                let scale = a.iter().fold(1f32, |s, v| s.max(v.abs()));
                let d = a
                    .iter()
                    .zip(&b)
                    .fold(0f32, |s, (x, y)| s.max((x - y).abs()));
                assert!(d <= 1e-5 * scale, "{m}x{k}x{n} {what}: {d} (scale {scale})");
            };
            close(host(want.inner()), host(got.inner()), "value");
            close(
                host(x0.grad(&g_want).unwrap()),
                host(x1.grad(&g_got).unwrap()),
                "∂x",
            );
            close(
                host(w0.grad(&g_want).unwrap()),
                host(w1.grad(&g_got).unwrap()),
                "∂w",
            );
            // Only the weight tracked: it still gets its gradient, x none.
            let x2 = Tensor::<AD, 2>::from_data(TensorData::new(xd.clone(), [m, k]), &dev);
            let w2 = Tensor::<AD, 2>::from_data(TensorData::new(wd.clone(), [n, k]), &dev)
                .require_grad();
            let y = AD::project(x2.clone(), &w2.clone().transpose());
            let g = (y.clone() * y).sum().backward();
            close(
                host(w0.grad(&g_want).unwrap()),
                host(w2.grad(&g).unwrap()),
                "∂w alone",
            );
            assert!(x2.grad(&g).is_none());
        }
    }
}
