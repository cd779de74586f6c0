//! Moves application clients off a node that stopped being master. Valkey keeps client
//! connections open across REPLICAOF, so a pooled client would keep writing to a replica and
//! get READONLY until it is recreated. At the demotion every normal and pub/sub client is
//! disconnected (as Sentinel does), except the agent's own connections (their `lib-name`) and
//! replication links;
//! for `--stale-client-window-ms` afterwards, clients that arrive again and send a write
//! (their route has not caught up yet) are disconnected too, while readers are left alone.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::{
    config::Config,
    snapshot::Shared,
    valkey::{AGENT_LIB_NAME, Valkey, ValkeyError},
};

/// How often the window looks for clients writing to the demoted node.
const SWEEP: Duration = Duration::from_millis(20);

/// Demotions, from whichever part of the agent sees them.
#[derive(Debug, Default)]
pub struct Demotions {
    /// When this node last stopped being master.
    at: Mutex<Option<Instant>>,
    wake: Notify,
}

impl Demotions {
    /// This node stopped being master just now: start (or restart) the window.
    pub fn demoted(&self) {
        if let Ok(mut at) = self.at.lock() {
            *at = Some(Instant::now());
        }
        self.wake.notify_one();
    }

    /// This node is master again: the window ends.
    pub fn promoted(&self) {
        if let Ok(mut at) = self.at.lock() {
            *at = None;
        }
    }

    fn since(&self) -> Option<Instant> {
        self.at.lock().ok().and_then(|at| *at)
    }
}

/// One client from CLIENT LIST.
#[derive(Debug, PartialEq, Eq)]
struct Client {
    id: u64,
    /// What its library announced: the agent's own connections say [`AGENT_LIB_NAME`].
    lib_name: String,
    /// The last command it ran, `client|list` for subcommands.
    cmd: String,
}

fn parse_client_list(text: &str) -> Vec<Client> {
    text.lines()
        .filter_map(|line| {
            let field = |key: &str| {
                line.split(' ')
                    .find_map(|f| f.strip_prefix(key)?.strip_prefix('='))
                    .unwrap_or_default()
            };
            Some(Client {
                id: field("id").parse().ok()?,
                lib_name: field("lib-name").to_owned(),
                cmd: field("cmd").to_owned(),
            })
        })
        .collect()
}

/// Disconnects the clients of these types that `pick` chooses, never the agent's own; the
/// number disconnected.
async fn disconnect(
    local: &mut Valkey,
    kinds: &[&str],
    pick: impl Fn(&Client) -> bool,
) -> Result<usize, ValkeyError> {
    let mut pipe = redis::pipe();
    let mut n = 0;
    for kind in kinds {
        let text: String = local
            .query(redis::cmd("CLIENT").arg("LIST").arg("TYPE").arg(*kind))
            .await?;
        for client in parse_client_list(&text) {
            if client.lib_name != AGENT_LIB_NAME && pick(&client) {
                pipe.cmd("CLIENT")
                    .arg("KILL")
                    .arg("ID")
                    .arg(client.id)
                    .ignore();
                n += 1;
            }
        }
    }
    if n > 0 {
        local.pipe::<()>(&pipe).await?;
    }
    Ok(n)
}

/// Disconnects every normal and pub/sub client but the agent's own; the number disconnected.
pub async fn disconnect_all(local: &mut Valkey) -> Result<usize, ValkeyError> {
    disconnect(local, &["normal", "pubsub"], |_| true).await
}

/// The commands that write, as CLIENT LIST names them.
async fn write_commands(local: &mut Valkey) -> Result<HashSet<String>, ValkeyError> {
    let names: Vec<String> = local
        .query(
            redis::cmd("COMMAND")
                .arg("LIST")
                .arg("FILTERBY")
                .arg("ACLCAT")
                .arg("write"),
        )
        .await?;
    Ok(names.into_iter().map(|n| n.to_lowercase()).collect())
}

/// Runs the window after each demotion, on a connection of its own.
pub async fn run(config: Arc<Config>, shared: Arc<Shared>) {
    let demotions = &shared.demotions;
    let window = config.stale_client_window;
    if window.is_zero() {
        return;
    }
    let mut local = match Valkey::new(&config, config.probe_timeout) {
        Ok(local) => local,
        Err(err) => {
            warn!(error = %err, "stale clients: no local client; demoted nodes keep them");
            return;
        }
    };
    let mut writes: Option<HashSet<String>> = None;
    loop {
        demotions.wake.notified().await;
        let mut moved = 0;
        while let Some(since) = demotions.since().filter(|t| t.elapsed() < window) {
            if writes.is_none() {
                writes = write_commands(&mut local)
                    .await
                    .inspect_err(|err| debug!(error = %err, "COMMAND LIST"))
                    .ok();
            }
            if let Some(writes) = &writes {
                match disconnect(&mut local, &["normal"], |c| writes.contains(&c.cmd)).await {
                    Ok(n) => moved += n,
                    Err(err) => debug!(error = %err, "stale clients: sweep failed"),
                }
            }
            let left = window.saturating_sub(since.elapsed());
            tokio::select! {
                _ = tokio::time::sleep(SWEEP.min(left)) => {}
                _ = demotions.wake.notified() => {}
            }
        }
        if moved > 0 {
            info!(
                disconnected = moved,
                "clients that kept writing after the demotion were disconnected"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_list_lines_give_id_library_and_last_command() {
        let text = "id=3 addr=127.0.0.1:5 laddr=127.0.0.1:6379 fd=8 name= age=1 idle=0 flags=N db=0 cmd=client|list user=default redir=-1 resp=2 lib-name=valkey-agent lib-ver=0.1.0\n\
                    id=7 addr=127.0.0.1:9 laddr=127.0.0.1:6379 fd=9 name=valkey-agent age=0 idle=0 flags=N db=0 cmd=set user=default redir=-1 resp=2 lib-name= lib-ver=\n\
                    garbage\n";
        assert_eq!(
            parse_client_list(text),
            vec![
                Client {
                    id: 3,
                    lib_name: "valkey-agent".into(),
                    cmd: "client|list".into()
                },
                Client {
                    id: 7,
                    lib_name: String::new(),
                    cmd: "set".into()
                },
            ]
        );
    }
}
