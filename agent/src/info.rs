//! Pure parsing of what Valkey and Sentinel answer (INFO text, CONFIG GET and SENTINEL
//! replies) into the report messages of the contract. No I/O here.

use std::collections::HashMap;

use valkey_proto::v1::{DataState, ReplicaInfo, Role, SentinelMaster, SentinelPeer};

/// INFO's `key:value` lines; section headers and blank lines are skipped.
pub fn parse_info(text: &str) -> HashMap<&str, &str> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(|line| line.split_once(':'))
        .collect()
}

/// `a=1,b=2` as found in `slave0:` and `db0:` lines.
fn parse_fields(value: &str) -> HashMap<&str, &str> {
    value
        .split(',')
        .filter_map(|pair| pair.split_once('='))
        .collect()
}

fn num<T: std::str::FromStr + Default>(info: &HashMap<&str, &str>, key: &str) -> T {
    info.get(key)
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_default()
}

fn text(info: &HashMap<&str, &str>, key: &str) -> String {
    info.get(key)
        .map(|v| v.trim().to_owned())
        .unwrap_or_default()
}

/// Total keys over every `dbN:keys=..` line.
pub fn key_count(info: &HashMap<&str, &str>) -> u64 {
    info.iter()
        .filter(|(k, _)| k.starts_with("db") && k[2..].chars().all(|c| c.is_ascii_digit()))
        .filter_map(|(_, v)| {
            parse_fields(v)
                .get("keys")
                .and_then(|n| n.parse::<u64>().ok())
        })
        .sum()
}

/// The parts of a DataState that come straight from INFO (server, replication, keyspace,
/// persistence) and CONFIG GET; restart detection is the watcher's, which has history.
pub fn data_state(info: &HashMap<&str, &str>, config: &HashMap<String, String>) -> DataState {
    let role = match info.get("role").map(|r| r.trim()) {
        Some("master") => Role::Master,
        Some("slave") | Some("replica") => Role::Replica,
        _ => Role::Unspecified,
    };
    let replicas = info
        .iter()
        .filter(|(k, _)| k.starts_with("slave") && k[5..].chars().all(|c| c.is_ascii_digit()))
        .map(|(k, v)| (k[5..].parse::<u32>().unwrap_or(u32::MAX), parse_fields(v)))
        .collect::<std::collections::BTreeMap<_, _>>()
        .into_values()
        .map(|f| ReplicaInfo {
            host: f.get("ip").copied().unwrap_or_default().to_owned(),
            port: num(&f, "port"),
            state: f.get("state").copied().unwrap_or_default().to_owned(),
            offset: num(&f, "offset"),
            lag_s: num(&f, "lag"),
        })
        .collect();
    let master_offset: i64 = num(info, "master_repl_offset");
    let replica_offset: i64 = num(info, "slave_repl_offset");
    let conf = |key: &str| {
        config
            .get(key)
            .and_then(|v| v.parse().ok())
            .unwrap_or_default()
    };
    let is_replica = role == Role::Replica;
    DataState {
        role: role.into(),
        run_id: text(info, "run_id"),
        uptime_s: num(info, "uptime_in_seconds"),
        key_count: key_count(info),
        loading: num::<u8>(info, "loading") == 1 || num::<u8>(info, "async_loading") == 1,
        repl_offset: master_offset.max(replica_offset),
        replid: text(info, "master_replid"),
        replid2: text(info, "master_replid2"),
        second_repl_offset: num(info, "second_repl_offset"),
        master_host: if is_replica {
            text(info, "master_host")
        } else {
            String::new()
        },
        master_port: if is_replica {
            num(info, "master_port")
        } else {
            0
        },
        master_link_up: is_replica
            && info.get("master_link_status").map(|s| s.trim()) == Some("up"),
        master_link_down_s: num(info, "master_link_down_since_seconds"),
        master_sync_in_progress: num::<u8>(info, "master_sync_in_progress") == 1,
        master_last_io_s: num(info, "master_last_io_seconds_ago"),
        replicas,
        min_replicas_to_write: conf("min-replicas-to-write"),
        min_replicas_max_lag: conf("min-replicas-max-lag"),
        replica_priority: conf("replica-priority"),
        replica_announce_ip: config
            .get("replica-announce-ip")
            .cloned()
            .unwrap_or_default(),
        replica_announce_port: conf("replica-announce-port"),
        version: info
            .get("valkey_version")
            .or_else(|| info.get("redis_version"))
            .map(|v| v.trim().to_owned())
            .unwrap_or_default(),
        ..DataState::default()
    }
}

fn flags(value: Option<&String>) -> Vec<String> {
    value
        .map(|v| {
            v.split(',')
                .filter(|f| !f.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

fn field<T: std::str::FromStr + Default>(map: &HashMap<String, String>, key: &str) -> T {
    map.get(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_default()
}

fn peer(map: &HashMap<String, String>) -> SentinelPeer {
    SentinelPeer {
        host: map.get("ip").cloned().unwrap_or_default(),
        port: field(map, "port"),
        flags: flags(map.get("flags")),
        run_id: map.get("runid").cloned().unwrap_or_default(),
        offset: field(map, "slave-repl-offset"),
        master_link_up: map.get("master-link-status").map(String::as_str) == Some("ok"),
        priority: field(map, "slave-priority"),
    }
}

/// One entry of SENTINEL MASTERS with its SENTINEL REPLICAS and SENTINEL SENTINELS.
pub fn sentinel_master(
    master: &HashMap<String, String>,
    replicas: &[HashMap<String, String>],
    sentinels: &[HashMap<String, String>],
) -> SentinelMaster {
    SentinelMaster {
        name: master.get("name").cloned().unwrap_or_default(),
        host: master.get("ip").cloned().unwrap_or_default(),
        port: field(master, "port"),
        flags: flags(master.get("flags")),
        config_epoch: field(master, "config-epoch"),
        quorum: field(master, "quorum"),
        num_replicas: field(master, "num-slaves"),
        num_other_sentinels: field(master, "num-other-sentinels"),
        replicas: replicas.iter().map(peer).collect(),
        sentinels: sentinels.iter().map(peer).collect(),
        failover_state: master.get("failover-state").cloned().unwrap_or_default(),
        down_after_ms: field(master, "down-after-milliseconds"),
        failover_timeout_ms: field(master, "failover-timeout"),
        parallel_syncs: field(master, "parallel-syncs"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MASTER: &str = "# Server\r\nvalkey_version:8.0.1\r\nrun_id:aaa\r\nuptime_in_seconds:42\r\n\r\n# Replication\r\nrole:master\r\nconnected_slaves:2\r\nslave1:ip=127.0.0.1,port=7002,state=wait_bgsave,offset=0,lag=3\r\nslave0:ip=127.0.0.1,port=7001,state=online,offset=1234,lag=0\r\nmaster_failover_state:no-failover\r\nmaster_replid:r1\r\nmaster_replid2:0000\r\nmaster_repl_offset:1300\r\nsecond_repl_offset:-1\r\n\r\n# Persistence\r\nloading:0\r\nasync_loading:0\r\n\r\n# Keyspace\r\ndb0:keys=10,expires=0,avg_ttl=0\r\ndb3:keys=5,expires=1,avg_ttl=9\r\n";

    const REPLICA: &str = "# Server\nredis_version:7.2.4\nrun_id:bbb\nuptime_in_seconds:7\n# Replication\nrole:slave\nmaster_host:10.0.0.1\nmaster_port:7000\nmaster_link_status:down\nmaster_last_io_seconds_ago:-1\nmaster_sync_in_progress:1\nslave_repl_offset:77\nmaster_link_down_since_seconds:5\nmaster_replid:r1\nmaster_repl_offset:70\n# Persistence\nloading:1\n";

    #[test]
    fn master_info() {
        let config = HashMap::from([
            ("min-replicas-to-write".to_owned(), "1".to_owned()),
            ("min-replicas-max-lag".to_owned(), "10".to_owned()),
            ("replica-priority".to_owned(), "100".to_owned()),
        ]);
        let state = data_state(&parse_info(MASTER), &config);
        assert_eq!(state.role(), Role::Master);
        assert_eq!(state.run_id, "aaa");
        assert_eq!(state.uptime_s, 42);
        assert_eq!(state.key_count, 15);
        assert_eq!(state.repl_offset, 1300);
        assert_eq!(state.second_repl_offset, -1);
        assert_eq!(state.version, "8.0.1");
        assert!(!state.loading && !state.master_link_up && state.master_host.is_empty());
        let ports: Vec<_> = state
            .replicas
            .iter()
            .map(|r| (r.port, r.offset, r.state.as_str()))
            .collect();
        assert_eq!(ports, [(7001, 1234, "online"), (7002, 0, "wait_bgsave")]);
        assert_eq!(
            (
                state.min_replicas_to_write,
                state.min_replicas_max_lag,
                state.replica_priority
            ),
            (1, 10, 100)
        );
    }

    #[test]
    fn replica_info() {
        let state = data_state(&parse_info(REPLICA), &HashMap::new());
        assert_eq!(state.role(), Role::Replica);
        assert_eq!(
            (state.master_host.as_str(), state.master_port),
            ("10.0.0.1", 7000)
        );
        assert!(!state.master_link_up);
        assert!(state.master_sync_in_progress && state.loading);
        assert_eq!(state.master_link_down_s, 5);
        assert_eq!(state.repl_offset, 77);
        assert_eq!(state.key_count, 0);
        assert_eq!(state.version, "7.2.4");
    }

    #[test]
    fn sentinel_replies() {
        let m = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let master = m(&[
            ("name", "ns.f"),
            ("ip", "127.0.0.1"),
            ("port", "7000"),
            ("flags", "master,s_down"),
            ("config-epoch", "3"),
            ("quorum", "2"),
            ("num-slaves", "2"),
            ("num-other-sentinels", "2"),
            ("down-after-milliseconds", "30000"),
            ("failover-timeout", "180000"),
            ("parallel-syncs", "1"),
        ]);
        let replica = m(&[
            ("ip", "127.0.0.1"),
            ("port", "7001"),
            ("flags", "slave"),
            ("master-link-status", "ok"),
            ("slave-repl-offset", "99"),
            ("runid", "r"),
            ("slave-priority", "7"),
        ]);
        let state = sentinel_master(&master, &[replica], &[]);
        assert_eq!(state.flags, ["master", "s_down"]);
        assert_eq!(
            (state.config_epoch, state.quorum, state.down_after_ms),
            (3, 2, 30000)
        );
        assert_eq!(
            (state.failover_timeout_ms, state.parallel_syncs),
            (180000, 1)
        );
        assert_eq!(
            (state.replicas[0].offset, state.replicas[0].priority),
            (99, 7)
        );
        assert!(state.replicas[0].master_link_up);
    }
}
