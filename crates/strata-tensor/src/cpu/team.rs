//! A decode team: the current rayon pool's other workers kept spinning through one decode step, so
//! that the step's many short parallel loops (a matvec of a few hundred microseconds, one per
//! projection) start on every thread at once instead of waiting for sleeping workers to wake.
//!
//! Rayon parks an idle worker after a short spin, and a parked worker takes tens of microseconds
//! to wake on a VM: on a 4-bit 1.1B model that was about 30 us of each of the ~90 matvecs of a
//! token, over a tenth of it. Inside [`with_team`], the parallel loops of the decode path
//! ([`for_each_task`], [`for_each_chunk_mut`]) hand their tasks to helpers that watch one atomic
//! word, llama.cpp-style, and the calling thread works on the same tasks; outside it (prefill, or
//! a thread that is not a pool worker) they are plain rayon loops. Either way every task runs
//! exactly once with the same inputs, so a loop's results are identical bit for bit. (Decode
//! attention alone splits short sequences into more key chunks inside a team, where a split is
//! cheap; chunks merge in a different order, so its rounding may differ.)
//!
//! Protocol: the calling thread (the team's owner) publishes a job as a pointer plus one word per
//! member holding a contiguous range `lo..hi` of its unclaimed tasks. Each member claims its own
//! range from the front, so that it streams one contiguous part of the weights forward, as a
//! rayon split would and as the kernels' prefetching expects; a member whose range is empty takes
//! tasks from the back of the others' (work stealing, for the end of the job). Every claim is a
//! compare-and-swap, and a member counts a task done when it finishes it. The owner returns only
//! when every task is done, so a job (on the owner's stack) outlives every claim on it, and a new
//! job is published only after that, so a successful claim always refers to the job that is
//! current. Between jobs, a helper prefetches the start of its share of the memory the owner
//! says the next job reads ([`prefetch_next`]: the decoder names the next projection's weights),
//! so that the memory bus works while the owner runs the step's serial parts. Helpers leave after
//! [`IDLE_LIMIT`] without work or when the team ends, and the owner re-spawns them at its next
//! job, so a helper never spins for long behind serial work and never holds a worker for good.

use std::cell::RefCell;
use std::panic::{self, AssertUnwindSafe};
use std::ptr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rayon::prelude::*;

/// How long a helper spins without a task before it leaves its worker to rayon.
const IDLE_LIMIT: Duration = Duration::from_micros(500);

thread_local! {
    /// The team this thread owns while it runs inside [`with_team`].
    static OWNED: RefCell<Option<Arc<Team>>> = const { RefCell::new(None) };
}

/// Runs `f` with the current rayon pool's other workers kept spinning as a team for the parallel
/// loops of the decode path. Meant for one short, loop-heavy step (a decode token); nested calls,
/// one-thread pools and threads outside a rayon pool simply run `f`.
pub fn with_team<R>(f: impl FnOnce() -> R) -> R {
    let threads = rayon::current_num_threads();
    if threads < 2 || rayon::current_thread_index().is_none() || in_team() {
        return f();
    }
    let team = Arc::new(Team::new(threads - 1));
    team.spawn_helpers();
    /// Clears the thread's team and stops the helpers however `f` ends.
    struct End(Arc<Team>);
    impl Drop for End {
        fn drop(&mut self) {
            OWNED.set(None);
            self.0.stop.store(true, Ordering::Release);
        }
    }
    OWNED.set(Some(Arc::clone(&team)));
    let _end = End(team);
    f()
}

/// Whether this thread owns a team, so that the parallel loops it starts go to the team.
pub fn in_team() -> bool {
    OWNED.with_borrow(Option::is_some)
}

/// Runs `a` then `b` on this thread when it owns a team (each one's loops then use the whole
/// team), otherwise `rayon::join(a, b)`.
pub fn join<A, B, RA, RB>(a: A, b: B) -> (RA, RB)
where
    A: FnOnce() -> RA + Send,
    B: FnOnce() -> RB + Send,
    RA: Send,
    RB: Send,
{
    if in_team() { (a(), b()) } else { rayon::join(a, b) }
}

/// Runs `f(i)` for every `i` in `0..n`, in parallel: on this thread's team when it owns one,
/// otherwise on rayon.
pub(crate) fn for_each_task(n: usize, f: impl Fn(usize) + Sync) {
    match OWNED.with_borrow(Option::clone) {
        Some(team) => team.run(n, &f),
        None => (0..n).into_par_iter().for_each(&f),
    }
}

/// Runs `f(i, chunk)` for the consecutive chunks of `len` elements of `y` (the last may be
/// shorter), in parallel as [`for_each_task`].
pub(crate) fn for_each_chunk_mut<T: Send>(y: &mut [T], len: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    if !in_team() {
        y.par_chunks_mut(len).enumerate().for_each(|(i, c)| f(i, c));
        return;
    }
    let total = y.len();
    let base = SendPtr(y.as_mut_ptr());
    for_each_task(total.div_ceil(len), |i| {
        let start = i * len;
        let end = (start + len).min(total);
        // SAFETY: task `i` runs once and takes elements `start..end` of `y`, disjoint from every
        // other task's, and `y` is borrowed mutably for the whole loop.
        let chunk = unsafe { std::slice::from_raw_parts_mut(base.get().add(start), end - start) };
        f(i, chunk);
    });
}

/// A raw pointer that may cross threads (for [`for_each_chunk_mut`]'s disjoint chunks).
struct SendPtr<T>(*mut T);
// SAFETY: only used to hand disjoint chunks of a `&mut [T]` (with `T: Send`) to other threads.
unsafe impl<T: Send> Send for SendPtr<T> {}
// SAFETY: as above; the pointer itself is only copied.
unsafe impl<T: Send> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    fn get(&self) -> *mut T {
        self.0
    }
}

/// A job's tasks, as the owner publishes them.
struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync),
}

/// What the owner and its helpers share.
struct Team {
    /// Per member (0 is the owner, then one per helper slot): `hi << 32 | lo`, the unclaimed tasks
    /// `lo..hi` of its part of the current job.
    parts: Vec<Padded<AtomicU64>>,
    /// The current job (a `Job` on the owner's stack), valid while one of its tasks is claimed and
    /// not done.
    job: AtomicPtr<()>,
    /// Tasks of the current job done (on its own cache line, away from the words helpers poll).
    done: Padded<AtomicUsize>,
    /// Set when the team ends.
    stop: AtomicBool,
    /// Per member: whether a helper runs in that slot (the owner's entry is unused).
    alive: Vec<AtomicBool>,
    /// Set when a task panicked on a helper; the owner re-raises it.
    panicked: AtomicBool,
    /// Set while the owner runs a job, so that a loop started from inside a task runs inline.
    busy: AtomicBool,
    /// The memory the next job reads ([`prefetch_next`]): up to [`HINT_PARTS`] (address, length)
    /// pairs, published by bumping `hint_seq`.
    hint: [(AtomicUsize, AtomicUsize); HINT_PARTS],
    hint_seq: AtomicU64,
}

/// The most byte ranges one [`prefetch_next`] hint holds.
const HINT_PARTS: usize = 3;

/// The most bytes a helper prefetches for one hint.
const HINT_BYTES: usize = 512 << 10;

/// Tells the team's helpers which memory the next parallel loop reads (the weights of the next
/// projection, in the order its tasks read them), so that while the owner runs serial work each
/// helper prefetches the start of the part it will take. Outside a team it does nothing. A hint
/// only affects speed: the helpers never read the memory, and a prefetch of an address that is
/// no longer mapped is ignored.
pub fn prefetch_next(parts: &[&[u8]]) {
    OWNED.with_borrow(|team| {
        if let Some(team) = team {
            for (i, slot) in team.hint.iter().enumerate() {
                let (at, len) = parts.get(i).map_or((0, 0), |p| (p.as_ptr() as usize, p.len()));
                slot.0.store(at, Ordering::Relaxed);
                slot.1.store(len, Ordering::Relaxed);
            }
            team.hint_seq.fetch_add(1, Ordering::Release);
        }
    });
}

const INDEX_MASK: u64 = u32::MAX as u64;

/// A value alone on its cache line.
#[repr(align(64))]
struct Padded<T>(T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl Team {
    /// A team of the owner and `helpers` helpers (none started yet).
    fn new(helpers: usize) -> Team {
        let members = helpers + 1;
        Team {
            parts: (0..members).map(|_| Padded(AtomicU64::new(0))).collect(),
            job: AtomicPtr::new(ptr::null_mut()),
            done: Padded(AtomicUsize::new(0)),
            stop: AtomicBool::new(false),
            alive: (0..members).map(|_| AtomicBool::new(false)).collect(),
            panicked: AtomicBool::new(false),
            busy: AtomicBool::new(false),
            hint: std::array::from_fn(|_| (AtomicUsize::new(0), AtomicUsize::new(0))),
            hint_seq: AtomicU64::new(0),
        }
    }

    /// Spawns a helper on the pool for every slot without one. Called on the owner, which holds
    /// the `Arc` the helpers clone.
    fn spawn_helpers(self: &Arc<Team>) {
        for slot in 1..self.alive.len() {
            if !self.alive[slot].load(Ordering::Acquire) {
                self.alive[slot].store(true, Ordering::Release);
                let team = Arc::clone(self);
                rayon::spawn(move || team.help(slot));
            }
        }
    }

    /// Runs `f(i)` for `i` in `0..n` with the helpers; returns when all are done.
    fn run(self: &Arc<Team>, n: usize, f: &(dyn Fn(usize) + Sync)) {
        if n <= 1 || self.busy.swap(true, Ordering::Acquire) {
            // At most one task, or a loop started inside a task while the team is mid-job: inline.
            (0..n).for_each(f);
            return;
        }
        assert!(n <= INDEX_MASK as usize, "team job of {n} tasks");
        self.spawn_helpers();
        let job = Job { f };
        self.job.store(&job as *const Job<'_> as *mut (), Ordering::Release);
        self.done.store(0, Ordering::Release);
        let members = self.parts.len();
        for (m, part) in self.parts.iter().enumerate() {
            let (lo, hi) = (m * n / members, (m + 1) * n / members);
            part.store((hi as u64) << 32 | lo as u64, Ordering::Release);
        }
        let mut owner_panic = None;
        while let Some(i) = self.claim(0) {
            if let Err(payload) = panic::catch_unwind(AssertUnwindSafe(|| f(i))) {
                owner_panic.get_or_insert(payload);
            }
            self.done.fetch_add(1, Ordering::AcqRel);
        }
        // Every task is claimed; wait for the helpers' last ones (they read `job` until then).
        while self.done.load(Ordering::Acquire) < n {
            std::hint::spin_loop();
        }
        self.job.store(ptr::null_mut(), Ordering::Release);
        self.busy.store(false, Ordering::Release);
        if let Some(payload) = owner_panic {
            panic::resume_unwind(payload);
        }
        if self.panicked.swap(false, Ordering::AcqRel) {
            panic!("a task of a decode-team loop panicked on a helper thread");
        }
    }

    /// Where helper `slot` starts prefetching the current hint: at its share of the hinted bytes
    /// (the next job's tasks are split in that order), for at most [`HINT_BYTES`]; returns the
    /// address range.
    fn hint_start(&self, slot: usize) -> (usize, usize) {
        let parts: [(usize, usize); HINT_PARTS] =
            std::array::from_fn(|i| (self.hint[i].0.load(Ordering::Relaxed), self.hint[i].1.load(Ordering::Relaxed)));
        let total: usize = parts.iter().map(|p| p.1).sum();
        let mut skip = total / self.parts.len() * slot;
        for (at, len) in parts {
            if skip < len {
                let start = at + skip;
                return (start, start + (len - skip).min(HINT_BYTES));
            }
            skip -= len;
        }
        (0, 0)
    }

    /// Claims a task of the current job for member `me`: the first of its own part, else the last
    /// of another member's.
    fn claim(&self, me: usize) -> Option<usize> {
        if let Some(i) = take(&self.parts[me], false) {
            return Some(i);
        }
        let members = self.parts.len();
        (1..members).find_map(|d| take(&self.parts[(me + d) % members], true))
    }

    /// A helper's loop in slot `slot`: run claimed tasks until the team ends or no job comes for
    /// [`IDLE_LIMIT`].
    fn help(&self, slot: usize) {
        // A helper job that rayon runs on a thread owning a team (one waiting inside a join)
        // leaves at once: that thread has its own work to return to.
        if in_team() {
            self.alive[slot].store(false, Ordering::Release);
            return;
        }
        let mut idle_since = Instant::now();
        let mut spins = 0u32;
        // The hint being prefetched: its sequence number, and the lines left (address, end).
        let (mut seen, mut next, mut end) = (self.hint_seq.load(Ordering::Acquire), 0usize, 0usize);
        loop {
            if let Some(i) = self.claim(slot) {
                // SAFETY: task `i` of the current job is claimed and not done, so the owner is
                // still inside `run` for that job and `job` points at its live `Job`.
                let job = unsafe { &*(self.job.load(Ordering::Acquire) as *const Job<'_>) };
                if panic::catch_unwind(AssertUnwindSafe(|| (job.f)(i))).is_err() {
                    self.panicked.store(true, Ordering::Release);
                }
                self.done.fetch_add(1, Ordering::AcqRel);
                idle_since = Instant::now();
                spins = 0;
                continue;
            }
            if self.stop.load(Ordering::Acquire) {
                break;
            }
            let seq = self.hint_seq.load(Ordering::Acquire);
            if seq != seen {
                seen = seq;
                (next, end) = self.hint_start(slot);
            }
            if next < end {
                // A kilobyte per turn, so that a new job is seen within a few hundred cycles.
                for line in (next..end.min(next + 1024)).step_by(64) {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: a prefetch is a hint; it never faults, whatever the address.
                    unsafe {
                        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(line as *const i8)
                    };
                    #[cfg(not(target_arch = "x86_64"))]
                    let _ = line;
                }
                next += 1024;
                continue;
            }
            spins += 1;
            if spins.is_multiple_of(256) && idle_since.elapsed() > IDLE_LIMIT {
                break;
            }
            std::hint::spin_loop();
        }
        self.alive[slot].store(false, Ordering::Release);
    }
}

/// Claims the first (or, `from_back`, the last) unclaimed task of one member's part, if any.
fn take(part: &AtomicU64, from_back: bool) -> Option<usize> {
    let mut s = part.load(Ordering::Acquire);
    loop {
        let (lo, hi) = (s & INDEX_MASK, s >> 32);
        if lo >= hi {
            return None;
        }
        let (new, task) = if from_back { (s - (1 << 32), hi - 1) } else { (s + 1, lo) };
        match part.compare_exchange_weak(s, new, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return Some(task as usize),
            Err(now) => s = now,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap()
    }

    /// Runs a loop of `n` tasks and returns how often each ran.
    fn counts(n: usize) -> Vec<usize> {
        let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
        for_each_task(n, |i| {
            hits[i].fetch_add(1, Ordering::Relaxed);
        });
        hits.into_iter().map(AtomicUsize::into_inner).collect()
    }

    #[test]
    fn every_task_runs_once_in_and_out_of_a_team() {
        for threads in [1, 2, 3] {
            pool(threads).install(|| {
                for n in [0, 1, 2, 3, 7, 64, 1001] {
                    assert!(counts(n).iter().all(|&c| c == 1), "{threads} threads, {n} tasks, no team");
                    with_team(|| {
                        assert_eq!(in_team(), threads > 1);
                        // Many jobs in a row, as a decode step runs them.
                        for _ in 0..50 {
                            assert!(counts(n).iter().all(|&c| c == 1), "{threads} threads, {n} tasks, team");
                        }
                    });
                    assert!(!in_team());
                }
            });
        }
    }

    #[test]
    fn hints_leave_every_task_running_once() {
        let weights = vec![7u8; 3 << 20];
        let (a, b) = weights.split_at(1 << 20);
        // Outside a team a hint does nothing.
        prefetch_next(&[a, b]);
        pool(2).install(|| {
            with_team(|| {
                for round in 0..50 {
                    // Hints of every shape: several parts, one, none, more than a hint holds.
                    match round % 4 {
                        0 => prefetch_next(&[a, b]),
                        1 => prefetch_next(&[b]),
                        2 => prefetch_next(&[]),
                        _ => prefetch_next(&[a, b, a, b]),
                    }
                    assert!(counts(1001).iter().all(|&c| c == 1), "round {round}");
                }
            });
        });
    }

    #[test]
    fn hint_starts_at_each_helpers_share() {
        let team = Team::new(1);
        let (a, b) = (vec![0u8; 4096], vec![0u8; 8192]);
        for (i, part) in [&a[..], &b[..]].iter().enumerate() {
            team.hint[i].0.store(part.as_ptr() as usize, Ordering::Relaxed);
            team.hint[i].1.store(part.len(), Ordering::Relaxed);
        }
        // Two members: the helper's share starts half way through the 12 KiB, 2 KiB into `b`.
        let (start, end) = team.hint_start(1);
        assert_eq!((start, end), (b.as_ptr() as usize + 2048, b.as_ptr() as usize + 8192));
        assert_eq!(team.hint_start(0), (a.as_ptr() as usize, a.as_ptr() as usize + 4096));
    }

    #[test]
    fn chunks_cover_the_slice() {
        pool(2).install(|| {
            with_team(|| {
                for (len, chunk) in [(0, 4), (1, 4), (10, 3), (1000, 64), (1000, 1000), (5, 8)] {
                    let mut v = vec![usize::MAX; len];
                    for_each_chunk_mut(&mut v, chunk, |i, c| {
                        assert!(c.len() <= chunk && !c.is_empty());
                        for (j, x) in c.iter_mut().enumerate() {
                            *x = i * chunk + j;
                        }
                    });
                    assert!(v.iter().enumerate().all(|(i, &x)| x == i), "len {len} chunk {chunk}");
                }
            })
        });
    }

    #[test]
    fn a_loop_inside_a_task_runs_inline() {
        pool(2).install(|| {
            with_team(|| {
                let total = AtomicUsize::new(0);
                for_each_task(8, |_| {
                    for_each_task(5, |_| {
                        total.fetch_add(1, Ordering::Relaxed);
                    });
                });
                assert_eq!(total.into_inner(), 40);
            })
        });
    }

    #[test]
    fn a_panicking_task_reaches_the_caller_and_the_team_goes_on() {
        pool(2).install(|| {
            with_team(|| {
                for bad in [0, 63] {
                    let result = panic::catch_unwind(|| {
                        for_each_task(64, |i| {
                            if i == bad {
                                panic!("task {i} fails");
                            }
                        })
                    });
                    assert!(result.is_err(), "task {bad}'s panic was lost");
                    assert!(counts(100).iter().all(|&c| c == 1));
                }
            })
        });
    }

    #[test]
    fn outside_a_pool_and_nested_teams_just_run() {
        // The test thread is not a pool worker.
        assert_eq!(with_team(|| (in_team(), counts(10))), (false, vec![1; 10]));
        pool(2).install(|| {
            with_team(|| {
                let inner = with_team(|| counts(33));
                assert!(inner.iter().all(|&c| c == 1) && in_team());
            });
            // The helpers left: ordinary rayon work still has every thread.
            assert_eq!(rayon::join(|| 1, || 2), (1, 2));
        });
    }

    #[test]
    fn join_runs_both_sides() {
        pool(2).install(|| {
            assert_eq!(join(|| 1, || 2), (1, 2));
            assert_eq!(with_team(|| join(|| counts(9).len(), || counts(4).len())), (9, 4));
        });
    }
}
