//! `rustci-server`: the control plane with its HTTP API. All behaviour lives in
//! `rustci::server`; this file reads flags and starts it.

use std::path::PathBuf;

use clap::Parser;
use rustci::server::{Overrides, Server, ServerConfig};

#[derive(Parser)]
#[command(
    name = "rustci-server",
    version,
    about = "The rustci control plane: queue, dispatch and follow CI jobs over HTTP"
)]
struct Args {
    /// Config file, TOML or YAML (env RUSTCI_CONFIG).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to listen on, e.g. 127.0.0.1:8080 (env RUSTCI_LISTEN).
    #[arg(long)]
    listen: Option<String>,
    /// Data directory (env RUSTCI_DATA_DIR).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Admin API key (env RUSTCI_ADMIN_KEY); generated on first start when none is set.
    #[arg(long)]
    admin_key: Option<String>,
    /// Listen for remote agents (Valkyrie, gRPC with TLS) on this address, e.g.
    /// 0.0.0.0:8443.
    #[arg(long)]
    agent_listen: Option<std::net::SocketAddr>,
    /// Further names for the server's certificate (host names or addresses), comma-separated.
    #[arg(long, value_delimiter = ',')]
    tls_names: Vec<String>,
    /// Serve the API over plain HTTP instead of HTTPS (env RUSTCI_PLAIN_HTTP=1); refused
    /// unless the listen address is a loopback one.
    #[arg(long)]
    plain_http: bool,
    /// The API's own certificate chain (PEM) instead of the generated one.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    rustci::server::init_logging();
    let mut overrides = Overrides::default();
    overrides.config = args.config;
    overrides.listen = args.listen;
    overrides.data_dir = args.data_dir;
    overrides.admin_key = args.admin_key;
    overrides.agent_listen = args.agent_listen;
    overrides.tls_names = args.tls_names;
    overrides.plain_http = args.plain_http;
    overrides.tls_cert = args.tls_cert;
    overrides.tls_key = args.tls_key;
    let config = match ServerConfig::resolve(|k| std::env::var(k).ok(), &overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("rustci-server: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    match Server::start(config).await {
        Ok(server) => {
            println!("rustci-server: listening on {}", server.url());
            if let Some(a) = server.agent_addr() {
                println!("rustci-server: listening for agents on {a}");
            }
            server.run_until_signalled().await;
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("rustci-server: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
