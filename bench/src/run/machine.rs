//! What the machine and the builds were when a run started or ended.

use std::fs;
use std::process::Command;

use super::targets::CharonBuild;

/// What the machine was, and how busy, when the run started or ended.
#[derive(Debug, Clone, Default)]
pub struct Machine {
    pub facts: Vec<(String, String)>,
    pub loadavg: String,
}

/// What a Charon build is: its version, profile and source. A build
/// directory may say where it came from in `charon-build.txt` (run.sh
/// writes one for `--baseline-rev`); otherwise it is taken to be built from
/// this checkout, whose commit is shown.
fn build_description(b: &CharonBuild) -> String {
    let version = first_line(
        &b.bin_dir.join("charon-node").to_string_lossy(),
        &["--version"],
    );
    // target/release or target/debug; other directories say it in
    // charon-build.txt.
    let profile = match b.bin_dir.file_name().and_then(|n| n.to_str()) {
        Some(p @ ("release" | "debug")) => format!("{p} build "),
        _ => String::new(),
    };
    let source = match fs::read_to_string(b.bin_dir.join("charon-build.txt")) {
        Ok(s) => s.trim().to_string(),
        Err(_) => checkout_description(),
    };
    format!(
        "{version} ({profile}in `{}`), {source}",
        b.bin_dir.display()
    )
}

/// `commit abc1234` of this checkout, `+ uncommitted changes` when what
/// `charon-node` is built from (not bench/ or docs/) differs from it.
fn checkout_description() -> String {
    let commit = first_line("git", &["rev-parse", "--short", "HEAD"]);
    let dirty = Command::new("git")
        .args([
            "status",
            "--porcelain",
            "--",
            "node",
            "proto",
            "Cargo.toml",
            "Cargo.lock",
        ])
        .output()
        .map(|o| !o.stdout.is_empty())
        .unwrap_or(false);
    format!(
        "commit {commit}{}",
        if dirty { " + uncommitted changes" } else { "" }
    )
}

fn first_line(cmd: &str, args: &[&str]) -> String {
    match Command::new(cmd).args(args).output() {
        Ok(o) => {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        }
        Err(_) => "not installed".into(),
    }
}

impl Machine {
    pub fn describe(builds: &[CharonBuild]) -> Machine {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
            .unwrap_or_else(|| "unknown".into());
        let cpus = cpuinfo
            .lines()
            .filter(|l| l.starts_with("processor"))
            .count();
        let mem = fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|k| format!("{:.1} GiB", k as f64 / 1024.0 / 1024.0))
            .unwrap_or_default();
        let os = fs::read_to_string("/etc/os-release")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("PRETTY_NAME="))
            .map(|s| s.trim_matches('"').to_string())
            .unwrap_or_default();
        let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string();
        let mut facts = vec![
            ("CPU".into(), format!("{cpus} × {model}")),
            ("memory".into(), mem),
            ("OS / kernel".into(), format!("{os} / Linux {kernel}")),
            ("nginx".into(), first_line("nginx", &["-v"])),
            ("HAProxy".into(), first_line("haproxy", &["-v"])),
            ("Caddy".into(), first_line("caddy", &["version"])),
            ("wrk".into(), first_line("wrk", &["-v"])),
            ("rustc".into(), first_line("rustc", &["--version"])),
        ];
        let at = facts.len().min(3);
        for (i, b) in builds.iter().enumerate() {
            let name = if b.label.is_empty() {
                "charon".to_string()
            } else {
                format!("charon@{}", b.label)
            };
            facts.insert(at + i, (name, build_description(b)));
        }
        Machine {
            facts,
            loadavg: fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
        }
    }
}
