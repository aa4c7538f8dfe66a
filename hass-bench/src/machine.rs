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

/// Median round trip in nanoseconds of one cache line between two threads (each
/// waits for the other's write, then writes back), over a few rounds of thousands.
/// The verify curve's multi-row forwards pass data between the cores far more than a
/// one-token step does; on a VM whose two vCPUs were sometimes placed on distant cores
/// (this probe: ~350 ns instead of ~60) a 4-token verify cost ~1.5× a 1-token step
/// instead of ~1.2×, so the report states the placement its ratios were measured in.
/// `None` with fewer than two CPUs (the round trip would measure the scheduler).
pub fn core_round_trip_ns() -> Option<f64> {
    use std::sync::atomic::{AtomicU64, Ordering};
    const TRIPS: u64 = 10_000;
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        return None;
    }
    // The engine's helper threads spin ~2 ms after their last job before they sleep; a
    // third spinning thread on two CPUs made round trips of microseconds.
    std::thread::sleep(std::time::Duration::from_millis(20));
    // Spins until `line` holds `value`, yielding now and then: with the other thread
    // descheduled (a busy machine), spinning alone would burn whole time slices.
    let wait = |line: &AtomicU64, value: u64| {
        let mut spins = 0u32;
        while line.load(Ordering::Acquire) != value {
            spins += 1;
            if spins % 4096 == 0 {
                std::thread::yield_now();
            }
            std::hint::spin_loop();
        }
    };
    let mut rounds: Vec<f64> = (0..3)
        .map(|_| {
            let line = AtomicU64::new(0);
            std::thread::scope(|s| {
                s.spawn(|| {
                    for i in 0..TRIPS {
                        wait(&line, 2 * i + 1);
                        line.store(2 * i + 2, Ordering::Release);
                    }
                });
                let t = Instant::now();
                for i in 0..TRIPS {
                    line.store(2 * i + 1, Ordering::Release);
                    wait(&line, 2 * i + 2);
                }
                t.elapsed().as_secs_f64() * 1e9 / TRIPS as f64
            })
        })
        .collect();
    rounds.sort_by(f64::total_cmp);
    Some(rounds[rounds.len() / 2])
}
