//! Helper threads for parallel work that lasts tens of microseconds: the column
//! parts of one decode-step projection.
//!
//! A decode step runs ~120 such projections, each 20–200 us on one core. Rayon's
//! workers fall asleep between them, and waking one costs 50–150 us on a VM (an
//! inter-processor interrupt through the hypervisor), so splitting a projection
//! over rayon was slower than one thread. The helpers here instead spin for
//! [`SPIN`] after their last part (yielding the core to runnable threads now and
//! then) and only then park, so back-to-back projections hand a part over in well
//! under a microsecond.

use std::cell::UnsafeCell;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, TryLockError};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

/// How long an idle helper keeps spinning before it parks: longer than the gaps
/// between the projections of a forward and between the forwards of a decode loop.
const SPIN: Duration = Duration::from_millis(2);
/// Spin iterations between yields and clock reads.
const SPINS_PER_CHECK: u32 = 256;

/// The part function of the running job, lifetime erased (see [`Pool::run`]).
type Part = *const (dyn Fn(usize) + Sync);

/// Bits of [`Shared::state`] holding the part count.
const PARTS_BITS: u32 = 16;

struct Shared {
    /// `generation << PARTS_BITS | parts` of the latest job, in one word so that a
    /// helper reads both consistently. The generation is bumped once per job; helper
    /// `i` runs part `i + 1` when `i + 1 < parts`.
    state: AtomicUsize,
    /// Parts still running on helpers.
    pending: AtomicUsize,
    /// A helper's part panicked (the caller re-raises it).
    panicked: AtomicBool,
    job: UnsafeCell<Option<Part>>,
    /// Set by a helper before it parks, so the next job unparks it.
    parked: Vec<AtomicBool>,
}

// SAFETY: `job` is written only by the thread holding `Pool::lock`, while no helper
// reads it (before the state change that starts a job, after `pending` reached 0).
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

/// The output of a job whose parts write disjoint elements of it.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub *mut f32);
// SAFETY: parts write disjoint elements, and the buffer outlives the job.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer (a method, so closures capture the `Sync` wrapper, not the field).
    pub fn get(self) -> *mut f32 {
        self.0
    }

    /// Rows `rows` of `width` values as a slice.
    ///
    /// # Safety
    /// The rows are inside the buffer, and no other live slice overlaps them.
    pub unsafe fn rows<'a>(self, rows: Range<usize>, width: usize) -> &'a mut [f32] {
        // SAFETY: the caller's.
        unsafe {
            std::slice::from_raw_parts_mut(self.0.add(rows.start * width), rows.len() * width)
        }
    }
}

/// Spinning helper threads plus the caller.
pub struct Pool {
    shared: &'static Shared,
    helpers: Vec<Thread>,
    /// One job at a time; a concurrent caller runs its parts itself.
    lock: Mutex<()>,
}

impl Pool {
    /// The process-wide pool: one helper per core beyond the first, as many as
    /// rayon's global pool has threads (so `RAYON_NUM_THREADS` limits both).
    pub fn global() -> &'static Pool {
        static POOL: OnceLock<Pool> = OnceLock::new();
        POOL.get_or_init(|| Pool::new(rayon::current_num_threads().saturating_sub(1)))
    }

    fn new(helpers: usize) -> Pool {
        let helpers = helpers.min((1 << PARTS_BITS) - 2);
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            state: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            job: UnsafeCell::new(None),
            parked: (0..helpers).map(|_| AtomicBool::new(false)).collect(),
        }));
        let helpers = (0..helpers)
            .map(|i| {
                thread::Builder::new()
                    .name(format!("hass-spin-{i}"))
                    .spawn(move || helper(shared, i))
                    .expect("spawn a spin-pool helper")
                    .thread()
                    .clone()
            })
            .collect();
        Pool {
            shared,
            helpers,
            lock: Mutex::new(()),
        }
    }

    /// Threads a job can use: the helpers and the caller.
    pub fn threads(&self) -> usize {
        self.helpers.len() + 1
    }

    /// Runs `part(0..parts)`, part 0 on the calling thread and the others on the
    /// helpers, and returns when all are done. With `parts` above [`Self::threads`],
    /// or while another thread's job runs, the caller runs the parts left itself.
    pub fn run(&self, parts: usize, part: &(dyn Fn(usize) + Sync)) {
        if parts == 0 {
            return;
        }
        let guard = match self.lock.try_lock() {
            Ok(g) => Some(g),
            Err(TryLockError::WouldBlock) => None,
            Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
        };
        let on_helpers = match guard {
            Some(_) if parts > 1 => (parts - 1).min(self.helpers.len()),
            _ => 0,
        };
        if on_helpers > 0 {
            let s = self.shared;
            // SAFETY: helpers are idle (pending is 0 and the lock is held) and read
            // `job` only after the state change below; the pointer is used only
            // until `pending` returns to 0, before `part` goes out of scope.
            unsafe {
                *s.job.get() = Some(std::mem::transmute::<&(dyn Fn(usize) + Sync), Part>(part));
            }
            s.pending.store(on_helpers, Ordering::Relaxed);
            let generation = (s.state.load(Ordering::Relaxed) >> PARTS_BITS) + 1;
            s.state.store(
                generation << PARTS_BITS | (on_helpers + 1),
                Ordering::SeqCst,
            );
            for (t, parked) in self.helpers.iter().zip(&s.parked).take(on_helpers) {
                if parked.load(Ordering::SeqCst) {
                    t.unpark();
                }
            }
        }
        part(0);
        for p in on_helpers + 1..parts {
            part(p);
        }
        if on_helpers > 0 {
            let mut spins = 0u32;
            while self.shared.pending.load(Ordering::Acquire) != 0 {
                std::hint::spin_loop();
                spins += 1;
                if spins == SPINS_PER_CHECK {
                    spins = 0;
                    thread::yield_now(); // a helper may wait for this core
                }
            }
            if self.shared.panicked.swap(false, Ordering::Relaxed) {
                panic!("a spin-pool part panicked");
            }
        }
        drop(guard);
    }
}

/// Helper `index`: waits for a new job, runs its part if it has one, repeats.
fn helper(s: &'static Shared, index: usize) {
    let mut seen = 0; // the initial state: a job published before we start still runs
    loop {
        let mut idle_since = Instant::now();
        let mut spins = 0u32;
        loop {
            let state = s.state.load(Ordering::Acquire);
            if state != seen {
                seen = state;
                break;
            }
            std::hint::spin_loop();
            spins += 1;
            if spins == SPINS_PER_CHECK {
                spins = 0;
                thread::yield_now();
                if idle_since.elapsed() > SPIN {
                    s.parked[index].store(true, Ordering::SeqCst);
                    // Re-check after announcing: a job published before the flag was
                    // seen by its caller would otherwise never unpark us.
                    if s.state.load(Ordering::SeqCst) == seen {
                        thread::park_timeout(Duration::from_millis(100));
                    }
                    s.parked[index].store(false, Ordering::SeqCst);
                    idle_since = Instant::now();
                }
            }
        }
        if index + 1 < seen & ((1 << PARTS_BITS) - 1) {
            // SAFETY: set before the state change we observed with Acquire; the
            // caller keeps it alive until `pending` reaches 0.
            let part = unsafe { (*s.job.get()).expect("job published") };
            let run = std::panic::AssertUnwindSafe(|| unsafe { (*part)(index + 1) });
            if std::panic::catch_unwind(run).is_err() {
                s.panicked.store(true, Ordering::Relaxed);
            }
            s.pending.fetch_sub(1, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_every_part_once() {
        let pool = Pool::new(3);
        for parts in 0..9 {
            let hits: Vec<AtomicUsize> = (0..parts).map(|_| AtomicUsize::new(0)).collect();
            pool.run(parts, &|p| {
                hits[p].fetch_add(1, Ordering::Relaxed);
            });
            assert!(
                hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                "{parts} parts"
            );
        }
    }

    #[test]
    fn wakes_parked_helpers_and_serves_concurrent_callers() {
        let pool = Pool::new(1);
        std::thread::sleep(SPIN * 3); // the helper parks
        let total = AtomicUsize::new(0);
        std::thread::scope(|sc| {
            for _ in 0..4 {
                sc.spawn(|| {
                    for _ in 0..200 {
                        pool.run(2, &|p| {
                            total.fetch_add(p + 1, Ordering::Relaxed);
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(Ordering::Relaxed), 4 * 200 * 3);
    }
}
