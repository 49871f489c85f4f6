//! The `rustci` command as a user runs it: exit codes, live output, validation, Ctrl-C.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

fn rustci() -> Command {
    Command::new(env!("CARGO_BIN_EXE_rustci"))
}

fn sample(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/jobs")
        .join(name)
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run(args: &[&str]) -> Run {
    let out = rustci().args(args).output().expect("rustci runs");
    Run {
        code: out.status.code().expect("exit code"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn write_job(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn sample_jobs_run_with_their_exit_codes() {
    let hello = run(&["run", sample("hello.yaml").to_str().unwrap()]);
    assert_eq!(hello.code, 0, "{}", hello.stderr);
    assert_eq!(hello.stdout, "hello from rustci on Linux\nbuilding...\n");
    assert!(
        hello.stderr.contains("job hello succeeded"),
        "{}",
        hello.stderr
    );

    let build = run(&["run", sample("build-and-test.yaml").to_str().unwrap()]);
    assert_eq!(build.code, 0, "{}", build.stderr);
    assert!(build.stdout.contains("token is ***"));
    assert!(!build.stdout.contains("s3cr3t-value"));

    let failing = run(&[
        "run",
        sample("failing.yaml").to_str().unwrap(),
        "--runner",
        "local",
    ]);
    assert_eq!(failing.code, 42);
    assert_eq!(failing.stdout, "before\n");
    assert!(
        failing.stderr.contains("\"breaks\" exited with code 42"),
        "{}",
        failing.stderr
    );

    let slow = run(&["run", sample("timeout.yaml").to_str().unwrap()]);
    assert_eq!(slow.code, 124, "{}", slow.stderr);
    assert!(slow.stderr.contains("timed out"));

    let json = run(&[
        "run",
        sample("job.json").to_str().unwrap(),
        "--runner",
        "native",
    ]);
    assert_eq!(json.code, 0, "{}", json.stderr);
    assert_eq!(json.stdout, "from a JSON job file\n");
}

#[test]
fn json_mode_prints_one_event_per_line() {
    let out = run(&["run", sample("failing.yaml").to_str().unwrap(), "--json"]);
    assert_eq!(out.code, 42);
    let events: Vec<serde_json::Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["seq"], i as u64);
    }
    assert_eq!(events[0]["kind"]["type"], "started");
    let last = events.last().unwrap();
    assert_eq!(last["kind"]["outcome"]["result"], "failed");
    assert_eq!(last["kind"]["outcome"]["exit_code"], 42);
}

#[test]
fn streams_stay_apart() {
    let dir = tempfile::tempdir().unwrap();
    let job = write_job(
        dir.path(),
        "s.yaml",
        "name: s\nsteps:\n  - run: echo out; echo err >&2\n",
    );
    let out = run(&["run", job.to_str().unwrap()]);
    assert_eq!(out.stdout, "out\n");
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 4, "{}", out.stderr);
    assert!(lines[0].starts_with("── step 1/1 "), "{}", out.stderr);
    assert_eq!(lines[1], "err");
    assert!(lines[2].contains(": exited 0 in "), "{}", out.stderr);
    let quiet = run(&["run", job.to_str().unwrap(), "--quiet"]);
    assert_eq!(quiet.stdout, "out\n");
    assert!(quiet.stderr.starts_with("err\n"), "{}", quiet.stderr);
}

#[test]
fn each_step_has_a_header_line_on_stderr_unless_quiet() {
    let job = sample("build-and-test.yaml");
    let out = run(&["run", job.to_str().unwrap(), "--runner", "native"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let headers: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("── step "))
        .collect();
    assert_eq!(headers.len(), 8, "{}", out.stderr);
    assert_eq!(headers[0], "── step 1/4 \"compile\"");
    // Status, duration and what the step used (the native runner measures CPU and I/O).
    assert!(
        headers[1].starts_with("── step 1/4 \"compile\": exited 0 in ")
            && headers[1].contains("s (cpu ")
            && headers[1].contains(" written)"),
        "{}",
        headers[1]
    );
    let status = out.stderr.lines().last().unwrap();
    assert!(
        status.starts_with("rustci: job build-and-test succeeded in ") && status.contains("(cpu "),
        "{status}"
    );
    assert_eq!(headers[6], "── step 4/4 \"flaky-but-allowed\"");
    assert!(
        headers[7].starts_with("── step 4/4 \"flaky-but-allowed\": exited 3 in "),
        "{}",
        headers[7]
    );
    // The job's output is untouched on stdout.
    assert!(!out.stdout.contains("── step"), "{}", out.stdout);
    assert!(out.stdout.contains("building demo\n"), "{}", out.stdout);

    // Output that does not end its line is ended before the next header.
    let dir = tempfile::tempdir().unwrap();
    let partial = write_job(
        dir.path(),
        "p.yaml",
        "name: p\nsteps:\n  - name: a\n    run: printf part >&2\n",
    );
    let out = run(&["run", partial.to_str().unwrap()]);
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines[1], "part", "{}", out.stderr);
    assert!(
        lines[2].starts_with("── step 1/1 \"a\": exited 0"),
        "{}",
        out.stderr
    );

    let quiet = run(&["run", job.to_str().unwrap(), "--runner", "native", "-q"]);
    assert_eq!(quiet.code, 0);
    assert!(!quiet.stderr.contains("── step"), "{}", quiet.stderr);
    assert_eq!(quiet.stdout, out_stdout_of(&job));
    assert!(quiet.stderr.contains("job build-and-test succeeded"));
}

/// The stdout of a `--quiet` run equals that of a normal one.
fn out_stdout_of(job: &Path) -> String {
    run(&["run", job.to_str().unwrap(), "--runner", "native"]).stdout
}

#[test]
fn invalid_files_exit_2_naming_every_problem() {
    let out = run(&["validate", sample("invalid.yaml").to_str().unwrap()]);
    assert_eq!(out.code, 2);
    for needle in [
        "2:7: name:",
        "4:5: steps[0]:",
        "6:14: steps[1].timeout:",
        "9:3: env.1BAD:",
        "10:10: timeout:",
        "11:1: colour: unknown field",
    ] {
        assert!(
            out.stderr.contains(needle),
            "missing {needle:?} in {}",
            out.stderr
        );
    }
    let out = run(&["run", sample("invalid.yaml").to_str().unwrap()]);
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("colour"));

    let out = run(&["validate", sample("hello.yaml").to_str().unwrap()]);
    assert_eq!(out.code, 0);

    let out = run(&["run", "/nonexistent/job.yaml"]);
    assert_eq!(out.code, 2);
    assert!(
        out.stderr.contains("/nonexistent/job.yaml"),
        "{}",
        out.stderr
    );

    let dir = tempfile::tempdir().unwrap();
    let job = write_job(dir.path(), "m.yaml", "name: m\nsteps: [\n");
    let out = run(&["validate", job.to_str().unwrap()]);
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("m.yaml:"), "{}", out.stderr);
}

#[test]
fn missing_executable_and_unfit_runner_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let job = write_job(
        dir.path(),
        "x.yaml",
        "name: x\nsteps:\n  - command: [/nonexistent/tool]\n",
    );
    let out = run(&["run", job.to_str().unwrap()]);
    assert_eq!(out.code, 127);
    assert!(
        out.stderr.contains("command not found: /nonexistent/tool"),
        "{}",
        out.stderr
    );

    let out = run(&["run", job.to_str().unwrap(), "--runner", "local"]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("cannot run `command:` steps"),
        "{}",
        out.stderr
    );

    let out = run(&["run", job.to_str().unwrap(), "--runner", "docker"]);
    assert_eq!(out.code, 1);
    if cfg!(feature = "docker") {
        assert!(out.stderr.contains("needs a job image"), "{}", out.stderr);
    } else {
        assert!(out.stderr.contains("no docker runner"), "{}", out.stderr);
    }
}

#[test]
fn runners_lists_local_and_native() {
    let out = run(&["runners"]);
    assert_eq!(out.code, 0);
    assert!(
        out.stdout.contains("local") && out.stdout.contains("native"),
        "{}",
        out.stdout
    );
    let out = run(&["runners", "--json"]);
    let kinds: Vec<String> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["info"]["kind"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let expected: &[&str] = if cfg!(feature = "docker") {
        &["local", "native", "docker"]
    } else {
        &["local", "native"]
    };
    assert_eq!(kinds, expected, "{}", out.stdout);
}

/// Output arrives while the job runs: the job waits for a file that the test creates only
/// after it has read the first line.
#[test]
fn output_is_live_and_ctrl_c_cancels_with_130() {
    let dir = tempfile::tempdir().unwrap();
    let gate = dir.path().join("gate");
    let pidfile = dir.path().join("pid");
    let job = write_job(
        dir.path(),
        "live.yaml",
        &format!(
            "name: live\nsteps:\n  - run: |\n      echo first\n      while [ ! -e {gate} ]; do sleep 0.05; done\n      echo second\n      echo $$ > {pid}\n      sleep 300\n",
            gate = gate.display(),
            pid = pidfile.display()
        ),
    );
    let mut child = rustci()
        .args(["run", job.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "first");
    std::fs::write(&gate, b"").unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), "second");
    // The pid file is written before `sleep 300` starts; wait for it by reading it.
    let pid: i32 = loop {
        if let Ok(text) = std::fs::read_to_string(&pidfile)
            && let Ok(pid) = text.trim().parse()
        {
            break pid;
        }
        std::thread::yield_now();
    };
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("cancelled"), "{stderr}");
    // The job's shell is gone.
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.contains(") Z")),
        "job process {pid} survived Ctrl-C"
    );
    let _ = Duration::ZERO;
}
