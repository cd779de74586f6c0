//! `valkey-controller`: the Failover operator's binary. Today it runs an instance locally
//! (`local up`, `local status`, `local switchover`); the Kubernetes controller comes next.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use valkey_controller::local::{self, UpOptions, control};

#[derive(Debug, Parser)]
#[command(
    name = "valkey-controller",
    version,
    about = "Valkey failover operator"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the Failover CustomResourceDefinition (YAML), as deploy/crd.yaml holds it.
    Crd,
    /// Run a Failover locally, without a cluster.
    Local {
        #[command(subcommand)]
        command: LocalCommand,
    },
}

#[derive(Debug, Subcommand)]
enum LocalCommand {
    /// Start (or resume) the instance a Failover manifest describes, until Ctrl-C.
    Up {
        /// The Failover manifest (the same YAML as in Kubernetes).
        #[arg(short = 'f', long = "file", env = "VALKEY_FAILOVER_FILE")]
        file: PathBuf,
        /// Working dir for data, logs and state (default: ./.valkey-local/<namespace>-<name>).
        #[arg(long, env = "VALKEY_LOCAL_DIR")]
        dir: Option<PathBuf>,
        /// A hung master (or one whose agent is silent) is failed over after this many
        /// milliseconds, once its replicas agree they lost it.
        #[arg(long, env = "VALKEY_LOCAL_HANG_TIMEOUT_MS", default_value_t = 3000)]
        hang_timeout_ms: u64,
        /// How often each agent probes its Valkey, in milliseconds.
        #[arg(long, env = "VALKEY_LOCAL_PROBE_INTERVAL_MS", default_value_t = 50)]
        probe_interval_ms: u64,
    },
    /// Show the status of a running `local up`.
    Status {
        /// The instance's working dir.
        #[arg(long, env = "VALKEY_LOCAL_DIR")]
        dir: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Rotate the instance's password (both work until every node and sentinel has the new one).
    RotatePassword {
        /// The instance's working dir.
        #[arg(long, env = "VALKEY_LOCAL_DIR")]
        dir: Option<PathBuf>,
    },
    /// Ask a running `local up` for a planned, lossless switchover.
    Switchover {
        /// The instance's working dir.
        #[arg(long, env = "VALKEY_LOCAL_DIR")]
        dir: Option<PathBuf>,
        /// The node to become master (default: the best replica).
        #[arg(long)]
        to: Option<String>,
    },
}

/// The one instance under ./.valkey-local when no --dir is given.
fn find_dir(dir: Option<PathBuf>) -> Result<PathBuf, String> {
    if let Some(dir) = dir {
        return Ok(dir);
    }
    let root = PathBuf::from(".valkey-local");
    let found: Vec<PathBuf> = std::fs::read_dir(&root)
        .map_err(|e| format!("--dir not given and {} cannot be read: {e}", root.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| control::socket_path(p).exists())
        .collect();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(format!(
            "no running instance under {}; pass --dir",
            root.display()
        )),
        _ => Err(format!(
            "several instances under {}; pass --dir",
            root.display()
        )),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("valkey-controller: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result: Result<(), String> = runtime.block_on(async {
        match cli.command {
            Command::Crd => {
                let yaml = valkey_controller::crd::crd_yaml().map_err(|e| e.to_string())?;
                print!("{yaml}");
                Ok(())
            }
            Command::Local { command } => match command {
                LocalCommand::Up {
                    file,
                    dir,
                    hang_timeout_ms,
                    probe_interval_ms,
                } => local::up(
                    UpOptions {
                        manifest: file,
                        dir,
                        hang_timeout: Duration::from_millis(hang_timeout_ms),
                        probe_interval_ms,
                    },
                    valkey_agent::termination(),
                )
                .await
                .map_err(|e| e.to_string()),
                LocalCommand::Status { dir, json } => {
                    let dir = find_dir(dir)?;
                    let reply = control::request(&dir, &control::Request::Status).await?;
                    let status = reply.status.ok_or(reply.message)?;
                    if json {
                        println!(
                            "{}",
                            serde_json::to_string_pretty(&status).map_err(|e| e.to_string())?
                        );
                    } else {
                        print!("{}", control::render(&status));
                    }
                    Ok(())
                }
                LocalCommand::RotatePassword { dir } => {
                    let dir = find_dir(dir)?;
                    let reply = control::request(&dir, &control::Request::RotatePassword).await?;
                    if reply.ok {
                        println!("{}", reply.message);
                        Ok(())
                    } else {
                        Err(reply.message)
                    }
                }
                LocalCommand::Switchover { dir, to } => {
                    let dir = find_dir(dir)?;
                    let reply =
                        control::request(&dir, &control::Request::Switchover { to }).await?;
                    if reply.ok {
                        println!("{}", reply.message);
                        Ok(())
                    } else {
                        Err(reply.message)
                    }
                }
            },
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("valkey-controller: {message}");
            ExitCode::from(2)
        }
    }
}
