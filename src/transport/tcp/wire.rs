//! The data-lane wire format: fixed 24-byte headers, request entries, and payloads that
//! travel as raw bytes straight between registered memory and the socket.
//!
//! ```text
//! header   magic u32 "KVXD" | version u16 | kind u16 | count u32 | status u32 | id u64
//! WRITE    header(count = n) + n entries + the entries' bytes, in order   → ACK or ERROR
//! READ     header(count = n) + n entries                                   → READ_DATA or ERROR
//! ACK      header(count = 0, status = 0)
//! READ_DATA header(count = 0, status = 0) + the entries' bytes, in order
//! ERROR    header(count = message bytes, status = code) + UTF-8 message
//! entry    addr u64 | len u32 | reserved u32 (0)
//! ```
//!
//! Responses come back in request order on each connection; `id` is echoed so a client
//! can check it. Everything little endian. Decoding never panics and bounds every count
//! before anything is allocated.

use std::fmt;

/// "KVXD" read as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"KVXD");
/// The only version spoken.
pub const VERSION: u16 = 1;
/// Bytes of a header.
pub const HEADER_LEN: usize = 24;
/// Bytes of one request entry.
pub const ENTRY_LEN: usize = 16;
/// Entries one request may carry.
pub const MAX_ENTRIES: u32 = 1024;
/// Payload bytes one request may move (one slice of the largest slice size).
pub const MAX_GROUP_BYTES: u64 = 1 << 30;
/// Bytes of an error message, at most.
pub const MAX_MESSAGE: u32 = 4096;

/// Frame kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    /// Entries plus payload, to be written into the server's memory.
    Write = 1,
    /// Entries whose bytes the server sends back.
    Read = 2,
    /// A WRITE landed in the server's memory.
    Ack = 3,
    /// The bytes of a READ follow.
    ReadData = 4,
    /// The request was refused; a message follows.
    Error = 5,
}

/// Error codes carried in `status` of an ERROR frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Code {
    /// An entry lies (partly) outside the server's registered memory.
    NotRegistered = 1,
    /// The region does not grant the right the request needs.
    AccessDenied = 2,
    /// The frame could not be decoded; the server closes the connection.
    Malformed = 3,
    /// The bytes could not be copied between the server's GPU memory and its staging
    /// buffer (the server's CUDA driver failed; nothing of a failed WRITE was acknowledged).
    Device = 4,
}

impl Code {
    /// The code for a status number (unknown ones read as `Malformed`).
    pub fn from_status(status: u32) -> Code {
        match status {
            1 => Code::NotRegistered,
            2 => Code::AccessDenied,
            4 => Code::Device,
            _ => Code::Malformed,
        }
    }
}

/// A decoded header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// What follows.
    pub kind: Kind,
    /// Entries (requests) or message bytes (ERROR); 0 otherwise.
    pub count: u32,
    /// 0, or an error code (ERROR).
    pub status: u32,
    /// The request's id, echoed in its response.
    pub id: u64,
}

/// Why a frame was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The first four bytes are not "KVXD": not a kvxfer data lane, or out of step.
    #[error("bad magic {0:#010x} (expected \"KVXD\"): not a kvxfer data lane")]
    BadMagic(u32),
    /// A version this build does not speak.
    #[error("unsupported data-lane protocol version {0} (this build speaks {VERSION})")]
    Version(u16),
    /// A kind number this build does not know.
    #[error("unknown frame kind {0}")]
    UnknownKind(u16),
    /// More entries or message bytes than allowed.
    #[error("{what} {count} exceeds the limit of {max}")]
    TooMany {
        /// Entries or message bytes.
        what: &'static str,
        /// What was sent.
        count: u32,
        /// The limit.
        max: u32,
    },
    /// An entry of zero bytes, a non-zero reserved field, an overflowing range, or a
    /// request moving too many bytes in all.
    #[error("bad entry {index}: {reason}")]
    BadEntry {
        /// Which entry.
        index: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// The input ends before the frame does.
    #[error("truncated frame: {got} of {expected} bytes")]
    Truncated {
        /// Bytes the frame needs (header plus entries).
        expected: usize,
        /// Bytes there were.
        got: usize,
    },
    /// A header field that must be zero for this kind is not.
    #[error("{kind:?} frame with non-zero {field}")]
    NonZero {
        /// The kind.
        kind: Kind,
        /// The field.
        field: &'static str,
    },
}

impl Header {
    /// The 24 bytes of this header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        out[4..6].copy_from_slice(&VERSION.to_le_bytes());
        out[6..8].copy_from_slice(&(self.kind as u16).to_le_bytes());
        out[8..12].copy_from_slice(&self.count.to_le_bytes());
        out[12..16].copy_from_slice(&self.status.to_le_bytes());
        out[16..24].copy_from_slice(&self.id.to_le_bytes());
        out
    }

    /// Decodes and checks a header: magic, version, kind, and the count limit per kind.
    pub fn decode(bytes: &[u8; HEADER_LEN]) -> Result<Header, WireError> {
        let u32_at =
            |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        let magic = u32_at(0);
        if magic != MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        let version = u16::from_le_bytes([bytes[4], bytes[5]]);
        if version != VERSION {
            return Err(WireError::Version(version));
        }
        let kind = match u16::from_le_bytes([bytes[6], bytes[7]]) {
            1 => Kind::Write,
            2 => Kind::Read,
            3 => Kind::Ack,
            4 => Kind::ReadData,
            5 => Kind::Error,
            other => return Err(WireError::UnknownKind(other)),
        };
        let mut id = [0u8; 8];
        id.copy_from_slice(&bytes[16..24]);
        let header = Header {
            kind,
            count: u32_at(8),
            status: u32_at(12),
            id: u64::from_le_bytes(id),
        };
        header.check()?;
        Ok(header)
    }

    fn check(&self) -> Result<(), WireError> {
        let nonzero = |field| WireError::NonZero {
            kind: self.kind,
            field,
        };
        match self.kind {
            Kind::Write | Kind::Read => {
                if self.count == 0 || self.count > MAX_ENTRIES {
                    return Err(WireError::TooMany {
                        what: "entries (1 at least)",
                        count: self.count,
                        max: MAX_ENTRIES,
                    });
                }
                if self.status != 0 {
                    return Err(nonzero("status"));
                }
            }
            Kind::Ack | Kind::ReadData => {
                if self.count != 0 {
                    return Err(nonzero("count"));
                }
                if self.status != 0 {
                    return Err(nonzero("status"));
                }
            }
            Kind::Error => {
                if self.count > MAX_MESSAGE {
                    return Err(WireError::TooMany {
                        what: "error message bytes",
                        count: self.count,
                        max: MAX_MESSAGE,
                    });
                }
            }
        }
        Ok(())
    }
}

/// One range of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Address in the server's memory.
    pub addr: u64,
    /// Bytes.
    pub len: u32,
}

impl Entry {
    /// Appends the 16 bytes of this entry to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.addr.to_le_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
    }
}

/// Decodes `bytes` (a whole number of entries) into `out` (cleared first) and returns the
/// payload bytes they add up to. Refuses empty entries, non-zero reserved fields, ranges
/// that overflow the address space, and totals over [`MAX_GROUP_BYTES`].
pub fn decode_entries(bytes: &[u8], out: &mut Vec<Entry>) -> Result<u64, WireError> {
    out.clear();
    if bytes.len() % ENTRY_LEN != 0 || bytes.len() / ENTRY_LEN > MAX_ENTRIES as usize {
        return Err(WireError::BadEntry {
            index: bytes.len() / ENTRY_LEN,
            reason: "entry bytes are not a whole number of entries within the limit",
        });
    }
    let mut total = 0u64;
    for (index, raw) in bytes.chunks_exact(ENTRY_LEN).enumerate() {
        let mut addr = [0u8; 8];
        addr.copy_from_slice(&raw[0..8]);
        let addr = u64::from_le_bytes(addr);
        let len = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
        let reserved = u32::from_le_bytes([raw[12], raw[13], raw[14], raw[15]]);
        let bad = |reason| WireError::BadEntry { index, reason };
        if len == 0 {
            return Err(bad("zero length"));
        }
        if reserved != 0 {
            return Err(bad("reserved field is not zero"));
        }
        if addr.checked_add(u64::from(len)).is_none() {
            return Err(bad("range overflows the address space"));
        }
        total += u64::from(len);
        if total > MAX_GROUP_BYTES {
            return Err(bad("request moves more than 1 GiB"));
        }
        out.push(Entry { addr, len });
    }
    Ok(total)
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Decodes a whole frame image (header, then entries or message) as a server or client
/// would, for the fuzz target and property tests. Returns the header and entries.
pub fn decode_frame(bytes: &[u8]) -> Result<(Header, Vec<Entry>), WireError> {
    let head: &[u8; HEADER_LEN] = bytes
        .get(..HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or(WireError::Truncated {
            expected: HEADER_LEN,
            got: bytes.len(),
        })?;
    let header = Header::decode(head)?;
    let mut entries = Vec::new();
    if matches!(header.kind, Kind::Write | Kind::Read) {
        let want = HEADER_LEN + header.count as usize * ENTRY_LEN;
        let body = bytes.get(HEADER_LEN..want).ok_or(WireError::Truncated {
            expected: want,
            got: bytes.len(),
        })?;
        decode_entries(body, &mut entries)?;
    }
    Ok((header, entries))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kind_strategy() -> impl Strategy<Value = Kind> {
        prop_oneof![
            Just(Kind::Write),
            Just(Kind::Read),
            Just(Kind::Ack),
            Just(Kind::ReadData),
            Just(Kind::Error)
        ]
    }

    proptest! {
        #[test]
        fn header_round_trips(kind in kind_strategy(), count in 0u32..2000, status in 0u32..4, id: u64) {
            let header = Header { kind, count, status, id };
            match Header::decode(&header.encode()) {
                Ok(decoded) => prop_assert_eq!(decoded, header),
                Err(_) => prop_assert!(header.check().is_err()),
            }
        }

        #[test]
        fn any_bytes_decode_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = decode_frame(&bytes);
        }

        #[test]
        fn entries_round_trip(entries in proptest::collection::vec((1u64..1 << 47, 1u32..1 << 16), 1..64)) {
            let mut raw = Vec::new();
            let entries: Vec<Entry> = entries.into_iter().map(|(addr, len)| Entry { addr, len }).collect();
            entries.iter().for_each(|e| e.encode_into(&mut raw));
            let mut out = Vec::new();
            let total = decode_entries(&raw, &mut out).unwrap();
            prop_assert_eq!(total, entries.iter().map(|e| u64::from(e.len)).sum::<u64>());
            prop_assert_eq!(out, entries);
        }
    }

    #[test]
    fn refuses_bad_headers() {
        let good = Header {
            kind: Kind::Write,
            count: 1,
            status: 0,
            id: 7,
        }
        .encode();
        let mut bad = good;
        bad[0] = b'X';
        assert!(matches!(Header::decode(&bad), Err(WireError::BadMagic(_))));
        let mut bad = good;
        bad[4] = 9;
        assert_eq!(Header::decode(&bad), Err(WireError::Version(9)));
        let mut bad = good;
        bad[6] = 77;
        assert_eq!(Header::decode(&bad), Err(WireError::UnknownKind(77)));
        let mut bad = good;
        bad[8..12].copy_from_slice(&(MAX_ENTRIES + 1).to_le_bytes());
        assert!(matches!(
            Header::decode(&bad),
            Err(WireError::TooMany { .. })
        ));
        let mut bad = good;
        bad[8..12].copy_from_slice(&0u32.to_le_bytes());
        assert!(matches!(
            Header::decode(&bad),
            Err(WireError::TooMany { .. })
        ));
    }

    #[test]
    fn refuses_bad_entries() {
        let mut out = Vec::new();
        let mut raw = Vec::new();
        Entry { addr: 8, len: 0 }.encode_into(&mut raw);
        assert!(decode_entries(&raw, &mut out).is_err());
        raw.clear();
        Entry {
            addr: u64::MAX - 2,
            len: 8,
        }
        .encode_into(&mut raw);
        assert!(decode_entries(&raw, &mut out).is_err());
        raw.clear();
        for i in 0..5 {
            Entry {
                addr: i << 40,
                len: 1 << 28,
            }
            .encode_into(&mut raw);
        }
        assert!(decode_entries(&raw, &mut out).is_err());
        assert!(decode_entries(&[0u8; 15], &mut out).is_err());
    }
}
