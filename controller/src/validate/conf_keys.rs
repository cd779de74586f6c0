//! What Valkey accepts in a config line the spec writes, so that an accepted customConfigs
//! value cannot leave a pod crash-looping on "FATAL CONFIG FILE ERROR": the line must split as
//! Valkey splits it (`sdssplitargs`: balanced quotes, each closed before a space), keys are
//! written in their canonical lower-case name (an alias would set a key twice, or slip past
//! the checks of the key it aliases), booleans are `yes` or `no`, and the common enumerations
//! take one of their values. Taken from Valkey 8.0's `CONFIG GET *`.

/// Valkey 8's aliases, and the key each names.
pub const ALIASES: &[(&str, &str)] = &[
    ("primaryauth", "masterauth"),
    ("primaryuser", "masteruser"),
    ("slaveof", "replicaof"),
    ("slave-priority", "replica-priority"),
    ("slave-announce-ip", "replica-announce-ip"),
    ("slave-announce-port", "replica-announce-port"),
    ("slave-read-only", "replica-read-only"),
    ("slave-serve-stale-data", "replica-serve-stale-data"),
    ("slave-ignore-maxmemory", "replica-ignore-maxmemory"),
    ("slave-lazy-flush", "replica-lazy-flush"),
    ("min-slaves-to-write", "min-replicas-to-write"),
    ("min-slaves-max-lag", "min-replicas-max-lag"),
    ("repl-ping-slave-period", "repl-ping-replica-period"),
    ("cluster-slave-no-failover", "cluster-replica-no-failover"),
    (
        "cluster-slave-validity-factor",
        "cluster-replica-validity-factor",
    ),
    ("hash-max-ziplist-entries", "hash-max-listpack-entries"),
    ("hash-max-ziplist-value", "hash-max-listpack-value"),
    ("zset-max-ziplist-entries", "zset-max-listpack-entries"),
    ("zset-max-ziplist-value", "zset-max-listpack-value"),
    ("list-max-ziplist-size", "list-max-listpack-size"),
];

/// Keys that take `yes` or `no`.
const BOOLEANS: &[&str] = &[
    "activedefrag",
    "activerehashing",
    "always-show-logo",
    "aof-load-truncated",
    "aof-rewrite-incremental-fsync",
    "aof-timestamp-enabled",
    "aof-use-rdb-preamble",
    "appendonly",
    "crash-log-enabled",
    "crash-memcheck-enabled",
    "disable-thp",
    "dual-channel-replication-enabled",
    "dynamic-hz",
    "extended-redis-compatibility",
    "hide-user-data-from-log",
    "io-threads-do-reads",
    "jemalloc-bg-thread",
    "latency-tracking",
    "lazyfree-lazy-eviction",
    "lazyfree-lazy-expire",
    "lazyfree-lazy-server-del",
    "lazyfree-lazy-user-del",
    "lazyfree-lazy-user-flush",
    "no-appendfsync-on-rewrite",
    "rdb-del-sync-files",
    "rdb-save-incremental-fsync",
    "rdbchecksum",
    "rdbcompression",
    "repl-disable-tcp-nodelay",
    "repl-diskless-sync",
    "replica-announced",
    "replica-ignore-disk-write-errors",
    "replica-ignore-maxmemory",
    "replica-lazy-flush",
    "replica-read-only",
    "replica-serve-stale-data",
    "set-proc-title",
    "stop-writes-on-bgsave-error",
    "syslog-enabled",
];

/// Keys that take an integer.
const INTEGERS: &[&str] = &[
    "databases",
    "io-threads",
    "socket-mark-id",
    "tcp-backlog",
    "acllog-max-len",
    "active-defrag-cycle-max",
    "active-defrag-cycle-min",
    "active-defrag-max-scan-fields",
    "active-defrag-threshold-lower",
    "active-defrag-threshold-upper",
    "active-expire-effort",
    "auto-aof-rewrite-percentage",
    "busy-reply-threshold",
    "cluster-announce-bus-port",
    "cluster-announce-port",
    "cluster-announce-tls-port",
    "cluster-blacklist-ttl",
    "cluster-migration-barrier",
    "cluster-node-timeout",
    "cluster-replica-validity-factor",
    "cluster-slave-validity-factor",
    "events-per-io-thread",
    "hash-max-listpack-entries",
    "hash-max-ziplist-entries",
    "hz",
    "latency-monitor-threshold",
    "lfu-decay-time",
    "lfu-log-factor",
    "list-compress-depth",
    "list-max-listpack-size",
    "list-max-ziplist-size",
    "lua-time-limit",
    "max-new-connections-per-cycle",
    "max-new-tls-connections-per-cycle",
    "maxclients",
    "maxmemory-eviction-tenacity",
    "maxmemory-samples",
    "min-replicas-max-lag",
    "min-replicas-to-write",
    "min-slaves-max-lag",
    "min-slaves-to-write",
    "port",
    "prefetch-batch-max-size",
    "repl-backlog-ttl",
    "repl-diskless-sync-delay",
    "repl-diskless-sync-max-replicas",
    "repl-ping-replica-period",
    "repl-ping-slave-period",
    "repl-timeout",
    "replica-announce-port",
    "replica-priority",
    "set-max-intset-entries",
    "set-max-listpack-entries",
    "set-max-listpack-value",
    "shutdown-timeout",
    "slave-announce-port",
    "slave-priority",
    "slowlog-log-slower-than",
    "slowlog-max-len",
    "stream-node-max-entries",
    "tcp-keepalive",
    "timeout",
    "tls-port",
    "tls-session-cache-size",
    "tls-session-cache-timeout",
    "tracking-table-max-keys",
    "zset-max-listpack-entries",
    "zset-max-ziplist-entries",
];

/// Keys that take a size: an integer, with a unit (`b`, `k`, `kb`, `m`, `mb`, `g`, `gb`) or
/// without.
const SIZES: &[&str] = &[
    "active-defrag-ignore-bytes",
    "auto-aof-rewrite-min-size",
    "client-query-buffer-limit",
    "cluster-link-sendbuf-limit",
    "hash-max-listpack-value",
    "hash-max-ziplist-value",
    "hll-sparse-max-bytes",
    "maxmemory",
    "maxmemory-clients",
    "proto-max-bulk-len",
    "repl-backlog-size",
    "stream-node-max-bytes",
    "zset-max-listpack-value",
    "zset-max-ziplist-value",
];

/// Keys that take several arguments; every other key takes one.
const MULTI: &[&str] = &[
    "save",
    "client-output-buffer-limit",
    "oom-score-adj-values",
    "latency-tracking-info-percentiles",
];

/// The classes of keyspace events (`notify-keyspace-events`).
const KEYSPACE_EVENTS: &str = "Ag$lshzxeKEtmdn";

/// Enumerations, and their values.
const ENUMS: &[(&str, &[&str])] = &[
    (
        "maxmemory-policy",
        &[
            "volatile-lru",
            "allkeys-lru",
            "volatile-lfu",
            "allkeys-lfu",
            "volatile-random",
            "allkeys-random",
            "volatile-ttl",
            "noeviction",
        ],
    ),
    ("appendfsync", &["always", "everysec", "no"]),
    (
        "loglevel",
        &["debug", "verbose", "notice", "warning", "nothing"],
    ),
    ("repl-diskless-load", &["disabled", "on-empty-db", "swapdb"]),
    ("sanitize-dump-payload", &["no", "yes", "clients"]),
    ("oom-score-adj", &["no", "yes", "relative", "absolute"]),
];

/// The key an alias names, if `key` is one.
pub fn aliased(key: &str) -> Option<&'static str> {
    ALIASES.iter().find(|(a, _)| *a == key).map(|(_, k)| *k)
}

/// Why `value` cannot follow `key` on a config line, if it cannot. `key` is lower case.
pub fn refused_value(key: &str, value: &str) -> Option<String> {
    let args = match sdssplitargs(value) {
        Ok(args) => args,
        Err(why) => return Some(format!("{value:?} does not load: {why}")),
    };
    if args.is_empty() {
        return Some("is empty: a key needs a value".into());
    }
    if args.len() > 1 && !MULTI.contains(&key) {
        return Some(format!(
            "{value:?} is {} arguments; {key} takes one (quote it to keep it whole)",
            args.len()
        ));
    }
    let single = || (args.len() == 1).then(|| args[0].to_ascii_lowercase());
    let integer = |a: &str| {
        let digits = a.strip_prefix('-').unwrap_or(a);
        !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
    };
    if INTEGERS.contains(&key) && !single().is_some_and(|a| integer(&a)) {
        return Some(format!("{value:?} is not an integer"));
    }
    let size = |a: &str| {
        let percent = key == "maxmemory-clients"
            && a.strip_suffix('%')
                .is_some_and(|n| integer(n) && !n.starts_with('-'));
        percent || super::parse_memory(a).is_some()
    };
    if SIZES.contains(&key) && !single().is_some_and(|a| size(&a)) {
        return Some(format!(
            "{value:?} is not a size (e.g. 100mb, 1gb, 1048576)"
        ));
    }
    if key == "save" && !(args == [""] || (args.len() % 2 == 0 && args.iter().all(|a| integer(a))))
    {
        return Some(format!(
            "{value:?} is not \"\" or pairs of seconds and changes (e.g. 900 1 300 10)"
        ));
    }
    if key == "notify-keyspace-events"
        && !args
            .iter()
            .all(|a| a.chars().all(|c| KEYSPACE_EVENTS.contains(c)))
    {
        return Some(format!(
            "{value:?} holds a class that is not one of {KEYSPACE_EVENTS}"
        ));
    }
    if BOOLEANS.contains(&key) && !matches!(single().as_deref(), Some("yes" | "no")) {
        return Some(format!("{value:?} is not yes or no"));
    }
    if let Some((_, values)) = ENUMS.iter().find(|(k, _)| *k == key)
        && !single().is_some_and(|v| values.contains(&v.as_str()))
    {
        return Some(format!("{value:?} is not one of {}", values.join(", ")));
    }
    None
}

/// Valkey's `sdssplitargs`: arguments separated by blanks, in double quotes (with `\n`-style
/// and `\xHH` escapes) or single quotes (with `\'`); a closing quote must be followed by a
/// blank or the end. Err when Valkey would refuse the line ("Unbalanced quotes").
pub fn sdssplitargs(line: &str) -> Result<Vec<String>, &'static str> {
    let bytes = line.as_bytes();
    let blank = |b: u8| matches!(b, b' ' | b'\n' | b'\r' | b'\t' | b'\0');
    // A closing quote at `i` must end the argument.
    let closing = |i: usize| match bytes.get(i + 1) {
        Some(&next) if !blank(next) => Err("a closing quote must be followed by a space"),
        _ => Ok(()),
    };
    let mut args = Vec::new();
    let mut i = 0;
    loop {
        while i < bytes.len() && blank(bytes[i]) {
            i += 1;
        }
        if i >= bytes.len() {
            return Ok(args);
        }
        let mut current = Vec::new();
        let (mut double, mut single) = (false, false);
        loop {
            let Some(&c) = bytes.get(i) else {
                if double || single {
                    return Err("unbalanced quotes");
                }
                break;
            };
            if double {
                if c == b'\\'
                    && bytes.get(i + 1) == Some(&b'x')
                    && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit)
                    && bytes.get(i + 3).is_some_and(u8::is_ascii_hexdigit)
                {
                    let hex = std::str::from_utf8(&bytes[i + 2..i + 4]).unwrap_or("0");
                    current.push(u8::from_str_radix(hex, 16).unwrap_or(0));
                    i += 3;
                } else if c == b'\\' && i + 1 < bytes.len() {
                    i += 1;
                    current.push(match bytes[i] {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'b' => 8,
                        b'a' => 7,
                        other => other,
                    });
                } else if c == b'"' {
                    closing(i)?;
                    i += 1;
                    break;
                } else {
                    current.push(c);
                }
            } else if single {
                if c == b'\\' && bytes.get(i + 1) == Some(&b'\'') {
                    i += 1;
                    current.push(b'\'');
                } else if c == b'\'' {
                    closing(i)?;
                    i += 1;
                    break;
                } else {
                    current.push(c);
                }
            } else if blank(c) {
                break;
            } else if c == b'"' {
                double = true;
            } else if c == b'\'' {
                single = true;
            } else {
                current.push(c);
            }
            i += 1;
        }
        args.push(String::from_utf8_lossy(&current).into_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_split_as_valkey_splits_them() {
        let ok = |line: &str| sdssplitargs(line).unwrap();
        assert_eq!(ok("900 1 300 10"), ["900", "1", "300", "10"]);
        assert_eq!(ok(r#""a b" 'c d'"#), ["a b", "c d"]);
        assert_eq!(ok(r#""\x41\n""#), ["A\n"]);
        assert_eq!(ok(r"'it\'s'"), ["it's"]);
        assert_eq!(ok("  "), Vec::<String>::new());
        for bad in [r#""open"#, "'open", r#""a"b"#, "'a'b", r#""trailing\"#] {
            assert!(sdssplitargs(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn booleans_and_enumerations_take_their_values_only() {
        assert!(refused_value("appendonly", "yes").is_none());
        assert!(refused_value("appendonly", "YES").is_none());
        assert!(refused_value("appendonly", "true").is_some());
        assert!(refused_value("maxmemory-policy", "allkeys-lru").is_none());
        assert!(refused_value("maxmemory-policy", "#").is_some());
        assert!(refused_value("hz", "").is_some());
        assert!(refused_value("save", "'900 1").is_some());
    }
}
