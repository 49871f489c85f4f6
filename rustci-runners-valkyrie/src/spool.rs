//! An attempt's output as an append-only file with its length and SHA-256, on both sides
//! of the protocol: the agent spools what the job writes until the control plane has
//! acknowledged it; the control plane stores each chunk at its durable length before it
//! acknowledges it.
//!
//! "Durable" here means written to the file (a process crash loses nothing written),
//! not fsynced: the same promise as the control plane's store and job logs.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// One attempt's output file.
pub(crate) struct Spool {
    path: PathBuf,
    file: File,
    len: u64,
    hash: Sha256,
    /// Bytes the cap dropped (agent side).
    pub dropped: u64,
}

impl Spool {
    /// Opens (creating) the file and reads what it holds, for its length and hash.
    pub fn open(path: &Path) -> std::io::Result<Spool> {
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)?;
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut len = 0u64;
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            len += n as u64;
        }
        Ok(Spool {
            path: path.to_path_buf(),
            file,
            len,
            hash,
            dropped: 0,
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
        if let Err(e) = self.file.write_all(data) {
            // A partial write is cut off again, so the file stays what `len` says.
            let _ = self.file.set_len(self.len);
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
        let mut filled = 0;
        while filled < want {
            let n = self
                .file
                .read_at(&mut buf[filled..], offset + filled as u64)?;
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

/// Lower-case hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Writes `data` to `path` atomically (a temporary file, then renamed): a process crash
/// leaves the old content or the new, never a part. Not fsynced, like the spools: the
/// promise is about process crashes, which the per-job path meets without a disk flush.
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(data)?;
    std::fs::rename(&tmp, path)
}

/// [`write_atomic`] and fsynced: for what is written rarely and must survive the machine
/// (agent registrations).
pub(crate) fn write_synced(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
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
}
