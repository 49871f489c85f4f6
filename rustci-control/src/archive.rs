//! Compressed logs in zstd's seekable format: the log cut into independent zstd frames
//! of at most [`FRAME`] bytes each, followed by a seek table in a skippable frame. Any
//! zstd decoder reads the whole file (`zstd -d` skips the table); a reader that knows the
//! table decompresses only the frames an offset needs.
//!
//! Seek table (all integers little-endian): the skippable frame's magic `0x184D2A5E`,
//! the length of what follows (u32), then per frame its compressed and its original size
//! (u32 each), then the footer: the number of frames (u32), a descriptor byte (0: no
//! checksums) and the seekable magic `0x8F92EAB1`.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// Original bytes per frame: the most a read decompresses to reach any offset.
pub(crate) const FRAME: usize = 256 * 1024;
/// zstd's default level: about as fast as a disk writes, a third to a tenth of the size
/// on typical build output.
const LEVEL: i32 = 3;
const SKIPPABLE_MAGIC: u32 = 0x184D_2A5E;
const SEEKABLE_MAGIC: u32 = 0x8F92_EAB1;
const FOOTER: usize = 9;
/// Largest original size of a frame accepted when reading (frames we write are a
/// quarter of it).
const MAX_FRAME: u32 = 4 * FRAME as u32;
/// The smallest zstd frame: magic number, frame header, one block header.
const MIN_FRAME: u64 = 9;

fn read_full(src: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match src.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Compresses everything `src` yields into `dst` as a seekable archive, reading and
/// holding one frame at a time. Returns (archive bytes, original bytes).
pub(crate) fn compress(mut src: impl Read, mut dst: impl Write) -> io::Result<(u64, u64)> {
    let mut compressor = zstd::bulk::Compressor::new(LEVEL)?;
    let mut buf = vec![0u8; FRAME];
    let mut table: Vec<(u32, u32)> = Vec::new();
    let (mut written, mut original) = (0u64, 0u64);
    loop {
        let n = read_full(&mut src, &mut buf)?;
        if n == 0 {
            break;
        }
        let frame = compressor.compress(&buf[..n])?;
        dst.write_all(&frame)?;
        table.push((frame.len() as u32, n as u32));
        written += frame.len() as u64;
        original += n as u64;
        if n < FRAME {
            break;
        }
    }
    let mut seek = Vec::with_capacity(8 + table.len() * 8 + FOOTER);
    seek.extend_from_slice(&SKIPPABLE_MAGIC.to_le_bytes());
    seek.extend_from_slice(&((table.len() * 8 + FOOTER) as u32).to_le_bytes());
    for (c, d) in &table {
        seek.extend_from_slice(&c.to_le_bytes());
        seek.extend_from_slice(&d.to_le_bytes());
    }
    seek.extend_from_slice(&(table.len() as u32).to_le_bytes());
    seek.push(0);
    seek.extend_from_slice(&SEEKABLE_MAGIC.to_le_bytes());
    dst.write_all(&seek)?;
    Ok((written + seek.len() as u64, original))
}

/// Where an archive's bytes are.
pub(crate) enum Source {
    /// A file.
    File(File),
    /// Memory (a log hub without a directory).
    Memory(Vec<u8>),
}

impl Source {
    fn len(&self) -> io::Result<u64> {
        match self {
            Source::File(f) => Ok(f.metadata()?.len()),
            Source::Memory(v) => Ok(v.len() as u64),
        }
    }

    fn read_exact_at(&self, buf: &mut [u8], at: u64) -> io::Result<()> {
        match self {
            Source::File(f) => f.read_exact_at(buf, at),
            Source::Memory(v) => {
                let start = usize::try_from(at).ok().filter(|s| *s <= v.len());
                match start.and_then(|s| v.get(s..s + buf.len())) {
                    Some(src) => {
                        buf.copy_from_slice(src);
                        Ok(())
                    }
                    None => Err(io::ErrorKind::UnexpectedEof.into()),
                }
            }
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Frame {
    at: u64,
    size: u32,
    start: u64,
    len: u32,
}

/// A seekable archive opened for reading.
pub(crate) struct Archive {
    source: Source,
    frames: Vec<Frame>,
    len: u64,
    stored: u64,
    /// The frame read last, decompressed (a follower reads a frame in several chunks).
    last: Mutex<Option<(usize, Arc<Vec<u8>>)>>,
}

fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("not a seekable zstd log archive: {}", what.into()),
    )
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes(b[i..i + 4].try_into().expect("four bytes"))
}

impl Archive {
    /// Reads the seek table of an archive.
    pub(crate) fn open(source: Source) -> io::Result<Archive> {
        let stored = source.len()?;
        if stored < (8 + FOOTER) as u64 {
            return Err(invalid(format!("{stored} bytes is too short")));
        }
        let mut footer = [0u8; FOOTER];
        source.read_exact_at(&mut footer, stored - FOOTER as u64)?;
        if u32_at(&footer, 5) != SEEKABLE_MAGIC {
            return Err(invalid("no seek table at its end"));
        }
        if footer[4] & 0x80 != 0 {
            return Err(invalid(
                "frame checksums in the seek table are not supported",
            ));
        }
        let count = u64::from(u32_at(&footer, 0));
        let table_len = count * 8 + FOOTER as u64 + 8;
        if table_len > stored || count * MIN_FRAME > stored - table_len {
            return Err(invalid(format!(
                "a seek table of {count} frames does not fit in {stored} bytes"
            )));
        }
        let mut table = vec![0u8; table_len as usize];
        source.read_exact_at(&mut table, stored - table_len)?;
        if u32_at(&table, 0) != SKIPPABLE_MAGIC || u64::from(u32_at(&table, 4)) != table_len - 8 {
            return Err(invalid("the seek table's frame header does not match"));
        }
        let mut frames = Vec::with_capacity(count as usize);
        let (mut at, mut start) = (0u64, 0u64);
        for i in 0..count as usize {
            let size = u32_at(&table, 8 + i * 8);
            let len = u32_at(&table, 12 + i * 8);
            if len > MAX_FRAME {
                return Err(invalid(format!("frame {i} holds {len} bytes")));
            }
            frames.push(Frame {
                at,
                size,
                start,
                len,
            });
            at += u64::from(size);
            start += u64::from(len);
        }
        if at != stored - table_len {
            return Err(invalid(format!(
                "its frames take {at} bytes, the file has {} before the seek table",
                stored - table_len
            )));
        }
        Ok(Archive {
            source,
            frames,
            len: start,
            stored,
            last: Mutex::new(None),
        })
    }

    /// The original length.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// The archive's own size.
    pub(crate) fn stored(&self) -> u64 {
        self.stored
    }

    fn frame(&self, i: usize) -> io::Result<Arc<Vec<u8>>> {
        if let Some((j, data)) = &*self.last.lock().expect("archive")
            && *j == i
        {
            return Ok(data.clone());
        }
        let f = self.frames[i];
        let mut raw = vec![0u8; f.size as usize];
        self.source.read_exact_at(&mut raw, f.at)?;
        let data = zstd::bulk::decompress(&raw, f.len as usize)?;
        if data.len() != f.len as usize {
            return Err(invalid(format!(
                "frame {i} holds {} bytes, its table entry says {}",
                data.len(),
                f.len
            )));
        }
        let data = Arc::new(data);
        *self.last.lock().expect("archive") = Some((i, data.clone()));
        Ok(data)
    }

    /// Up to `max` original bytes at `offset`.
    pub(crate) fn read(&self, offset: u64, max: usize) -> io::Result<Bytes> {
        let mut out = Vec::new();
        let mut at = offset;
        while out.len() < max && at < self.len {
            let i = self
                .frames
                .partition_point(|f| f.start + u64::from(f.len) <= at);
            let Some(f) = self.frames.get(i) else { break };
            let data = self.frame(i)?;
            let from = (at - f.start) as usize;
            let take = (data.len() - from).min(max - out.len());
            out.extend_from_slice(&data[from..from + take]);
            at += take as u64;
        }
        Ok(Bytes::from(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize) -> Vec<u8> {
        (0..n)
            .map(|i| {
                if i % 97 == 96 {
                    b'\n'
                } else {
                    b"compiling rustci v0.1 "[i % 22]
                }
            })
            .collect()
    }

    #[test]
    fn any_range_reads_back_and_any_zstd_decoder_reads_the_whole() {
        for n in [0, 1, 1000, FRAME - 1, FRAME, FRAME + 1, 3 * FRAME + 17] {
            let log = sample(n);
            let mut out = Vec::new();
            let (stored, original) = compress(&log[..], &mut out).unwrap();
            assert_eq!((stored, original), (out.len() as u64, n as u64));
            // The standard decoder skips the seek table.
            assert_eq!(
                zstd::stream::decode_all(&out[..]).unwrap(),
                log,
                "{n} bytes"
            );
            let a = Archive::open(Source::Memory(out)).unwrap();
            assert_eq!(a.len(), n as u64);
            for (offset, max) in [(0, n), (0, 10), (FRAME - 5, 10), (n / 2, FRAME * 2)] {
                let got = a.read(offset as u64, max).unwrap();
                let end = (offset + max).min(n);
                let want = if offset < n {
                    &log[offset..end]
                } else {
                    &[][..]
                };
                assert_eq!(&got[..], want, "{n} bytes at {offset}+{max}");
            }
            assert!(a.read(n as u64 + 5, 10).unwrap().is_empty());
        }
    }

    #[test]
    fn damaged_archives_are_refused_with_the_reason() {
        let mut out = Vec::new();
        compress(&sample(5000)[..], &mut out).unwrap();
        let short = out[..10].to_vec();
        let e = Archive::open(Source::Memory(short)).err().unwrap();
        assert!(e.to_string().contains("too short"), "{e}");
        let mut cut = out.clone();
        cut.remove(0);
        let e = Archive::open(Source::Memory(cut)).err().unwrap();
        assert!(e.to_string().contains("before the seek table"), "{e}");
        let plain = sample(5000);
        let e = Archive::open(Source::Memory(plain)).err().unwrap();
        assert!(e.to_string().contains("no seek table"), "{e}");
        // A frame whose bytes are damaged: the read fails, nothing panics.
        let mut bad = out.clone();
        for b in &mut bad[4..40] {
            *b ^= 0x5a;
        }
        let a = Archive::open(Source::Memory(bad)).unwrap();
        assert!(a.read(0, 100).is_err());
    }
}
