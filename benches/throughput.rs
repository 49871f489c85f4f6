//! Output throughput: a job writing 1 GiB to stdout through NativeRunner (every byte
//! delivered as events to the caller) vs a raw pipe read of the same bytes from the same
//! command, in the same run. Before measuring, one run records how much the resident
//! memory of this process grows while 1 GiB streams through the runner.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group};
use rustci::testkit::rss_bytes;
use rustci::{EventKind, Job, JobId, NativeConfig, NativeRunner, Outcome, Runner, Step};

const SIZE: u64 = 1 << 30;

fn raw_pipe() -> u64 {
    let mut child = Command::new("head")
        .args(["-c", &SIZE.to_string(), "/dev/zero"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        let n = out.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    assert!(child.wait().unwrap().success());
    total
}

/// Streams the job and returns the bytes received and the peak RSS growth seen.
async fn through_runner(runner: &NativeRunner, job: &Job, sample_rss: bool) -> (u64, u64) {
    let before = rss_bytes().expect("resident memory of the bench");
    let mut peak = 0;
    let mut total = 0u64;
    let mut execution = runner.start(job, JobId::new()).await.unwrap();
    while let Some(event) = execution.next_event().await {
        match event.kind {
            EventKind::Output { data, .. } => {
                total += data.len() as u64;
                if sample_rss && total % (64 << 20) < data.len() as u64 {
                    let now = rss_bytes().expect("resident memory of the bench");
                    peak = peak.max(now.saturating_sub(before));
                }
            }
            EventKind::Finished { outcome } => assert_eq!(outcome, Outcome::Succeeded),
            _ => {}
        }
    }
    (total, peak)
}

fn throughput(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut config = NativeConfig::default();
    config.host.max_output_bytes = u64::MAX;
    let runner = NativeRunner::new(config).unwrap();
    let job = Job::new(
        "gigabyte",
        vec![Step::command([
            "head",
            "-c",
            &SIZE.to_string(),
            "/dev/zero",
        ])],
    );

    let (bytes, growth) = rt.block_on(through_runner(&runner, &job, true));
    assert_eq!(bytes, SIZE);
    println!(
        "rss_growth_bytes: {growth} ({} MiB) while streaming 1 GiB",
        growth >> 20
    );
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .or_else(|| Some(std::path::PathBuf::from("target")))
    {
        let _ = std::fs::create_dir_all(dir.join("criterion"));
        let _ = std::fs::write(dir.join("criterion/rss_growth_bytes"), growth.to_string());
    }

    let mut group = c.benchmark_group("output_throughput");
    group.throughput(Throughput::Bytes(SIZE));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    group.bench_function("raw/pipe_read", |b| b.iter(|| assert_eq!(raw_pipe(), SIZE)));
    group.bench_function("native/stdout_events", |b| {
        b.to_async(&rt)
            .iter(|| async { assert_eq!(through_runner(&runner, &job, false).await.0, SIZE) })
    });
    group.finish();
}

#[path = "common/run_window.rs"]
mod run_window;

criterion_group!(benches, throughput);

fn main() {
    run_window::record("throughput", || {
        benches();
        Criterion::default().configure_from_args().final_summary();
    });
}
