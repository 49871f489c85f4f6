//! What the end-to-end tests share.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Polls `f` every 50 ms until it gives a value, for at most `secs` seconds; panics with
/// `what` (what was awaited) when it never does.
pub async fn wait_for<T>(what: &str, secs: u64, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), async {
        loop {
            if let Some(v) = f().await {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("not within {secs} s: {what}"))
}

/// The `rustci-server` binary, started on `<dir>/server.yaml` and `<dir>/data`; killed
/// (SIGKILL) and reaped when dropped.
pub struct ServerProc {
    /// The process.
    pub child: Child,
    /// Its API's base URL, as it printed it.
    pub base: String,
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the server binary listening on a free loopback port with `admin` as its admin
/// key and `log` as its log level, and waits until it says where it listens.
pub fn start_server(dir: &Path, admin: &str, log: &str) -> ServerProc {
    let mut child = Command::new(env!("CARGO_BIN_EXE_rustci-server"))
        .env("RUSTCI_CONFIG", dir.join("server.yaml"))
        .env("RUSTCI_DATA_DIR", dir.join("data"))
        .env("RUSTCI_LISTEN", "127.0.0.1:0")
        .env("RUSTCI_ADMIN_KEY", admin)
        .env("RUSTCI_LOG", log)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let base = loop {
        let line = lines
            .next()
            .expect("the server printed its address")
            .unwrap();
        if let Some(addr) = line.strip_prefix("rustci-server: listening on ") {
            break addr.to_string();
        }
    };
    // Keep draining stdout so the server never blocks on it.
    std::thread::spawn(move || for _ in lines {});
    ServerProc { child, base }
}
