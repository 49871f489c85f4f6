//! The entry script that runs a job's steps inside the job container, and the parser that
//! finds its step markers in the container's log streams.
//!
//! A job runs in one container (so steps share the workspace and start without a container
//! start each). The container's command is `/bin/sh -c <entry script>`. The script runs each
//! step in its own child process and writes a marker line before and after it, on both
//! stdout and stderr:
//!
//! ```text
//! \n:rustci:<nonce>:o:start 0\n      step 0 begins (on stdout; `e` on stderr)
//! ...the step's own output...
//! \n:rustci:<nonce>:o:end 0 42\n     step 0 ended with status 42
//! ```
//!
//! The leading newline of a marker is the script's, never the step's, and is removed with
//! the marker, so output that ends without a newline arrives exactly as written. The nonce
//! is random per job, so a step's ordinary output is never taken for a marker. A step could
//! forge one only by reading the script's nonce from its own container, which can only
//! misreport its own result.
//!
//! When the container is asked to stop (SIGTERM to its first process, as the kubelet does),
//! the script forwards SIGTERM to every other process of the container and keeps waiting
//! for the step, so the kubelet's grace period and SIGKILL apply to the whole step, and it
//! starts no further step. After each step, processes it left behind are killed (when the
//! script is the container's first process, as it is unless a patch makes the pod share
//! one process namespace). The script's own variables are named `_rci_*`.

use bytes::{Bytes, BytesMut};
use rustci_runners::job::{Job, Step, StepAction};

use rustci_runners::backend::WORKSPACE;

/// Quotes `s` for a POSIX shell: every character literal.
pub(crate) fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        if c == '\'' {
            out.push_str("'\\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    out
}

/// The marker prefix for `nonce`, without the stream tag.
pub(crate) fn marker_prefix(nonce: &str) -> Vec<u8> {
    format!("\n:rustci:{nonce}:").into_bytes()
}

/// The entry script for `job`. `nonce` goes into every marker; with `clean_workspace` the
/// script empties the workspace when it exits (a workspace that outlives the pod).
pub(crate) fn entry_script(job: &Job, nonce: &str, clean_workspace: bool) -> String {
    let workdir = match &job.workdir {
        Some(w) => format!("{WORKSPACE}/{w}"),
        None => WORKSPACE.to_string(),
    };
    let mut s = String::new();
    // The script's own variables carry a prefix no job variable is expected to have.
    s.push_str(&format!("_rci_m={}\n", quote(&format!(":rustci:{nonce}:"))));
    // A marker on both streams, each starting on a line of its own.
    s.push_str(
        "_rci_mark() { printf '\\n%so:%s\\n' \"$_rci_m\" \"$1\"; printf '\\n%se:%s\\n' \"$_rci_m\" \"$1\" >&2; }\n",
    );
    // SIGTERM from the kubelet: pass it on to every process of the container (the script
    // is the container's first process, which the kernel spares), or to the step alone
    // when the script is not (a pod sharing one process namespace). It also remembers the
    // stop, so no further step starts.
    s.push_str(
        "_rci_term() { _rci_z=1; if [ $$ = 1 ]; then kill -TERM -1 2>/dev/null; elif [ -n \"$_rci_p\" ]; then kill -TERM \"$_rci_p\" 2>/dev/null; fi; }\n",
    );
    s.push_str("_rci_z=\ntrap _rci_term TERM INT\n");
    // Waits for the step, also across trapped signals, then kills what it left behind
    // (when the script is the container's first process: everything else is the job's).
    s.push_str(
        "_rci_wait() { while :; do wait \"$_rci_p\"; _rci_r=$?; kill -0 \"$_rci_p\" 2>/dev/null || break; done; \
         if [ $$ = 1 ]; then kill -KILL -1 2>/dev/null; fi; _rci_p=; _rci_mark \"end $1 $_rci_r\"; }\n",
    );
    if clean_workspace {
        // A workspace on a shared claim: emptied whichever way the script ends.
        s.push_str(&format!(
            "trap 'cd / && rm -rf {WORKSPACE}/* {WORKSPACE}/.[!.]* {WORKSPACE}/..?* 2>/dev/null' EXIT\n"
        ));
    }
    s.push_str(&format!("_rci_w={}\n", quote(&workdir)));
    s.push_str("mkdir -p \"$_rci_w\" || exit 1\n");
    for (index, step) in job.steps.iter().enumerate() {
        s.push_str("[ -z \"$_rci_z\" ] || exit 143\n");
        s.push_str(&format!("_rci_mark 'start {index}'\n"));
        s.push_str(&format!("( cd \"$_rci_w\" || exit 1\n{}", step_body(step)));
        // A stop that came while the step was being started reaches it too.
        s.push_str(" ) & _rci_p=$!; [ -z \"$_rci_z\" ] || kill -TERM \"$_rci_p\" 2>/dev/null\n");
        s.push_str(&format!("_rci_wait {index}\n"));
        if !step.continue_on_error {
            s.push_str("[ \"$_rci_r\" = 0 ] || exit \"$_rci_r\"\n");
        }
    }
    s.push_str("[ -z \"$_rci_z\" ] || exit 143\nexit 0\n");
    s
}

fn step_body(step: &Step) -> String {
    let mut s = String::new();
    for (name, value) in &step.env {
        s.push_str(&format!("export {name}={}\n", quote(value)));
    }
    match &step.action {
        StepAction::Run(script) => {
            // `--`: a script starting with `-` is a script, not options.
            s.push_str(&format!("exec /bin/sh -e -c -- {}", quote(script)));
        }
        StepAction::Command(argv) => {
            s.push_str("exec");
            for arg in argv {
                s.push(' ');
                s.push_str(&quote(arg));
            }
        }
        _ => s.push_str("echo 'rustci: a step kind this runner does not know' >&2; exit 126"),
    }
    s
}

/// Whether the entry script can run `step`.
pub(crate) fn known_step(step: &Step) -> bool {
    matches!(step.action, StepAction::Run(_) | StepAction::Command(_))
}

/// Which stream a marker was written to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tag {
    /// `o`: stdout.
    Out,
    /// `e`: stderr.
    Err,
}

/// What a marker says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mark {
    /// Step `n` begins.
    Start(usize),
    /// Step `n` ended with this wait status (`128 + n` for signal `n`).
    End(usize, i32),
}

/// A piece of a log stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Piece {
    /// Bytes the job wrote.
    Output(Bytes),
    /// A marker of the entry script.
    Marker(Tag, Mark),
}

/// The longest marker line accepted; a longer "marker" is passed on as output.
const MAX_MARKER: usize = 256;

/// Splits a log stream into output and markers, across chunk boundaries.
pub(crate) struct MarkerParser {
    prefix: Vec<u8>,
    buf: BytesMut,
}

impl MarkerParser {
    pub(crate) fn new(nonce: &str) -> Self {
        MarkerParser {
            prefix: marker_prefix(nonce),
            buf: BytesMut::new(),
        }
    }

    /// Feeds a chunk; appends what it completes to `out`.
    pub(crate) fn push(&mut self, chunk: &[u8], out: &mut Vec<Piece>) {
        self.buf.extend_from_slice(chunk);
        loop {
            match self.find_prefix() {
                Some(at) => {
                    if at > 0 {
                        out.push(Piece::Output(self.buf.split_to(at).freeze()));
                    }
                    let body_start = self.prefix.len();
                    match self.buf[body_start..].iter().position(|b| *b == b'\n') {
                        Some(len) => {
                            let line = self.buf.split_to(body_start + len + 1);
                            let body = &line[body_start..body_start + len];
                            match parse_marker(body) {
                                Some((tag, mark)) => out.push(Piece::Marker(tag, mark)),
                                None => out.push(Piece::Output(line.freeze())),
                            }
                        }
                        None if self.buf.len() - body_start > MAX_MARKER => {
                            // Not one of ours after all: pass the prefix on as output.
                            let len = self.prefix.len();
                            out.push(Piece::Output(self.buf.split_to(len).freeze()));
                        }
                        None => return,
                    }
                }
                None => {
                    let keep = self.partial_prefix_len();
                    let emit = self.buf.len() - keep;
                    if emit > 0 {
                        out.push(Piece::Output(self.buf.split_to(emit).freeze()));
                    }
                    return;
                }
            }
        }
    }

    /// Ends the stream: what was held back is output.
    pub(crate) fn finish(&mut self, out: &mut Vec<Piece>) {
        if !self.buf.is_empty() {
            out.push(Piece::Output(self.buf.split().freeze()));
        }
    }

    fn find_prefix(&self) -> Option<usize> {
        let p = &self.prefix;
        let mut from = 0;
        while let Some(i) = self.buf[from..].iter().position(|b| *b == b'\n') {
            let at = from + i;
            let rest = &self.buf[at..];
            if rest.len() >= p.len() {
                if rest.starts_with(p) {
                    return Some(at);
                }
            } else {
                // Could still become the prefix: handled as a partial prefix.
                return None;
            }
            from = at + 1;
        }
        None
    }

    /// Length of a tail of the buffer that may be the start of the prefix.
    fn partial_prefix_len(&self) -> usize {
        let start = self.buf.len().saturating_sub(self.prefix.len() - 1);
        for at in start..self.buf.len() {
            if self.buf[at] == b'\n' && self.prefix.starts_with(&self.buf[at..]) {
                return self.buf.len() - at;
            }
        }
        0
    }
}

fn parse_marker(body: &[u8]) -> Option<(Tag, Mark)> {
    let text = std::str::from_utf8(body).ok()?;
    let (tag, rest) = text.split_once(':')?;
    let tag = match tag {
        "o" => Tag::Out,
        "e" => Tag::Err,
        _ => return None,
    };
    let mut words = rest.split(' ');
    let mark = match (words.next()?, words.next(), words.next(), words.next()) {
        ("start", Some(n), None, None) => Mark::Start(n.parse().ok()?),
        ("end", Some(n), Some(code), None) => Mark::End(n.parse().ok()?, code.parse().ok()?),
        _ => return None,
    };
    Some((tag, mark))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NONCE: &str = "0123abcd";

    fn marker(tag: char, body: &str) -> String {
        format!("\n:rustci:{NONCE}:{tag}:{body}\n")
    }

    fn parse_in_chunks(input: &[u8], size: usize) -> Vec<Piece> {
        let mut p = MarkerParser::new(NONCE);
        let mut out = Vec::new();
        for chunk in input.chunks(size) {
            p.push(chunk, &mut out);
        }
        p.finish(&mut out);
        // Merge adjacent output so chunking does not matter for comparison.
        let mut merged: Vec<Piece> = Vec::new();
        for piece in out {
            match (merged.last_mut(), piece) {
                (Some(Piece::Output(a)), Piece::Output(b)) => {
                    let mut v = a.to_vec();
                    v.extend_from_slice(&b);
                    *a = Bytes::from(v);
                }
                (_, piece) => merged.push(piece),
            }
        }
        merged
    }

    #[test]
    fn markers_split_output_exactly_at_every_chunk_size() {
        let input = format!(
            "{}abc{}{}x\n\ny{}",
            marker('o', "start 0"),
            marker('o', "end 0 0"),
            marker('o', "start 1"),
            marker('o', "end 1 137"),
        );
        let expected = vec![
            Piece::Marker(Tag::Out, Mark::Start(0)),
            Piece::Output(Bytes::from_static(b"abc")),
            Piece::Marker(Tag::Out, Mark::End(0, 0)),
            Piece::Marker(Tag::Out, Mark::Start(1)),
            Piece::Output(Bytes::from_static(b"x\n\ny")),
            Piece::Marker(Tag::Out, Mark::End(1, 137)),
        ];
        for size in 1..=input.len() {
            assert_eq!(
                parse_in_chunks(input.as_bytes(), size),
                expected,
                "chunk size {size}"
            );
        }
    }

    #[test]
    fn foreign_prefixes_and_broken_markers_stay_output() {
        let input =
            format!("\n:rustci:other:o:start 0\n\n:rustci:{NONCE}:o:bogus\ntail\n:rustci:{NONCE}");
        let out = parse_in_chunks(input.as_bytes(), 3);
        assert_eq!(out, vec![Piece::Output(Bytes::from(input))]);
    }

    #[test]
    fn stderr_tag_and_binary_bytes() {
        let mut input = marker('e', "start 2").into_bytes();
        input.extend_from_slice(b"\xff\x00\n");
        input.extend_from_slice(marker('e', "end 2 1").as_bytes());
        let out = parse_in_chunks(&input, 5);
        assert_eq!(
            out,
            vec![
                Piece::Marker(Tag::Err, Mark::Start(2)),
                Piece::Output(Bytes::from_static(b"\xff\x00\n")),
                Piece::Marker(Tag::Err, Mark::End(2, 1)),
            ]
        );
    }

    #[test]
    fn quoting_keeps_every_character() {
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), "'it'\\''s'");
        assert_eq!(quote(""), "''");
    }

    /// The script really runs under a POSIX shell and produces the markers described.
    #[test]
    fn entry_script_runs_steps_under_sh() {
        let job = Job::new(
            "t",
            vec![
                Step::run("echo one; echo err >&2").with_env("X", "it's"),
                Step::command(["sh", "-c", "printf '%s' \"$X\"; exit 3"]).allow_failure(),
                Step::run("exit 4"),
                Step::run("echo never"),
            ],
        );
        let dir = tempfile::tempdir().unwrap();
        let script =
            entry_script(&job, NONCE, false).replace(WORKSPACE, dir.path().to_str().unwrap());
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(&script)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(4));
        let stdout = parse_in_chunks(&out.stdout, 7);
        assert_eq!(
            stdout,
            vec![
                Piece::Marker(Tag::Out, Mark::Start(0)),
                Piece::Output(Bytes::from_static(b"one\n")),
                Piece::Marker(Tag::Out, Mark::End(0, 0)),
                Piece::Marker(Tag::Out, Mark::Start(1)),
                Piece::Marker(Tag::Out, Mark::End(1, 3)),
                Piece::Marker(Tag::Out, Mark::Start(2)),
                Piece::Marker(Tag::Out, Mark::End(2, 4)),
            ]
        );
        let stderr = parse_in_chunks(&out.stderr, 7);
        assert_eq!(stderr[1], Piece::Output(Bytes::from_static(b"err\n")));
        assert_eq!(stderr.len(), 7);
    }

    /// SIGTERM stops the script for good: a step allowed to fail does not let the next
    /// one start.
    #[test]
    fn a_stop_starts_no_further_step() {
        use std::io::Read;
        let job = Job::new(
            "t",
            vec![
                Step::run("echo go; sleep 30").allow_failure(),
                Step::run("echo never"),
            ],
        );
        let dir = tempfile::tempdir().unwrap();
        let script =
            entry_script(&job, NONCE, false).replace(WORKSPACE, dir.path().to_str().unwrap());
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg(&script)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 256];
        while !String::from_utf8_lossy(&seen).contains("go\n") {
            let n = stdout.read(&mut buf).unwrap();
            assert!(
                n > 0,
                "the script ended early: {:?}",
                String::from_utf8_lossy(&seen)
            );
            seen.extend_from_slice(&buf[..n]);
        }
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        stdout.read_to_end(&mut seen).unwrap();
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(143));
        let pieces = parse_in_chunks(&seen, 64);
        assert!(
            pieces.contains(&Piece::Marker(Tag::Out, Mark::End(0, 143))),
            "{pieces:?}"
        );
        assert!(
            !pieces.contains(&Piece::Marker(Tag::Out, Mark::Start(1))),
            "{pieces:?}"
        );
    }

    /// The job's own variables keep their values (the script's are prefixed), and a script
    /// that starts with `-` is run, not taken for options.
    #[test]
    fn job_variables_and_dash_scripts_are_left_alone() {
        let job = Job::new(
            "t",
            vec![Step::run(
                "-rustci-not-an-option 2>/dev/null || echo \"dash-ok $M $W $p $r $z\"",
            )],
        );
        let dir = tempfile::tempdir().unwrap();
        let script =
            entry_script(&job, NONCE, false).replace(WORKSPACE, dir.path().to_str().unwrap());
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(&script)
            .envs([
                ("M", "m1"),
                ("W", "w1"),
                ("p", "p1"),
                ("r", "r1"),
                ("z", "z1"),
            ])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        let pieces = parse_in_chunks(&out.stdout, 16);
        assert_eq!(
            pieces[1],
            Piece::Output(Bytes::from_static(b"dash-ok m1 w1 p1 r1 z1\n"))
        );
    }
}
