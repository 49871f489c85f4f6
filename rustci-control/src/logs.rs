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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::watch;

use crate::Error;
use crate::archive::{self, Archive, Source};
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
    /// The byte ranges of each log that came from stderr, merged, in order: of open logs
    /// (and of every log without a directory); a closed log's are in `<id>.stderr`.
    stderr: Mutex<HashMap<JobId, Vec<(u64, u64)>>>,
    /// Closed logs' ranges read back from their files, the last few (a follower of a
    /// long log asks for every chunk).
    read_back: Mutex<HashMap<JobId, Arc<Ranges>>>,
    /// Compressed logs opened for reading, the last few (with a directory), or all of
    /// them (in memory, where they are the storage).
    archives: Mutex<HashMap<JobId, Arc<Archive>>>,
    /// Counts [`LogHub::remove`] calls (an archive opened across one is not cached).
    removals: AtomicU64,
}

/// Makes room for one more entry in a cache of at most [`READ_BACK`].
fn evict_one<V>(cache: &mut HashMap<JobId, V>) {
    if cache.len() >= READ_BACK
        && let Some(k) = cache.keys().next().cloned()
    {
        cache.remove(&k);
    }
}

/// Byte ranges `[start, end)` of a log, in order.
type Ranges = Vec<(u64, u64)>;

/// Closed logs whose stderr ranges stay read back, and compressed logs kept open.
const READ_BACK: usize = 64;

/// Decodes the archive at `path` whole and checks it holds `len` bytes.
fn verify(path: &std::path::Path, len: u64) -> std::io::Result<()> {
    let a = Archive::open(Source::File(File::open(path)?))?;
    if a.len() != len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("it holds {} bytes, the original {len}", a.len()),
        ));
    }
    let mut at = 0;
    while at < len {
        let n = a.read(at, archive::FRAME)?.len() as u64;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        at += n;
    }
    Ok(())
}

/// An archive written beside its log, to be renamed into place.
struct Pending {
    index: usize,
    tmp: PathBuf,
    target: PathBuf,
    original: PathBuf,
}

/// What a finished log takes in storage: its stored bytes (compressed when it is) and
/// its original length.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoredLog {
    /// Bytes in storage.
    pub bytes: u64,
    /// Bytes of the log as written.
    pub original: u64,
    /// Whether it is stored compressed.
    pub compressed: bool,
}

/// The merged ranges of a `.stderr` file (`start length` lines); none when it is absent.
fn read_ranges(path: &std::path::Path) -> Vec<(u64, u64)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for line in text.lines() {
        let mut parts = line.split(' ').map(|p| p.parse::<u64>());
        let (Some(Ok(start)), Some(Ok(len))) = (parts.next(), parts.next()) else {
            continue;
        };
        match ranges.last_mut() {
            Some(last) if last.1 == start => last.1 = start + len,
            _ => ranges.push((start, start + len)),
        }
    }
    ranges
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
        self.file(id, "log")
    }

    fn file(&self, id: &JobId, ext: &str) -> Option<PathBuf> {
        let dir = self.inner.dir.as_ref()?;
        safe_id(id.as_str()).then(|| dir.join(format!("{id}.{ext}")))
    }

    /// A compressed log, opened (and kept among the last few opened).
    fn archive(&self, id: &JobId) -> Result<Option<Arc<Archive>>, Error> {
        if let Some(a) = self.inner.archives.lock().expect("logs").get(id) {
            return Ok(Some(a.clone()));
        }
        let Some(path) = self.file(id, "log.zst") else {
            return Ok(None);
        };
        let removals = self.inner.removals.load(Ordering::SeqCst);
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::log(format!("opening log {}", path.display()), e)),
        };
        let a = Arc::new(
            Archive::open(Source::File(f))
                .map_err(|e| Error::log(format!("reading log {}", path.display()), e))?,
        );
        let mut cache = self.inner.archives.lock().expect("logs");
        // A log removed since the file was opened is not kept open by the cache.
        if self.inner.removals.load(Ordering::SeqCst) == removals {
            evict_one(&mut cache);
            cache.insert(id.clone(), a.clone());
        }
        Ok(Some(a))
    }

    /// How many bytes of a job's log are stored.
    pub fn len(&self, id: &JobId) -> u64 {
        self.stored_len(id)
    }

    fn stored_len(&self, id: &JobId) -> u64 {
        match self.path(id) {
            Some(p) => match std::fs::metadata(p) {
                Ok(m) => m.len(),
                Err(_) => self.archive(id).ok().flatten().map_or(0, |a| a.len()),
            },
            None => match self.inner.memory.lock().expect("logs").get(id) {
                Some(v) => v.len() as u64,
                None => self
                    .inner
                    .archives
                    .lock()
                    .expect("logs")
                    .get(id)
                    .map_or(0, |a| a.len()),
            },
        }
    }

    /// True while a job's log is open for writing (its job has not ended).
    pub fn is_open(&self, id: &JobId) -> bool {
        self.inner.live.lock().expect("logs").contains_key(id)
    }

    /// What a log takes in storage now; `None` while it is open.
    pub fn stored(&self, id: &JobId) -> Result<Option<StoredLog>, Error> {
        if self.is_open(id) {
            return Ok(None);
        }
        if let Some(path) = self.path(id) {
            match std::fs::metadata(&path) {
                Ok(m) => {
                    return Ok(Some(StoredLog {
                        bytes: m.len(),
                        original: m.len(),
                        compressed: false,
                    }));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::log(format!("reading log {}", path.display()), e)),
            }
        } else if let Some(v) = self.inner.memory.lock().expect("logs").get(id) {
            let n = v.len() as u64;
            return Ok(Some(StoredLog {
                bytes: n,
                original: n,
                compressed: false,
            }));
        }
        let archive = match self.inner.dir {
            Some(_) => self.archive(id)?,
            None => self.inner.archives.lock().expect("logs").get(id).cloned(),
        };
        Ok(Some(archive.map_or(StoredLog::default(), |a| StoredLog {
            bytes: a.stored(),
            original: a.len(),
            compressed: true,
        })))
    }

    /// Compresses finished logs ([`crate::archive`]'s seekable zstd format), each read
    /// back the same through [`LogHub::read`] and [`LogHub::follow`]. Per log: what it
    /// takes now, or `None` when it is open (only finished logs may be given). A log
    /// compressed already, or empty, is left as it is. With a directory, each archive is
    /// written beside the log; once the batch's archives are all flushed (one
    /// `syncfs`) they are renamed into place, and the originals are removed after the
    /// renames are durable, so a crash at any point leaves one complete copy readable.
    pub fn compress(&self, ids: &[JobId]) -> Vec<Result<Option<StoredLog>, Error>> {
        let mut out = Vec::with_capacity(ids.len());
        let mut pending = Vec::new();
        let mut originals = Vec::new();
        for (index, id) in ids.iter().enumerate() {
            out.push(self.compress_one(id, index, &mut pending, &mut originals));
        }
        let Some(dir) = &self.inner.dir else {
            return out;
        };
        if !pending.is_empty() {
            // One flush of the file system for the whole batch: every archive is on disk
            // before any rename.
            let synced = File::open(dir).and_then(|d| nix::unistd::syncfs(&d).map_err(Into::into));
            if let Err(e) = synced {
                for p in &pending {
                    let _ = std::fs::remove_file(&p.tmp);
                    out[p.index] = Err(Error::log(
                        format!("syncing log directory {}", dir.display()),
                        std::io::Error::new(e.kind(), e.to_string()),
                    ));
                }
                pending.clear();
            }
        }
        for p in pending {
            match std::fs::rename(&p.tmp, &p.target) {
                Ok(()) => originals.push((p.index, p.original)),
                Err(e) => {
                    let _ = std::fs::remove_file(&p.tmp);
                    out[p.index] = Err(Error::log(
                        format!("renaming {} into place", p.tmp.display()),
                        e,
                    ));
                }
            }
        }
        if originals.is_empty() {
            return out;
        }
        // The renames are durable before any original goes. When they may not be, the
        // logs stay as they are recorded (plain): the next pass finds each archive beside
        // its original and checks it.
        if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
            for (index, _) in &originals {
                out[*index] = Err(Error::log(
                    format!("syncing log directory {}", dir.display()),
                    std::io::Error::new(e.kind(), e.to_string()),
                ));
            }
            return out;
        }
        for (_, path) in originals {
            if let Err(e) = std::fs::remove_file(&path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::error!(path = %path.display(), error = %e, "removing a log after compressing it");
            }
        }
        out
    }

    fn compress_one(
        &self,
        id: &JobId,
        index: usize,
        pending: &mut Vec<Pending>,
        originals: &mut Vec<(usize, PathBuf)>,
    ) -> Result<Option<StoredLog>, Error> {
        if self.is_open(id) {
            return Ok(None);
        }
        let Some(path) = self.path(id) else {
            if self.inner.dir.is_some() {
                return Ok(Some(StoredLog::default()));
            }
            // Compressed from a copy; the log is swapped for its archive in one step, so a
            // reader finds one or the other, and a failure leaves the log as it was.
            let Some(v) = self.inner.memory.lock().expect("logs").get(id).cloned() else {
                return self.stored(id);
            };
            if v.is_empty() {
                return Ok(Some(StoredLog::default()));
            }
            let mut out = Vec::new();
            let a = archive::compress(&v[..], &mut out)
                .and_then(|_| Archive::open(Source::Memory(out)))
                .map_err(|e| Error::log(format!("compressing the log of job {id}"), e))?;
            let stored = StoredLog {
                bytes: a.stored(),
                original: a.len(),
                compressed: true,
            };
            let mut memory = self.inner.memory.lock().expect("logs");
            if memory.remove(id).is_none() {
                // Removed meanwhile.
                return Ok(Some(StoredLog::default()));
            }
            self.inner
                .archives
                .lock()
                .expect("logs")
                .insert(id.clone(), Arc::new(a));
            return Ok(Some(stored));
        };
        let src = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return self.stored(id),
            Err(e) => return Err(Error::log(format!("opening log {}", path.display()), e)),
        };
        let target = path.with_extension("log.zst");
        let original = src
            .metadata()
            .map_err(|e| Error::log(format!("reading log {}", path.display()), e))?
            .len();
        if target.exists() {
            // Compressed already and the original left by a crash: the original goes only
            // when the archive decodes whole to its length; otherwise it is made again.
            match verify(&target, original) {
                Ok(()) => {
                    originals.push((index, path));
                    return self.stored_archive(id);
                }
                Err(e) => {
                    tracing::warn!(path = %target.display(), error = %e, "a compressed log left by a crash does not match its original: compressing again");
                    std::fs::remove_file(&target)
                        .map_err(|e| Error::log(format!("removing {}", target.display()), e))?;
                }
            }
        }
        if original == 0 {
            return Ok(Some(StoredLog::default()));
        }
        let tmp = path.with_extension("log.zst.tmp");
        let written = (|| {
            let mut dst = std::io::BufWriter::new(File::create(&tmp)?);
            let sizes = archive::compress(std::io::BufReader::new(src), &mut dst)?;
            dst.into_inner().map_err(|e| e.into_error())?;
            Ok::<_, std::io::Error>(sizes)
        })();
        match written {
            Ok((bytes, original)) => {
                pending.push(Pending {
                    index,
                    tmp,
                    target,
                    original: path,
                });
                Ok(Some(StoredLog {
                    bytes,
                    original,
                    compressed: true,
                }))
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(Error::log(format!("compressing log {}", path.display()), e))
            }
        }
    }

    fn stored_archive(&self, id: &JobId) -> Result<Option<StoredLog>, Error> {
        Ok(Some(self.archive(id)?.map_or(StoredLog::default(), |a| {
            StoredLog {
                bytes: a.stored(),
                original: a.len(),
                compressed: true,
            }
        })))
    }

    /// Deletes a finished log (plain or compressed, with its stderr ranges). False when
    /// the log is open: it is kept.
    pub fn remove(&self, id: &JobId) -> Result<bool, Error> {
        let live = self.inner.live.lock().expect("logs");
        if live.contains_key(id) {
            return Ok(false);
        }
        {
            let mut archives = self.inner.archives.lock().expect("logs");
            self.inner.removals.fetch_add(1, Ordering::SeqCst);
            archives.remove(id);
        }
        self.inner.read_back.lock().expect("logs").remove(id);
        self.inner.memory.lock().expect("logs").remove(id);
        self.inner.stderr.lock().expect("logs").remove(id);
        drop(live);
        for ext in ["log", "log.zst", "stderr", "log.zst.tmp"] {
            let Some(path) = self.file(id, ext) else {
                break;
            };
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::log(format!("removing log {}", path.display()), e)),
            }
        }
        // Again once the files are gone: an archive opened meanwhile is not kept either.
        let mut archives = self.inner.archives.lock().expect("logs");
        self.inner.removals.fetch_add(1, Ordering::SeqCst);
        archives.remove(id);
        Ok(true)
    }

    /// Opens a job's log for appending (its existing content is kept); followers wait
    /// for more until [`LogHub::close`].
    pub fn open(&self, id: &JobId) {
        let mut live = self.inner.live.lock().expect("logs");
        if live.contains_key(id) {
            return;
        }
        let len = self.stored_len(id);
        // Opened again (a retry, or after a restart): its earlier stderr ranges go on.
        if let Some(dir) = &self.inner.dir
            && safe_id(id.as_str())
        {
            self.inner.read_back.lock().expect("logs").remove(id);
            let earlier = read_ranges(&dir.join(format!("{id}.stderr")));
            if !earlier.is_empty() {
                self.inner
                    .stderr
                    .lock()
                    .expect("logs")
                    .insert(id.clone(), earlier);
            }
        }
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
        self.append_from(id, false, data)
    }

    /// Appends to an open log, recording whether the bytes came from stderr (the
    /// ranges are kept beside the log: `<id>.stderr`, one `start length` line per write).
    pub fn append_from(&self, id: &JobId, stderr: bool, data: &[u8]) -> Result<(), Error> {
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
        if stderr && !data.is_empty() {
            let (start, closed) = *live.len.borrow();
            let end = start + data.len() as u64;
            if !closed || self.inner.dir.is_none() {
                let mut all = self.inner.stderr.lock().expect("logs");
                let ranges = all.entry(id.clone()).or_default();
                match ranges.last_mut() {
                    Some(last) if last.1 == start => last.1 = end,
                    _ => ranges.push((start, end)),
                }
            }
            if let Some(dir) = &self.inner.dir
                && safe_id(id.as_str())
            {
                let path = dir.join(format!("{id}.stderr"));
                let line = format!("{start} {}\n", data.len());
                let written = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .and_then(|mut f| f.write_all(line.as_bytes()));
                // The bytes are in the log: their length is published whatever happens
                // here; only the tint of these bytes is lost after a restart.
                if let Err(e) = written {
                    tracing::error!(path = %path.display(), error = %e, "recording stderr ranges");
                }
            }
        }
        live.len.send_modify(|(len, _)| *len += data.len() as u64);
        Ok(())
    }

    /// The parts of `[from, to)` of a job's log that came from stderr, in order.
    pub fn stderr_ranges(&self, id: &JobId, from: u64, to: u64) -> Vec<(u64, u64)> {
        let clip = |ranges: &[(u64, u64)]| -> Vec<(u64, u64)> {
            let first = ranges.partition_point(|r| r.1 <= from);
            ranges[first..]
                .iter()
                .take_while(|r| r.0 < to)
                .map(|r| (r.0.max(from), r.1.min(to)))
                .collect()
        };
        if let Some(r) = self.inner.stderr.lock().expect("logs").get(id) {
            return clip(r);
        }
        let Some(dir) = &self.inner.dir else {
            return Vec::new();
        };
        if !safe_id(id.as_str()) {
            return Vec::new();
        }
        if let Some(r) = self.inner.read_back.lock().expect("logs").get(id) {
            return clip(r);
        }
        // Only a closed log's file is final: read and kept with the open logs locked, so
        // an `open` cannot come between.
        let live = self.inner.live.lock().expect("logs");
        let ranges = read_ranges(&dir.join(format!("{id}.stderr")));
        let clipped = clip(&ranges);
        if !live.contains_key(id) {
            let mut cache = self.inner.read_back.lock().expect("logs");
            evict_one(&mut cache);
            cache.insert(id.clone(), Arc::new(ranges));
        }
        clipped
    }

    /// Ends a job's log: followers get the rest and then the end.
    pub fn close(&self, id: &JobId) {
        let live = self.inner.live.lock().expect("logs").remove(id);
        if let Some(live) = live {
            live.lock()
                .expect("log")
                .len
                .send_modify(|(_, closed)| *closed = true);
        }
        // After the flag: an append still under way either recorded its range already or
        // sees the log closed and records none here.
        if self.inner.dir.is_some() {
            // Read back from its file from now on.
            self.inner.stderr.lock().expect("logs").remove(id);
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
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        return match self.archive(id)? {
                            Some(a) => a.read(offset, max).map_err(|e| {
                                Error::log(format!("reading log {}", path.display()), e)
                            }),
                            None => Ok(Bytes::new()),
                        };
                    }
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
                    drop(memory);
                    let a = self.inner.archives.lock().expect("logs").get(id).cloned();
                    return match a {
                        Some(a) => a
                            .read(offset, max)
                            .map_err(|e| Error::log(format!("reading the log of job {id}"), e)),
                        None => Ok(Bytes::new()),
                    };
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

#[cfg(test)]
mod stderr_tests {
    use super::*;

    #[test]
    fn stderr_ranges_are_merged_clipped_and_read_back_after_close() {
        let dir = tempfile::tempdir().unwrap();
        for hub in [LogHub::in_memory(), LogHub::in_dir(dir.path()).unwrap()] {
            let id = JobId::from("job1".to_string());
            hub.open(&id);
            hub.append_from(&id, false, b"out\n").unwrap(); // 0..4
            hub.append_from(&id, true, b"err").unwrap(); // 4..7
            hub.append_from(&id, true, b"or\n").unwrap(); // 7..10, merged
            hub.append_from(&id, false, b"more\n").unwrap(); // 10..15
            hub.append_from(&id, true, b"x\n").unwrap(); // 15..17
            assert_eq!(hub.stderr_ranges(&id, 0, 100), [(4, 10), (15, 17)]);
            assert_eq!(hub.stderr_ranges(&id, 5, 16), [(5, 10), (15, 16)]);
            assert!(hub.stderr_ranges(&id, 10, 15).is_empty());
            hub.close(&id);
            assert_eq!(
                hub.stderr_ranges(&id, 0, 100),
                [(4, 10), (15, 17)],
                "the same once closed"
            );
        }
        // And for a new hub over the same directory (a restart), also once the log is
        // opened again and written on.
        let again = LogHub::in_dir(dir.path()).unwrap();
        let id = JobId::from("job1".to_string());
        assert_eq!(again.stderr_ranges(&id, 0, 100), [(4, 10), (15, 17)]);
        again.open(&id);
        again.append_from(&id, true, b"y\n").unwrap(); // 17..19, merged
        assert_eq!(again.stderr_ranges(&id, 0, 100), [(4, 10), (15, 19)]);
        again.close(&id);
        assert_eq!(again.stderr_ranges(&id, 0, 100), [(4, 10), (15, 19)]);
        assert!(
            again
                .stderr_ranges(&JobId::from("none".to_string()), 0, 9)
                .is_empty()
        );
    }
}

#[cfg(test)]
mod compress_tests {
    use super::*;

    #[test]
    fn what_a_crash_mid_compression_leaves_is_finished_by_the_next_pass() {
        let dir = tempfile::tempdir().unwrap();
        let hub = LogHub::in_dir(dir.path()).unwrap();
        let text = b"line one\nline two\n".repeat(500);
        let ids: Vec<JobId> = ["a", "b", "c"]
            .into_iter()
            .map(|s| JobId::from(s.to_string()))
            .collect();
        for id in &ids {
            hub.open(id);
            hub.append(id, &text).unwrap();
            hub.close(id);
        }
        // `a`: an archive half written when the process died.
        std::fs::write(dir.path().join("a.log.zst.tmp"), b"partial").unwrap();
        // `b`: compressed and renamed, its original not yet removed.
        let done = hub.compress(&ids[1..2]);
        assert!(done[0].as_ref().unwrap().unwrap().compressed);
        std::fs::write(dir.path().join("b.log"), &text).unwrap();
        let again = hub.compress(&ids);
        for (id, r) in ids.iter().zip(&again) {
            let s = r.as_ref().unwrap().unwrap();
            assert!(s.compressed, "{id}");
            assert_eq!(s.original, text.len() as u64);
            assert_eq!(hub.read(id, 0, 1 << 20).unwrap(), text, "{id}");
            assert!(!dir.path().join(format!("{id}.log")).exists());
            assert!(!dir.path().join(format!("{id}.log.zst.tmp")).exists());
        }
        // An archive left beside its original but damaged: made again, the original kept
        // until then.
        let d = JobId::from("d".to_string());
        hub.open(&d);
        hub.append(&d, &text).unwrap();
        hub.close(&d);
        std::fs::write(dir.path().join("d.log.zst"), b"not an archive").unwrap();
        let r = hub.compress(std::slice::from_ref(&d));
        assert!(r[0].as_ref().unwrap().unwrap().compressed);
        assert_eq!(hub.read(&d, 0, 1 << 20).unwrap(), text);
        assert!(!dir.path().join("d.log").exists());

        // An open log is never compressed.
        let open = JobId::from("open".to_string());
        hub.open(&open);
        hub.append(&open, b"x").unwrap();
        assert!(
            hub.compress(std::slice::from_ref(&open))[0]
                .as_ref()
                .unwrap()
                .is_none()
        );
        assert!(!hub.remove(&open).unwrap(), "nor removed");
        hub.close(&open);
        assert!(hub.remove(&open).unwrap());
        assert_eq!(hub.len(&open), 0);
    }
}

#[cfg(test)]
mod memory_tests {
    use super::*;

    #[test]
    fn a_reader_of_a_log_in_memory_sees_it_whole_while_it_is_compressed() {
        let hub = LogHub::in_memory();
        let id = JobId::from("m".to_string());
        let text: Vec<u8> = (0..200_000u32)
            .flat_map(|i| format!("{i} ").into_bytes())
            .collect();
        hub.open(&id);
        hub.append(&id, &text).unwrap();
        hub.close(&id);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (hub, id, stop, len) = (hub.clone(), id.clone(), stop.clone(), text.len());
            std::thread::spawn(move || {
                let mut reads = 0u64;
                while !stop.load(Ordering::SeqCst) || reads == 0 {
                    assert_eq!(hub.len(&id), len as u64);
                    let tail = hub.read(&id, len as u64 - 100, 100).unwrap();
                    assert_eq!(tail.len(), 100, "read {reads}");
                    reads += 1;
                }
                reads
            })
        };
        let r = hub.compress(std::slice::from_ref(&id));
        assert!(r[0].as_ref().unwrap().unwrap().compressed);
        stop.store(true, Ordering::SeqCst);
        assert!(reader.join().unwrap() > 0);
        assert_eq!(hub.read(&id, 0, text.len()).unwrap(), text);
    }
}
