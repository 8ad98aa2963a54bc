//! CPU time and resident memory of a process and its descendants (nginx's
//! master and worker are counted together), from `/proc`.

use std::fs;

/// `(pid, ppid, (utime, stime) in clock ticks)` from `/proc/PID/stat`.
fn stat(pid: u32) -> Option<(u32, u32, (u64, u64))> {
    parse_stat(pid, &fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn parse_stat(pid: u32, s: &str) -> Option<(u32, u32, (u64, u64))> {
    // The command name is in parentheses and may hold spaces: split after it.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); ppid is field 4, utime 14, stime 15.
    let ppid = f.get(1)?.parse().ok()?;
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((pid, ppid, (utime, stime)))
}

/// `pid` and every process below it.
pub fn tree(pid: u32) -> Vec<u32> {
    let mut all = Vec::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for e in dir.flatten() {
            if let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) {
                if let Some((p, pp, _)) = stat(p) {
                    all.push((p, pp));
                }
            }
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let parent = out[i];
        out.extend(all.iter().filter(|(_, pp)| *pp == parent).map(|(p, _)| *p));
        i += 1;
    }
    out
}

fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no preconditions; it only reads a constant.
    #[allow(unsafe_code)]
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// CPU seconds a process tree has used, split by where: in its own code
/// (user) and in the kernel on its behalf (system). The split shows how far
/// user-space work can move a figure: a proxy whose CPU is 90% system time
/// cannot get more than ~10% cheaper by changing its own code.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CpuTimes {
    pub user: f64,
    pub system: f64,
}

impl CpuTimes {
    pub fn total(self) -> f64 {
        self.user + self.system
    }

    /// The time used between `earlier` and `self`.
    pub fn since(self, earlier: CpuTimes) -> CpuTimes {
        CpuTimes {
            user: self.user - earlier.user,
            system: self.system - earlier.system,
        }
    }
}

/// CPU time used so far by the tree under `pid` (all threads, live and
/// exited).
pub fn cpu_times(pid: u32) -> CpuTimes {
    let (user, system) = tree(pid)
        .into_iter()
        .filter_map(stat)
        .fold((0u64, 0u64), |(u, s), (_, _, (du, ds))| (u + du, s + ds));
    let hz = clock_ticks_per_sec() as f64;
    CpuTimes {
        user: user as f64 / hz,
        system: system as f64 / hz,
    }
}

/// CPU seconds used by one thread.
pub fn task_cpu_secs(pid: u32, tid: u32) -> f64 {
    fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat"))
        .ok()
        .and_then(|s| parse_stat(tid, &s))
        .map_or(0.0, |(_, _, (u, s))| {
            (u + s) as f64 / clock_ticks_per_sec() as f64
        })
}

fn rss_kib_of(pid: u32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Resident memory of the tree under `pid`, KiB.
pub fn rss_kib(pid: u32) -> u64 {
    tree(pid).into_iter().filter_map(rss_kib_of).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process() {
        let me = std::process::id();
        assert!(rss_kib(me) > 0);
        // Spin until this process has used at least one clock tick of user time.
        let start = cpu_times(me);
        let mut x = 0u64;
        while cpu_times(me).since(start).user <= 0.0 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let used = cpu_times(me).since(start);
        assert!(used.user > 0.0 && used.system >= 0.0);
        assert_eq!(used.total(), used.user + used.system);
        assert!(tree(me).contains(&me));
    }
}
