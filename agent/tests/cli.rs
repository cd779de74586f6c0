//! The binary's flags: every flag has an env fallback and a help line, and bad input stops the
//! agent at start with an error that names the flag.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::process::Command;

fn agent() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_valkey-agent"));
    cmd.env_clear();
    cmd
}

#[test]
fn help_gives_every_flag_an_env_fallback_and_a_description() {
    let out = agent().arg("--help").output().expect("run --help");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    // One block per flag: "      --flag <VALUE>", its description, then its env and default.
    let blocks: Vec<&str> = help
        .split("\n      --")
        .skip(1)
        .filter(|b| !b.starts_with("help") && !b.starts_with("version"))
        .collect();
    assert!(blocks.len() >= 20, "{help}");
    for block in blocks {
        let flag = block.lines().next().unwrap_or_default();
        assert!(
            block.contains("[env: VALKEY_AGENT_"),
            "--{flag} has no env fallback"
        );
        let description = block.lines().nth(1).unwrap_or_default().trim();
        assert!(description.len() > 10, "--{flag} has no description");
    }
}

#[test]
fn bad_flags_are_refused_naming_the_flag() {
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().to_str().expect("utf-8 path");
    let cases: &[(&[&str], &str)] = &[
        (&["--valkey-addr", "no-port"], "--valkey-addr"),
        (
            &[
                "--controller-addr",
                "ftp://x",
                "--failover",
                "f",
                "--token",
                "t",
            ],
            "--controller-addr",
        ),
        (
            &["--controller-addr", "http://127.0.0.1:1", "--failover", "f"],
            "--token",
        ),
        (&["--mode", "cluster"], "--mode"),
        (&["--probe-interval-ms", "soon"], "--probe-interval-ms"),
        (
            &["--valkey-password-file", "/nonexistent/password"],
            "--valkey-password-file",
        ),
    ];
    for (args, flag) in cases {
        let out = agent()
            .args([
                "--data-dir",
                data,
                "--metrics-listen",
                "off",
                "--listen",
                "127.0.0.1:0",
            ])
            .args(*args)
            .output()
            .expect("run the agent");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(flag),
            "{args:?} should name {flag}: {stderr}"
        );
    }
}

#[test]
fn a_port_in_use_is_refused_naming_the_flag() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let dir = tempfile::tempdir().expect("dir");
    let out = agent()
        .args([
            "--data-dir",
            dir.path().to_str().expect("utf-8 path"),
            "--metrics-listen",
            "off",
        ])
        .args(["--listen", &addr])
        .output()
        .expect("run the agent");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--listen") && stderr.contains(&addr),
        "{stderr}"
    );
}
