//! Everything `local up` checks and sets up before any process starts: the manifest, the
//! binaries, the working dir and its state, ports, passwords and the sentinels.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use super::*;
use crate::desired::Placed;

/// Prepares the working dir and everything `up` needs, checking all bad input before any
/// process starts.
pub(super) async fn prepare(options: &UpOptions) -> Result<Runtime, LocalError> {
    let (manifest, key) = read_manifest(options)?;
    // An external Sentinel set gets no processes of ours: an agent for each of its sentinels
    // runs inside the controller instead.
    let external: Vec<crate::external::ExternalNode> = manifest
        .spec
        .sentinel
        .as_ref()
        .and_then(|s| s.sentinel_reference.as_ref())
        .map(|reference| crate::external::nodes(&key.name, reference))
        .unwrap_or_default();
    let bins = Binaries::find(&manifest)?;
    let dir = options
        .dir
        .clone()
        .unwrap_or_else(|| default_dir(&key.namespace, &key.name));
    // Everything this runtime and its children write (configs holding passwords, AOF and RDB
    // files, logs, the control socket) is for this user alone, whatever the caller's umask.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let dir = super::workdir::claim(&dir)?;
    let sentinel_secret = sentinel_secret(&dir, &manifest)?;
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
    let mut state = load_state(&dir, &state_path, &key)?;
    reserve_ports(&dir, &manifest, &key, &mut state)?;
    // Nodes beyond the replica count keep running, retiring, until the master is elsewhere.
    let placed = state.ports.iter().filter_map(|(pod, ports)| {
        Some(Placed {
            ordinal: pod.rsplit_once('-')?.1.parse::<u32>().ok()?,
            host: options.hosts.ip(pod).to_owned(),
            name: pod.clone(),
            port: ports.valkey,
        })
    });
    // Everything is on loopback: the addresses the nodes announce at start are right.
    let desired = crate::desired::data(&manifest.valid, placed, options.hang_timeout, false);
    let sentinel = sentinel_desired(options, &manifest, &key, &state, &external);
    let driver = Driver::new(key.clone(), state.durable.clone());
    let tls = tls::LocalTls::prepare(
        &dir,
        manifest.spec.access.enable_tls,
        options.cert_lifetime,
        options.hosts.names(),
    )?;
    let embedded = manifest.spec.sentinel.is_some() && external.is_empty();
    let (sentinel_password_file, sentinel_secret) =
        sentinel_password(&dir, sentinel_secret, embedded, !external.is_empty())?;
    let runtime = Runtime {
        pods: Default::default(),
        password_file: dir.join("password"),
        token_file: dir.join("agent-token"),
        key,
        state_path,
        state,
        desired,
        manifest,
        valkey_bin: bins.valkey,
        agent_bin: bins.agent,
        hub_addr: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        hosts: options.hosts.clone(),
        probe_interval_ms: options.probe_interval_ms,
        procs: BTreeMap::new(),
        driver,
        sentinel,
        sentinel_bin: bins.sentinel,
        external,
        external_tls,
        sentinel_password_file,
        sentinel_secret,
        tls,
        sentinel_roll: tls::SentinelRoll::default(),
        dir,
    };
    await_free_ports(&runtime).await?;
    secret_file(&runtime.password_file)?;
    secret_file(&runtime.token_file)?;
    runtime.state.save(&runtime.state_path)?;
    Ok(runtime)
}

fn read_manifest(options: &UpOptions) -> Result<(Manifest, InstanceKey), LocalError> {
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
    Ok((manifest, key))
}

/// The programs `local up` runs.
struct Binaries {
    valkey: PathBuf,
    agent: PathBuf,
    /// For embedded sentinels only.
    sentinel: Option<PathBuf>,
}

impl Binaries {
    fn find(manifest: &Manifest) -> Result<Self, LocalError> {
        let missing = |name: &str| LocalError::MissingBinary {
            name: name.into(),
            flag: "path",
        };
        let sentinel = match &manifest.spec.sentinel {
            Some(s) if s.sentinel_reference.is_none() => {
                Some(which("valkey-sentinel").ok_or_else(|| missing("valkey-sentinel"))?)
            }
            _ => None,
        };
        let valkey = which("valkey-server").ok_or_else(|| missing("valkey-server"))?;
        let agent = std::env::var_os("VALKEY_AGENT_BIN")
            .map(PathBuf::from)
            .or_else(|| sibling_or_path("valkey-agent"))
            .ok_or_else(|| missing("valkey-agent"))?;
        Ok(Binaries {
            valkey,
            agent,
            sentinel,
        })
    }
}

/// The Secret the sentinels' password is read from, if the manifest names one: secrets are
/// files in the working dir, a Secret named N is `secrets/N/password`.
fn sentinel_secret(
    dir: &Path,
    manifest: &Manifest,
) -> Result<Option<(String, PathBuf)>, LocalError> {
    let Some((field, name)) = manifest
        .spec
        .sentinel
        .as_ref()
        .and_then(|s| s.password_secret())
    else {
        return Ok(None);
    };
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
    Ok(Some((name, file)))
}

/// The working dir's state, or a new one; refused when the dir holds another instance or
/// one is running there.
fn load_state(dir: &Path, state_path: &Path, key: &InstanceKey) -> Result<LocalState, LocalError> {
    let state = LocalState::load(state_path)?.unwrap_or_else(|| LocalState {
        namespace: key.namespace.clone(),
        name: key.name.clone(),
        ..LocalState::default()
    });
    if state.namespace != key.namespace || state.name != key.name {
        return Err(LocalError::OtherInstance {
            dir: dir.to_owned(),
            found: format!("{}/{}", state.namespace, state.name),
            wanted: format!("{}/{}", key.namespace, key.name),
        });
    }
    if control::is_running(dir) {
        return Err(LocalError::AlreadyRunning {
            dir: dir.to_owned(),
        });
    }
    Ok(state)
}

/// Ports for every embedded sentinel and every data node the state does not have yet; the
/// ports the state names stay reserved while the instance is stopped.
fn reserve_ports(
    dir: &Path,
    manifest: &Manifest,
    key: &InstanceKey,
    state: &mut LocalState,
) -> Result<(), LocalError> {
    let ports = Registry::shared();
    let reserve = |entry: std::collections::btree_map::Entry<'_, String, NodePorts>| {
        if let std::collections::btree_map::Entry::Vacant(entry) = entry {
            let [valkey, agent, metrics] = ports
                .reserve(dir)
                .map_err(io("reserving ports in", ports.path()))?;
            entry.insert(NodePorts {
                valkey,
                agent,
                metrics,
            });
        }
        Ok::<_, LocalError>(())
    };
    if let Some(settings) = manifest
        .spec
        .sentinel
        .as_ref()
        .filter(|s| s.sentinel_reference.is_none())
    {
        for ordinal in 0..settings.count() {
            reserve(
                state
                    .sentinels
                    .entry(format!("{}-sentinel-{ordinal}", key.name)),
            )?;
        }
    }
    for ordinal in 0..manifest.spec.replicas as u32 {
        reserve(state.ports.entry(pod_name(&key.name, ordinal)))?;
    }
    let held: Vec<u16> = state
        .ports
        .values()
        .chain(state.sentinels.values())
        .flat_map(|p| [p.valkey, p.agent, p.metrics])
        .collect();
    ports
        .claim(dir, &held)
        .map_err(io("reserving ports in", ports.path()))
}

/// How Sentinel watches the instance: embedded sentinels on their reserved ports, an external
/// set where the manifest says.
fn sentinel_desired(
    options: &UpOptions,
    manifest: &Manifest,
    key: &InstanceKey,
    state: &LocalState,
    external: &[crate::external::ExternalNode],
) -> Option<SentinelDesired> {
    let sentinels = state
        .sentinels
        .iter()
        .map(|(pod, p)| (options.hosts.ip(pod).to_owned(), u32::from(p.valkey)))
        .chain(external.iter().map(|n| (n.host.clone(), u32::from(n.port))))
        .collect();
    let monitor = format!("{}.{}", key.namespace, key.name);
    // On loopback every sentinel is reached where it says it is.
    crate::desired::sentinel(&manifest.valid, monitor, sentinels, BTreeMap::new())
}

/// The sentinels' password file in force, and the Secret (name, file) it follows.
type SentinelPassword = (Option<PathBuf>, Option<(String, PathBuf)>);

/// The sentinels' password file in force, and the Secret it follows. Embedded sentinels use
/// the controller's copy of their password, which follows the Secret through a rotation; an
/// external set's agents read the Secret itself.
fn sentinel_password(
    dir: &Path,
    secret: Option<(String, PathBuf)>,
    embedded: bool,
    external: bool,
) -> Result<SentinelPassword, LocalError> {
    let copy = dir.join("sentinel-password");
    Ok(match secret {
        // No Secret named: embedded sentinels still get a password of their own (any local
        // user could otherwise run SENTINEL FAILOVER), kept in the working dir.
        None if embedded => {
            secret_file(&copy)?;
            (Some(copy), None)
        }
        None => (None, None),
        Some((_, file)) if external => (Some(file), None),
        Some((name, file)) => {
            if !copy.exists() {
                let password = std::fs::read(&file).map_err(io("reading", &file))?;
                write_atomic(&copy, &password).map_err(io("writing", &copy))?;
            }
            (Some(copy), Some((name, file)))
        }
    })
}

/// Every port the instance's processes will take is free, or refused naming it. A Valkey
/// killed with its controller may leave a forked child (AOF rewrite, diskless sync) holding
/// its port for a moment: it gets a few seconds.
async fn await_free_ports(runtime: &Runtime) -> Result<(), LocalError> {
    for (pod, ports, _) in runtime.wanted_pods() {
        for (what, port) in [
            ("valkey", ports.valkey),
            ("agent", ports.agent),
            ("metrics", ports.metrics),
        ] {
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
    Ok(())
}
