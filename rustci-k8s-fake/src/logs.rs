//! Container logs as the kubelet keeps them: one file per container on disk, framed records
//! (`stream: u8`, `timestamp: i64 ns`, `length: u32`, bytes), written by the attach pump
//! and read incrementally — following readers wait on a `watch` channel that publishes how
//! many bytes of whole records are in the file. Memory stays flat whatever the log size.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, watch};

/// Size of a record header.
const HEADER: usize = 1 + 8 + 4;
/// Largest chunk a reader sends at once.
const CHUNK: usize = 64 * 1024;

/// Which output stream a record came from.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Stream {
    /// stdout
    Stdout = 1,
    /// stderr
    Stderr = 2,
}

/// How far the file is written.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Progress {
    /// Bytes of complete records in the file.
    pub len: u64,
    /// No more records will come (container exited or pod deleted).
    pub done: bool,
}

/// One container's log file.
pub(crate) struct LogFile {
    /// Where it is.
    pub path: PathBuf,
    progress: watch::Sender<Progress>,
}

impl LogFile {
    /// Creates the (empty) file.
    pub(crate) async fn create(path: PathBuf) -> std::io::Result<(Arc<LogFile>, LogWriter)> {
        if let Some(dir) = path.parent() {
            tokio::fs::create_dir_all(dir).await?;
        }
        let file = tokio::fs::File::create(&path).await?;
        let (progress, _) = watch::channel(Progress::default());
        let log = Arc::new(LogFile { path, progress });
        let writer = LogWriter {
            file,
            len: 0,
            log: log.clone(),
        };
        Ok((log, writer))
    }

    /// Marks the log complete (followers end once they have read everything).
    pub(crate) fn finish(&self) {
        self.progress.send_modify(|p| p.done = true);
    }

    /// Whether the log is complete.
    pub(crate) fn is_done(&self) -> bool {
        self.progress.borrow().done
    }
}

/// Appends records to a log file.
pub(crate) struct LogWriter {
    file: tokio::fs::File,
    len: u64,
    log: Arc<LogFile>,
}

fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or_default()
}

impl LogWriter {
    /// Appends one record and publishes it to readers.
    pub(crate) async fn write(&mut self, stream: Stream, data: &[u8]) -> std::io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let ts = now_nanos();
        // Records longer than u32::MAX are split (attach chunks never are that large).
        for piece in data.chunks(u32::MAX as usize) {
            let mut header = [0u8; HEADER];
            header[0] = stream as u8;
            header[1..9].copy_from_slice(&ts.to_be_bytes());
            header[9..13].copy_from_slice(&(piece.len() as u32).to_be_bytes());
            self.file.write_all(&header).await?;
            self.file.write_all(piece).await?;
            self.len += (HEADER + piece.len()) as u64;
        }
        self.file.flush().await?;
        let len = self.len;
        self.log.progress.send_modify(|p| p.len = len);
        Ok(())
    }

    /// Flushes and marks the log complete.
    pub(crate) async fn close(mut self) {
        let _ = self.file.flush().await;
        self.log.finish();
    }
}

/// What a log request asks for.
#[derive(Clone, Debug, Default)]
pub(crate) struct ReadOptions {
    /// Keep streaming until the log is complete.
    pub follow: bool,
    /// `None` = both streams.
    pub stream: Option<Stream>,
    /// Prefix each line with an RFC 3339 timestamp.
    pub timestamps: bool,
    /// Only the last N lines.
    pub tail_lines: Option<u64>,
    /// Stop after N bytes.
    pub limit_bytes: Option<u64>,
}

/// Streams the log through a bounded channel (so memory stays flat); the channel closes
/// when the response is complete.
pub(crate) fn read(log: Arc<LogFile>, options: ReadOptions) -> mpsc::Receiver<Bytes> {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        if let Err(e) = read_into(&log, &options, &tx).await {
            tracing::debug!("log read of {} ended: {e}", log.path.display());
        }
    });
    rx
}

fn stream_wanted(options: &ReadOptions, byte: u8) -> bool {
    match options.stream {
        None => true,
        Some(s) => s as u8 == byte,
    }
}

fn rfc3339(nanos: i64) -> String {
    k8s_openapi::jiff::Timestamp::from_nanosecond(i128::from(nanos))
        .map(|t| format!("{t:.9}"))
        .unwrap_or_default()
}

/// Counts the lines of the selected stream(s) in the first `len` bytes of the file.
async fn count_lines(log: &LogFile, options: &ReadOptions, len: u64) -> std::io::Result<u64> {
    let file = tokio::fs::File::open(&log.path).await?;
    let mut reader = BufReader::with_capacity(CHUNK, file);
    let mut pos = 0u64;
    let mut lines = 0u64;
    let mut last = b'\n';
    let mut buf = vec![0u8; CHUNK];
    while pos < len {
        let mut header = [0u8; HEADER];
        reader.read_exact(&mut header).await?;
        let n = u32::from_be_bytes([header[9], header[10], header[11], header[12]]) as usize;
        let wanted = stream_wanted(options, header[0]);
        let mut left = n;
        while left > 0 {
            let take = left.min(CHUNK);
            reader.read_exact(&mut buf[..take]).await?;
            if wanted {
                lines += buf[..take].iter().filter(|b| **b == b'\n').count() as u64;
                last = buf[take - 1];
            }
            left -= take;
        }
        pos += (HEADER + n) as u64;
    }
    if last != b'\n' {
        lines += 1;
    }
    Ok(lines)
}

async fn read_into(
    log: &LogFile,
    options: &ReadOptions,
    tx: &mpsc::Sender<Bytes>,
) -> std::io::Result<()> {
    let mut progress = log.progress.subscribe();
    let snapshot = *progress.borrow_and_update();
    let mut skip_lines = match options.tail_lines {
        Some(tail) => count_lines(log, options, snapshot.len)
            .await?
            .saturating_sub(tail),
        None => 0,
    };
    let file = tokio::fs::File::open(&log.path).await?;
    let mut reader = BufReader::with_capacity(CHUNK, file);
    let mut pos = 0u64;
    let mut budget = options.limit_bytes.unwrap_or(u64::MAX);
    let mut line_start = true;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let now = *progress.borrow_and_update();
        while pos < now.len {
            let mut header = [0u8; HEADER];
            reader.read_exact(&mut header).await?;
            let ts = i64::from_be_bytes(header[1..9].try_into().unwrap_or_default());
            let n = u32::from_be_bytes([header[9], header[10], header[11], header[12]]) as usize;
            pos += (HEADER + n) as u64;
            let wanted = stream_wanted(options, header[0]);
            let mut left = n;
            while left > 0 {
                let take = left.min(CHUNK);
                reader.read_exact(&mut buf[..take]).await?;
                left -= take;
                if !wanted {
                    continue;
                }
                let mut data = &buf[..take];
                // tailLines: drop whole lines before the tail.
                while skip_lines > 0 && !data.is_empty() {
                    match data.iter().position(|b| *b == b'\n') {
                        Some(i) => {
                            data = &data[i + 1..];
                            skip_lines -= 1;
                        }
                        None => data = &[],
                    }
                }
                if data.is_empty() {
                    continue;
                }
                let out = if options.timestamps {
                    let stamp = rfc3339(ts);
                    let mut out = BytesMut::with_capacity(data.len() + 32);
                    for piece in data.split_inclusive(|b| *b == b'\n') {
                        if line_start {
                            out.extend_from_slice(stamp.as_bytes());
                            out.extend_from_slice(b" ");
                        }
                        out.extend_from_slice(piece);
                        line_start = piece.last() == Some(&b'\n');
                    }
                    out.freeze()
                } else {
                    Bytes::copy_from_slice(data)
                };
                let out = if (out.len() as u64) > budget {
                    out.slice(..budget as usize)
                } else {
                    out
                };
                budget -= out.len() as u64;
                if tx.send(out).await.is_err() {
                    return Ok(());
                }
                if budget == 0 {
                    return Ok(());
                }
            }
        }
        if !options.follow || now.done {
            return Ok(());
        }
        tokio::select! {
            changed = progress.changed() => if changed.is_err() { return Ok(()) },
            _ = tx.closed() => return Ok(()),
        }
    }
}
