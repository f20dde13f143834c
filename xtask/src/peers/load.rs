//! How busy the machine was with other work while an engine ran: the CPU time every process
//! used (`/proc/stat`) minus the CPU time of the engine itself (this process's waited-for
//! children, `/proc/self/stat`), as an average number of cores, plus the time the hypervisor
//! took away (steal). On a shared machine this says which figures were measured in peace.

/// CPU counters at one moment, in clock ticks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuSample {
    /// Busy time of all CPUs together (user, nice, system, irq, softirq).
    busy: u64,
    /// Stolen time of all CPUs together.
    steal: u64,
    /// Every counter of all CPUs together: busy, idle, iowait and steal.
    total: u64,
    /// CPU time (user + system) of this process's children that have been waited for.
    children: u64,
    /// Online CPUs.
    cpus: usize,
}

/// What other work used while an engine ran.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Interference {
    /// Cores kept busy by other processes, on average.
    pub other_cores: f64,
    /// Cores taken by the hypervisor (steal), on average.
    pub steal_cores: f64,
}

impl CpuSample {
    /// Reads the counters, or `None` where `/proc` does not have them.
    pub fn now() -> Option<CpuSample> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let own = std::fs::read_to_string("/proc/self/stat").ok()?;
        CpuSample::parse(&stat, &own)
    }

    /// Parses `/proc/stat` and `/proc/self/stat`.
    fn parse(stat: &str, own: &str) -> Option<CpuSample> {
        let line = stat.lines().find(|l| l.starts_with("cpu "))?;
        let v: Vec<u64> = line.split_whitespace().skip(1).map(|x| x.parse().ok()).collect::<Option<_>>()?;
        // user nice system idle iowait irq softirq steal (guest time is inside user).
        let field = |i: usize| v.get(i).copied().unwrap_or(0);
        let busy = field(0) + field(1) + field(2) + field(5) + field(6);
        let steal = field(7);
        let total = busy + field(3) + field(4) + steal;
        let cpus = stat
            .lines()
            .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
            .count();
        // The command name (field 2) is in parentheses and may hold spaces: fields after the
        // last ')' start at field 3 (state); cutime and cstime are fields 16 and 17.
        let after = &own[own.rfind(')')? + 1..];
        let f: Vec<&str> = after.split_whitespace().collect();
        let children = f.get(13)?.parse::<u64>().ok()? + f.get(14)?.parse::<u64>().ok()?;
        Some(CpuSample { busy, steal, total, children, cpus: cpus.max(1) })
    }

    /// The other work between `self` and the later sample `after`.
    pub fn interference(&self, after: &CpuSample) -> Option<Interference> {
        let total = after.total.checked_sub(self.total)?;
        if total == 0 {
            return None;
        }
        let busy = after.busy.saturating_sub(self.busy);
        let ours = after.children.saturating_sub(self.children);
        let cores = |ticks: u64| ticks as f64 / total as f64 * self.cpus as f64;
        Some(Interference {
            other_cores: cores(busy.saturating_sub(ours)),
            steal_cores: cores(after.steal.saturating_sub(self.steal)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str =
        "cpu  100 0 50 800 10 5 5 30 0 0\ncpu0 50 0 25 400 5 3 2 15 0 0\ncpu1 50 0 25 400 5 2 3 15 0 0\nintr 1\n";

    fn own(cutime: u64, cstime: u64) -> String {
        // pid (comm with spaces) state, then fields 4..15, then cutime and cstime.
        format!("42 (a b) S 1 2 3 4 5 6 7 8 9 10 11 12 {cutime} {cstime} 0 0")
    }

    #[test]
    fn parses_proc_stat_and_own_children_time() {
        let s = CpuSample::parse(STAT, &own(7, 3)).unwrap();
        assert_eq!(s, CpuSample { busy: 160, steal: 30, total: 1000, children: 10, cpus: 2 });
    }

    #[test]
    fn interference_subtracts_the_engines_own_time() {
        let before = CpuSample { busy: 0, steal: 0, total: 0, children: 0, cpus: 2 };
        // 1000 ticks over 2 CPUs: 500 ticks of wall time. The engine used 600 ticks (1.2 cores),
        // everything together 800 busy ticks, so others used 200 ticks: 0.4 cores; 50 ticks of
        // steal are 0.1 cores.
        let after = CpuSample { busy: 800, steal: 50, total: 1000, children: 600, cpus: 2 };
        let i = before.interference(&after).unwrap();
        assert!((i.other_cores - 0.4).abs() < 1e-12);
        assert!((i.steal_cores - 0.1).abs() < 1e-12);
        assert!(after.interference(&after).is_none());
    }
}
