//! Command-line flags (each with an env fallback) and their validation into a typed `Config`.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, ValueEnum};

/// What the agent watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// A valkey-server.
    Data,
    /// A valkey-sentinel.
    Sentinel,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// valkey-agent: the sidecar that watches one local valkey-server or valkey-sentinel, reports
/// to the controller over one gRPC stream, and carries out the controller's commands.
#[derive(Debug, Clone, Parser)]
#[command(name = "valkey-agent", version, about, long_about = None)]
pub struct Args {
    /// Whether the local process is a valkey-server (data) or a valkey-sentinel.
    #[arg(long, env = "VALKEY_AGENT_MODE", value_enum, default_value = "data")]
    pub mode: Mode,

    /// Address of the local Valkey or Sentinel, host:port.
    #[arg(
        long,
        env = "VALKEY_AGENT_VALKEY_ADDR",
        default_value = "127.0.0.1:6379"
    )]
    pub valkey_addr: String,

    /// ACL user the agent logs in as (absent: the default user).
    #[arg(long, env = "VALKEY_AGENT_VALKEY_USERNAME")]
    pub valkey_username: Option<String>,

    /// File holding the password of the local Valkey or Sentinel (absent: no password).
    #[arg(long, env = "VALKEY_AGENT_VALKEY_PASSWORD_FILE")]
    pub valkey_password_file: Option<PathBuf>,

    /// File holding the instance's password, on a sentinel's pod: the agent sets it as the
    /// monitor's auth-pass (the controller names it, never sends it). On a data pod it is
    /// --valkey-password-file.
    #[arg(long, env = "VALKEY_AGENT_INSTANCE_PASSWORD_FILE")]
    pub instance_password_file: Option<PathBuf>,

    /// CA bundle (PEM) to verify the local Valkey or Sentinel against: set, the agent speaks
    /// TLS to it. Re-read before every new connection.
    #[arg(long, env = "VALKEY_AGENT_VALKEY_TLS_CA_FILE")]
    pub valkey_tls_ca_file: Option<PathBuf>,

    /// The certificate the local process serves. Watched: when it (or its key) changes, the
    /// agent has the process re-read its TLS files, without a restart. Needs
    /// --valkey-tls-key-file and --valkey-tls-ca-file.
    #[arg(
        long,
        env = "VALKEY_AGENT_VALKEY_TLS_CERT_FILE",
        requires = "valkey_tls_key_file"
    )]
    pub valkey_tls_cert_file: Option<PathBuf>,

    /// The key of --valkey-tls-cert-file.
    #[arg(
        long,
        env = "VALKEY_AGENT_VALKEY_TLS_KEY_FILE",
        requires = "valkey_tls_cert_file"
    )]
    pub valkey_tls_key_file: Option<PathBuf>,

    /// CA bundle (PEM) the controller's certificate must chain to; required with an https://
    /// --controller-addr. Re-read at every connection attempt.
    #[arg(long, env = "VALKEY_AGENT_CONTROLLER_CA_FILE")]
    pub controller_ca_file: Option<PathBuf>,

    /// The controller's agent hub, e.g. https://valkey-controller:9090. Plain http:// is
    /// accepted only for a loopback address, so the token never crosses a network in the
    /// clear. Absent: run without a
    /// controller (watch, health and metrics only).
    #[arg(long, env = "VALKEY_AGENT_CONTROLLER_ADDR")]
    pub controller_addr: Option<String>,

    /// File holding the token presented to the controller (in Kubernetes, the projected
    /// service-account token). Re-read on every connection.
    #[arg(long, env = "VALKEY_AGENT_TOKEN_FILE", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,

    /// The token itself, when no token file is used.
    #[arg(long, env = "VALKEY_AGENT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Namespace of the Failover this pod belongs to.
    #[arg(long, env = "VALKEY_AGENT_NAMESPACE", default_value = "default")]
    pub namespace: String,

    /// Name of the Failover this pod belongs to.
    #[arg(long, env = "VALKEY_AGENT_FAILOVER", default_value = "")]
    pub failover: String,

    /// This pod's name (defaults to the host name).
    #[arg(long, env = "VALKEY_AGENT_POD_NAME")]
    pub pod_name: Option<String>,

    /// Host other nodes use to reach the local process (defaults to the host of --valkey-addr).
    #[arg(long, env = "VALKEY_AGENT_ANNOUNCE_HOST")]
    pub announce_host: Option<String>,

    /// Port other nodes use to reach the local process (defaults to the port of --valkey-addr).
    #[arg(long, env = "VALKEY_AGENT_ANNOUNCE_PORT")]
    pub announce_port: Option<u16>,

    /// Directory for the agent's durable state (the epoch fence); normally Valkey's data dir.
    #[arg(long, env = "VALKEY_AGENT_DATA_DIR", default_value = "/data")]
    pub data_dir: PathBuf,

    /// Where the gRPC health and state service listens.
    #[arg(long, env = "VALKEY_AGENT_LISTEN", default_value = "0.0.0.0:9400")]
    pub listen: SocketAddr,

    /// Where Prometheus metrics are served over HTTP (/metrics). "off" disables them.
    #[arg(
        long,
        env = "VALKEY_AGENT_METRICS_LISTEN",
        default_value = "0.0.0.0:9401"
    )]
    pub metrics_listen: String,

    /// Milliseconds between probes of the local process.
    #[arg(long, env = "VALKEY_AGENT_PROBE_INTERVAL_MS", default_value_t = 100)]
    pub probe_interval_ms: u64,

    /// Milliseconds without an answer before the local process counts as hung.
    #[arg(long, env = "VALKEY_AGENT_PROBE_TIMEOUT_MS", default_value_t = 1000)]
    pub probe_timeout_ms: u64,

    /// Milliseconds between heartbeats to the controller when nothing significant changes.
    #[arg(
        long,
        env = "VALKEY_AGENT_HEARTBEAT_INTERVAL_MS",
        default_value_t = 1000
    )]
    pub heartbeat_interval_ms: u64,

    /// Sentinel mode: the INFO period set on the local sentinel (SENTINEL DEBUG INFO-PERIOD),
    /// in milliseconds: how stale its view of the replicas' offsets and priorities may be.
    /// 0 leaves the sentinel's own (10000 by default).
    #[arg(
        long,
        env = "VALKEY_AGENT_SENTINEL_INFO_PERIOD_MS",
        default_value_t = 1000
    )]
    pub sentinel_info_period_ms: u64,

    /// Default deadline of a command that names none, in milliseconds.
    #[arg(
        long,
        env = "VALKEY_AGENT_COMMAND_DEADLINE_MS",
        default_value_t = 10_000
    )]
    pub command_deadline_ms: u64,

    /// After this node stops being master, how long clients that still send it writes are
    /// disconnected (they arrived through a route that has not caught up yet), in
    /// milliseconds. 0: only the clients connected at the moment of the demotion.
    #[arg(
        long,
        env = "VALKEY_AGENT_STALE_CLIENT_WINDOW_MS",
        default_value_t = 10_000
    )]
    pub stale_client_window_ms: u64,

    /// On SIGTERM, how long a master waits for the controller to move its role away.
    #[arg(
        long,
        env = "VALKEY_AGENT_SHUTDOWN_SWITCHOVER_TIMEOUT_MS",
        default_value_t = 20_000
    )]
    pub shutdown_switchover_timeout_ms: u64,

    /// Longest wait between two attempts to reach the controller, in milliseconds.
    #[arg(long, env = "VALKEY_AGENT_RECONNECT_MAX_MS", default_value_t = 5_000)]
    pub reconnect_max_ms: u64,

    /// How log lines are written: text for people, json for log collectors.
    #[arg(
        long,
        env = "VALKEY_AGENT_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
}

/// Bad flags, each naming the flag.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--valkey-addr {0:?}: expected host:port")]
    ValkeyAddr(String),
    #[error("--controller-addr {0:?}: expected an http:// or https:// URL")]
    ControllerAddr(String),
    #[error(
        "--controller-addr {0:?}: plain http:// is only for a loopback controller (the token \
         would cross the network in the clear); use https:// with --controller-ca-file"
    )]
    PlaintextController(String),
    #[error("--controller-ca-file is required with an https:// --controller-addr")]
    MissingControllerCa,
    #[error("--valkey-tls-cert-file needs --valkey-tls-ca-file")]
    TlsCertWithoutCa,
    #[error("--metrics-listen {0:?}: expected host:port or \"off\"")]
    MetricsListen(String),
    #[error("--{flag} must be at least {min}, got {value}")]
    TooSmall {
        flag: &'static str,
        min: u64,
        value: u64,
    },
    #[error("--valkey-password-file {path}: {source}")]
    PasswordFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--valkey-password-file {0}: the file is empty")]
    EmptyPassword(PathBuf),
    #[error("--failover is required when --controller-addr is set")]
    MissingFailover,
    #[error("--token or --token-file is required when --controller-addr is set")]
    MissingToken,
}

/// Where the agent finds its token, re-read at every connection.
#[derive(Clone)]
pub enum TokenSource {
    File(PathBuf),
    Inline(String),
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(path) => f.debug_tuple("File").field(path).finish(),
            Self::Inline(_) => f.write_str("Inline(<redacted>)"),
        }
    }
}

impl TokenSource {
    /// The token, trimmed of surrounding white space.
    pub fn read(&self) -> std::io::Result<String> {
        match self {
            Self::File(path) => Ok(std::fs::read_to_string(path)?.trim().to_owned()),
            Self::Inline(token) => Ok(token.trim().to_owned()),
        }
    }
}

/// The controller to report to.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    pub addr: String,
    pub token: TokenSource,
    pub reconnect_max: Duration,
    /// With https://: the CA bundle the controller's certificate must chain to.
    pub ca_file: Option<PathBuf>,
}

/// TLS to the local process.
#[derive(Debug, Clone)]
pub struct ValkeyTls {
    /// What the process's certificate is verified against.
    pub ca_file: PathBuf,
    /// The files the process serves, watched for renewal.
    pub served: Option<(PathBuf, PathBuf)>,
    /// A certificate and key the agent presents to the process, for one that requires client
    /// certificates (an external Sentinel set's `tls-auth-clients yes`). Re-read with the CA.
    pub client: Option<(PathBuf, PathBuf)>,
}

/// The validated configuration the agent runs with.
#[derive(Clone)]
pub struct Config {
    pub mode: Mode,
    pub valkey_host: String,
    pub valkey_port: u16,
    pub valkey_username: Option<String>,
    pub valkey_password: Option<String>,
    /// Where the password came from: re-read when Valkey refuses it (a rotation).
    pub valkey_password_file: Option<PathBuf>,
    /// Sentinel pods: the instance's password, which commands name as `PasswordRef`s.
    pub instance_password_file: Option<PathBuf>,
    pub valkey_tls: Option<ValkeyTls>,
    pub controller: Option<ControllerConfig>,
    pub namespace: String,
    pub failover: String,
    pub pod_name: String,
    pub announce_host: String,
    pub announce_port: u16,
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
    pub probe_interval: Duration,
    pub probe_timeout: Duration,
    pub heartbeat_interval: Duration,
    /// The INFO period to set on the local sentinel; None leaves its own.
    pub sentinel_info_period: Option<Duration>,
    pub command_deadline: Duration,
    pub shutdown_switchover_timeout: Duration,
    pub stale_client_window: Duration,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("mode", &self.mode)
            .field(
                "valkey",
                &format_args!("{}:{}", self.valkey_host, self.valkey_port),
            )
            .field("valkey_username", &self.valkey_username)
            .field(
                "valkey_password",
                &self.valkey_password.as_ref().map(|_| "<redacted>"),
            )
            .field("valkey_tls", &self.valkey_tls)
            .field("controller", &self.controller)
            .field("namespace", &self.namespace)
            .field("failover", &self.failover)
            .field("pod_name", &self.pod_name)
            .field(
                "announce",
                &format_args!("{}:{}", self.announce_host, self.announce_port),
            )
            .field("data_dir", &self.data_dir)
            .field("listen", &self.listen)
            .field("metrics_listen", &self.metrics_listen)
            .finish_non_exhaustive()
    }
}

/// Splits `host:port` (also `[v6]:port`).
pub fn split_host_port(addr: &str) -> Option<(String, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port: u16 = port.parse().ok()?;
    (!host.is_empty() && port != 0).then(|| (host.to_owned(), port))
}

/// Whether the authority of an http:// URL (`host:port/...`) is a loopback host.
fn is_loopback(rest: &str) -> bool {
    let authority = rest.split('/').next().unwrap_or_default();
    let host = split_host_port(authority)
        .map(|(host, _)| host)
        .unwrap_or_else(|| {
            authority
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned()
        });
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn at_least(flag: &'static str, value: u64, min: u64) -> Result<Duration, ConfigError> {
    if value < min {
        return Err(ConfigError::TooSmall { flag, min, value });
    }
    Ok(Duration::from_millis(value))
}

/// Where a rotation keeps the password it moves to, beside the one in force (`<file>.new`):
/// the controller writes it there (or mounts it) before it names it in a command.
pub fn next_password_path(in_force: &std::path::Path) -> PathBuf {
    in_force.with_extension("new")
}

impl Args {
    /// Checks every flag and reads the password file.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let (valkey_host, valkey_port) = split_host_port(&self.valkey_addr)
            .ok_or_else(|| ConfigError::ValkeyAddr(self.valkey_addr.clone()))?;
        let valkey_password = match &self.valkey_password_file {
            None => None,
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| ConfigError::PasswordFile {
                        path: path.clone(),
                        source,
                    })?;
                let password = text.trim_end_matches(['\r', '\n']).to_owned();
                if password.is_empty() {
                    return Err(ConfigError::EmptyPassword(path.clone()));
                }
                Some(password)
            }
        };
        let controller = match self.controller_addr {
            None => None,
            Some(addr) => {
                let addr = addr.trim().to_owned();
                let valid = ["http://", "https://"].iter().any(|scheme| {
                    addr.strip_prefix(scheme)
                        .is_some_and(|rest| !rest.is_empty())
                });
                if !valid {
                    return Err(ConfigError::ControllerAddr(addr));
                }
                let ca_file = match addr.strip_prefix("http://") {
                    Some(rest) if !is_loopback(rest) => {
                        return Err(ConfigError::PlaintextController(addr));
                    }
                    Some(_) => None,
                    None => Some(
                        self.controller_ca_file
                            .clone()
                            .ok_or(ConfigError::MissingControllerCa)?,
                    ),
                };
                if self.failover.is_empty() {
                    return Err(ConfigError::MissingFailover);
                }
                let token = match (self.token_file, self.token) {
                    (Some(path), _) => TokenSource::File(path),
                    (None, Some(token)) => TokenSource::Inline(token),
                    (None, None) => return Err(ConfigError::MissingToken),
                };
                Some(ControllerConfig {
                    addr,
                    token,
                    reconnect_max: at_least("reconnect-max-ms", self.reconnect_max_ms, 100)?,
                    ca_file,
                })
            }
        };
        let served = self.valkey_tls_cert_file.zip(self.valkey_tls_key_file);
        let valkey_tls = match (self.valkey_tls_ca_file, served) {
            (None, Some(_)) => return Err(ConfigError::TlsCertWithoutCa),
            (None, None) => None,
            (Some(ca_file), served) => Some(ValkeyTls {
                ca_file,
                served,
                client: None,
            }),
        };
        let metrics_listen = match self.metrics_listen.trim() {
            "off" | "" => None,
            text => Some(
                text.parse()
                    .map_err(|_| ConfigError::MetricsListen(text.to_owned()))?,
            ),
        };
        let pod_name = self
            .pod_name
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "valkey-agent".to_owned());
        Ok(Config {
            mode: self.mode,
            announce_host: self.announce_host.unwrap_or_else(|| valkey_host.clone()),
            announce_port: self.announce_port.unwrap_or(valkey_port),
            valkey_host,
            valkey_port,
            valkey_username: self.valkey_username,
            valkey_password,
            valkey_password_file: self.valkey_password_file,
            instance_password_file: self.instance_password_file,
            valkey_tls,
            controller,
            namespace: self.namespace,
            failover: self.failover,
            pod_name,
            data_dir: self.data_dir,
            listen: self.listen,
            metrics_listen,
            probe_interval: at_least("probe-interval-ms", self.probe_interval_ms, 10)?,
            probe_timeout: at_least("probe-timeout-ms", self.probe_timeout_ms, 50)?,
            heartbeat_interval: at_least("heartbeat-interval-ms", self.heartbeat_interval_ms, 50)?,
            sentinel_info_period: match self.sentinel_info_period_ms {
                0 => None,
                ms => Some(at_least("sentinel-info-period-ms", ms, 100)?),
            },
            command_deadline: at_least("command-deadline-ms", self.command_deadline_ms, 100)?,
            shutdown_switchover_timeout: Duration::from_millis(self.shutdown_switchover_timeout_ms),
            stale_client_window: Duration::from_millis(self.stale_client_window_ms),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Result<Config, String> {
        let mut argv = vec!["valkey-agent", "--data-dir", "/tmp"];
        argv.extend_from_slice(extra);
        let args = Args::try_parse_from(argv).map_err(|e| e.to_string())?;
        args.validate().map_err(|e| e.to_string())
    }

    #[test]
    fn host_port_forms() {
        assert_eq!(
            split_host_port("127.0.0.1:6379"),
            Some(("127.0.0.1".into(), 6379))
        );
        assert_eq!(split_host_port("[::1]:7000"), Some(("::1".into(), 7000)));
        assert_eq!(
            split_host_port("valkey-0.svc:1"),
            Some(("valkey-0.svc".into(), 1))
        );
        assert_eq!(split_host_port("nohost"), None);
        assert_eq!(split_host_port(":6379"), None);
        assert_eq!(split_host_port("h:0"), None);
        assert_eq!(split_host_port("h:99999"), None);
    }

    #[test]
    fn errors_name_the_flag() {
        let cases: &[(&[&str], &str)] = &[
            (&["--valkey-addr", "nope"], "--valkey-addr"),
            (
                &[
                    "--controller-addr",
                    "tcp://x",
                    "--failover",
                    "f",
                    "--token",
                    "t",
                ],
                "--controller-addr",
            ),
            (
                &["--controller-addr", "http://127.0.0.1:1", "--token", "t"],
                "--failover",
            ),
            (
                &["--controller-addr", "http://127.0.0.1:1", "--failover", "f"],
                "--token",
            ),
            (
                &[
                    "--controller-addr",
                    "http://controller.ns.svc:9090",
                    "--failover",
                    "f",
                    "--token",
                    "t",
                ],
                "use https:// with --controller-ca-file",
            ),
            (
                &[
                    "--controller-addr",
                    "https://controller.ns.svc:9090",
                    "--failover",
                    "f",
                    "--token",
                    "t",
                ],
                "--controller-ca-file",
            ),
            (
                &[
                    "--valkey-tls-cert-file",
                    "/tls/tls.crt",
                    "--valkey-tls-key-file",
                    "/tls/tls.key",
                ],
                "--valkey-tls-ca-file",
            ),
            (&["--probe-interval-ms", "1"], "--probe-interval-ms"),
            (&["--metrics-listen", "garbage"], "--metrics-listen"),
            (
                &["--valkey-password-file", "/nonexistent/pw"],
                "--valkey-password-file",
            ),
        ];
        for (args, flag) in cases {
            match parse(args) {
                Ok(config) => panic!("{args:?} accepted: {config:?}"),
                Err(err) => assert!(err.contains(flag), "{args:?}: {err}"),
            }
        }
    }

    #[test]
    fn plaintext_is_accepted_for_a_loopback_controller_only() -> Result<(), String> {
        for addr in [
            "http://127.0.0.1:7070",
            "http://localhost:7070",
            "http://[::1]:7070",
        ] {
            let config = parse(&["--controller-addr", addr, "--failover", "f", "--token", "t"])?;
            assert!(config.controller.is_some_and(|c| c.ca_file.is_none()));
        }
        let config = parse(&[
            "--controller-addr",
            "https://controller.ns.svc:7070",
            "--controller-ca-file",
            "/etc/ca.crt",
            "--failover",
            "f",
            "--token",
            "t",
        ])?;
        assert_eq!(
            config.controller.and_then(|c| c.ca_file),
            Some(PathBuf::from("/etc/ca.crt"))
        );
        Ok(())
    }

    #[test]
    fn defaults_and_announce() -> Result<(), String> {
        let config = parse(&["--valkey-addr", "127.0.0.1:7001", "--metrics-listen", "off"])?;
        assert_eq!(
            (config.announce_host.as_str(), config.announce_port),
            ("127.0.0.1", 7001)
        );
        assert_eq!(config.metrics_listen, None);
        assert_eq!(config.probe_interval, Duration::from_millis(100));
        assert!(config.controller.is_none());
        Ok(())
    }

    #[test]
    fn password_is_read_and_never_printed() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("pw");
        std::fs::write(&path, "s3cret-value\n")?;
        let config = parse(&["--valkey-password-file", path.to_str().ok_or("path")?])?;
        assert_eq!(config.valkey_password.as_deref(), Some("s3cret-value"));
        assert!(!format!("{config:?}").contains("s3cret"));
        std::fs::write(&path, "\n")?;
        let err = parse(&["--valkey-password-file", path.to_str().ok_or("path")?]);
        assert!(err.is_err_and(|e| e.contains("--valkey-password-file") && e.contains("empty")));
        Ok(())
    }
}
