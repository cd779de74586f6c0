//! The images build from what the repository holds: every Dockerfile's COPY sources exist, and
//! the binary each one builds and copies is a binary of the workspace, the same one it runs.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{collections::BTreeSet, path::PathBuf, process::Command};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

/// (package, binary) of every binary target in the workspace.
fn workspace_binaries() -> BTreeSet<(String, String)> {
    let output = Command::new(env!("CARGO"))
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .current_dir(repo())
        .output()
        .expect("cargo metadata");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    let mut bins = BTreeSet::new();
    for package in metadata["packages"].as_array().expect("packages") {
        for target in package["targets"].as_array().expect("targets") {
            if target["kind"]
                .as_array()
                .expect("kind")
                .iter()
                .any(|k| k == "bin")
            {
                bins.insert((
                    package["name"].as_str().expect("name").to_owned(),
                    target["name"].as_str().expect("name").to_owned(),
                ));
            }
        }
    }
    bins
}

/// The value after `flag` in a command line.
fn after<'a>(words: &[&'a str], flag: &str) -> Option<&'a str> {
    words
        .iter()
        .position(|w| *w == flag)
        .and_then(|i| words.get(i + 1).copied())
}

#[test]
fn every_dockerfile_copies_what_exists_and_ships_the_binary_it_builds() {
    let bins = workspace_binaries();
    let wanted = ["agent.Dockerfile", "controller.Dockerfile"];
    for name in wanted {
        let path = repo().join("deploy/docker").join(name);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (the README tells users to build it)",
                path.display()
            )
        });
        let mut built = None;
        let mut shipped = None;
        let mut entrypoint = None;
        for line in text.lines().map(str::trim) {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.first().copied() {
                Some("COPY") if words.iter().any(|w| w.starts_with("--from=")) => {
                    let source = words[words.len() - 2];
                    shipped = source.rsplit('/').next().map(str::to_owned);
                }
                Some("COPY") => {
                    for source in &words[1..words.len() - 1] {
                        assert!(
                            repo().join(source).exists(),
                            "{name}: COPY source {source} does not exist"
                        );
                    }
                }
                Some("RUN") if words.contains(&"cargo") => {
                    let package = after(&words, "-p").expect("-p");
                    let bin = after(&words, "--bin").expect("--bin");
                    assert!(
                        bins.contains(&(package.to_owned(), bin.to_owned())),
                        "{name}: builds {package}/{bin}, not a binary of the workspace: {bins:?}"
                    );
                    assert!(
                        words.contains(&"--locked"),
                        "{name}: builds without --locked"
                    );
                    built = Some(bin.to_owned());
                }
                Some("ENTRYPOINT") => entrypoint = Some(line.to_owned()),
                _ => {}
            }
        }
        let built = built.unwrap_or_else(|| panic!("{name} builds no binary"));
        assert_eq!(
            shipped.as_deref(),
            Some(built.as_str()),
            "{name} ships another binary"
        );
        let entrypoint = entrypoint.unwrap_or_else(|| panic!("{name} has no ENTRYPOINT"));
        assert!(
            entrypoint.contains(&format!("/{built}\"")),
            "{name}: {entrypoint}"
        );
    }
    // The build context leaves out what would bloat or leak into it.
    let ignore = std::fs::read_to_string(repo().join(".dockerignore")).expect(".dockerignore");
    for entry in ["target", ".valkey-local", ".git"] {
        assert!(
            ignore.lines().any(|l| l.trim_end_matches('/') == entry),
            ".dockerignore lacks {entry}"
        );
    }
}
