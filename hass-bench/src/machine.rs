//! Facts about the machine measured in the benchmark run itself.

use std::time::Instant;

/// Peak resident set size of this process in bytes (Linux `VmHWM`), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Copy bandwidth in bytes copied per second: the best of several `memcpy`s of a buffer
/// much larger than the caches. Decode of a small model streams its weights once per
/// token, so `weight bytes / this` estimates the speed limit of one decode step.
pub fn copy_bandwidth() -> f64 {
    const LEN: usize = 256 << 20;
    let src = vec![1u8; LEN];
    let mut dst = vec![0u8; LEN];
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        dst.copy_from_slice(&src);
        std::hint::black_box(&mut dst);
        best = best.min(t.elapsed().as_secs_f64());
    }
    LEN as f64 / best
}
