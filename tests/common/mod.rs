//! What the end-to-end tests share.
#![allow(dead_code)]

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
