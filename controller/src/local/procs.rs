//! The local runtime's processes, standing in for the kubelet: each node's config written
//! afresh before every start, its Valkey (or Sentinel) and agent started, restarted when they
//! die, and stopped when the node retires or the runtime stops.

use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use tracing::{info, warn};

use super::{
    LocalError, NodePorts, NodeProcs, Runtime,
    conf::{self, Passwords},
    hosts::listening,
    io,
    supervisor::{Supervised, log_path},
    write_atomic,
};

impl Runtime {
    /// A data node's valkey.conf, generated afresh before every start (see [`conf`]).
    pub(super) fn write_config(&self, pod: &str, ports: NodePorts) -> Result<(), LocalError> {
        let node_dir = self.node_dir(pod);
        std::fs::create_dir_all(&node_dir).map_err(io("creating", &node_dir))?;
        let passwords =
            Passwords::read(&self.password_file).map_err(io("reading", &self.password_file))?;
        let conf = conf::ValkeyConf {
            port: ports.valkey,
            host: self.hosts.ip(pod),
            dir: &node_dir,
            log: &log_path(&self.dir, &format!("{pod}.valkey")),
            passwords: &passwords,
            custom: &self.manifest.spec.custom_configs,
            tls: self.tls.instance.as_ref(),
        }
        .render();
        let path = node_dir.join("valkey.conf");
        write_atomic(&path, conf.as_bytes()).map_err(io("writing", &path))
    }

    /// A sentinel's sentinel.conf before every start: what Sentinel learned is kept (its
    /// state must survive a restart), its port and password lines are regenerated.
    pub(super) fn write_sentinel_config(
        &self,
        pod: &str,
        ports: NodePorts,
    ) -> Result<(), LocalError> {
        let node_dir = self.node_dir(pod);
        std::fs::create_dir_all(&node_dir).map_err(io("creating", &node_dir))?;
        let path = node_dir.join("sentinel.conf");
        let passwords = match &self.sentinel_password_file {
            Some(file) => Some(Passwords::read(file).map_err(io("reading", file))?),
            None => None,
        };
        let existing = std::fs::read_to_string(&path).ok();
        let empty = BTreeMap::new();
        let conf = conf::SentinelConf {
            port: ports.valkey,
            host: self.hosts.ip(pod),
            dir: &node_dir,
            log: &log_path(&self.dir, &format!("{pod}.sentinel")),
            passwords: passwords.as_ref(),
            custom: self
                .manifest
                .spec
                .sentinel
                .as_ref()
                .map_or(&empty, |s| &s.custom_configs),
            tls: self.tls.instance.as_ref(),
        }
        .render(existing.as_deref());
        if existing.as_deref() != Some(conf.as_str()) {
            write_atomic(&path, conf.as_bytes()).map_err(io("writing", &path))?;
        }
        Ok(())
    }

    /// Writes the config of `pod` for its next start.
    pub(super) fn write_any_config(
        &self,
        pod: &str,
        ports: NodePorts,
        sentinel: bool,
    ) -> Result<(), LocalError> {
        if sentinel && self.sentinel_bin.is_some() {
            self.write_sentinel_config(pod, ports)
        } else {
            self.write_config(pod, ports)
        }
    }

    pub(super) fn procs_for(&self, pod: &str, ports: NodePorts, sentinel: bool) -> NodeProcs {
        let (what, program, conf) = match (&self.sentinel_bin, sentinel) {
            (Some(bin), true) => ("valkey-sentinel", bin.clone(), "sentinel.conf"),
            _ => ("valkey-server", self.valkey_bin.clone(), "valkey.conf"),
        };
        let conf = self.node_dir(pod).join(conf);
        let netns = self.hosts.netns(pod).map(Path::to_owned);
        let ip = self.hosts.ip(pod);
        let valkey = Supervised::new(
            format!("{pod} {what}"),
            program,
            vec![conf.display().to_string()],
            log_path(&self.dir, &format!("{pod}.{what}-stdout")),
        )
        .in_netns(netns.clone());
        let mut agent_args: Vec<String> = if sentinel {
            let mut args = vec![
                "--mode".into(),
                "sentinel".into(),
                "--instance-password-file".into(),
                self.password_file.display().to_string(),
            ];
            if let Some(file) = &self.sentinel_password_file {
                args.extend(["--valkey-password-file".into(), file.display().to_string()]);
            }
            args
        } else {
            vec![
                "--valkey-password-file".into(),
                self.password_file.display().to_string(),
            ]
        };
        agent_args.extend([
            "--valkey-addr".into(),
            format!("{ip}:{}", ports.valkey),
            "--controller-addr".into(),
            format!("https://{}", self.hub_addr),
            "--controller-ca-file".into(),
            self.tls.ca_file.display().to_string(),
            "--token-file".into(),
            self.token_file.display().to_string(),
            "--namespace".into(),
            self.key.namespace.clone(),
            "--failover".into(),
            self.key.name.clone(),
            "--pod-name".into(),
            pod.to_owned(),
            "--data-dir".into(),
            self.node_dir(pod).join("agent").display().to_string(),
            "--listen".into(),
            format!("{ip}:{}", ports.agent),
            "--metrics-listen".into(),
            format!("{ip}:{}", ports.metrics),
            "--probe-interval-ms".into(),
            self.probe_interval_ms.to_string(),
            "--reconnect-max-ms".into(),
            "1000".into(),
        ]);
        if let Some(files) = &self.tls.instance {
            agent_args.extend([
                "--valkey-tls-ca-file".into(),
                files.ca.clone(),
                "--valkey-tls-cert-file".into(),
                files.cert.clone(),
                "--valkey-tls-key-file".into(),
                files.key.clone(),
            ]);
        }
        let agent = Supervised::new(
            format!("{pod} valkey-agent"),
            self.agent_bin.clone(),
            agent_args,
            log_path(&self.dir, &format!("{pod}.agent")),
        )
        .in_netns(netns);
        NodeProcs { valkey, agent }
    }

    /// The processes to run: the desired nodes, those still retiring, and the sentinels; each
    /// with its ports and whether it is a sentinel.
    pub(super) fn wanted_pods(&self) -> Vec<(String, NodePorts, bool)> {
        let data = self
            .desired
            .nodes
            .iter()
            .filter_map(|n| Some((n.name.clone(), *self.state.ports.get(&n.name)?, false)));
        let sentinels = self
            .state
            .sentinels
            .iter()
            .filter(|_| self.sentinel_bin.is_some())
            .map(|(pod, ports)| (pod.clone(), *ports, true));
        data.chain(sentinels).collect()
    }

    /// Starts the nodes not running yet: every Valkey first, and each agent once its Valkey
    /// listens, so that no agent reports a Valkey that has merely not started yet as gone.
    pub(super) async fn start_missing(&mut self) -> Result<(), LocalError> {
        // The hub admits the agents of the nodes wanted, of those still running (retiring),
        // and of the external Sentinel set.
        let wanted = self.wanted_pods();
        let admitted: Vec<String> = (wanted.iter().map(|(pod, _, _)| pod.clone()))
            .chain(self.procs.keys().cloned())
            .chain(self.external.iter().map(|n| n.pod.clone()))
            .collect();
        self.pods.set(admitted);
        let mut started = Vec::new();
        for (pod, ports, sentinel) in wanted {
            if self.procs.contains_key(&pod) {
                continue;
            }
            let mut procs = self.procs_for(&pod, ports, sentinel);
            self.write_any_config(&pod, ports, sentinel)?;
            procs.valkey.start()?;
            self.procs.insert(pod.clone(), procs);
            started.push((pod, ports));
        }
        for (pod, ports) in started {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !listening(self.hosts.ip(&pod), ports.valkey) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if let Some(procs) = self.procs.get_mut(&pod) {
                procs.agent.start()?;
            }
            info!(pod = %pod, valkey = ports.valkey, agent = ports.agent, "node started");
        }
        Ok(())
    }

    /// Stands in for the kubelet's restarts: a process that died is started again after
    /// [`supervisor::RESTART_DELAY`], a Valkey or Sentinel with its config generated anew.
    pub(super) fn tend(&mut self) {
        for (pod, ports, sentinel) in self.wanted_pods() {
            let Some(procs) = self.procs.get_mut(&pod) else {
                continue;
            };
            procs.agent.reap();
            if procs.agent.due() {
                procs.agent.restart();
            }
            procs.valkey.reap();
            if !procs.valkey.due() {
                continue;
            }
            let written = self.write_any_config(&pod, ports, sentinel);
            let Some(procs) = self.procs.get_mut(&pod) else {
                continue;
            };
            match written {
                Ok(()) => procs.valkey.restart(),
                Err(err) => {
                    warn!(pod = %pod, error = %err, "cannot write the config; restart postponed");
                    procs.valkey.postpone();
                }
            }
        }
    }

    /// Stops retiring nodes once the master is not one of them (scale down).
    pub(super) async fn stop_retiring(&mut self) -> Result<(), LocalError> {
        let master_stays = self
            .state
            .durable
            .master
            .as_deref()
            .and_then(|m| self.desired.node(m))
            .is_some_and(|n| !n.retiring);
        if !master_stays {
            return Ok(());
        }
        let extra: Vec<String> = self
            .desired
            .nodes
            .iter()
            .filter(|n| n.retiring)
            .map(|n| n.name.clone())
            .collect();
        self.desired.nodes.retain(|n| !n.retiring);
        for pod in extra {
            if let Some(mut procs) = self.procs.remove(&pod) {
                procs
                    .agent
                    .stop(Signal::SIGKILL, Duration::from_secs(1))
                    .await;
                procs
                    .valkey
                    .stop(Signal::SIGTERM, Duration::from_secs(5))
                    .await;
                info!(pod = %pod, "node removed (scaled down)");
            }
            self.state.ports.remove(&pod);
            self.state.save(&self.state_path)?;
        }
        Ok(())
    }

    pub(super) async fn shutdown(&mut self) {
        for procs in self.procs.values_mut() {
            procs
                .agent
                .stop(Signal::SIGKILL, Duration::from_secs(1))
                .await;
        }
        for procs in self.procs.values_mut() {
            procs
                .valkey
                .stop(Signal::SIGTERM, Duration::from_secs(10))
                .await;
        }
    }
}
