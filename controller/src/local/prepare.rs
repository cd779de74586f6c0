//! Everything `local up` checks and sets up before any process starts: the manifest, the
//! binaries, the working dir and its state, ports, passwords and the sentinels.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use super::*;

/// Prepares the working dir and everything `up` needs, checking all bad input before any
/// process starts.
pub(super) async fn prepare(options: &UpOptions) -> Result<Runtime, LocalError> {
    let text =
        std::fs::read_to_string(&options.manifest).map_err(|source| LocalError::ReadManifest {
            path: options.manifest.clone(),
            source,
        })?;
    let manifest = Manifest::parse(&text, &options.manifest.display().to_string())?;
    let key = InstanceKey {
        namespace: manifest.namespace().to_owned(),
        name: manifest.metadata.name.clone(),
    };
    // An external Sentinel set gets no processes of ours: an agent for each of its sentinels
    // runs inside the controller instead.
    let external: Vec<crate::external::ExternalNode> = manifest
        .spec
        .sentinel
        .as_ref()
        .and_then(|s| s.sentinel_reference.as_ref())
        .map(|reference| crate::external::nodes(&key.name, reference))
        .unwrap_or_default();
    let sentinel_bin = match &manifest.spec.sentinel {
        Some(s) if s.sentinel_reference.is_none() => {
            Some(which("valkey-sentinel").ok_or(LocalError::MissingBinary {
                name: "valkey-sentinel".into(),
                flag: "path",
            })?)
        }
        _ => None,
    };
    let valkey_bin = which("valkey-server").ok_or(LocalError::MissingBinary {
        name: "valkey-server".into(),
        flag: "path",
    })?;
    let agent_bin = std::env::var_os("VALKEY_AGENT_BIN")
        .map(PathBuf::from)
        .or_else(|| sibling_or_path("valkey-agent"))
        .ok_or(LocalError::MissingBinary {
            name: "valkey-agent".into(),
            flag: "path",
        })?;

    let dir = options
        .dir
        .clone()
        .unwrap_or_else(|| default_dir(&key.namespace, &key.name));
    // Everything this runtime and its children write (configs holding passwords, AOF and RDB
    // files, logs, the control socket) is for this user alone, whatever the caller's umask.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let dir = super::workdir::claim(&dir)?;
    // Secrets are files in the working dir: a Secret named N is `secrets/N/password`.
    let sentinel_secret = match manifest
        .spec
        .sentinel
        .as_ref()
        .and_then(|s| s.password_secret())
    {
        None => None,
        Some((field, name)) => {
            let file = dir.join("secrets").join(&name).join("password");
            let readable = std::fs::read_to_string(&file).is_ok_and(|p| !p.trim().is_empty());
            if !readable {
                return Err(LocalError::Manifest(ManifestError::Invalid {
                    field: field.to_owned(),
                    message: format!(
                        "Secret {name:?} not found (the local runtime reads it from {})",
                        file.display()
                    ),
                }));
            }
            Some((name, file))
        }
    };
    let external_tls = match manifest
        .spec
        .sentinel
        .as_ref()
        .and_then(|s| s.sentinel_reference.as_ref())
        .and_then(|r| r.auth.as_ref())
        .and_then(|a| a.tls_secret.as_deref())
    {
        Some(name) => Some(tls::external_sentinel_tls(&dir, name)?),
        None => None,
    };
    let state_path = dir.join("state.json");
    let mut state = LocalState::load(&state_path)?.unwrap_or_else(|| LocalState {
        namespace: key.namespace.clone(),
        name: key.name.clone(),
        ..LocalState::default()
    });
    if state.namespace != key.namespace || state.name != key.name {
        return Err(LocalError::OtherInstance {
            dir,
            found: format!("{}/{}", state.namespace, state.name),
            wanted: format!("{}/{}", key.namespace, key.name),
        });
    }
    if control::is_running(&dir) {
        return Err(LocalError::AlreadyRunning { dir });
    }

    let replicas = manifest.spec.replicas as u32;
    let ports = Registry::shared();
    if let Some(settings) = manifest
        .spec
        .sentinel
        .as_ref()
        .filter(|s| s.sentinel_reference.is_none())
    {
        for ordinal in 0..settings.count() {
            let pod = format!("{}-sentinel-{ordinal}", key.name);
            if let std::collections::btree_map::Entry::Vacant(entry) = state.sentinels.entry(pod) {
                let [sentinel, agent, metrics] = ports
                    .reserve(&dir)
                    .map_err(io("reserving ports in", ports.path()))?;
                entry.insert(NodePorts {
                    valkey: sentinel,
                    agent,
                    metrics,
                });
            }
        }
    }
    for ordinal in 0..replicas {
        let pod = pod_name(&key.name, ordinal);
        if let std::collections::btree_map::Entry::Vacant(entry) = state.ports.entry(pod) {
            let [valkey, agent, metrics] = ports
                .reserve(&dir)
                .map_err(io("reserving ports in", ports.path()))?;
            entry.insert(NodePorts {
                valkey,
                agent,
                metrics,
            });
        }
    }
    // The ports this dir's state names stay reserved while it is stopped.
    let held: Vec<u16> = state
        .ports
        .values()
        .chain(state.sentinels.values())
        .flat_map(|p| [p.valkey, p.agent, p.metrics])
        .collect();
    ports
        .claim(&dir, &held)
        .map_err(io("reserving ports in", ports.path()))?;
    // Nodes beyond the replica count keep running, retiring, until the master is elsewhere.
    let mut nodes: Vec<NodeSpec> = state
        .ports
        .iter()
        .filter_map(|(pod, ports)| {
            let ordinal = pod.rsplit_once('-')?.1.parse::<u32>().ok()?;
            Some(NodeSpec {
                name: pod.clone(),
                ordinal,
                host: options.hosts.ip(pod).to_owned(),
                port: ports.valkey,
                retiring: ordinal >= replicas,
            })
        })
        .collect();
    nodes.sort_by_key(|n| n.ordinal);
    let desired = Desired {
        nodes,
        hang_timeout_ms: options.hang_timeout.as_millis() as u64,
        replica_silence_s: (options.hang_timeout.as_secs() as i64).max(2),
        live_config: crate::engine::live_config(&manifest.spec),
        // Everything is on loopback: the addresses the nodes announce at start are right.
        announce: false,
    };
    let driver = Driver::new(key.clone(), state.durable.clone());
    let tls = tls::LocalTls::prepare(
        &dir,
        manifest.spec.access.enable_tls,
        options.cert_lifetime,
        options.hosts.names(),
    )?;
    let runtime = Runtime {
        pods: Default::default(),
        password_file: dir.join("password"),
        token_file: dir.join("agent-token"),
        key,
        state_path,
        state,
        desired,
        manifest,
        valkey_bin,
        agent_bin,
        hub_addr: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        hosts: options.hosts.clone(),
        probe_interval_ms: options.probe_interval_ms,
        procs: BTreeMap::new(),
        driver,
        sentinel: None,
        sentinel_bin: None,
        external: Vec::new(),
        external_tls: None,
        sentinel_password_file: None,
        sentinel_secret: None,
        tls,
        sentinel_roll: tls::SentinelRoll::default(),
        dir,
    };
    // Embedded sentinels use the controller's copy of their password, which follows the Secret
    // through a rotation; an external set's agents read the Secret itself.
    let embedded = runtime.manifest.spec.sentinel.is_some() && external.is_empty();
    let (sentinel_password_file, sentinel_secret) = match sentinel_secret {
        // No Secret named: embedded sentinels still get a password of their own (any local
        // user could otherwise run SENTINEL FAILOVER), kept in the working dir.
        None if embedded => {
            let copy = runtime.dir.join("sentinel-password");
            secret_file(&copy)?;
            (Some(copy), None)
        }
        None => (None, None),
        Some((_, file)) if !external.is_empty() => (Some(file), None),
        Some((name, file)) => {
            let copy = runtime.dir.join("sentinel-password");
            if !copy.exists() {
                let password = std::fs::read(&file).map_err(io("reading", &file))?;
                write_atomic(&copy, &password).map_err(io("writing", &copy))?;
            }
            (Some(copy), Some((name, file)))
        }
    };
    let runtime = Runtime {
        sentinel: match &runtime.manifest.spec.sentinel {
            Some(settings) => Some(SentinelDesired {
                name: format!("{}.{}", runtime.key.namespace, runtime.key.name),
                quorum: settings.quorum_or_default(),
                monitor_config: settings.monitor_config_or_default(),
                sentinel_addrs: runtime
                    .state
                    .sentinels
                    .iter()
                    .map(|(pod, p)| (options.hosts.ip(pod).to_owned(), u32::from(p.valkey)))
                    .chain(external.iter().map(|n| (n.host.clone(), u32::from(n.port))))
                    .collect(),
                // On loopback every sentinel is reached where it says it is.
                announce: Default::default(),
            }),
            None => None,
        },
        sentinel_bin,
        external,
        external_tls,
        sentinel_password_file,
        sentinel_secret,
        ..runtime
    };
    for (pod, ports, _) in runtime.wanted_pods() {
        for (what, port) in [
            ("valkey", ports.valkey),
            ("agent", ports.agent),
            ("metrics", ports.metrics),
        ] {
            // A Valkey killed with its controller may leave a forked child (AOF rewrite,
            // diskless sync) holding its port for a moment: give it a few seconds.
            let deadline = Instant::now() + Duration::from_secs(3);
            while port_in_use(port) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if port_in_use(port) {
                return Err(LocalError::PortInUse {
                    pod,
                    what,
                    port,
                    state: runtime.state_path.clone(),
                });
            }
        }
    }
    secret_file(&runtime.password_file)?;
    secret_file(&runtime.token_file)?;
    runtime.state.save(&runtime.state_path)?;
    Ok(runtime)
}
