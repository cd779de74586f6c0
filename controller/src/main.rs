//! `valkey-controller`: the Failover operator. The failover core, agent hub and local runtime
//! arrive with issue 3; until then this binary only says so.

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "valkey-controller", version, about = "Valkey failover operator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a Failover locally, without a cluster.
    Local {
        #[command(subcommand)]
        command: LocalCommand,
    },
}

#[derive(Debug, Subcommand)]
enum LocalCommand {
    /// Start the instance described by a Failover manifest.
    Up {
        /// The Failover manifest (YAML).
        #[arg(short = 'f', long = "file", env = "VALKEY_FAILOVER_FILE")]
        file: std::path::PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Local {
            command: LocalCommand::Up { file },
        } => anyhow::bail!(
            "`local up -f {}`: the local runtime is not built yet; it arrives with the failover core",
            file.display()
        ),
    }
}
