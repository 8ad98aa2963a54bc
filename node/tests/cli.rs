//! The `charon-node` binary's command line: bad configuration is refused
//! before anything starts. (Declaring an integration test here also makes
//! `cargo test` build the binary that the `charon-tests` harness starts.)

use std::process::Command;

fn node() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_charon-node"));
    for (k, _) in std::env::vars() {
        if k.starts_with("CHARON_") {
            c.env_remove(k);
        }
    }
    c
}

#[test]
fn help_lists_the_settings() {
    let out = node().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--data-dir",
        "--http-listen",
        "--api-listen",
        "--admin-listen",
        "--trusted-proxy",
        "--config",
    ] {
        assert!(text.contains(flag), "{flag} missing from --help");
    }
}

#[test]
fn bad_config_exits_64_naming_the_setting_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cases: &[(&[&str], &str)] = &[
        (&["--http-listen", "localhost:eighty"], "http_listen"),
        (&["--trusted-proxy", "10.0.0.0/99"], "trusted_proxies"),
        (&["--upstream-timeout-ms", "0"], "upstream_timeout_ms"),
        (&["--log-format", "yaml"], "log_format"),
        (
            &["--config", "/nonexistent/charon.toml"],
            "/nonexistent/charon.toml",
        ),
    ];
    for (args, setting) in cases {
        let out = node()
            .arg("--data-dir")
            .arg(&data)
            .args(*args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(setting), "{args:?}: {err}");
        assert!(
            !data.exists(),
            "{args:?} created the data dir before failing"
        );
    }
}

#[test]
fn unknown_flags_are_usage_errors() {
    let out = node().arg("--htp-listen").arg("x").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--htp-listen"));
}
