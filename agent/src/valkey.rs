//! One connection to the local valkey-server or valkey-sentinel, with every call bounded by a
//! timeout and every failure classified the way failover decisions need it: gone, hung,
//! loading, busy or refusing our credentials.

use std::time::Duration;

use redis::{
    AsyncConnectionConfig, Client, ConnectionAddr, ConnectionInfo, ErrorKind, FromRedisValue,
    IntoConnectionInfo, RedisConnectionInfo, RedisError, ServerErrorKind,
    aio::MultiplexedConnection,
};
use valkey_proto::v1::ProcessState;

use crate::config::Config;

/// The library name the agent's own connections announce in their handshake (`CLIENT
/// SETINFO LIB-NAME`, pipelined with AUTH): `lib-name` in CLIENT LIST.
pub const AGENT_LIB_NAME: &str = "valkey-agent";

/// Why a call to the local process failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValkeyError {
    /// Connection refused, reset or closed: the process is gone.
    #[error("down: {0}")]
    Down(String),
    /// No answer in time.
    #[error("no answer within {0:?}")]
    Hung(Duration),
    #[error("loading its dataset")]
    Loading,
    #[error("busy running a script")]
    Busy,
    #[error("refused our credentials: {0}")]
    Auth(String),
    /// The process answered with an error to this particular command.
    #[error("{0}")]
    Reply(String),
}

impl ValkeyError {
    /// What the failure says about the process.
    pub fn process_state(&self) -> ProcessState {
        match self {
            Self::Down(_) => ProcessState::Down,
            Self::Hung(_) => ProcessState::Hung,
            Self::Loading => ProcessState::Loading,
            Self::Busy => ProcessState::Busy,
            Self::Auth(_) => ProcessState::AuthFailed,
            Self::Reply(_) => ProcessState::Up,
        }
    }

    fn classify(err: &RedisError) -> Self {
        // A pipeline's error carries its first failure only in its text.
        let text = err.to_string();
        let code = err.code().unwrap_or_else(|| {
            ["NOAUTH", "WRONGPASS", "LOADING", "BUSY"]
                .into_iter()
                .find(|code| text.contains(&format!("\"{code}\"")) || text.starts_with(code))
                .unwrap_or_default()
        });
        match err.kind() {
            ErrorKind::Server(ServerErrorKind::BusyLoading) => Self::Loading,
            ErrorKind::AuthenticationFailed => Self::Auth(err.to_string()),
            _ if code == "LOADING" => Self::Loading,
            _ if code == "BUSY" => Self::Busy,
            _ if matches!(code, "NOAUTH" | "WRONGPASS") => Self::Auth(text),
            _ if err.is_io_error()
                || err.is_connection_refusal()
                || err.is_connection_dropped()
                || err.is_unrecoverable_error() =>
            {
                Self::Down(err.to_string())
            }
            _ => Self::Reply(text),
        }
    }
}

/// A lazily (re)connected client of the local process.
pub struct Valkey {
    client: Client,
    conn: Option<MultiplexedConnection>,
    timeout: Duration,
    addr: (String, u16),
    username: Option<String>,
    password: Option<String>,
    password_file: Option<std::path::PathBuf>,
    /// With TLS: where the CA (and a client certificate) come from, and what was last read.
    tls: Option<(crate::config::ValkeyTls, TlsMaterial)>,
}

/// What a TLS connection to the process is made with, as last read from its files.
#[derive(Default, PartialEq, Eq)]
struct TlsMaterial {
    /// The CA bundle the server is verified against.
    ca: Vec<u8>,
    /// The certificate and key presented to a server that asks for one.
    client: Option<(Vec<u8>, Vec<u8>)>,
}

impl TlsMaterial {
    /// Reads the files, or says which one cannot be used (the process then counts as down:
    /// the agent cannot reach it).
    fn read(files: &crate::config::ValkeyTls) -> Result<Self, ValkeyError> {
        let ca = crate::tls::read_bundle(&files.ca_file)
            .map_err(|e| ValkeyError::Down(format!("TLS CA file {e}")))?;
        let client = match &files.client {
            None => None,
            Some((cert, key)) => {
                let read = |path: &std::path::Path| {
                    std::fs::read(path).map_err(|e| {
                        ValkeyError::Down(format!("TLS client certificate {}: {e}", path.display()))
                    })
                };
                Some((read(cert)?, read(key)?))
            }
        };
        Ok(Self { ca, client })
    }
}

fn client(
    addr: &(String, u16),
    username: Option<&str>,
    password: Option<&str>,
    tls: Option<&TlsMaterial>,
) -> Result<Client, ValkeyError> {
    let mut redis =
        RedisConnectionInfo::default().set_lib_name(AGENT_LIB_NAME, env!("CARGO_PKG_VERSION"));
    if let Some(user) = username {
        redis = redis.set_username(user);
    }
    if let Some(password) = password {
        redis = redis.set_password(password);
    }
    let conn_addr = match tls {
        None => ConnectionAddr::Tcp(addr.0.clone(), addr.1),
        Some(_) => ConnectionAddr::TcpTls {
            host: addr.0.clone(),
            port: addr.1,
            insecure: false,
            tls_params: None,
        },
    };
    // TCP_NODELAY: with TLS, the client's handshake Finished and its first command are two
    // small writes in a row, and Nagle would hold the second for the server's delayed ACK
    // (40 ms on Linux).
    let info: ConnectionInfo = conn_addr
        .into_connection_info()
        .map_err(|e| ValkeyError::Reply(e.to_string()))?
        .set_redis_settings(redis)
        .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
    match tls {
        None => Client::open(info),
        Some(tls) => Client::build_with_tls(
            info,
            redis::TlsCertificates {
                client_tls: tls
                    .client
                    .as_ref()
                    .map(|(cert, key)| redis::ClientTlsConfig {
                        client_cert: cert.clone(),
                        client_key: key.clone(),
                    }),
                root_cert: Some(tls.ca.clone()),
            },
        ),
    }
    .map_err(|e| ValkeyError::Reply(e.to_string()))
}

impl std::fmt::Debug for Valkey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Valkey")
            .field("addr", self.client.get_connection_info().addr())
            .field("connected", &self.conn.is_some())
            .finish()
    }
}

impl Valkey {
    pub fn new(config: &Config, timeout: Duration) -> Result<Self, ValkeyError> {
        let addr = (config.valkey_host.clone(), config.valkey_port);
        // Files that cannot be read yet leave empty material: every connect re-reads them.
        let tls = config
            .valkey_tls
            .as_ref()
            .map(|t| (t.clone(), TlsMaterial::read(t).unwrap_or_default()));
        let client = client(
            &addr,
            config.valkey_username.as_deref(),
            config.valkey_password.as_deref(),
            tls.as_ref().map(|(_, read)| read),
        )?;
        Ok(Self {
            client,
            conn: None,
            timeout,
            addr,
            username: config.valkey_username.clone(),
            password: config.valkey_password.clone(),
            password_file: config.valkey_password_file.clone(),
            tls,
        })
    }

    /// After Valkey refused our password: re-reads the password file, and when it holds a
    /// new password (a rotation), uses it from now on. True when it changed.
    fn reload_password(&mut self) -> bool {
        let Some(file) = &self.password_file else {
            return false;
        };
        let Ok(text) = std::fs::read_to_string(file) else {
            return false;
        };
        let password = text.trim_end_matches(['\r', '\n']).to_owned();
        if password.is_empty() || Some(&password) == self.password.as_ref() {
            return false;
        }
        match client(
            &self.addr,
            self.username.as_deref(),
            Some(&password),
            self.tls.as_ref().map(|(_, read)| read),
        ) {
            Ok(client) => {
                tracing::info!("the Valkey password file changed; using the new password");
                self.client = client;
                self.password = Some(password);
                true
            }
            Err(_) => false,
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Drops the connection; the next call reconnects.
    pub fn reset(&mut self) {
        self.conn = None;
    }

    async fn connection(&mut self) -> Result<MultiplexedConnection, ValkeyError> {
        match self.connect().await {
            Err(ValkeyError::Auth(_)) if self.reload_password() => self.connect().await,
            other => other,
        }
    }

    /// With TLS, before each new connection: a CA bundle or client certificate that changed
    /// (a renewal) is used from now on.
    fn reload_tls(&mut self) -> Result<(), ValkeyError> {
        let Some((files, current)) = &self.tls else {
            return Ok(());
        };
        let read = TlsMaterial::read(files)?;
        if &read != current {
            self.client = client(
                &self.addr,
                self.username.as_deref(),
                self.password.as_deref(),
                Some(&read),
            )?;
            self.tls = Some((files.clone(), read));
        }
        Ok(())
    }

    async fn connect(&mut self) -> Result<MultiplexedConnection, ValkeyError> {
        if let Some(conn) = &self.conn {
            return Ok(conn.clone());
        }
        self.reload_tls()?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(None);
        let conn = tokio::time::timeout(
            self.timeout,
            self.client
                .get_multiplexed_async_connection_with_config(&config),
        )
        .await
        .map_err(|_| ValkeyError::Hung(self.timeout))?
        .map_err(|e| match ValkeyError::classify(&e) {
            // A connect that times out inside the client is a hang, not a death.
            ValkeyError::Down(_) if e.is_timeout() => ValkeyError::Hung(self.timeout),
            other => other,
        })?;
        self.conn = Some(conn.clone());
        Ok(conn)
    }

    /// Runs one command within `timeout` (the connection's own when None).
    pub async fn query_within<T: FromRedisValue>(
        &mut self,
        cmd: &redis::Cmd,
        timeout: Option<Duration>,
    ) -> Result<T, ValkeyError> {
        let limit = timeout.unwrap_or(self.timeout);
        self.bounded(limit, |mut conn| async move {
            cmd.query_async::<T>(&mut conn).await
        })
        .await
    }

    pub async fn query<T: FromRedisValue>(&mut self, cmd: &redis::Cmd) -> Result<T, ValkeyError> {
        self.query_within(cmd, None).await
    }

    /// A pipeline, as one round trip.
    pub async fn pipe<T: FromRedisValue>(
        &mut self,
        pipe: &redis::Pipeline,
    ) -> Result<T, ValkeyError> {
        let limit = self.timeout;
        self.bounded(limit, |mut conn| async move {
            pipe.query_async::<T>(&mut conn).await
        })
        .await
    }

    /// Runs `call` on the connection. A kept connection that turns out dead (the server was
    /// restarted, or something ran CLIENT KILL on it, as Sentinel does when it reconfigures a
    /// node) is replaced and the call made once more: every command the agent sends is
    /// idempotent.
    async fn bounded<T, F>(
        &mut self,
        limit: Duration,
        call: impl Fn(MultiplexedConnection) -> F,
    ) -> Result<T, ValkeyError>
    where
        F: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let kept = self.conn.is_some();
        let conn = self.connection().await?;
        let mut result = within(limit, call(conn)).await;
        if kept && matches!(result, Err(ValkeyError::Down(_))) {
            self.conn = None;
            let conn = self.connection().await?;
            result = within(limit, call(conn)).await;
        }
        if let Err(err) = &result
            && !matches!(
                err,
                ValkeyError::Reply(_) | ValkeyError::Busy | ValkeyError::Loading
            )
        {
            // Never reuse a connection that failed or may still deliver a late reply.
            self.conn = None;
        }
        result
    }
}

/// One call, bounded by `limit`, its error classified.
async fn within<T>(
    limit: Duration,
    call: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, ValkeyError> {
    match tokio::time::timeout(limit, call).await {
        Err(_) => Err(ValkeyError::Hung(limit)),
        Ok(reply) => reply.map_err(|e| ValkeyError::classify(&e)),
    }
}
