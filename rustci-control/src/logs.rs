//! Job logs: every attempt's output appended to one log per job (a file under the data
//! directory, or memory), and followers that read what is stored so far and then the live
//! tail, from any offset.
//!
//! The writer never waits for a follower: it appends and publishes the new length through
//! a `watch` channel. A follower reads from storage at its own offset, so a slow one skips
//! notifications but never bytes.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::watch;

use crate::Error;
use rustci_runners::runner::JobId;

/// Largest chunk a follower gets at once.
const CHUNK: u64 = 64 * 1024;

/// A piece of a job's log.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LogChunk {
    /// Byte offset of `data` in the job's log.
    pub offset: u64,
    /// The bytes (already masked by the runner).
    pub data: Bytes,
}

struct Live {
    file: Option<File>,
    len: watch::Sender<(u64, bool)>,
}

#[derive(Default)]
struct Inner {
    dir: Option<PathBuf>,
    live: Mutex<HashMap<JobId, Arc<Mutex<Live>>>>,
    /// Logs kept in memory (no directory), finished or not.
    memory: Mutex<HashMap<JobId, Vec<u8>>>,
}

/// The logs of all jobs of a control plane. Cheap to clone.
#[derive(Clone, Default)]
pub struct LogHub {
    inner: Arc<Inner>,
}

/// True for ids that are safe as a file name: ASCII letters, digits, `-` and `_`.
pub(crate) fn safe_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl LogHub {
    /// Logs in memory.
    pub fn in_memory() -> Self {
        Self::default()
    }

    /// Logs as files `<dir>/<job id>.log`; creates `dir`.
    pub fn in_dir(dir: impl Into<PathBuf>) -> Result<Self, Error> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::log(format!("creating log directory {}", dir.display()), e))?;
        Ok(LogHub {
            inner: Arc::new(Inner {
                dir: Some(dir),
                ..Inner::default()
            }),
        })
    }

    fn path(&self, id: &JobId) -> Option<PathBuf> {
        let dir = self.inner.dir.as_ref()?;
        safe_id(id.as_str()).then(|| dir.join(format!("{id}.log")))
    }

    /// How many bytes of a job's log are stored.
    pub fn len(&self, id: &JobId) -> u64 {
        self.stored_len(id)
    }

    fn stored_len(&self, id: &JobId) -> u64 {
        match self.path(id) {
            Some(p) => std::fs::metadata(p).map(|m| m.len()).unwrap_or(0),
            None => self
                .inner
                .memory
                .lock()
                .expect("logs")
                .get(id)
                .map_or(0, |v| v.len() as u64),
        }
    }

    /// Opens a job's log for appending (its existing content is kept); followers wait
    /// for more until [`LogHub::close`].
    pub fn open(&self, id: &JobId) {
        let mut live = self.inner.live.lock().expect("logs");
        if live.contains_key(id) {
            return;
        }
        let len = self.stored_len(id);
        let (tx, _) = watch::channel((len, false));
        live.insert(
            id.clone(),
            Arc::new(Mutex::new(Live {
                file: None,
                len: tx,
            })),
        );
    }

    /// Appends to an open log.
    pub fn append(&self, id: &JobId, data: &[u8]) -> Result<(), Error> {
        let Some(live) = self.inner.live.lock().expect("logs").get(id).cloned() else {
            return Ok(());
        };
        let mut live = live.lock().expect("log");
        match self.path(id) {
            Some(path) => {
                if live.file.is_none() {
                    let f = OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&path)
                        .map_err(|e| Error::log(format!("opening log {}", path.display()), e))?;
                    live.file = Some(f);
                }
                if let Some(f) = live.file.as_mut() {
                    f.write_all(data)
                        .map_err(|e| Error::log(format!("writing log {}", path.display()), e))?;
                }
            }
            None => self
                .inner
                .memory
                .lock()
                .expect("logs")
                .entry(id.clone())
                .or_default()
                .extend_from_slice(data),
        }
        live.len.send_modify(|(len, _)| *len += data.len() as u64);
        Ok(())
    }

    /// Ends a job's log: followers get the rest and then the end.
    pub fn close(&self, id: &JobId) {
        if let Some(live) = self.inner.live.lock().expect("logs").remove(id) {
            live.lock()
                .expect("log")
                .len
                .send_modify(|(_, closed)| *closed = true);
        }
    }

    /// Closes every open log (at shutdown: followers of jobs that will not run in this
    /// process get the end).
    pub fn close_all(&self) {
        let open: Vec<JobId> = self
            .inner
            .live
            .lock()
            .expect("logs")
            .keys()
            .cloned()
            .collect();
        for id in open {
            self.close(&id);
        }
    }

    /// Reads up to `max` bytes at `offset` of what is stored.
    pub fn read(&self, id: &JobId, offset: u64, max: usize) -> Result<Bytes, Error> {
        match self.path(id) {
            Some(path) => {
                let f = match File::open(&path) {
                    Ok(f) => f,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Bytes::new()),
                    Err(e) => return Err(Error::log(format!("opening log {}", path.display()), e)),
                };
                let mut buf = vec![0u8; max];
                let mut filled = 0;
                while filled < max {
                    let n = f
                        .read_at(&mut buf[filled..], offset + filled as u64)
                        .map_err(|e| Error::log(format!("reading log {}", path.display()), e))?;
                    if n == 0 {
                        break;
                    }
                    filled += n;
                }
                buf.truncate(filled);
                Ok(Bytes::from(buf))
            }
            None => {
                let memory = self.inner.memory.lock().expect("logs");
                let Some(v) = memory.get(id) else {
                    return Ok(Bytes::new());
                };
                let start = (offset as usize).min(v.len());
                let end = start.saturating_add(max).min(v.len());
                Ok(Bytes::copy_from_slice(&v[start..end]))
            }
        }
    }

    /// Follows a job's log from `offset`: stored bytes first, then the live tail until
    /// the log is closed. A log that is not open is read to its end.
    pub fn follow(&self, id: &JobId, offset: u64) -> LogFollower {
        let rx = self
            .inner
            .live
            .lock()
            .expect("logs")
            .get(id)
            .map(|l| l.lock().expect("log").len.subscribe());
        LogFollower {
            hub: self.clone(),
            id: id.clone(),
            offset,
            rx,
        }
    }
}

/// A reader of one job's log; see [`LogHub::follow`].
pub struct LogFollower {
    hub: LogHub,
    id: JobId,
    offset: u64,
    rx: Option<watch::Receiver<(u64, bool)>>,
}

impl LogFollower {
    /// The offset of the next byte this follower will get.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The next stored chunk without waiting: `None` when everything stored so far was
    /// read (whether or not more may come).
    pub fn try_next(&mut self) -> Option<Result<LogChunk, Error>> {
        let len = match &self.rx {
            Some(rx) => rx.borrow().0,
            None => self.hub.stored_len(&self.id),
        };
        if self.offset >= len {
            return None;
        }
        let want = (len - self.offset).min(CHUNK) as usize;
        match self.hub.read(&self.id, self.offset, want) {
            Ok(data) if data.is_empty() => None,
            Ok(data) => {
                let chunk = LogChunk {
                    offset: self.offset,
                    data,
                };
                self.offset += chunk.data.len() as u64;
                Some(Ok(chunk))
            }
            Err(e) => Some(Err(e)),
        }
    }

    /// The next chunk, or `None` once the log is closed and fully read.
    pub async fn next(&mut self) -> Option<Result<LogChunk, Error>> {
        loop {
            let (len, closed) = match &mut self.rx {
                Some(rx) => *rx.borrow_and_update(),
                None => (self.hub.stored_len(&self.id), true),
            };
            if self.offset < len {
                let want = (len - self.offset).min(CHUNK) as usize;
                return Some(match self.hub.read(&self.id, self.offset, want) {
                    Ok(data) if data.is_empty() => Err(Error::log(
                        format!("reading the log of job {}", self.id),
                        std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "the log is shorter than its recorded length",
                        ),
                    )),
                    Ok(data) => {
                        let chunk = LogChunk {
                            offset: self.offset,
                            data,
                        };
                        self.offset += chunk.data.len() as u64;
                        Ok(chunk)
                    }
                    Err(e) => Err(e),
                });
            }
            if closed {
                return None;
            }
            let rx = self.rx.as_mut()?;
            if rx.changed().await.is_err() {
                // The writer is gone without closing (shutdown): read what is stored.
                self.rx = None;
            }
        }
    }
}
