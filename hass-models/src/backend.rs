//! The backend picked by cargo features: `cuda` > `wgpu` > CPU (`burn-flex`, default).
//! Library code stays generic over `B: Backend`; binaries and tests use this alias.

#[cfg(feature = "cuda")]
pub type DefaultBackend = burn::backend::Cuda;
#[cfg(all(feature = "wgpu", not(feature = "cuda")))]
pub type DefaultBackend = burn::backend::Wgpu;
#[cfg(not(any(feature = "cuda", feature = "wgpu")))]
pub type DefaultBackend = burn::backend::Flex;

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
