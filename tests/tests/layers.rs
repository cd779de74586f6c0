//! The controller's modules stand in floors that only look down, and the decision floor is
//! walled: read from the `crate::` paths of every production source file (test modules and
//! `tests.rs` files left out), each top-level module's imports must go to its own floor or a
//! lower one, the two runtimes must not import each other, the decision code (`decide/`)
//! must import nothing but the floor below it, and no two top-level modules may import each
//! other, directly or around a circle. Inside the Kubernetes runtime the same holds for its
//! tiers (`objects`, `runtime`, `hot`, `cold`, `run`): each imports only the ones below it.
//! See `../shared/LAYOUT.md` and the README's layout.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// Each top-level module of `controller/src` and its floor; `crate` is the crate root
/// (`lib.rs`: `now_ms`).
const FLOORS: &[(&str, u8)] = &[
    ("crate", 0),
    ("conf_text", 0),
    ("files", 0),
    ("tls", 0),
    // The decisions, and the spec they are made from.
    ("decide", 1),
    ("crd", 1),
    ("desired", 1),
    ("validate", 1),
    ("manifest", 1),
    // The agent hub, and the agents the controller runs itself for an external Sentinel set.
    ("hub", 2),
    ("external", 2),
    // The failover driver both runtimes share.
    ("driver", 3),
    // The runtimes.
    ("k8s", 4),
    ("local", 4),
];

/// What the decision floor may import beside itself.
const DECIDE_MAY_USE: &[&str] = &["crate", "conf_text", "files", "tls"];

fn floor(module: &str) -> u8 {
    FLOORS
        .iter()
        .find(|(m, _)| *m == module)
        .map(|(_, f)| *f)
        .unwrap_or_else(|| panic!("module {module} has no floor: add it to FLOORS"))
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            // A `tests/` folder holds a module's tests, as a `tests.rs` file does.
            if path.file_name().is_some_and(|n| n != "tests") {
                sources(&path, out);
            }
        } else if path.extension().is_some_and(|e| e == "rs")
            && path.file_name().is_some_and(|n| n != "tests.rs")
        {
            out.push(path);
        }
    }
}

/// A file's text without comments, and without its test module (by convention the last item,
/// after `#[cfg(test)]`).
fn production_text(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let text = text.split("#[cfg(test)]").next().unwrap_or_default();
    text.lines()
        .map(|l| l.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level modules a text names: `crate::m::...` paths, and the items of `use crate::{..}`
/// groups.
fn imports(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let word = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level items of the group, at brace depth 0.
            let (mut depth, mut start) = (0usize, 0usize);
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        found.insert(word(group[start..j].trim()));
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        found.insert(word(group[start..j].trim()));
                        start = j + 1;
                    }
                    _ => {}
                }
            }
        } else {
            let name = word(rest);
            // A path to a module continues with `::`; an item of the root does not.
            let module = if rest[name.len()..].starts_with("::") {
                name
            } else {
                "crate".to_owned()
            };
            found.insert(module);
        }
    }
    found.remove("");
    found.remove("self");
    found
}

/// Top-level module -> the top-level modules it imports.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../controller/src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let relative = file.strip_prefix(&src).unwrap();
        let first = relative.iter().next().unwrap().to_string_lossy();
        let module = first.trim_end_matches(".rs").to_owned();
        if module == "lib" || module == "main" {
            continue;
        }
        let edges = graph.entry(module.clone()).or_default();
        edges.extend(
            imports(&production_text(&file))
                .into_iter()
                .filter(|target| *target != module),
        );
    }
    graph
}

#[test]
fn imports_only_look_down_and_the_decision_floor_is_walled() {
    let graph = graph();
    let mut wrong = Vec::new();
    for (module, targets) in &graph {
        for target in targets {
            let (from, to) = (floor(module), floor(target));
            if to > from {
                wrong.push(format!(
                    "{module} (floor {from}) imports {target} (floor {to})"
                ));
            }
            if from == 4 && to == 4 {
                wrong.push(format!(
                    "the runtimes import each other: {module} imports {target}"
                ));
            }
            if module == "decide" && !DECIDE_MAY_USE.contains(&target.as_str()) {
                wrong.push(format!("the decision floor imports {target}"));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn no_two_top_level_modules_import_each_other_around_a_circle() {
    let graph = graph();
    // Depth-first search for a back edge.
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut circle = path[at..].to_vec();
            circle.push(node.to_owned());
            return Some(circle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(circle) = visit(next, graph, path, done) {
                return Some(circle);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        if let Some(circle) = visit(node, &graph, &mut Vec::new(), &mut done) {
            panic!("a circle of imports: {}", circle.join(" -> "));
        }
    }
}

/// The Kubernetes runtime's tiers (`controller/src/k8s/`) and their floors: `crate` stands for
/// the names and settings in `k8s/mod.rs`.
const K8S_FLOORS: &[(&str, u8)] = &[
    ("crate", 0),
    ("error", 0),
    ("objects", 1),
    ("runtime", 2),
    ("hot", 3),
    ("cold", 4),
    ("run", 5),
];

fn k8s_floor(tier: &str) -> u8 {
    K8S_FLOORS
        .iter()
        .find(|(t, _)| *t == tier)
        .map(|(_, f)| *f)
        .unwrap_or_else(|| panic!("k8s/{tier} has no floor: add it to K8S_FLOORS"))
}

#[test]
fn the_kubernetes_tiers_only_look_down() {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../controller/src/k8s");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut wrong = Vec::new();
    for file in files {
        let relative = file.strip_prefix(&src).unwrap();
        let first = relative.iter().next().unwrap().to_string_lossy();
        let tier = match first.trim_end_matches(".rs") {
            "mod" => "crate",
            other => other,
        };
        let text = production_text(&file);
        // Within a tier files use `super::`; only `crate::k8s::` paths may cross tiers.
        if text.contains("super::super::") {
            wrong.push(format!(
                "{} reaches across tiers by super::super::",
                relative.display()
            ));
        }
        // The k8s paths only, read as if k8s were the crate.
        let k8s_only = text
            .replace("crate::k8s::", "\u{1}")
            .replace("crate::", "other::")
            .replace('\u{1}', "crate::");
        for target in imports(&k8s_only) {
            // Anything that is not a tier is an item of k8s/mod.rs (a name, a label, a helper).
            let known = K8S_FLOORS.iter().any(|(t, _)| *t == target);
            let target = if known { target } else { "crate".to_owned() };
            let (from, to) = (k8s_floor(tier), k8s_floor(&target));
            if target != tier && to >= from && from > 0 {
                wrong.push(format!(
                    "{} (k8s/{tier}, floor {from}) imports k8s/{target} (floor {to})",
                    relative.display()
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn the_reader_sees_what_it_should() {
    // The reader itself: a group, nested groups, a path in code, a root item.
    let text = "use crate::{\n    decide::{self, model::Plan},\n    hub::Hub,\n};\n\
                fn f() { crate::k8s::run(); crate::now_ms(); }";
    let found: Vec<String> = imports(text).into_iter().collect();
    assert_eq!(found, ["crate", "decide", "hub", "k8s"]);
}
