//! `valkey-controller`: the Failover operator's binary: the Kubernetes controller (`run`), the
//! CRD (`crd`), and an instance run locally without a cluster (`local up`, `status`,
//! `switchover`, `rotate-password`).

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
    /// Print the Failover CustomResourceDefinition (YAML), as deploy/base/crd.yaml holds it.
    Crd,
    /// Run the Kubernetes controller (in a cluster, or against the current kubeconfig).
    Run(RunArgs),
    /// Print, as YAML, the objects the controller would apply for a Failover manifest (all but
    /// the generated password Secret), after validating it.
    Render {
        /// The Failover manifest.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// Run a Failover locally, without a cluster.
    Local {
        #[command(subcommand)]
        command: LocalCommand,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Where the agent hub (gRPC) listens.
    #[arg(
        long,
        env = "VALKEY_CONTROLLER_HUB_LISTEN",
        default_value = "0.0.0.0:7070"
    )]
    hub_listen: std::net::SocketAddr,
    /// Where /metrics and /healthz are served.
    #[arg(
        long,
        env = "VALKEY_CONTROLLER_HTTP_LISTEN",
        default_value = "0.0.0.0:8080"
    )]
    http_listen: std::net::SocketAddr,
    /// The address agents dial to reach the hub (the controller's Service), https://: the hub
    /// serves TLS only, with a certificate from the controller's CA.
    #[arg(
        long,
        env = "VALKEY_CONTROLLER_AGENT_ADDR",
        default_value = "https://valkey-controller.valkey-system.svc:7070"
    )]
    agent_controller_addr: String,
    /// Image of the agent sidecar (it holds valkey-agent).
    #[arg(long, env = "VALKEY_CONTROLLER_AGENT_IMAGE")]
    agent_image: Option<String>,
    /// Valkey image used when spec.image is absent.
    #[arg(
        long,
        env = "VALKEY_CONTROLLER_VALKEY_IMAGE",
        default_value = "valkey/valkey:8.0"
    )]
    valkey_image: String,
    /// Exporter image used when spec.exporter.image is absent.
    #[arg(
        long,
        env = "VALKEY_CONTROLLER_EXPORTER_IMAGE",
        default_value = "oliver006/redis_exporter:v1.67.0"
    )]
    exporter_image: String,
    /// This replica's pod name (the Lease holder identity).
    #[arg(long, env = "POD_NAME")]
    pod_name: String,
    /// This replica's namespace (where the Lease lives).
    #[arg(long, env = "POD_NAMESPACE", default_value = "valkey-system")]
    pod_namespace: String,
    /// A hung master (or one whose agent is silent) is failed over after this many
    /// milliseconds, once its replicas agree they lost it (policy manual).
    #[arg(
        long,
        env = "VALKEY_CONTROLLER_HANG_TIMEOUT_MS",
        default_value_t = 5000
    )]
    hang_timeout_ms: u64,
    /// Let Failovers ask for privileged pod settings (root, privileged mode, added
    /// capabilities, an unconfined seccomp profile, unsafe sysctls). Off: such a spec is
    /// refused, naming the field, so that whoever may create a Failover cannot run privileged
    /// pods through the controller.
    #[arg(long, env = "VALKEY_CONTROLLER_ALLOW_PRIVILEGED_PODS")]
    allow_privileged_pods: bool,
    /// Watch the Failovers of these namespaces only (comma-separated, or the flag repeated),
    /// and own objects there only, so that the controller runs with a Role in each
    /// (deploy/namespaced/, deploy/multi-namespace/) instead of cluster-wide rights.
    #[arg(
        long,
        env = "VALKEY_CONTROLLER_WATCH_NAMESPACE",
        value_delimiter = ',',
        value_parser = namespace_name
    )]
    watch_namespace: Vec<String>,
    /// Files for the agents the controller runs itself, one per sentinel of an external
    /// Sentinel set (passwords and certificates): an in-memory volume of this pod.
    #[arg(
        long,
        env = "VALKEY_CONTROLLER_WORK_DIR",
        default_value = "/run/valkey-controller"
    )]
    work_dir: std::path::PathBuf,
}

/// A namespace's name, as `--watch-namespace` takes it.
fn namespace_name(value: &str) -> Result<String, String> {
    if valkey_controller::validate::is_dns_label(value) {
        Ok(value.to_owned())
    } else {
        Err(format!("{value:?} is not a namespace name (a DNS label)"))
    }
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
        /// Lifetime of the certificates issued from the working dir's CA, in seconds (renewed
        /// at two thirds of it); at least 10.
        #[arg(long, env = "VALKEY_LOCAL_CERT_LIFETIME_SECS", default_value_t = 90 * 24 * 3600,
              value_parser = clap::value_parser!(u64).range(10..))]
        cert_lifetime_secs: u64,
        /// Run a pod in a Linux network namespace of its own: POD=NETNS_PATH,IPV4 (repeated).
        /// For the partition tests and partition-bench; needs --hub-host.
        #[arg(long, hide = true)]
        netns: Vec<String>,
        /// The address the hub listens on and agents dial (with --netns).
        #[arg(long, hide = true)]
        hub_host: Option<String>,
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

async fn execute(command: Command) -> Result<(), String> {
    match command {
        Command::Crd => {
            let yaml = valkey_controller::crd::crd_yaml().map_err(|e| e.to_string())?;
            print!("{yaml}");
            Ok(())
        }
        Command::Render { file } => render(&file),
        Command::Run(args) => {
            valkey_controller::k8s::run::run(run_options(args), valkey_agent::termination())
                .await
                .map_err(|e| e.to_string())
        }
        Command::Local { command } => local_command(command).await,
    }
}

/// `render`: the objects for a manifest, as YAML.
fn render(file: &std::path::Path) -> Result<(), String> {
    let text =
        std::fs::read_to_string(file).map_err(|e| format!("reading {}: {e}", file.display()))?;
    let manifest = valkey_controller::manifest::Manifest::parse(&text, &file.display().to_string())
        .map_err(|e| e.to_string())?;
    let mut failover =
        valkey_controller::crd::Failover::new(&manifest.metadata.name, manifest.spec.clone());
    failover.metadata.namespace = Some(manifest.namespace().to_owned());
    // Annotations steer what is rendered (the NetworkPolicy's namespaces).
    failover.metadata.annotations =
        Some(manifest.metadata.annotations().map_err(|e| e.to_string())?);
    let objects =
        valkey_controller::k8s::render(&failover, &valkey_controller::k8s::Settings::default())
            .map_err(|e| e.to_string())?;
    for object in objects {
        let yaml = serde_yaml::to_string(&object).map_err(|e| e.to_string())?;
        print!("---\n{yaml}");
    }
    Ok(())
}

fn run_options(args: RunArgs) -> valkey_controller::k8s::run::RunOptions {
    let defaults = valkey_controller::k8s::Settings::default();
    valkey_controller::k8s::run::RunOptions {
        hub_listen: args.hub_listen,
        http_listen: args.http_listen,
        settings: valkey_controller::k8s::Settings {
            valkey_image: args.valkey_image,
            agent_image: args.agent_image.unwrap_or(defaults.agent_image),
            exporter_image: args.exporter_image,
            controller_addr: args.agent_controller_addr,
            // Filled in from the controller's CA once it is loaded.
            controller_ca: String::new(),
            admission: valkey_controller::validate::Admission {
                allow_privileged: args.allow_privileged_pods,
            },
            controller_namespace: args.pod_namespace.clone(),
            watch_namespaces: args.watch_namespace,
            work_dir: args.work_dir,
            // Loopback, on the hub's port.
            in_process_hub: format!("https://127.0.0.1:{}", args.hub_listen.port()),
        },
        pod_name: args.pod_name,
        pod_namespace: args.pod_namespace,
        hang_timeout: Duration::from_millis(args.hang_timeout_ms),
    }
}

async fn local_command(command: LocalCommand) -> Result<(), String> {
    let asked = match command {
        LocalCommand::Up {
            file,
            dir,
            hang_timeout_ms,
            probe_interval_ms,
            cert_lifetime_secs,
            netns,
            hub_host,
        } => {
            let options = UpOptions {
                manifest: file,
                dir,
                hang_timeout: Duration::from_millis(hang_timeout_ms),
                probe_interval_ms,
                cert_lifetime: Duration::from_secs(cert_lifetime_secs),
                hosts: local::hosts::Hosts::parse(&netns, hub_host)?,
            };
            return local::up(options, valkey_agent::termination())
                .await
                .map_err(|e| e.to_string());
        }
        LocalCommand::Status { dir, json } => {
            let dir = find_dir(dir)?;
            let reply = control::request(&dir, &control::Request::Status).await?;
            let status = reply.status.ok_or(reply.message)?;
            if json {
                let text = serde_json::to_string_pretty(&status).map_err(|e| e.to_string())?;
                println!("{text}");
            } else {
                print!("{}", control::render(&status));
            }
            return Ok(());
        }
        LocalCommand::RotatePassword { dir } => (dir, control::Request::RotatePassword),
        LocalCommand::Switchover { dir, to } => (dir, control::Request::Switchover { to }),
    };
    let (dir, request) = asked;
    let reply = control::request(&find_dir(dir)?, &request).await?;
    if !reply.ok {
        return Err(reply.message);
    }
    println!("{}", reply.message);
    Ok(())
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
    let result = runtime.block_on(execute(cli.command));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("valkey-controller: {message}");
            ExitCode::from(2)
        }
    }
}
