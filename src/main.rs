//! `hangar`: the one binary. It parses arguments, loads the config, builds
//! the parts and waits for a signal; the parts live in their crates.
//!
//! - `hangar dev`: the whole platform in one process (flaps, one flyd host,
//!   the catalog and the proxy).
//! - `hangar flyd` and `hangar proxy`: one more host or edge, in the region
//!   their config names, beside a `hangar dev` sharing its data dir.
//! - `hangar pilot --dir DIR`: a machine's init, started by flyd.
//! - `hangar echo`: the built-in image `hangar/echo`, started by pilot.
//! - `hangar apps|machines|status`: the client commands (see `cli`).
//! - `hangar tokens create --org ORG`: a new API token for an org.
//! - `hangar bench lifecycle`: lifecycle latencies through the Machines API.
//! - `hangar bench catalog`: the catalog at scale (load, memory, lookups,
//!   propagation).

mod bench;
mod cli;
mod config;
mod dev;

/// jemalloc: steady under many threads allocating per request, and it can
/// report allocated bytes (what `hangar bench catalog` measures the FIB with).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "hangar",
    version,
    about = "A self-hostable Fly.io-style platform"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole platform in one process.
    Dev(DevArgs),
    /// Run one more flyd host (in `flyd.region`) beside `hangar dev`,
    /// sharing its data dir.
    Flyd(DevArgs),
    /// Run one more proxy (in `proxy.region`) beside `hangar dev`, sharing
    /// its data dir.
    Proxy(DevArgs),
    /// Create, list and destroy apps.
    Apps {
        #[command(flatten)]
        conn: cli::Conn,
        #[command(subcommand)]
        cmd: cli::AppsCmd,
    },
    /// Run and manage machines.
    Machines {
        #[command(flatten)]
        conn: cli::Conn,
        #[command(subcommand)]
        cmd: cli::MachinesCmd,
    },
    /// The host's images: list, pull, import, remove, prune.
    Images {
        #[command(flatten)]
        conn: cli::HostConn,
        #[command(subcommand)]
        cmd: cli::ImagesCmd,
    },
    /// Where the API is, who you are, and what runs.
    Status {
        #[command(flatten)]
        conn: cli::Conn,
    },
    /// Manage API tokens (works on the data dir, beside a running instance).
    #[command(subcommand)]
    Tokens(TokensCmd),
    /// Measure a part of the platform.
    #[command(subcommand)]
    Bench(BenchPart),
    /// Supervise one machine (started by flyd).
    #[command(hide = true)]
    Pilot {
        /// The machine's directory (its log, socket and exit status); the
        /// spec comes on stdin.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Serve the built-in image hangar/echo (started by pilot).
    #[command(hide = true)]
    Echo,
    /// runc's hook: give the container being created its network.
    #[command(hide = true)]
    NetworkHook { attach: String },
    /// A sandbox's PID 1: run the command, pass signals on, reap orphans.
    #[command(hide = true)]
    Init {
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

#[derive(Subcommand)]
enum TokensCmd {
    /// Create a token for an org (creating the org if needed); prints it.
    Create {
        /// The org the token acts for.
        #[arg(long, default_value = "personal")]
        org: String,
        /// A name to recognize the token by.
        #[arg(long, default_value = "cli")]
        name: String,
        /// The data dir whose RIB holds tokens.
        #[arg(long, default_value = ".hangar")]
        data_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum BenchPart {
    /// Machine lifecycle latencies and create throughput.
    Lifecycle(bench::LifecycleArgs),
    /// The catalog at scale: FIB load, memory, lookups, propagation.
    Catalog(bench::CatalogArgs),
    /// HTTP requests at a fixed rate: latency percentiles at that load.
    Load(bench::LoadArgs),
    /// New TLS sessions per second: full handshakes, one request each.
    Handshakes(bench::HandshakesArgs),
    /// A request to a stopped or suspended app through the proxy, which
    /// starts its machine: time to first byte.
    Coldstart(bench::ColdstartArgs),
    /// Pull + unpack of an image from a registry (and the small image the
    /// machine benchmarks run with --image).
    Images(bench::ImagesArgs),
}

/// Flags of `hangar dev` (and `flyd`, `proxy`); each overrides the config
/// file.
#[derive(clap::Args)]
pub struct DevArgs {
    /// Config file (TOML); the built-in config/dev.toml when absent.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Where state lives: RIB, flyd store, machine logs, dev certificate, token.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Machines API listen address.
    #[arg(long)]
    flaps_addr: Option<SocketAddr>,
    /// Proxy HTTP listen address.
    #[arg(long)]
    http_addr: Option<SocketAddr>,
    /// Proxy HTTPS listen address.
    #[arg(long)]
    https_addr: Option<SocketAddr>,
    /// Metrics listen address.
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
    /// flyd host RPC listen address: `ip:port`, or `unix:<path>`.
    #[arg(long)]
    flyd_addr: Option<hangar_flyd::Listen>,
    /// The address block of sandboxed machines' networks (CIDR), which
    /// must overlap nothing this host routes: two instances on one host
    /// need two.
    #[arg(long)]
    machine_network: Option<hangar_api::AddrBlock>,
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    // rustls warns about each peer's protocol quirks (an IP address sent
    // as SNI, by curl and wrk among others): an edge sees them on every
    // handshake and can do nothing about them, and a log line per
    // handshake costs a write. Failed handshakes are counted in metrics.
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,rustls=error"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only for a terminal, not for log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Raises the open-files limit to the most the system allows: every
/// client connection, machine connection and listener takes a descriptor,
/// and the usual soft limit (1024) would cap the proxy far below its
/// connection limits. Logs the limit in force.
fn raise_open_files() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    if soft < hard {
        if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            tracing::warn!(soft, hard, error = %e, "cannot raise the open-files limit");
        }
    }
    if let Ok((soft, _)) = getrlimit(Resource::RLIMIT_NOFILE) {
        tracing::info!(open_files = soft, "open-files limit");
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing();
    // Everything Hangar writes (the RIB, flyd's store, keys, tokens, logs,
    // machine directories) is its own alone. Workloads inherit it too.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    if matches!(
        cli.command,
        Command::Dev(_) | Command::Flyd(_) | Command::Proxy(_)
    ) {
        raise_open_files();
    }
    match cli.command {
        Command::Dev(args) => tokio::runtime::Runtime::new()?.block_on(dev::run(args.config()?)),
        Command::Flyd(args) => {
            tokio::runtime::Runtime::new()?.block_on(dev::run_flyd(args.config()?))
        }
        Command::Proxy(args) => {
            tokio::runtime::Runtime::new()?.block_on(dev::run_proxy(args.config()?))
        }
        Command::Pilot { dir } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(hangar_flyd::pilot::run(&dir)),
        Command::Echo => tokio::runtime::Runtime::new()?.block_on(hangar_flyd::echo::run()),
        Command::NetworkHook { attach } => {
            hangar_flyd::runtime::network::run_hook(&attach, std::io::stdin())
                .map_err(anyhow::Error::msg)
        }
        Command::Init { command } => {
            let code = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(hangar_flyd::init::run(&command))?;
            std::process::exit(code)
        }
        Command::Tokens(TokensCmd::Create {
            org,
            name,
            data_dir,
        }) => {
            std::fs::create_dir_all(&data_dir)?;
            let rib = hangar_catalog::Rib::open(&data_dir.join("rib.sqlite"))?;
            rib.ensure_org(&org, &org)?;
            println!("{}", hangar_flaps::auth::issue_token(&rib, &org, &name)?);
            Ok(())
        }
        Command::Apps { conn, cmd } => exit_with(cli::apps(conn, cmd)),
        Command::Machines { conn, cmd } => exit_with(cli::machines(conn, cmd)),
        Command::Status { conn } => exit_with(cli::status(conn)),
        Command::Images { conn, cmd } => exit_with(cli::images(conn, cmd)),
        Command::Bench(BenchPart::Catalog(args)) => bench::catalog(args),
        Command::Bench(BenchPart::Load(args)) => {
            tokio::runtime::Runtime::new()?.block_on(bench::load(args))
        }
        Command::Bench(BenchPart::Handshakes(args)) => {
            tokio::runtime::Runtime::new()?.block_on(bench::handshakes(args))
        }
        Command::Bench(BenchPart::Coldstart(args)) => {
            tokio::runtime::Runtime::new()?.block_on(bench::coldstart(args))
        }
        Command::Bench(BenchPart::Images(args)) => {
            tokio::runtime::Runtime::new()?.block_on(bench::images(args))
        }
        Command::Bench(BenchPart::Lifecycle(args)) => {
            tokio::runtime::Runtime::new()?.block_on(bench::lifecycle(args))
        }
    }
}

/// Runs a client command and exits with its code; an error is printed
/// and exits 1.
fn exit_with(command: impl Future<Output = anyhow::Result<i32>>) -> anyhow::Result<()> {
    let code = match tokio::runtime::Runtime::new()?.block_on(command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

impl DevArgs {
    /// The config file (or the built-in one) with the flags applied,
    /// validated.
    fn config(&self) -> anyhow::Result<config::Config> {
        let mut cfg = config::Config::load(self.config.as_deref())?;
        self.apply(&mut cfg);
        cfg.validate()?;
        Ok(cfg)
    }

    fn apply(&self, cfg: &mut config::Config) {
        if let Some(d) = &self.data_dir {
            cfg.data_dir = d.clone();
        }
        if let Some(a) = self.flaps_addr {
            cfg.flaps.listen = a;
        }
        if let Some(a) = self.http_addr {
            cfg.proxy.http_addr = a;
        }
        if let Some(a) = self.https_addr {
            cfg.proxy.https_addr = a;
        }
        if let Some(a) = self.metrics_addr {
            cfg.metrics.listen = a;
        }
        if let Some(a) = &self.flyd_addr {
            cfg.flyd.listen = a.clone();
        }
        if let Some(block) = self.machine_network {
            cfg.flyd.network.block = block;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runc_finds_the_network_hook_by_its_name() {
        let hook = hangar_flyd::runtime::network::HOOK_COMMAND;
        let cli = Cli::try_parse_from(["hangar", hook, "{}"]).unwrap();
        assert!(matches!(cli.command, Command::NetworkHook { .. }));
    }
}
