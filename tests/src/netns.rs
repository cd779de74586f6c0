//! A small network of Linux network namespaces for partition tests: one namespace per host
//! (a Valkey with its agent, the controller, a client group), each with a veth pair to a
//! bridge in this (root) namespace, which keeps an address on the bridge so the test can
//! watch every host whatever the partition. Partitions are made with blackhole routes in the
//! hosts' namespaces (`ip route add blackhole`): packets between the two sides are dropped,
//! connections hang as they do on a real network, and healing removes the routes. Needs root;
//! [`Net::unavailable`] says why not otherwise. Everything is removed on drop.

use valkey_controller::local::hosts;

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

static NETS: AtomicU32 = AtomicU32::new(0);

/// One host of the network.
#[derive(Debug, Clone)]
pub struct Host {
    pub ns: String,
    pub ip: Ipv4Addr,
}

impl Host {
    /// The path `setns(2)` and `--netns` take.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.ns)
    }
}

#[derive(Debug)]
pub struct Net {
    bridge: String,
    root: Ipv4Addr,
    hosts: BTreeMap<String, Host>,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn must(args: &[&str]) {
    if let Err(err) = ip(args) {
        panic!("{err}");
    }
}

impl Net {
    /// Why this process cannot make a network here, if it cannot.
    pub fn unavailable() -> Option<String> {
        if !nix::unistd::geteuid().is_root() {
            return Some("not root: network namespaces need it (CI runs as root)".into());
        }
        let probe = format!("vk-probe-{}", std::process::id());
        match ip(&["netns", "add", &probe]) {
            Ok(()) => {
                let _ = ip(&["netns", "del", &probe]);
                None
            }
            Err(err) => Some(format!("cannot make a network namespace: {err}")),
        }
    }

    /// A network with one namespace per name, every host reaching every other.
    pub fn new(names: &[&str]) -> Self {
        assert!(names.len() <= 13, "a /28 holds 13 hosts beside the bridge");
        // A /28 of 10.0.0.0/8 of its own per network: the process id and a counter.
        let id = (std::process::id() % (1 << 18)) * 4 + NETS.fetch_add(1, Ordering::Relaxed) % 4;
        let base = u32::from(Ipv4Addr::new(10, 0, 0, 0)) + id * 16;
        let bridge = format!("vb{id:05x}");
        let root = Ipv4Addr::from(base + 1);
        let mut net = Net {
            bridge: bridge.clone(),
            root,
            hosts: BTreeMap::new(),
        };
        must(&["link", "add", &bridge, "type", "bridge"]);
        must(&["addr", "add", &format!("{root}/28"), "dev", &bridge]);
        must(&["link", "set", &bridge, "up"]);
        for (i, name) in names.iter().enumerate() {
            let host = Host {
                ns: format!("vk-{id:05x}-{name}"),
                ip: Ipv4Addr::from(base + 2 + i as u32),
            };
            let veth = format!("vk{id:05x}{i:x}");
            must(&["netns", "add", &host.ns]);
            net.hosts.insert((*name).to_owned(), host.clone());
            must(&[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &host.ns,
            ]);
            must(&["link", "set", &veth, "master", &bridge, "up"]);
            must(&[
                "-n",
                &host.ns,
                "addr",
                "add",
                &format!("{}/28", host.ip),
                "dev",
                "eth0",
            ]);
            must(&["-n", &host.ns, "link", "set", "eth0", "up"]);
            must(&["-n", &host.ns, "link", "set", "lo", "up"]);
        }
        net
    }

    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .get(name)
            .unwrap_or_else(|| panic!("no host {name}"))
    }

    pub fn ip(&self, name: &str) -> Ipv4Addr {
        self.host(name).ip
    }

    /// This namespace's address on the bridge (it is never cut off).
    pub fn root_ip(&self) -> Ipv4Addr {
        self.root
    }

    /// Drops every packet between `a` and `b`, both ways.
    pub fn cut(&self, a: &str, b: &str) {
        let (ha, hb) = (self.host(a), self.host(b));
        for (from, to) in [(ha, hb), (hb, ha)] {
            // Already cut (an overlapping partition) is fine.
            let _ = ip(&[
                "-n",
                &from.ns,
                "route",
                "add",
                "blackhole",
                &format!("{}/32", to.ip),
            ]);
        }
    }

    /// Cuts every host of `side` from every host of `other`.
    pub fn split(&self, side: &[&str], other: &[&str]) {
        for a in side {
            for b in other {
                self.cut(a, b);
            }
        }
    }

    /// Cuts `name` from every other host but those in `except`.
    pub fn isolate(&self, name: &str, except: &[&str]) {
        let others: Vec<&str> = self
            .hosts
            .keys()
            .map(String::as_str)
            .filter(|h| *h != name && !except.contains(h))
            .collect();
        self.split(&[name], &others);
    }

    /// Every host reaches every other again.
    pub fn heal(&self) {
        for host in self.hosts.values() {
            must(&["-n", &host.ns, "route", "flush", "type", "blackhole"]);
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for host in self.hosts.values() {
            let _ = ip(&["netns", "del", &host.ns]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

/// Runs `f` on a thread of its own inside `host`'s namespace: every socket it opens is
/// there. `f` typically builds a current-thread runtime.
pub fn spawn_in<T: Send + 'static>(
    host: &Host,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let (file, ns) = (open(host), host.ns.clone());
    std::thread::spawn(move || {
        hosts::enter(&file).unwrap_or_else(|e| panic!("setns {ns}: {e}"));
        f()
    })
}

/// `host`'s namespace, opened for [`hosts::enter`].
fn open(host: &Host) -> std::fs::File {
    hosts::open(&host.path()).unwrap_or_else(|e| panic!("{}: {e}", host.path().display()))
}

/// Makes `cmd` start inside `host`'s namespace, as `local up --netns` starts its nodes.
#[allow(unsafe_code)]
pub fn command_in(cmd: &mut Command, host: &Host) {
    use std::os::unix::process::CommandExt;
    let file = open(host);
    // SAFETY: the closure only calls setns(2) on a file opened before the fork.
    unsafe {
        cmd.pre_exec(move || hosts::enter(&file));
    }
}
