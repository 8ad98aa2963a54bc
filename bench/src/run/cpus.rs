//! Pinned mode (`--pin`): which CPUs the proxy gets and which the load
//! generators and the backend get, so that a proxy's throughput is not
//! hostage to the load generator competing with it for a core.
//!
//! Pinning is done with `taskset -c` around each command (the process keeps
//! its PID, and nginx's workers inherit the master's set), and checked
//! afterwards in `/proc/PID/status` for every process of the proxy.

use std::ffi::OsStr;
use std::fs;
use std::process::Command;

use anyhow::{bail, Context};

/// Who runs where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuPlan {
    /// CPUs the proxy under test may run on.
    pub proxy: Vec<usize>,
    /// CPUs of the load generators and the backend.
    pub load: Vec<usize>,
    /// Whether the two sets are disjoint. They are not when the proxy has
    /// as many workers as the machine has CPUs (see [`CpuPlan::new`]).
    pub isolated: bool,
}

impl CpuPlan {
    /// The proxy gets the last `workers` CPUs of `available`, everything
    /// else the first ones: on two CPUs with one worker, proxy on CPU 1,
    /// load and backend on CPU 0.
    ///
    /// With `workers` ≥ the CPUs there are, the proxy cannot have cores of
    /// its own without running fewer cores than it has workers, which is
    /// not what `--workers N` asks for. Then the proxy may use every CPU
    /// and the load generators and backend are confined to the first one:
    /// they share that CPU with one of the proxy's workers, the other
    /// workers have theirs alone. Per-core figures (CPU time per request)
    /// stay meaningful; totals are bounded by the shared core.
    pub fn new(available: &[usize], workers: usize) -> anyhow::Result<CpuPlan> {
        if available.len() < 2 {
            bail!(
                "--pin needs at least 2 CPUs to split between the proxy and the load; this process may use {}",
                list(available)
            );
        }
        let workers = workers.max(1);
        if workers < available.len() {
            let split = available.len() - workers;
            Ok(CpuPlan {
                proxy: available[split..].to_vec(),
                load: available[..split].to_vec(),
                isolated: true,
            })
        } else {
            Ok(CpuPlan {
                proxy: available.to_vec(),
                load: available[..1].to_vec(),
                isolated: false,
            })
        }
    }

    /// One sentence for the report.
    pub fn describe(&self, workers: usize) -> String {
        if self.isolated {
            format!(
                "Pinned: each proxy on CPU(s) {} (its own), load generators and backend on CPU(s) {}.",
                list(&self.proxy),
                list(&self.load)
            )
        } else {
            format!(
                "Pinned, **not isolated**: {workers} worker(s) on {} CPU(s) cannot have cores of their own. \
                 Each proxy may use CPUs {}; load generators and backend are confined to CPU {}, which \
                 they share with one proxy worker. Per-core figures hold; totals are bounded by the shared CPU.",
                self.proxy.len(),
                list(&self.proxy),
                list(&self.load)
            )
        }
    }
}

/// `program`, run under `taskset -c CPUS` when `cpus` is given.
pub fn command(program: impl AsRef<OsStr>, cpus: Option<&[usize]>) -> Command {
    match cpus {
        Some(c) => {
            let mut cmd = Command::new("taskset");
            cmd.arg("-c").arg(list(c)).arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

/// The CPUs this process may run on (`Cpus_allowed_list` of /proc/self).
pub fn available() -> anyhow::Result<Vec<usize>> {
    allowed(std::process::id())
}

/// The CPUs process `pid` may run on.
pub fn allowed(pid: u32) -> anyhow::Result<Vec<usize>> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    let l = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .context("no Cpus_allowed_list in /proc/PID/status")?;
    parse_list(l.trim())
}

/// `0-2,5` → `[0, 1, 2, 5]` (the kernel's CPU list format).
pub fn parse_list(s: &str) -> anyhow::Result<Vec<usize>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.parse()?, b.parse()?);
                if b < a {
                    bail!("bad CPU range {part:?}");
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse()?),
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// `[0, 1, 2, 5]` → `0,1,2,5` (what `taskset -c` reads).
pub fn list(cpus: &[usize]) -> String {
    cpus.iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_worker_on_two_cpus_gets_cpu_1_alone() {
        let p = CpuPlan::new(&[0, 1], 1).unwrap();
        assert_eq!(p.proxy, vec![1]);
        assert_eq!(p.load, vec![0]);
        assert!(p.isolated);
    }

    #[test]
    fn as_many_workers_as_cpus_share_the_first_with_the_load() {
        let p = CpuPlan::new(&[0, 1], 2).unwrap();
        assert_eq!(p.proxy, vec![0, 1]);
        assert_eq!(p.load, vec![0]);
        assert!(!p.isolated);
        assert!(p.describe(2).contains("not isolated"));
        let p = CpuPlan::new(&[0, 1], 5).unwrap();
        assert_eq!((p.proxy, p.load), (vec![0, 1], vec![0]));
    }

    #[test]
    fn larger_machines_split_by_workers() {
        let p = CpuPlan::new(&[0, 1, 2, 3, 4, 5, 6, 7], 2).unwrap();
        assert_eq!(p.proxy, vec![6, 7]);
        assert_eq!(p.load, vec![0, 1, 2, 3, 4, 5]);
        assert!(p.isolated);
    }

    #[test]
    fn one_cpu_cannot_be_split() {
        assert!(CpuPlan::new(&[3], 1).is_err());
    }

    #[test]
    fn cpu_lists_parse_and_print() {
        assert_eq!(parse_list("0-2,5").unwrap(), vec![0, 1, 2, 5]);
        assert_eq!(parse_list("3").unwrap(), vec![3]);
        assert!(parse_list("2-1").is_err());
        assert_eq!(list(&[0, 1, 2, 5]), "0,1,2,5");
    }

    #[test]
    fn this_process_has_cpus() {
        assert!(!available().unwrap().is_empty());
    }

    #[test]
    fn taskset_pins_a_child() {
        let cpus = available().unwrap();
        let one = [cpus[cpus.len() - 1]];
        let mut child = command("sleep", Some(&one)).arg("5").spawn().unwrap();
        // taskset sets the mask, then execs: once the child is `sleep`, its
        // mask is the one asked for.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut seen = Vec::new();
        while std::time::Instant::now() < deadline {
            let comm = fs::read_to_string(format!("/proc/{}/comm", child.id())).unwrap_or_default();
            if comm.trim() == "sleep" {
                seen = allowed(child.id()).unwrap();
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(seen, one.to_vec());
    }
}
