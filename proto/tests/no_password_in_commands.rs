//! No message the controller sends an agent can carry a password: every field reachable from
//! `ControllerMessage` is checked by name and type, so that a password field added later fails
//! here rather than crossing the stream. (Map `params` entries are free-form; the agent refuses
//! the password keys among them, tested in tests/tests/agent_commands.rs.)
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::collections::{BTreeSet, HashMap};

use prost_types::{DescriptorProto, field_descriptor_proto::Type};

/// Names that would hold a secret, and the fields allowed to match them anyway.
const SECRET_WORDS: &[&str] = &["pass", "secret", "token", "auth", "key"];
const ALLOWED: &[&str] = &[
    // SHA-256 hashes, not passwords.
    "valkey.agent.v1.AclSetUser.password_sha256",
    // The ACL user Sentinel logs in as: a name.
    "valkey.agent.v1.SentinelMonitor.auth_user",
    // References, resolved by the agent from its own files.
    "valkey.agent.v1.SentinelMonitor.auth_pass_ref",
    "valkey.agent.v1.ConfigSet.password_params",
    "valkey.agent.v1.SentinelSet.password_params",
    "valkey.agent.v1.SentinelConfigSet.password_params",
];

fn messages() -> HashMap<String, DescriptorProto> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/proto");
    let fds = protox::compile(["valkey/agent/v1/agent.proto"], [dir]).expect("the proto compiles");
    let mut all = HashMap::new();
    fn walk(prefix: &str, message: &DescriptorProto, all: &mut HashMap<String, DescriptorProto>) {
        let name = format!("{prefix}.{}", message.name());
        for nested in &message.nested_type {
            walk(&name, nested, all);
        }
        all.insert(name, message.clone());
    }
    for file in &fds.file {
        for message in &file.message_type {
            walk(&format!(".{}", file.package()), message, &mut all);
        }
    }
    all
}

#[test]
fn no_field_the_controller_sends_can_hold_a_password() {
    let all = messages();
    let mut pending = vec![".valkey.agent.v1.ControllerMessage".to_owned()];
    let mut seen = BTreeSet::new();
    let mut offending = Vec::new();
    while let Some(name) = pending.pop() {
        if !seen.insert(name.clone()) {
            continue;
        }
        let message = all.get(&name).unwrap_or_else(|| panic!("{name} not found"));
        // A map's entries: their `key` and `value` are judged by the map field's name.
        let map_entry = message
            .options
            .as_ref()
            .is_some_and(|o| o.map_entry.unwrap_or(false));
        for field in &message.field {
            let path = format!("{}.{}", name.trim_start_matches('.'), field.name());
            let lower = field.name().to_ascii_lowercase();
            let sounds_secret = SECRET_WORDS.iter().any(|w| lower.contains(w));
            if sounds_secret && !map_entry && !ALLOWED.contains(&path.as_str()) {
                offending.push(path.clone());
            }
            if field.r#type() == Type::Message {
                pending.push(field.type_name().to_owned());
            }
        }
    }
    assert!(
        seen.contains(".valkey.agent.v1.SentinelMonitor")
            && seen.contains(".valkey.agent.v1.ConfigSet"),
        "the walk missed the commands: {seen:?}"
    );
    assert!(
        offending.is_empty(),
        "fields the controller sends that could carry a secret: {offending:?}"
    );
    // A password-named field that is a plain string would be the regression this guards.
    let monitor = &all[".valkey.agent.v1.SentinelMonitor"];
    assert!(monitor.field.iter().all(|f| f.name() != "auth_pass"));
}
