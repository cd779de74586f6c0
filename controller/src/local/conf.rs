//! Every process's config file, generated afresh before each (re)start from the spec and the
//! working dir's password files. Sentinel follows each REPLICAOF it sends with CONFIG REWRITE,
//! which rewrites a data node's valkey.conf (its `replicaof`, `primaryauth` and `user default`
//! lines); nothing of that survives a restart here. A sentinel's own file is its state and is
//! kept, but its port and password lines are regenerated too.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use crate::{conf_text::quote, tls::TlsFiles};

/// The passwords a process must accept, and the one it presents to others.
#[derive(Clone, PartialEq, Eq)]
pub struct Passwords {
    /// The password in force (`password`, `sentinel-password`): replicas present it to their
    /// master (`masterauth`), sentinels to their peers.
    pub in_force: String,
    /// Every password accepted: the one in force, and both ends of a rotation under way.
    pub accepted: Vec<String>,
}

impl std::fmt::Debug for Passwords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Passwords")
            .field("accepted", &self.accepted.len())
            .finish_non_exhaustive()
    }
}

/// Where a rotation keeps the password it is leaving (`<file>.old`).
pub fn old_password_path(in_force: &Path) -> PathBuf {
    in_force.with_extension("old")
}

/// Where a rotation keeps the password it is moving to (`<file>.new`), from its first step on,
/// so that a process (re)started at any point of it accepts both.
pub fn new_password_path(in_force: &Path) -> PathBuf {
    // Where the agents look for it when a command names the next password.
    valkey_agent::config::next_password_path(in_force)
}

fn read_trimmed(path: &Path) -> std::io::Result<String> {
    Ok(std::fs::read_to_string(path)?.trim().to_owned())
}

impl Passwords {
    /// The password in `in_force`, and those of a rotation under way (`.old`, `.new`).
    pub fn read(in_force: &Path) -> std::io::Result<Self> {
        let current = read_trimmed(in_force)?;
        let mut accepted = vec![current.clone()];
        for path in [old_password_path(in_force), new_password_path(in_force)] {
            if let Ok(other) = read_trimmed(&path)
                && !other.is_empty()
                && !accepted.contains(&other)
            {
                accepted.push(other);
            }
        }
        Ok(Self {
            in_force: current,
            accepted,
        })
    }

    /// The ACL line of the default user accepting every password (hashes only).
    fn acl_line(&self) -> String {
        let hashes: Vec<String> = self
            .accepted
            .iter()
            .map(|p| format!("#{}", sha256_hex(p)))
            .collect();
        format!("user default on {} ~* &* +@all\n", hashes.join(" "))
    }
}

pub use valkey_agent::passwords::sha256_hex;

/// What a data node's valkey.conf is made of.
#[derive(Debug)]
pub struct ValkeyConf<'a> {
    pub port: u16,
    /// The node's address (`--netns`), or loopback: bound, and announced to its master.
    pub host: &'a str,
    pub dir: &'a Path,
    pub log: &'a Path,
    pub passwords: &'a Passwords,
    pub custom: &'a BTreeMap<String, String>,
    /// TLS only, with these files.
    pub tls: Option<&'a TlsFiles>,
}

/// The `bind` line's addresses: `host`, and loopback too (the agent beside it may use either).
fn bind_addresses(host: &str) -> String {
    match host {
        super::hosts::LOOPBACK => host.to_owned(),
        _ => format!("{host} {}", super::hosts::LOOPBACK),
    }
}

/// The port lines: plaintext, or TLS only.
fn port_lines(port: u16, tls: Option<&TlsFiles>) -> String {
    match tls {
        None => format!("port {port}\n"),
        Some(files) => files.config_lines(port),
    }
}

impl ValkeyConf<'_> {
    /// The whole file. Every node starts as a replica of nobody (port 1 refuses at once): a
    /// node that comes back, empty or not, serves no writes and no sync until the controller
    /// (or Sentinel) makes it master. The password is in every place Valkey reads one: the
    /// default user (every accepted password while a rotation runs) and `masterauth`.
    pub fn render(&self) -> String {
        let mut conf = format!(
            "# Written by valkey-controller local up before every start; edits are overwritten.\n\
             {ports}bind {bind}\nprotected-mode no\ndir {dir}\n\
             {acl}masterauth {master_auth}\n\
             appendonly yes\nappendfsync everysec\nsave \"\"\n\
             repl-ping-replica-period 1\nrepl-diskless-sync yes\nrepl-diskless-sync-delay 0\n\
             replicaof 127.0.0.1 1\n\
             replica-announce-ip {announce}\nlogfile {log}\n",
            ports = port_lines(self.port, self.tls),
            bind = bind_addresses(self.host),
            announce = self.host,
            dir = quote(&self.dir.display().to_string()),
            acl = self.passwords.acl_line(),
            master_auth = quote(&self.passwords.in_force),
            log = quote(&self.log.display().to_string()),
        );
        for (key, value) in self.custom {
            conf.push_str(&format!("{key} {value}\n"));
        }
        conf
    }
}

/// What a sentinel's sentinel.conf is made of.
#[derive(Debug)]
pub struct SentinelConf<'a> {
    pub port: u16,
    /// The sentinel's address (`--netns`), or loopback: bound in a first file.
    pub host: &'a str,
    pub dir: &'a Path,
    pub log: &'a Path,
    /// The sentinels' own password, when they have one.
    pub passwords: Option<&'a Passwords>,
    pub custom: &'a BTreeMap<String, String>,
    /// TLS only (its port and every link it opens), with these files.
    pub tls: Option<&'a TlsFiles>,
}

impl SentinelConf<'_> {
    /// The password lines: the default user accepting every password of a rotation under
    /// way, and the one in force presented to the other sentinels.
    fn auth_lines(&self) -> String {
        self.passwords
            .map(|p| {
                format!(
                    "{}sentinel sentinel-pass {}\n",
                    p.acl_line(),
                    quote(&p.in_force)
                )
            })
            .unwrap_or_default()
    }

    /// The whole file: `existing` (what Sentinel last wrote: its monitors, peers, epochs) with
    /// the port and password lines regenerated, or the first file when there is none.
    pub fn render(&self, existing: Option<&str>) -> String {
        let Some(existing) = existing else {
            let mut conf = format!(
                "{ports}bind {bind}\nprotected-mode no\ndir {dir}\n\
                 sentinel resolve-hostnames yes\nsentinel announce-hostnames no\nlogfile {log}\n{auth}",
                ports = port_lines(self.port, self.tls),
                bind = bind_addresses(self.host),
                dir = quote(&self.dir.display().to_string()),
                log = quote(&self.log.display().to_string()),
                auth = self.auth_lines(),
            );
            for (key, value) in self.custom {
                conf.push_str(&format!("{key} {value}\n"));
            }
            return conf;
        };
        let mut conf = port_lines(self.port, self.tls);
        conf.extend(existing.lines().filter_map(|line| {
            let mut words = line.split_whitespace();
            match (words.next(), words.next()) {
                (Some(word), _) if word == "port" || word.starts_with("tls-") => None,
                (Some("requirepass" | "masterauth"), _)
                | (Some("user"), Some("default"))
                | (Some("sentinel"), Some("sentinel-pass")) => None,
                _ => Some(format!("{line}\n")),
            }
        }));
        conf.push_str(&self.auth_lines());
        conf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passwords(accepted: &[&str]) -> Passwords {
        Passwords {
            in_force: accepted[0].to_owned(),
            accepted: accepted.iter().map(|p| (*p).to_owned()).collect(),
        }
    }

    fn valkey_conf(passwords: &Passwords) -> ValkeyConf<'_> {
        ValkeyConf {
            host: "127.0.0.1",
            port: 7000,
            dir: Path::new("/d"),
            log: Path::new("/l"),
            passwords,
            custom: &EMPTY,
            tls: None,
        }
    }

    static EMPTY: BTreeMap<String, String> = BTreeMap::new();

    fn valkey(passwords: &Passwords) -> String {
        valkey_conf(passwords).render()
    }

    #[test]
    fn a_node_in_a_namespace_of_its_own_binds_and_announces_its_address() {
        let passwords = passwords(&["pw"]);
        let conf = ValkeyConf {
            host: "10.1.0.2",
            ..valkey_conf(&passwords)
        }
        .render();
        assert!(conf.contains("\nbind 10.1.0.2 127.0.0.1\n"), "{conf}");
        assert!(conf.contains("\nreplica-announce-ip 10.1.0.2\n"), "{conf}");
        assert!(valkey(&passwords).contains("\nbind 127.0.0.1\n"));
    }

    #[test]
    fn a_data_node_starts_as_a_replica_of_nobody_with_the_password_everywhere() {
        let conf = valkey(&passwords(&["new"]));
        assert!(conf.contains("\nreplicaof 127.0.0.1 1\n"), "{conf}");
        assert!(conf.contains("\nmasterauth \"new\"\n"), "{conf}");
        let acl = format!("\nuser default on #{} ~* &* +@all\n", sha256_hex("new"));
        assert!(conf.contains(&acl), "{conf}");
        assert!(!conf.contains("requirepass"), "{conf}");
    }

    #[test]
    fn during_a_rotation_a_data_node_accepts_both_and_presents_the_one_in_force() {
        let conf = valkey(&passwords(&["old", "new"]));
        let acl = format!(
            "\nuser default on #{} #{} ~* &* +@all\n",
            sha256_hex("old"),
            sha256_hex("new")
        );
        assert!(conf.contains(&acl), "{conf}");
        assert!(conf.contains("\nmasterauth \"old\"\n"), "{conf}");
    }

    #[test]
    fn passwords_of_a_rotation_under_way_are_read_beside_the_one_in_force() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("password");
        std::fs::write(&file, "one\n").expect("write");
        assert_eq!(Passwords::read(&file).expect("read"), passwords(&["one"]));
        std::fs::write(new_password_path(&file), "two").expect("write");
        std::fs::write(old_password_path(&file), "one").expect("write");
        assert_eq!(
            Passwords::read(&file).expect("read"),
            passwords(&["one", "two"])
        );
        assert!(Passwords::read(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn a_sentinel_keeps_what_it_learned_and_gets_its_port_and_password_lines_anew() {
        let learned = "port 1\nsentinel monitor m 127.0.0.1 7000 2\nuser default on #stale ~* &* +@all\n\
                       sentinel sentinel-pass stale\nrequirepass stale\nsentinel known-sentinel m 127.0.0.1 9 abc\n";
        let pw = passwords(&["now"]);
        let conf = SentinelConf {
            host: "127.0.0.1",
            port: 26379,
            dir: Path::new("/d"),
            log: Path::new("/l"),
            passwords: Some(&pw),
            custom: &BTreeMap::new(),
            tls: None,
        }
        .render(Some(learned));
        assert!(conf.starts_with("port 26379\n"), "{conf}");
        assert!(
            conf.contains("sentinel monitor m 127.0.0.1 7000 2\n"),
            "{conf}"
        );
        assert!(conf.contains("sentinel known-sentinel m 127.0.0.1 9 abc\n"));
        assert!(!conf.contains("stale"), "{conf}");
        assert!(conf.contains("sentinel sentinel-pass \"now\"\n"), "{conf}");
    }

    #[test]
    fn with_tls_a_node_and_a_sentinel_serve_tls_only_and_link_over_tls() {
        let files = TlsFiles::in_dir("/w/tls");
        let pw = passwords(&["p"]);
        let conf = ValkeyConf {
            host: "127.0.0.1",
            port: 7000,
            dir: Path::new("/d"),
            log: Path::new("/l"),
            passwords: &pw,
            custom: &BTreeMap::new(),
            tls: Some(&files),
        }
        .render();
        for line in [
            "port 0\n",
            "\ntls-port 7000\n",
            "\ntls-cert-file \"/w/tls/tls.crt\"\n",
            "\ntls-key-file \"/w/tls/tls.key\"\n",
            "\ntls-ca-cert-file \"/w/tls/ca.crt\"\n",
            "\ntls-replication yes\n",
        ] {
            assert!(conf.contains(line), "{line:?} missing from:\n{conf}");
        }
        assert!(!conf.contains("port 7000\n") || conf.contains("tls-port 7000\n"));
        // A sentinel that ran without TLS gets TLS lines instead of its old port line.
        let learned = "port 26379\nsentinel monitor m 127.0.0.1 7000 2\ntls-port 1\n";
        let sentinel = SentinelConf {
            host: "127.0.0.1",
            port: 26379,
            dir: Path::new("/d"),
            log: Path::new("/l"),
            passwords: None,
            custom: &BTreeMap::new(),
            tls: Some(&files),
        }
        .render(Some(learned));
        assert!(
            sentinel.starts_with("port 0\ntls-port 26379\n"),
            "{sentinel}"
        );
        assert_eq!(sentinel.matches("tls-port").count(), 1, "{sentinel}");
        assert!(sentinel.contains("sentinel monitor m 127.0.0.1 7000 2\n"));
    }
}
