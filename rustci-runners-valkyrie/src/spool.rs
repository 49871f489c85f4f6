//! An attempt's output as an append-only file with its length and SHA-256, on both sides
//! of the protocol: the agent spools what the job writes until the control plane has
//! acknowledged it; the control plane stores each chunk at its durable length before it
//! acknowledges it.
//!
//! "Durable" here means written to the file (a process crash loses nothing written),
//! not fsynced: the same promise as the control plane's store and job logs.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

/// One attempt's output file. A lazy spool creates its file at the first byte: an
/// attempt that writes nothing costs no file.
pub(crate) struct Spool {
    path: PathBuf,
    file: Option<File>,
    len: u64,
    hash: Sha256,
    /// Bytes the cap dropped (agent side).
    pub dropped: u64,
    /// Where its file comes from, when spares are kept.
    spares: Option<Arc<Spares>>,
    /// Its file went to the spares: it takes no more bytes.
    retired: bool,
    /// It has (or had) a file on disk: false for a lazy spool that took no byte yet.
    has_file: bool,
}

/// Emptied output files kept for the attempts to come. An attempt's file is a spare
/// renamed to the attempt's name, and a finished attempt's file is emptied and renamed
/// back, so a steady stream of short jobs allocates no inode: on ext4 without a journal
/// each new inode is found by skipping every inode freed in the last minute, which made
/// creating an output file cost milliseconds after a few thousand short jobs. At most
/// `cap` spares are kept; past that a finished attempt's file is removed.
pub(crate) struct Spares {
    dir: PathBuf,
    free: Mutex<Vec<PathBuf>>,
    next: AtomicU64,
    cap: usize,
}

impl Spares {
    /// Spares in `dir` (created), adopting the regular files an earlier run left there
    /// (emptied, in case a crash struck between renaming one there and emptying it) up
    /// to `cap`, and removing the rest. `dir` must be on the same file system as the
    /// output files.
    pub fn open(dir: &Path, cap: usize) -> std::io::Result<Arc<Spares>> {
        std::fs::create_dir_all(dir)?;
        let mut free = Vec::new();
        let mut next = 0u64;
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let path = entry.path();
            // Not a symbolic link or anything else planted there.
            let regular = entry.file_type().is_ok_and(|t| t.is_file());
            let number = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse::<u64>().ok())
                .filter(|n| *n < u64::MAX / 2);
            let kept = match number {
                Some(n) if regular && free.len() < cap => {
                    next = next.max(n + 1);
                    OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .and_then(|f| f.set_len(0))
                        .is_ok()
                }
                _ => false,
            };
            if kept {
                free.push(path);
            } else {
                let _ = std::fs::remove_file(&path);
            }
        }
        Ok(Arc::new(Spares {
            dir: dir.to_path_buf(),
            free: Mutex::new(free),
            next: AtomicU64::new(next),
            cap,
        }))
    }

    /// A new empty file at `path`, replacing what is there: a spare when one is left,
    /// else a file created.
    pub fn create(&self, path: &Path) -> std::io::Result<File> {
        if let Some(spare) = self.free.lock().expect("spares").pop() {
            if std::fs::rename(&spare, path).is_ok() {
                // Spares are empty. Opened without O_TRUNC: on ext4 a file truncated to
                // nothing, written and closed is flushed to disk by the close (to
                // protect replace-by-truncate writers), which put a disk write into
                // every attempt.
                let reused = OpenOptions::new().read(true).write(true).open(path);
                if let Ok(f) = reused
                    && f.metadata().is_ok_and(|m| m.len() == 0)
                {
                    return Ok(f);
                }
                // Not as it should be: a new file, not this inode.
                let _ = std::fs::remove_file(path);
            } else {
                let _ = std::fs::remove_file(&spare);
            }
        }
        create(path)
    }

    /// Moves the file at `path` to the spares and empties it, or removes it when `cap`
    /// spares are kept. Nothing may write to it through an open handle afterwards.
    /// Renamed before it is emptied: of two calls for one path, only the first finds
    /// it, so the second cannot empty a spare already reused.
    pub fn retire(&self, path: &Path) {
        let room = self.free.lock().expect("spares").len() < self.cap;
        if !room {
            let _ = std::fs::remove_file(path);
            return;
        }
        let spare = self
            .dir
            .join(self.next.fetch_add(1, Ordering::Relaxed).to_string());
        if std::fs::rename(path, &spare).is_err() {
            // Gone already (or not movable): nothing to keep.
            let _ = std::fs::remove_file(path);
            return;
        }
        let emptied = OpenOptions::new()
            .write(true)
            .open(&spare)
            .and_then(|f| f.set_len(0));
        if emptied.is_ok() {
            self.free.lock().expect("spares").push(spare);
        } else {
            let _ = std::fs::remove_file(&spare);
        }
    }

    /// How many are kept.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.free.lock().expect("spares").len()
    }
}

fn create(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
}

impl Spool {
    /// Opens (creating) the file and reads what it holds, for its length and hash.
    pub fn open(path: &Path) -> std::io::Result<Spool> {
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)?;
        Self::read_from(path, file)
    }

    /// A spool with no file until its first byte; an existing file is replaced then.
    pub fn lazy(path: &Path) -> Spool {
        Spool {
            path: path.to_path_buf(),
            file: None,
            len: 0,
            hash: Sha256::new(),
            dropped: 0,
            spares: None,
            retired: false,
            has_file: false,
        }
    }

    /// [`Spool::lazy`] whose file, at the first byte, is one of `spares`.
    pub fn lazy_with(path: &Path, spares: &Arc<Spares>) -> Spool {
        Spool {
            spares: Some(spares.clone()),
            ..Spool::lazy(path)
        }
    }

    /// Closes its file and hands it to `spares` (see [`Spares::retire`]). It takes no
    /// bytes after this (an append is an error), so nothing reaches the spare.
    pub fn retire(&mut self, spares: &Spares) {
        self.seal();
        // A lazy spool that never took a byte has no file: nothing to keep (and no
        // rename and removal that would fail, for every job that writes nothing).
        if self.has_file {
            spares.retire(&self.path);
        }
    }

    /// Closes its file for good: an append after this is an error, and reads find
    /// nothing. Its length and hash stay. For a file that is to be retired later.
    pub fn seal(&mut self) {
        self.retired = true;
        self.file = None;
    }

    fn read_from(path: &Path, file: File) -> std::io::Result<Spool> {
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut len = 0u64;
        loop {
            let n = file.read_at(&mut buf, len)?;
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            len += n as u64;
        }
        Ok(Spool {
            path: path.to_path_buf(),
            file: Some(file),
            len,
            hash,
            dropped: 0,
            spares: None,
            retired: false,
            has_file: true,
        })
    }

    /// Bytes held.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `data`.
    pub fn append(&mut self, data: &[u8]) -> std::io::Result<()> {
        if self.retired {
            return Err(std::io::Error::other(format!(
                "{} was let go; it takes no more output",
                self.path.display()
            )));
        }
        if data.is_empty() {
            return Ok(());
        }
        let file = match &mut self.file {
            Some(f) => f,
            None => {
                let f = match &self.spares {
                    Some(spares) => spares.create(&self.path)?,
                    None => create(&self.path)?,
                };
                self.has_file = true;
                self.file.insert(f)
            }
        };
        if let Err(e) = file.write_all_at(data, self.len) {
            // A partial write is cut off again, so the file stays what `len` says.
            let _ = file.set_len(self.len);
            return Err(e);
        }
        self.hash.update(data);
        self.len += data.len() as u64;
        Ok(())
    }

    /// Appends `data` up to `cap` bytes in all; past the cap, writes `marker` once and
    /// counts what is dropped.
    pub fn append_capped(&mut self, data: &[u8], cap: u64, marker: &[u8]) -> std::io::Result<()> {
        if self.dropped > 0 {
            self.dropped += data.len() as u64;
            return Ok(());
        }
        let room = cap.saturating_sub(self.len) as usize;
        if data.len() <= room {
            return self.append(data);
        }
        self.append(&data[..room])?;
        self.append(marker)?;
        self.dropped = (data.len() - room) as u64;
        Ok(())
    }

    /// Up to `max` bytes from `offset`.
    pub fn read_at(&self, offset: u64, max: usize) -> std::io::Result<Vec<u8>> {
        let want = (self.len.saturating_sub(offset) as usize).min(max);
        let mut buf = vec![0u8; want];
        let Some(file) = &self.file else {
            return Ok(Vec::new());
        };
        let mut filled = 0;
        while filled < want {
            let n = file.read_at(&mut buf[filled..], offset + filled as u64)?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        buf.truncate(filled);
        Ok(buf)
    }

    /// SHA-256 of everything held, hex.
    pub fn sha256(&self) -> String {
        hex(&self.hash.clone().finalize())
    }
}

/// An append-only file of records, one JSON line each: what an attempt's state needs to
/// survive a process crash, without a file created per attempt (file creation and
/// removal are much of what a short job costs). A line cut off by a crash is skipped on
/// reading. [`Journal::rewrite`] replaces it with the live records (a temporary file,
/// then renamed), so it stays small.
pub(crate) struct Journal {
    path: PathBuf,
    file: File,
    lines: usize,
    /// Every write flushed to disk (for what must survive the machine).
    sync: bool,
}

impl Journal {
    /// Opens (creating) the journal; returns it with the records it holds that decode.
    pub fn open<T: serde::de::DeserializeOwned>(path: &Path) -> std::io::Result<(Journal, Vec<T>)> {
        let text = match std::fs::read(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        // A last line without its newline was cut off by a crash mid-append (a record is
        // one write ending in its newline): it is dropped. Any other line that does not
        // decode is damage, and is not guessed past.
        let whole = text.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        if whole < text.len() {
            tracing::warn!(path = %path.display(), bytes = text.len() - whole, "dropped a journal line cut off by a crash");
        }
        let mut records = Vec::new();
        let mut lines = 0;
        for (i, line) in text[..whole].split(|b| *b == b'\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            lines += 1;
            let r = serde_json::from_slice(line).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{} line {}: {e}", path.display(), i + 1),
                )
            })?;
            records.push(r);
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        if whole < text.len() {
            file.set_len(whole as u64)?;
        }
        Ok((
            Journal {
                path: path.to_path_buf(),
                file,
                lines,
                sync: false,
            },
            records,
        ))
    }

    /// [`Journal::open`] with every append and rewrite flushed to disk before it returns.
    pub fn open_synced<T: serde::de::DeserializeOwned>(
        path: &Path,
    ) -> std::io::Result<(Journal, Vec<T>)> {
        let (mut j, records) = Self::open(path)?;
        j.sync = true;
        Ok((j, records))
    }

    /// Appends one record.
    pub fn append<T: serde::Serialize>(&mut self, record: &T) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(record).map_err(std::io::Error::other)?;
        line.push(b'\n');
        self.file.write_all(&line)?;
        if self.sync {
            self.file.sync_data()?;
        }
        self.lines += 1;
        Ok(())
    }

    /// Lines written since it was opened or rewritten, and read at opening.
    pub fn lines(&self) -> usize {
        self.lines
    }

    /// Replaces the journal with `records`.
    pub fn rewrite<T: serde::Serialize>(&mut self, records: &[T]) -> std::io::Result<()> {
        let tmp = self.path.with_extension("tmp");
        let mut text = Vec::new();
        for r in records {
            text.extend(serde_json::to_vec(r).map_err(std::io::Error::other)?);
            text.push(b'\n');
        }
        let mut f = File::create(&tmp)?;
        f.write_all(&text)?;
        if self.sync {
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        self.file = OpenOptions::new().append(true).open(&self.path)?;
        self.lines = records.len();
        Ok(())
    }
}

/// Lower-case hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_and_hash_survive_reopening_and_the_cap_drops_with_one_marker() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.out");
        let mut s = Spool::open(&p).unwrap();
        s.append(b"hello ").unwrap();
        s.append_capped(b"world, and more", 10, b"[cut]").unwrap();
        s.append_capped(b"lost too", 10, b"[cut]").unwrap();
        assert_eq!(s.read_at(0, 100).unwrap(), b"hello worl[cut]");
        assert_eq!(s.dropped, 11 + 8);
        let again = Spool::open(&p).unwrap();
        assert_eq!(again.len(), 15);
        assert_eq!(again.sha256(), s.sha256());
        assert_eq!(again.sha256(), hex(&Sha256::digest(b"hello worl[cut]")));
        assert_eq!(again.read_at(6, 4).unwrap(), b"worl");
        assert_eq!(again.read_at(15, 4).unwrap(), b"");
    }

    #[test]
    fn a_lazy_spool_makes_no_file_until_written() {
        let dir = tempfile::tempdir().unwrap();
        let lazy_path = dir.path().join("lazy.out");
        std::fs::write(&lazy_path, b"an earlier run's").unwrap();
        let mut lazy = Spool::lazy(&lazy_path);
        assert_eq!(lazy.len(), 0);
        assert_eq!(lazy.read_at(0, 10).unwrap(), b"");
        assert_eq!(lazy.sha256(), hex(&Sha256::digest(b"")));
        lazy.append(b"").unwrap();
        assert_eq!(std::fs::read(&lazy_path).unwrap(), b"an earlier run's");
        lazy.append(b"new").unwrap();
        assert_eq!(
            std::fs::read(&lazy_path).unwrap(),
            b"new",
            "replaced at the first byte"
        );
        let nothing = dir.path().join("never.out");
        let _ = Spool::lazy(&nothing);
        assert!(!nothing.exists());
    }

    #[test]
    fn spares_are_emptied_reused_capped_and_adopted_after_a_restart() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let spare_dir = dir.path().join("spare");
        let spares = Spares::open(&spare_dir, 2).unwrap();
        let a = dir.path().join("a.out");
        let mut s = Spool::lazy_with(&a, &spares);
        s.append(b"secret output").unwrap();
        let inode = std::fs::metadata(&a).unwrap().ino();
        s.retire(&spares);
        assert!(!a.exists(), "renamed away");
        assert_eq!(spares.len(), 1);
        let kept: Vec<_> = std::fs::read_dir(&spare_dir).unwrap().collect();
        assert_eq!(kept.len(), 1);
        let kept = kept[0].as_ref().unwrap().path();
        assert_eq!(std::fs::metadata(&kept).unwrap().len(), 0, "emptied");
        // The next attempt's file is that spare: the same inode, empty, then written.
        let b = dir.path().join("b.out");
        std::fs::write(&b, b"an earlier run's").unwrap();
        let mut t = Spool::lazy_with(&b, &spares);
        t.append(b"new").unwrap();
        assert_eq!(std::fs::metadata(&b).unwrap().ino(), inode);
        assert_eq!(std::fs::read(&b).unwrap(), b"new");
        assert_eq!(spares.len(), 0);
        // None left: a file is created.
        let c = dir.path().join("c.out");
        let mut u = Spool::lazy_with(&c, &spares);
        u.append(b"c").unwrap();
        // A retired spool takes no more bytes: nothing reaches the spare.
        t.retire(&spares);
        let e = t.append(b"late").unwrap_err().to_string();
        assert!(e.contains("b.out") && e.contains("no more output"), "{e}");
        assert!(!b.exists());
        assert_eq!(spares.len(), 1);
        for f in std::fs::read_dir(&spare_dir).unwrap() {
            assert_eq!(f.unwrap().metadata().unwrap().len(), 0, "spares are empty");
        }
        // Past the cap, files are removed.
        u.retire(&spares);
        assert_eq!(spares.len(), 2);
        assert!(!c.exists() && !b.exists());
        let d = dir.path().join("d.out");
        std::fs::write(&d, b"d").unwrap();
        spares.retire(&d);
        assert_eq!(spares.len(), 2, "capped");
        assert!(!d.exists(), "removed past the cap");
        let roomy = Spares::open(&dir.path().join("spare2"), 5).unwrap();
        roomy.retire(&dir.path().join("never.out"));
        assert_eq!(roomy.len(), 0, "no file, nothing kept");
        let mut quiet = Spool::lazy_with(&dir.path().join("quiet.out"), &roomy);
        let before = roomy.next.load(Ordering::Relaxed);
        quiet.retire(&roomy);
        assert_eq!(
            roomy.next.load(Ordering::Relaxed),
            before,
            "not handed to the spares at all (no rename tried)"
        );
        assert_eq!(
            roomy.len(),
            0,
            "a spool that took no byte has nothing to keep"
        );
        assert!(quiet.append(b"late").is_err(), "and takes no byte after");
        assert_eq!(
            std::fs::read_dir(dir.path().join("spare2"))
                .unwrap()
                .count(),
            0
        );
        // A restart adopts the spares (emptying any a crash left full) up to the cap and
        // removes anything else.
        std::fs::write(spare_dir.join("77"), b"left full by a crash").unwrap();
        std::fs::write(spare_dir.join("junk"), b"x").unwrap();
        let target = dir.path().join("not-a-spare");
        std::fs::write(&target, b"keep me").unwrap();
        std::os::unix::fs::symlink(&target, spare_dir.join("90")).unwrap();
        let again = Spares::open(&spare_dir, 3).unwrap();
        assert_eq!(again.len(), 3);
        assert!(!spare_dir.join("junk").exists());
        assert!(
            !spare_dir.join("90").exists(),
            "a link is removed, not adopted"
        );
        assert_eq!(std::fs::read(&target).unwrap(), b"keep me", "nor followed");
        assert_eq!(std::fs::metadata(spare_dir.join("77")).unwrap().len(), 0);
        let e = dir.path().join("e.out");
        let mut v = Spool::lazy_with(&e, &again);
        v.append(b"e").unwrap();
        v.retire(&again);
        assert!(
            spare_dir.join("78").exists(),
            "numbering goes on after the highest adopted"
        );
    }

    #[test]
    fn a_journal_survives_reopening_skips_a_torn_line_and_rewrites() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        let (mut j, none) = Journal::open::<u32>(&p).unwrap();
        assert!(none.is_empty());
        for n in [1u32, 2, 3] {
            j.append(&n).unwrap();
        }
        drop(j);
        // A crash cut the last line.
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"4").unwrap();
        f.write_all(b"2x").unwrap();
        drop(f);
        let (mut j, got) = Journal::open::<u32>(&p).unwrap();
        assert_eq!(got, [1, 2, 3]);
        j.append(&5u32).unwrap();
        let (mut j, got) = Journal::open::<u32>(&p).unwrap();
        assert_eq!(
            got,
            [1, 2, 3, 5],
            "the torn line was dropped, not glued to the next"
        );
        assert_eq!(j.lines(), 4);
        j.rewrite(&[7u32]).unwrap();
        j.append(&8u32).unwrap();
        let (_, got) = Journal::open::<u32>(&p).unwrap();
        assert_eq!(got, [7, 8]);
        // A damaged line that is not the last is an error naming it.
        std::fs::write(&p, b"1\nbad\n3\n").unwrap();
        let e = Journal::open::<u32>(&p).err().unwrap().to_string();
        assert!(e.contains("line 2"), "{e}");
    }
}
