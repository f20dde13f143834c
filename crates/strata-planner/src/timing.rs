//! The time model: how long one decoded token takes for a given set of streamed units and a
//! prefetch depth.
//!
//! A unit computes in `bytes_per_token / matvec rate of its dtype`; a streamed unit's transfer
//! takes `transfer bytes / disk read rate`. The disk reads one unit at a time, in execution order,
//! wrapping around to the next token. With prefetch depth `d`, the load of streamed unit `k` may
//! start once the disk has finished unit `k - 1` and execution has reached streamed unit `k - d`
//! (with `d = 0`: reached unit `k` itself, so loads happen on demand and nothing overlaps). At
//! that moment units `k - d ..= k` are in flight or in use, which is why the ring has `d + 1`
//! staging buffers. Compute runs units in order and waits for each streamed unit's load.
//!
//! Writing `N_k` for the time streamed unit `k` starts computing, `E_k` for the time its load
//! ends, `t_k` for its transfer time and `g_k` for the compute from the start of unit `k` to the
//! start of the next streamed unit (the resident units between them included):
//!
//! ```text
//! E_k = max(E_{k-1}, N_{k-d-1} + g_{k-d-1}) + t_k
//! N_k = max(N_{k-1} + g_{k-1}, E_k)
//! ```
//!
//! This recurrence is linear in the max-plus algebra, so one token is a small max-plus matrix
//! `M` over the state `(N_{k-1}, ..., N_{k-d-1}, E_{k-1})`, and the steady-state time per token
//! is exactly `M`'s cycle time: its maximum cycle mean, found with Karp's algorithm. It is `C + X`
//! (all compute plus all transfer) at depth 0, never below `max(C, X)`, and never grows with the
//! depth: a deeper prefetch only relaxes the constraints. The one-off fill of the first token is
//! not part of it. Times are whole picoseconds so that sums are exact and the same input always
//! gives the same bits.

use std::cmp::Ordering;
use std::collections::VecDeque;

/// Picoseconds per second.
const PS_PER_SECOND: f64 = 1e12;

/// The time to move `bytes` at `gb_s` (10^9 bytes per second), in whole picoseconds. The rate
/// must be finite and above zero (`HardwareProfile::validate` checks it).
pub(crate) fn picoseconds(bytes: u64, gb_s: f64) -> i128 {
    // bytes / (gb_s * 1e9) seconds is bytes * 1e3 / gb_s picoseconds; the cast saturates.
    (bytes as f64 * 1e3 / gb_s).round() as i128
}

/// Seconds from picoseconds.
pub(crate) fn seconds(ps: i128) -> f64 {
    ps as f64 / PS_PER_SECOND
}

/// One streamed unit of the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stage {
    /// Its transfer time, in picoseconds.
    pub transfer: i128,
    /// Compute from the start of this unit to the start of the next streamed unit, in
    /// picoseconds.
    pub compute: i128,
}

/// An exact time per token: `num / den` picoseconds, `den > 0`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ratio {
    num: i128,
    den: i128,
}

impl Ratio {
    /// A whole number of picoseconds.
    pub(crate) fn whole(ps: i128) -> Ratio {
        Ratio { num: ps, den: 1 }
    }

    /// This time plus `ps` picoseconds (saturating).
    pub(crate) fn plus(self, ps: i128) -> Ratio {
        Ratio { num: self.num.saturating_add(ps.saturating_mul(self.den)), den: self.den }
    }

    /// The value in seconds, rounded once (the numerator is exact below 2^53 ps, 2.5 hours).
    pub(crate) fn seconds(self) -> f64 {
        self.num as f64 / (self.den as f64 * PS_PER_SECOND)
    }
}

impl PartialEq for Ratio {
    fn eq(&self, other: &Ratio) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Ratio {}

impl PartialOrd for Ratio {
    fn partial_cmp(&self, other: &Ratio) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Ratio {
    fn cmp(&self, other: &Ratio) -> Ordering {
        self.num.saturating_mul(other.den).cmp(&other.num.saturating_mul(self.den))
    }
}

/// A max-plus value: `None` is minus infinity (no dependency).
type MaxPlus = Option<i128>;

fn plus(a: MaxPlus, w: i128) -> MaxPlus {
    a.map(|x| x.saturating_add(w))
}

fn max(a: MaxPlus, b: MaxPlus) -> MaxPlus {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

/// The steady-state time per token of the pipeline over `stages` (the streamed units of one
/// token, in execution order) at prefetch depth `depth`. Needs `depth < stages.len()`.
pub(crate) fn cycle_time(stages: &[Stage], depth: usize) -> Ratio {
    debug_assert!(depth < stages.len(), "depth {depth} with {} streamed units", stages.len());
    let m = stages.len();
    let n = depth + 2;
    // Each state component is a max-plus row over the initial state: start from the identity.
    let unit_row = |i: usize| -> Vec<MaxPlus> { (0..n).map(|j| (i == j).then_some(0)).collect() };
    let mut starts: VecDeque<Vec<MaxPlus>> = (0..=depth).map(unit_row).collect();
    let mut load_end = unit_row(depth + 1);
    for k in 0..m {
        let previous = stages[(k + m - 1) % m].compute;
        let window = stages[(k + m - depth - 1) % m].compute;
        let transfer = stages[k].transfer;
        let issued = &starts[depth];
        let new_load_end: Vec<MaxPlus> =
            (0..n).map(|j| plus(max(load_end[j], plus(issued[j], window)), transfer)).collect();
        let new_start: Vec<MaxPlus> = (0..n).map(|j| max(plus(starts[0][j], previous), new_load_end[j])).collect();
        starts.pop_back();
        starts.push_front(new_start);
        load_end = new_load_end;
    }
    let matrix: Vec<Vec<MaxPlus>> = starts.into_iter().chain(std::iter::once(load_end)).collect();
    max_cycle_mean(&matrix)
}

/// Karp's algorithm for the maximum cycle mean of a max-plus matrix, where `matrix[v][u]` is
/// the weight of the edge from `u` to `v`. Every walk starts at a virtual source joined to all
/// nodes, so the graph need not be strongly connected; it must have a cycle.
fn max_cycle_mean(matrix: &[Vec<MaxPlus>]) -> Ratio {
    let n = matrix.len();
    let mut walks: Vec<Vec<MaxPlus>> = vec![vec![Some(0); n]];
    for k in 1..=n {
        let previous = &walks[k - 1];
        let next = (0..n)
            .map(|v| (0..n).fold(None, |best, u| max(best, previous[u].and_then(|d| plus(matrix[v][u], d)))))
            .collect();
        walks.push(next);
    }
    let mut best: Option<Ratio> = None;
    for (v, longest) in walks[n].iter().enumerate() {
        let Some(longest) = *longest else { continue };
        let worst = (0..n)
            .filter_map(|k| walks[k][v].map(|d| Ratio { num: longest.saturating_sub(d), den: (n - k) as i128 }))
            .min();
        if let Some(worst) = worst {
            best = Some(best.map_or(worst, |b| b.max(worst)));
        }
    }
    debug_assert!(best.is_some(), "the pipeline's matrix has no cycle");
    best.unwrap_or(Ratio::whole(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn stages(pairs: &[(i128, i128)]) -> Vec<Stage> {
        pairs.iter().map(|&(transfer, compute)| Stage { transfer, compute }).collect()
    }

    /// Runs the recurrence for `tokens` tokens from an idle start and returns the time each
    /// token's first streamed unit starts computing.
    fn simulate(stages: &[Stage], depth: usize, tokens: usize) -> Vec<i128> {
        let m = stages.len();
        let total = m * tokens;
        let mut start = vec![0i128; total];
        let mut load_end = vec![0i128; total];
        for k in 0..total {
            let disk_free = if k == 0 { 0 } else { load_end[k - 1] };
            let issued = if k > depth { start[k - depth - 1] + stages[(k - depth - 1) % m].compute } else { 0 };
            load_end[k] = disk_free.max(issued) + stages[k % m].transfer;
            let ready = if k == 0 { 0 } else { start[k - 1] + stages[(k - 1) % m].compute };
            start[k] = ready.max(load_end[k]);
        }
        (0..tokens).map(|t| start[t * m]).collect()
    }

    #[test]
    fn depth_zero_adds_all_compute_and_all_transfer() {
        let s = stages(&[(5, 1), (7, 3), (2, 11)]);
        assert_eq!(cycle_time(&s, 0), Ratio::whole(5 + 7 + 2 + 1 + 3 + 11));
    }

    #[test]
    fn uniform_units_hide_the_smaller_of_compute_and_transfer() {
        let disk_bound = stages(&[(10, 4); 6]);
        let compute_bound = stages(&[(4, 10); 6]);
        for depth in 1..6 {
            assert_eq!(cycle_time(&disk_bound, depth), Ratio::whole(60), "depth {depth}");
            assert_eq!(cycle_time(&compute_bound, depth), Ratio::whole(60), "depth {depth}");
        }
    }

    #[test]
    fn a_big_transfer_hides_behind_one_more_compute_segment_per_level_of_depth() {
        // One big unit (transfer 100) among three cheap ones, each computing for 10. At depth d
        // the big load starts when execution reaches the unit d places before it, so it
        // overlaps d compute segments and the other 4 - d (its own among them) add to it.
        let s = stages(&[(1, 10), (1, 10), (1, 10), (100, 10)]);
        assert_eq!(cycle_time(&s, 0), Ratio::whole(103 + 40));
        assert_eq!(cycle_time(&s, 1), Ratio::whole(100 + 3 * 10));
        assert_eq!(cycle_time(&s, 2), Ratio::whole(100 + 2 * 10));
        assert_eq!(cycle_time(&s, 3), Ratio::whole(100 + 10));
    }

    #[test]
    fn a_disk_bound_pipeline_runs_at_disk_speed() {
        // Two loads of 3 behind computes of 1 and 2 at depth 1: the disk is busy all the time.
        let s = stages(&[(3, 1), (3, 2)]);
        assert_eq!(cycle_time(&s, 1), Ratio::whole(6));
        assert_eq!(cycle_time(&s, 0), Ratio::whole(9));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn cycle_time_matches_a_long_simulation_and_its_bounds(
            pairs in prop::collection::vec((0i128..1000, 0i128..1000), 1..8),
            depth in 0usize..6,
        ) {
            let s = stages(&pairs);
            let depth = depth.min(s.len() - 1);
            let lambda = cycle_time(&s, depth);
            let compute: i128 = pairs.iter().map(|p| p.1).sum();
            let transfer: i128 = pairs.iter().map(|p| p.0).sum();
            prop_assert!(lambda >= Ratio::whole(compute.max(transfer)));
            prop_assert!(lambda <= Ratio::whole(compute + transfer));
            // From any start, a max-plus system stays within a bounded distance of lambda * T
            // (at most the matrix size times the heaviest entry, itself at most C + X), so the
            // average over the last half of a long run is lambda to within that over the window.
            let tokens = 2000;
            let starts = simulate(&s, depth, tokens);
            let window = (tokens - 1 - tokens / 2) as f64;
            let measured = (starts[tokens - 1] - starts[tokens / 2]) as f64 / window;
            let exact = lambda.num as f64 / lambda.den as f64;
            let bound = (depth + 2) as f64 * (compute + transfer) as f64 / window;
            prop_assert!((measured - exact).abs() <= bound, "measured {} vs cycle time {}", measured, exact);
        }

        #[test]
        fn deeper_prefetch_is_never_slower(
            pairs in prop::collection::vec((0i128..1000, 0i128..1000), 2..10),
        ) {
            let s = stages(&pairs);
            for depth in 0..s.len() - 1 {
                prop_assert!(cycle_time(&s, depth + 1) <= cycle_time(&s, depth), "depth {}", depth);
            }
        }
    }
}
