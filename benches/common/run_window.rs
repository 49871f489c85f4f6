//! Records when a bench process ran, so that `scripts/bench-ratios` pairs a figure only
//! with a baseline measured by the same process: it refuses a pair unless both of
//! criterion's estimates were written between this run's start and end.
//!
//! Each bench's `main` calls [`record`] around its criterion groups; the window goes to
//! `target/criterion/runs/<bench>.json` (`CARGO_TARGET_DIR` honoured), with `end` null
//! until the run completes.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn path(bench: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"));
    target
        .join("criterion")
        .join("runs")
        .join(format!("{bench}.json"))
}

fn write(bench: &str, start: f64, end: Option<f64>) {
    let p = path(bench);
    if let Some(dir) = p.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let end = end.map_or("null".to_string(), |e| format!("{e:.3}"));
    let _ = std::fs::write(&p, format!("{{\"start\": {start:.3}, \"end\": {end}}}\n"));
}

/// Runs `benches` (the criterion groups and the final summary), recording the window.
/// Under `cargo test` (criterion's `--test` mode, no measurement) nothing is recorded.
pub fn record(bench: &str, benches: impl FnOnce()) {
    let measuring = std::env::args().any(|a| a == "--bench");
    let start = now();
    if measuring {
        write(bench, start, None);
    }
    benches();
    if measuring {
        write(bench, start, Some(now()));
    }
}
