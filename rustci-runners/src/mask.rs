//! Secret masking over a byte stream.
//!
//! A [`Masker`] replaces every occurrence of a secret with `***`, also when the secret is
//! split across two writes: it holds back the last `longest secret - 1` bytes of each chunk
//! until the next chunk (or the end of the stream) shows whether they begin a secret.
//! Multi-line secrets are masked as a whole, and each of their lines of 8 or more bytes is
//! masked on its own too, so a job that prints them line by line leaks nothing.

use aho_corasick::{AhoCorasick, MatchKind};
use bytes::{BufMut, Bytes, BytesMut};

/// The text that replaces a secret.
pub const MASK: &[u8] = b"***";

/// Compiled set of secret values, shared by the maskers of one job.
#[derive(Clone, Debug)]
pub struct SecretSet {
    matcher: Option<AhoCorasick>,
    longest: usize,
}

impl SecretSet {
    /// Builds the set; empty values are ignored.
    pub fn new<'a>(secrets: impl IntoIterator<Item = &'a str>) -> Self {
        let mut patterns: Vec<&str> = Vec::new();
        for secret in secrets {
            if secret.is_empty() {
                continue;
            }
            patterns.push(secret);
            if secret.contains('\n') {
                patterns.extend(
                    secret
                        .lines()
                        .map(|l| l.trim_end_matches('\r'))
                        .filter(|l| l.len() >= 8),
                );
            }
        }
        let longest = patterns.iter().map(|p| p.len()).max().unwrap_or(0);
        let matcher = (!patterns.is_empty()).then(|| {
            AhoCorasick::builder()
                .match_kind(MatchKind::LeftmostLongest)
                .build(&patterns)
                .expect("literal patterns always build")
        });
        SecretSet { matcher, longest }
    }

    /// True when there is nothing to mask.
    pub fn is_empty(&self) -> bool {
        self.matcher.is_none()
    }

    /// Masks a complete text (an error message, say).
    pub fn mask_str(&self, text: &str) -> String {
        let mut masker = Masker::new(self.clone());
        let mut out = masker
            .push(Bytes::copy_from_slice(text.as_bytes()))
            .to_vec();
        out.extend_from_slice(&masker.finish());
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// Streaming masker for one output stream.
#[derive(Debug)]
pub struct Masker {
    set: SecretSet,
    pending: BytesMut,
}

impl Masker {
    /// A masker for `set`.
    pub fn new(set: SecretSet) -> Self {
        Masker {
            set,
            pending: BytesMut::new(),
        }
    }

    /// Feeds a chunk and returns what can be emitted now.
    pub fn push(&mut self, chunk: Bytes) -> Bytes {
        let Some(matcher) = &self.set.matcher else {
            return chunk;
        };
        self.pending.extend_from_slice(&chunk);
        let hold = self.set.longest - 1;
        let cut = self.pending.len().saturating_sub(hold);
        let (out, consumed) = Self::mask_until(matcher, &self.pending, cut);
        let _ = self.pending.split_to(consumed);
        out
    }

    /// Ends the stream and returns the rest.
    pub fn finish(&mut self) -> Bytes {
        let Some(matcher) = &self.set.matcher else {
            return Bytes::new();
        };
        let all = self.pending.split();
        let (out, _) = Self::mask_until(matcher, &all, all.len());
        out
    }

    /// Masks `buf`, emitting bytes before `cut` and any match that starts before `cut`.
    /// Returns the output and how many input bytes it covers.
    fn mask_until(matcher: &AhoCorasick, buf: &[u8], cut: usize) -> (Bytes, usize) {
        let mut out = BytesMut::with_capacity(cut + MASK.len());
        let mut at = 0;
        for m in matcher.find_iter(buf) {
            if m.start() >= cut {
                break;
            }
            out.put_slice(&buf[at..m.start()]);
            out.put_slice(MASK);
            at = m.end();
        }
        if at < cut {
            out.put_slice(&buf[at..cut]);
            at = cut;
        }
        (out.freeze(), at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(secrets: &[&str], chunks: &[&[u8]]) -> Vec<u8> {
        let mut m = Masker::new(SecretSet::new(secrets.iter().copied()));
        let mut out = Vec::new();
        for c in chunks {
            out.extend_from_slice(&m.push(Bytes::copy_from_slice(c)));
        }
        out.extend_from_slice(&m.finish());
        out
    }

    #[test]
    fn masks_whole_and_split_secrets() {
        assert_eq!(run(&["hunter2"], &[b"pw=hunter2!"]), b"pw=***!");
        assert_eq!(run(&["hunter2"], &[b"pw=hun", b"ter2!"]), b"pw=***!");
        assert_eq!(
            run(&["hunter2"], &[b"h", b"u", b"n", b"t", b"e", b"r", b"2"]),
            b"***"
        );
        assert_eq!(run(&["abc", "abcdef"], &[b"xabcdefx"]), b"x***x");
        assert_eq!(run(&[], &[b"plain"]), b"plain");
        assert_eq!(run(&["zz"], &[b"no secret here"]), b"no secret here");
        // A prefix that turns out not to be the secret is released unchanged.
        assert_eq!(run(&["hunter2"], &[b"hunt", b"er3"]), b"hunter3");
    }

    #[test]
    fn masks_multiline_secrets_whole_and_by_line() {
        let key = "-----BEGIN KEY-----\nAAAABBBBCCCC\n-----END KEY-----";
        let out = run(&[key], &[key.as_bytes()]);
        assert_eq!(out, b"***");
        let out = run(&[key], &[b"line: AAAABBBBCCCC\n"]);
        assert_eq!(out, b"line: ***\n");
    }

    #[test]
    fn binary_bytes_pass_through() {
        let data: Vec<u8> = (0..=255).collect();
        assert_eq!(run(&["secret"], &[&data]), data);
    }
}
