//! CPU time and resident memory of a process and its descendants (nginx's
//! master and worker are counted together), from `/proc`.

use std::fs;

/// `(pid, ppid, utime + stime in clock ticks)` from `/proc/PID/stat`.
fn stat(pid: u32) -> Option<(u32, u32, u64)> {
    parse_stat(pid, &fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn parse_stat(pid: u32, s: &str) -> Option<(u32, u32, u64)> {
    // The command name is in parentheses and may hold spaces: split after it.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); ppid is field 4, utime 14, stime 15.
    let ppid = f.get(1)?.parse().ok()?;
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((pid, ppid, utime + stime))
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

/// User + system CPU seconds used so far by the tree under `pid`
/// (all threads, live and exited).
pub fn cpu_secs(pid: u32) -> f64 {
    let ticks: u64 = tree(pid)
        .into_iter()
        .filter_map(stat)
        .map(|(_, _, t)| t)
        .sum();
    ticks as f64 / clock_ticks_per_sec() as f64
}

/// CPU seconds used by one thread.
pub fn task_cpu_secs(pid: u32, tid: u32) -> f64 {
    fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat"))
        .ok()
        .and_then(|s| parse_stat(tid, &s))
        .map_or(0.0, |(_, _, t)| t as f64 / clock_ticks_per_sec() as f64)
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
        assert!(cpu_secs(me) >= 0.0);
        assert!(tree(me).contains(&me));
    }
}
