//! Where the local runtime's processes run: all on this machine's loopback (the default), or
//! each node in a Linux network namespace of its own, with its own address (`--netns`), so that
//! the partition tests and `partition-bench` can cut the network between them.

use std::{
    collections::BTreeMap,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

/// The address every process has without `--netns`.
pub const LOOPBACK: &str = "127.0.0.1";

/// One node's network namespace and its address there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeHost {
    pub netns: PathBuf,
    pub ip: String,
}

/// The hosts of every pod, and the address the hub is reached at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hosts {
    nodes: BTreeMap<String, NodeHost>,
    hub: Option<String>,
}

impl Hosts {
    /// From `--netns POD=NETNS_PATH,IP` (repeated) and `--hub-host IP`; the error names the
    /// flag and the value.
    pub fn parse(specs: &[String], hub: Option<String>) -> Result<Self, String> {
        let mut nodes = BTreeMap::new();
        for spec in specs {
            let parsed = spec.split_once('=').and_then(|(pod, rest)| {
                let (netns, ip) = rest.rsplit_once(',')?;
                ip.parse::<std::net::Ipv4Addr>().ok()?;
                Some((
                    pod.to_owned(),
                    NodeHost {
                        netns: PathBuf::from(netns),
                        ip: ip.to_owned(),
                    },
                ))
            });
            let Some((pod, host)) = parsed else {
                return Err(format!("--netns {spec:?}: expected POD=NETNS_PATH,IPV4"));
            };
            nodes.insert(pod, host);
        }
        if let Some(hub) = &hub {
            match hub.parse::<std::net::Ipv4Addr>() {
                Err(_) => return Err(format!("--hub-host {hub:?}: expected an IPv4 address")),
                // The hub would listen on every interface of the machine.
                Ok(ip) if ip.is_unspecified() => {
                    return Err(format!(
                        "--hub-host {hub}: name the one address agents reach the controller at"
                    ));
                }
                Ok(_) if nodes.is_empty() => {
                    return Err("--hub-host is for --netns only".into());
                }
                Ok(_) => {}
            }
        }
        if !nodes.is_empty() && hub.is_none() {
            return Err(
                "--netns needs --hub-host: the address agents reach the controller at".into(),
            );
        }
        Ok(Self { nodes, hub })
    }

    /// The address of `pod`'s processes.
    pub fn ip(&self, pod: &str) -> &str {
        self.nodes.get(pod).map_or(LOOPBACK, |h| h.ip.as_str())
    }

    /// The network namespace `pod`'s processes run in, if not this one.
    pub fn netns(&self, pod: &str) -> Option<&Path> {
        self.nodes.get(pod).map(|h| h.netns.as_path())
    }

    /// The address the hub listens on and agents dial.
    pub fn hub(&self) -> &str {
        self.hub.as_deref().unwrap_or(LOOPBACK)
    }

    /// Every address a certificate must name (beside loopback).
    pub fn names(&self) -> Vec<String> {
        self.nodes
            .values()
            .map(|h| h.ip.clone())
            .chain(self.hub.clone())
            .collect()
    }
}

/// Opens a namespace for [`enter`]; done before the fork, so that the child only calls setns.
pub fn open(netns: &Path) -> std::io::Result<std::fs::File> {
    std::fs::File::open(netns)
}

/// Moves the calling thread (or a child between fork and exec) into the network namespace.
pub fn enter(netns: &std::fs::File) -> std::io::Result<()> {
    nix::sched::setns(netns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(std::io::Error::from)
}

/// Whether something listens at `ip`:`port`: a connect when the address is another
/// namespace's, a bind attempt on loopback (which also sees a port held without listening).
pub fn listening(ip: &str, port: u16) -> bool {
    if ip == LOOPBACK {
        return super::supervisor::port_in_use(port);
    }
    let Ok(addr) = format!("{ip}:{port}").parse::<std::net::SocketAddr>() else {
        return false;
    };
    std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(200)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_are_parsed_and_bad_ones_named() {
        let hosts = Hosts::parse(
            &["demo-0=/run/netns/a,10.1.0.2".into()],
            Some("10.1.0.9".into()),
        )
        .expect("valid");
        assert_eq!(hosts.ip("demo-0"), "10.1.0.2");
        assert_eq!(hosts.ip("demo-1"), LOOPBACK);
        assert_eq!(hosts.netns("demo-0"), Some(Path::new("/run/netns/a")));
        assert_eq!(hosts.hub(), "10.1.0.9");
        let err = Hosts::parse(&["demo-0=/run/netns/a".into()], Some("10.1.0.9".into()))
            .expect_err("no ip");
        assert!(err.contains("--netns"), "{err}");
        let err = Hosts::parse(&["demo-0=/x,10.1.0.2".into()], None).expect_err("no hub");
        assert!(err.contains("--hub-host"), "{err}");
        assert_eq!(Hosts::parse(&[], None), Ok(Hosts::default()));
        // A hub on every interface, or a hub host without network namespaces, is refused.
        let err = Hosts::parse(&["demo-0=/x,10.1.0.2".into()], Some("0.0.0.0".into()))
            .expect_err("unspecified");
        assert!(err.contains("--hub-host 0.0.0.0"), "{err}");
        let err = Hosts::parse(&[], Some("10.1.0.9".into())).expect_err("no --netns");
        assert!(err.contains("--netns"), "{err}");
    }
}
