//! The `valkey-agent` binary: flags, logging, then `valkey_agent::run` until SIGTERM.

use clap::Parser;
use tracing_subscriber::EnvFilter;
use valkey_agent::{Args, config::LogFormat};

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match args.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    // One crypto provider for TLS to the controller.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = match args.validate() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("valkey-agent: {err}");
            return std::process::ExitCode::from(2);
        }
    };
    valkey_agent::listen::raise_fd_limit();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("valkey-agent: cannot start the runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(valkey_agent::run(config, valkey_agent::termination())) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("valkey-agent: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
