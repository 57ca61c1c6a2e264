//! The on-disk format, pure: segment headers and records, encoded and checked without I/O
//! (`docs/storage.md` is normative; the golden test in `tests/log.rs` pins it).

/// First bytes of every segment file.
pub const MAGIC: [u8; 8] = *b"DEBUSLOG";
/// The format version this build writes and reads (segment header and records).
pub const FORMAT_VERSION: u8 = 1;
/// Bytes of a segment header: magic, format version (`u32`), reserved (`u32`, zero).
pub const HEADER_LEN: usize = 16;
/// Bytes of a record before its body: length, CRC-32C, version, kind, sequence number.
pub const RECORD_HEAD: usize = 4 + 4 + 1 + 1 + 8;
/// Largest record body: a message at the largest payload limit with room for its topic and
/// header, or a run of messages.
pub const MAX_BODY: usize = 80 * 1024 * 1024;

/// A record read back from a log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    /// Its sequence number: increasing through the log, never reused.
    pub seq: u64,
    /// What kind of record it is (the writer's own numbering).
    pub kind: u8,
    /// Its contents.
    pub body: &'a [u8],
    /// The buffer `body` lies in, when it is shared ([`Record::body_bytes`]).
    backing: Option<&'a Bytes>,
}

impl Record<'_> {
    /// Its contents as [`Bytes`]: a slice of the segment read back, without a copy (it keeps
    /// the segment's buffer alive while it lives).
    pub fn body_bytes(&self) -> Bytes {
        match self.backing {
            Some(b) => b.slice_ref(self.body),
            None => Bytes::copy_from_slice(self.body),
        }
    }

    /// The same record, its body a slice of `backing`.
    pub(crate) fn backed<'b>(self, backing: &'b Bytes) -> Record<'b>
    where
        Self: 'b,
    {
        Record {
            backing: Some(backing),
            ..self
        }
    }
}

use bytes::Bytes;

/// Appends a segment header to `dst`.
pub fn put_header(dst: &mut Vec<u8>) {
    dst.extend_from_slice(&MAGIC);
    dst.extend_from_slice(&u32::from(FORMAT_VERSION).to_le_bytes());
    dst.extend_from_slice(&0u32.to_le_bytes());
}

/// What a segment header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// A segment of this format.
    Valid,
    /// A segment of a later format version (this build must not touch it).
    Newer(u32),
    /// Not a segment header (another file, or damaged).
    Invalid,
}

/// Reads a segment header from the start of `bytes`.
pub fn check_header(bytes: &[u8]) -> Header {
    let Some(head) = bytes.get(..HEADER_LEN) else {
        return Header::Invalid;
    };
    if head[..8] != MAGIC {
        return Header::Invalid;
    }
    let version = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
    match version {
        v if v == u32::from(FORMAT_VERSION) => Header::Valid,
        v if v > u32::from(FORMAT_VERSION) => Header::Newer(v),
        _ => Header::Invalid,
    }
}

/// Appends a record to `dst`.
///
/// # Panics
///
/// When `body` is longer than [`MAX_BODY`] (the log checks before it encodes).
pub fn put_record(dst: &mut Vec<u8>, seq: u64, kind: u8, body: &[u8]) {
    assert!(body.len() <= MAX_BODY, "record body over MAX_BODY");
    let len = u32::try_from(RECORD_HEAD - 4 + body.len()).expect("below MAX_BODY");
    dst.extend_from_slice(&len.to_le_bytes());
    let crc_at = dst.len();
    dst.extend_from_slice(&[0; 4]);
    let covered = dst.len();
    dst.push(FORMAT_VERSION);
    dst.push(kind);
    dst.extend_from_slice(&seq.to_le_bytes());
    dst.extend_from_slice(body);
    let crc = crc32c::crc32c(&dst[covered..]);
    dst[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
}

/// Why the bytes at some offset are not a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bad {
    /// The record continues past the end of the bytes (a write cut short).
    Cut,
    /// Its length is impossible, its checksum does not match, or its version is unknown.
    Corrupt(&'static str),
}

/// Reads the record at the start of `bytes`: the record and its length on disk.
///
/// # Errors
///
/// [`Bad`] says why there is no valid record there.
pub fn read_record(bytes: &[u8]) -> Result<(Record<'_>, usize), Bad> {
    let Some(len) = bytes.get(..4) else {
        return Err(Bad::Cut);
    };
    let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
    if !(RECORD_HEAD - 4..=RECORD_HEAD - 4 + MAX_BODY).contains(&len) {
        return Err(Bad::Corrupt("impossible record length"));
    }
    let Some(rest) = bytes.get(4..4 + len) else {
        return Err(Bad::Cut);
    };
    let crc = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
    let covered = &rest[4..];
    if crc32c::crc32c(covered) != crc {
        return Err(Bad::Corrupt("checksum mismatch"));
    }
    if covered[0] != FORMAT_VERSION {
        return Err(Bad::Corrupt("unknown record version"));
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&covered[2..10]);
    Ok((
        Record {
            seq: u64::from_le_bytes(seq),
            kind: covered[1],
            body: &covered[10..],
            backing: None,
        },
        4 + len,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_read_back_and_damage_is_told_apart_from_a_cut() {
        let mut b = Vec::new();
        put_record(&mut b, 7, 2, b"hello");
        assert_eq!(b.len(), RECORD_HEAD + 5);
        let (r, n) = read_record(&b).unwrap();
        assert_eq!((r.seq, r.kind, r.body, n), (7, 2, &b"hello"[..], b.len()));
        assert_eq!(r.body_bytes(), b"hello"[..]);
        for cut in 0..b.len() {
            assert_eq!(read_record(&b[..cut]), Err(Bad::Cut), "cut at {cut}");
        }
        for flip in 4..b.len() {
            let mut d = b.clone();
            d[flip] ^= 0x40;
            assert!(
                matches!(read_record(&d), Err(Bad::Corrupt(_))),
                "flip at {flip}"
            );
        }
        let mut zero = vec![0u8; 32];
        assert!(matches!(read_record(&zero), Err(Bad::Corrupt(_))));
        zero[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(read_record(&zero), Err(Bad::Corrupt(_))));
    }

    #[test]
    fn headers_of_this_and_later_formats() {
        let mut h = Vec::new();
        put_header(&mut h);
        assert_eq!(check_header(&h), Header::Valid);
        h[8] = 9;
        assert_eq!(check_header(&h), Header::Newer(9));
        h[0] = b'X';
        assert_eq!(check_header(&h), Header::Invalid);
        assert_eq!(check_header(&h[..3]), Header::Invalid);
    }
}
