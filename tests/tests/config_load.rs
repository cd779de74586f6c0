//! Every customConfigs value that validation accepts loads: a corpus of tricky values (quotes,
//! backslashes, comments, Unicode line separators, case, aliases, booleans, enumerations and
//! flags), each either refused by validation with the field named, or rendered into the
//! config the pods run and loaded by a real valkey-server or valkey-sentinel, which must come
//! up. A config Valkey refuses would leave the pod crash-looping.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::{process::Command, time::Duration};

use valkey_controller::{
    crd::{Failover, SentinelSettings},
    k8s::{objects::data, objects::sentinel},
    validate::validate,
};
use valkey_e2e::{free_port, procs::Proc};

const T: Duration = Duration::from_secs(10);

/// The values tried for each key (`{v}` in a key's template is each of them).
const TRICKY: &[&str] = &[
    "plain",
    "\"quoted\"",
    "'single'",
    "\"unbalanced",
    "'unbalanced",
    "\"closed\"early",
    "trailing\\",
    "\"trailing\\\"",
    "#",
    "# comment",
    "a\u{2028}b",
    "é",
    "",
    " ",
    "two words",
];

/// Keys and values on their own, beyond the tricky ones.
const DATA: &[(&str, &str)] = &[
    ("maxmemory", "100mb"),
    ("maxmemory", "1GB"),
    ("maxmemory-policy", "allkeys-lru"),
    ("maxmemory-policy", "ALLKEYS-LRU"),
    ("maxmemory-policy", "lru"),
    ("appendonly", "yes"),
    ("appendonly", "true"),
    ("save", "\"\""),
    ("save", "900 1 300 10"),
    ("notify-keyspace-events", "KEA"),
    ("notify-keyspace-events", "Kx!"),
    ("notify-keyspace-events", "\"\""),
    ("hz", "20"),
    ("MaxMemory", "100mb"),
    ("slave-priority", "10"),
    ("replica-priority", "10"),
    ("primaryauth", "x"),
    ("syslog-ident", "valkey"),
    ("loglevel", "warning"),
    ("loglevel", "loud"),
    ("maxmemory-clients", "10%"),
    ("maxmemory-clients", "ten%"),
    ("databases", "16"),
    ("databases", "16mb"),
    ("client-output-buffer-limit", "pubsub 32mb 8mb 60"),
    ("latency-tracking-info-percentiles", "50 99 99.9"),
];

const SENTINEL: &[(&str, &str)] = &[
    ("loglevel", "notice"),
    ("loglevel", "loud"),
    ("unixsocket", "/tmp/x.sock"),
    ("aclfile", "/tmp/users.acl"),
    ("sentinel", "deny-scripts-reconfig no"),
    ("protected-mode", "no"),
    ("Loglevel", "notice"),
    ("syslog-ident", "sentinel"),
];

fn example() -> Failover {
    serde_yaml::from_str(include_str!("../../deploy/examples/failover.yaml")).expect("seed")
}

/// Starts `bin` on `conf` (with `port` and `dir` lines moved to the test's) and says whether
/// it comes up (answers PING) or exits, with its log.
fn loads(bin: &str, conf: &str, what: &str) -> Result<(), String> {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let conf = conf
        .lines()
        .filter(|l| !l.starts_with("port ") && !l.starts_with("bind ") && !l.starts_with("dir "))
        .collect::<Vec<_>>()
        .join("\n");
    let conf = format!(
        "{conf}\nport {port}\nbind 127.0.0.1\ndir {}\n",
        dir.path().display()
    );
    let file = dir.path().join("test.conf");
    std::fs::write(&file, &conf).expect("write conf");
    let mut proc = Proc::spawn(what, Command::new(bin).arg(&file), &dir.path().join("log"));
    let deadline = std::time::Instant::now() + T;
    loop {
        if let Some(status) = proc.exited() {
            let log = std::fs::read_to_string(dir.path().join("log")).unwrap_or_default();
            return Err(format!(
                "{what}: exited {status}:\n{log}\n--- config ---\n{conf}"
            ));
        }
        let pong = std::net::TcpStream::connect(("127.0.0.1", port))
            .ok()
            .and_then(|mut s| {
                use std::io::{Read, Write};
                s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
                s.write_all(b"PING\r\n").ok()?;
                let mut buf = [0u8; 64];
                let n = s.read(&mut buf).ok()?;
                Some(String::from_utf8_lossy(&buf[..n]).into_owned())
            });
        // Up: PONG, or NOAUTH from a sentinel with a password.
        if pong.is_some_and(|p| p.starts_with('+') || p.starts_with('-')) {
            return Ok(());
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: neither up nor exited"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn every_accepted_custom_config_loads_in_a_real_server() {
    let mut failures = Vec::new();
    let (mut accepted, mut refused) = (0, 0);
    let tricky_data = ["syslog-ident", "maxmemory-policy", "save", "hz"];
    let data = DATA
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .chain(tricky_data.iter().flat_map(|k| {
            TRICKY
                .iter()
                .map(move |v| ((*k).to_owned(), (*v).to_owned()))
        }));
    for (key, value) in data {
        let mut failover = example();
        failover.spec.custom_configs = [(key.clone(), value.clone())].into();
        let what = format!("customConfigs {key}: {value:?}");
        match validate("example", &failover.spec) {
            Err(err) => {
                assert!(err.field.starts_with("spec.customConfigs"), "{what}: {err}");
                refused += 1;
            }
            Ok(()) => {
                accepted += 1;
                if let Err(why) = loads("valkey-server", &data::valkey_conf(&failover.spec), &what)
                {
                    failures.push(why);
                }
            }
        }
    }
    let sentinel = SENTINEL
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .chain(
            TRICKY
                .iter()
                .map(|v| ("syslog-ident".to_owned(), (*v).to_owned())),
        );
    for (key, value) in sentinel {
        let mut failover = example();
        let settings = SentinelSettings {
            custom_configs: [(key.clone(), value.clone())].into(),
            ..SentinelSettings::default()
        };
        failover.spec.sentinel = Some(settings.clone());
        let what = format!("sentinel customConfigs {key}: {value:?}");
        match validate("example", &failover.spec) {
            Err(err) => {
                assert!(
                    err.field.starts_with("spec.sentinel.customConfigs"),
                    "{what}: {err}"
                );
                refused += 1;
            }
            Ok(()) => {
                accepted += 1;
                let conf = sentinel::sentinel_conf(&settings);
                if let Err(why) = loads("valkey-sentinel", &conf, &what) {
                    failures.push(why);
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {accepted} accepted values do not load ({refused} refused):\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    assert!(
        accepted > 10 && refused > 10,
        "{accepted} accepted, {refused} refused"
    );
}
