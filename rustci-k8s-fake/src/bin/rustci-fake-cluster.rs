//! `rustci-fake-cluster`: runs a fake Kubernetes cluster (API server + Docker-backed
//! kubelet) until SIGINT/SIGTERM, with its kubeconfig written to a file.

use std::path::PathBuf;

use clap::Parser;
use rustci_k8s_fake::{FakeCluster, FakeConfig};

/// Runs a fake Kubernetes cluster whose pods run on the local Docker engine.
#[derive(Parser, Debug)]
#[command(name = "rustci-fake-cluster", version, about)]
struct Args {
    /// Port to listen on (127.0.0.1 only); 0 = any free port.
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Where to write the kubeconfig.
    #[arg(long, default_value = "./fake-kubeconfig")]
    kubeconfig: PathBuf,
    /// The namespace that exists (and the kubeconfig's context namespace).
    #[arg(long, default_value = "default")]
    namespace: String,
    /// Serve plain HTTP instead of HTTPS.
    #[arg(long)]
    no_tls: bool,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let config = FakeConfig {
        namespaces: vec![args.namespace.clone()],
        tls: !args.no_tls,
        port: args.port,
        ..FakeConfig::default()
    };
    let cluster = match FakeCluster::start(config).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("rustci-fake-cluster: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    if let Err(e) = cluster.write_kubeconfig(&args.kubeconfig, &args.namespace) {
        eprintln!(
            "rustci-fake-cluster: cannot write {}: {e}",
            args.kubeconfig.display()
        );
        cluster.shutdown().await;
        return std::process::ExitCode::FAILURE;
    }
    println!("listening on {}", cluster.url());
    println!(
        "cluster {} (its containers carry the label {}={})",
        cluster.cluster_id(),
        rustci_k8s_fake::CLUSTER_LABEL,
        cluster.cluster_id()
    );
    println!("kubeconfig written to {}", args.kubeconfig.display());
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("rustci-fake-cluster: cannot handle SIGTERM: {e}");
            cluster.shutdown().await;
            return std::process::ExitCode::FAILURE;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    cluster.shutdown().await;
    std::process::ExitCode::SUCCESS
}
