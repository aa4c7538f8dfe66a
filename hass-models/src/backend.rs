//! The backend picked by cargo features: `cuda` > `wgpu` > CPU (`burn-flex`, default),
//! and [`HassBackend`], Burn's backend-extension pattern for the one operation hass
//! needs faster than Burn provides it on the CPU.
//! Library code stays generic over `B: HassBackend`; binaries and tests use the alias.

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::flex::FlexTensor;
use burn::backend::{Autodiff, Flex};
use burn::prelude::*;
use burn::tensor::activation::softmax;
use burn::tensor::{DType, TensorPrimitive};

use crate::attention;
use crate::large_m;
use crate::quant::{qmatmul, QMatrix};
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
pub const COST_REVISION: u32 = 5;

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
            return match wp.as_slice::<f32>() {
                Some(ws) => on_host(x, n, |xs, out| large_m::matmul(xs, m, k, ws, n, out)),
                None => matmul(x, w),
            };
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
        let mask: Option<Vec<bool>> = mask.map(|m| {
            m.clone()
                .into_data()
                .convert::<bool>()
                .into_vec::<bool>()
                .expect("bool mask")
        });
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
            mask.as_deref(),
            &mut out,
        );
        Tensor::from_primitive(TensorPrimitive::Float(FlexTensor::from_data(
            TensorData::new(out, [1, groups, rows, hd]),
        )))
        .to_device(&device)
    }

    const QUANT_KERNELS: bool = true;
    const HOST_MEMORY: bool = true;

    fn project_quant(x: Tensor<Self, 2>, w: &QMatrix) -> Tensor<Self, 2> {
        let [m, k] = x.dims();
        assert_eq!(
            k,
            w.cols(),
            "{k} activation columns for {} weight columns",
            w.cols()
        );
        on_host(x.cast(DType::F32), w.rows(), |xs, out| {
            qmatmul(xs, m, w, out)
        })
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

/// Burn's `slice_assign` of `rows` at positions `start..` of `buf`.
fn assign_rows<B: Backend>(buf: Tensor<B, 4>, start: usize, rows: Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, h, t, d] = rows.dims();
    buf.slice_assign([0..b, 0..h, start..start + t, 0..d], rows)
}

/// `[m, n]` from `product(x, out)`, which fills `out` from `x`'s f32 values.
fn on_host(
    x: Tensor<Flex, 2>,
    n: usize,
    product: impl FnOnce(&[f32], &mut [f32]),
) -> Tensor<Flex, 2> {
    let m = x.dims()[0];
    let device = x.device();
    let xp: FlexTensor = x.into_primitive().tensor();
    let xp = if xp.as_slice::<f32>().is_some() {
        xp
    } else {
        xp.to_contiguous()
    };
    let mut out = vec![0.0f32; m * n];
    product(xp.as_slice::<f32>().expect("contiguous f32"), &mut out);
    Tensor::from_primitive(TensorPrimitive::Float(FlexTensor::from_data(
        TensorData::new(out, [m, n]),
    )))
    .to_device(&device)
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

/// Training differentiates through Burn's matmul.
impl<B: HassBackend, C: CheckpointStrategy> HassBackend for Autodiff<B, C> {
    const HOST_MEMORY: bool = B::HOST_MEMORY;
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
