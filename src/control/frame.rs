//! The frame: a 16-byte little-endian header followed by `len` body bytes.
//!
//! ```text
//! offset  size  field
//!      0     4  magic       0x4358_564B ("KVXC" on the wire)
//!      4     2  version     1
//!      6     2  kind        message type (see `kind`)
//!      8     4  len         body bytes following the header (at most MAX_BODY)
//!     12     4  request_id  0 = unsolicited; a reply echoes its request's id
//! ```

use std::io::{self, Read};

use super::error::ControlError;
use super::message::Message;

/// The magic number that starts every frame (`"KVXC"` as little-endian bytes).
pub const MAGIC: u32 = 0x4358_564B;
/// The protocol version this build speaks.
pub const VERSION: u16 = 1;
/// Size of the frame header in bytes.
pub const HEADER_LEN: usize = 16;
/// Largest body a frame may carry (16 MiB); a header announcing more is refused before
/// anything is allocated.
pub const MAX_BODY: u32 = 16 << 20;

/// A decoded frame header. The magic is implied: a header with another magic does not
/// decode.
///
/// Unknown versions and kinds decode: the receiver answers them with an Error frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FrameHeader {
    /// Protocol version of the frame ([`VERSION`]).
    pub version: u16,
    /// Message kind (see [`kind`](super::kind)).
    pub kind: u16,
    /// Body bytes following the header (at most [`MAX_BODY`]).
    pub len: u32,
    /// 0 for unsolicited frames; a reply echoes the request's id.
    pub request_id: u32,
}

impl FrameHeader {
    /// The header of a version-[`VERSION`] frame.
    pub fn new(kind: u16, len: u32, request_id: u32) -> FrameHeader {
        FrameHeader {
            version: VERSION,
            kind,
            len,
            request_id,
        }
    }

    /// The 16 wire bytes of this header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        out[4..6].copy_from_slice(&self.version.to_le_bytes());
        out[6..8].copy_from_slice(&self.kind.to_le_bytes());
        out[8..12].copy_from_slice(&self.len.to_le_bytes());
        out[12..16].copy_from_slice(&self.request_id.to_le_bytes());
        out
    }

    /// Decodes a header. Errors: [`ControlError::BadMagic`], [`ControlError::BodyTooLong`].
    /// Any version and kind are accepted here (see [`FrameHeader::check_version`]).
    pub fn decode(bytes: &[u8; HEADER_LEN]) -> Result<FrameHeader, ControlError> {
        let magic = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        if magic != MAGIC {
            return Err(ControlError::BadMagic { found: magic });
        }
        let header = FrameHeader {
            version: u16::from_le_bytes([bytes[4], bytes[5]]),
            kind: u16::from_le_bytes([bytes[6], bytes[7]]),
            len: u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]),
            request_id: u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]),
        };
        if header.len > MAX_BODY {
            return Err(ControlError::BodyTooLong {
                len: header.len.into(),
                max: MAX_BODY,
            });
        }
        Ok(header)
    }

    /// `Err(UnsupportedVersion)` unless the frame is of the version this build speaks.
    pub fn check_version(&self) -> Result<(), ControlError> {
        if self.version == VERSION {
            Ok(())
        } else {
            Err(ControlError::UnsupportedVersion {
                version: self.version,
                supported: VERSION,
            })
        }
    }
}

/// The wire bytes of one frame (header and body) carrying `message`.
///
/// Errors: [`ControlError::BodyTooLong`] if the body exceeds [`MAX_BODY`].
pub fn encode_frame(message: &Message, request_id: u32) -> Result<Vec<u8>, ControlError> {
    let (kind, body) = message.encode();
    frame_bytes(kind, request_id, &body)
}

/// Header + body in one buffer, so that a frame is one `write` call.
pub(crate) fn frame_bytes(
    kind: u16,
    request_id: u32,
    body: &[u8],
) -> Result<Vec<u8>, ControlError> {
    let len = u32::try_from(body.len())
        .ok()
        .filter(|&len| len <= MAX_BODY)
        .ok_or(ControlError::BodyTooLong {
            len: body.len() as u64,
            max: MAX_BODY,
        })?;
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&FrameHeader::new(kind, len, request_id).encode());
    out.extend_from_slice(body);
    Ok(out)
}

/// Reads one header. `Ok(None)` when the stream ended cleanly before its first byte.
pub(crate) fn read_header<R: Read>(reader: &mut R) -> Result<Option<FrameHeader>, ControlError> {
    let mut buf = [0u8; HEADER_LEN];
    let mut filled = 0;
    while filled < HEADER_LEN {
        match reader.read(&mut buf[filled..]) {
            Ok(0) if filled == 0 => return Ok(None),
            Ok(0) => {
                return Err(ControlError::Truncated {
                    expected: HEADER_LEN as u64,
                    got: filled as u64,
                })
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ControlError::io("reading a frame header", e)),
        }
    }
    FrameHeader::decode(&buf).map(Some)
}

/// Reads a body of `len` bytes. The buffer grows as bytes arrive, so a peer that announces
/// a large body and sends nothing does not make this side allocate it.
pub(crate) fn read_body<R: Read>(reader: &mut R, len: u32) -> Result<Vec<u8>, ControlError> {
    let mut body = Vec::with_capacity((len as usize).min(64 * 1024));
    let got = reader
        .take(len.into())
        .read_to_end(&mut body)
        .map_err(|e| ControlError::io("reading a frame body", e))?;
    if got < len as usize {
        return Err(ControlError::Truncated {
            expected: len.into(),
            got: got as u64,
        });
    }
    Ok(body)
}

/// Reads and discards a body of `len` bytes.
pub(crate) fn skip_body<R: Read>(reader: &mut R, len: u32) -> Result<(), ControlError> {
    let got = io::copy(&mut reader.take(len.into()), &mut io::sink())
        .map_err(|e| ControlError::io("skipping a frame body", e))?;
    if got < u64::from(len) {
        return Err(ControlError::Truncated {
            expected: len.into(),
            got,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn magic_is_kvxc_on_the_wire() {
        let bytes = FrameHeader::new(5, 8, 7).encode();
        assert_eq!(&bytes[0..4], b"KVXC");
        assert_eq!(
            bytes,
            [b'K', b'V', b'X', b'C', 1, 0, 5, 0, 8, 0, 0, 0, 7, 0, 0, 0]
        );
    }

    #[test]
    fn bad_magic_and_long_bodies_are_refused() {
        let mut bytes = FrameHeader::new(1, 0, 0).encode();
        bytes[0] = b'X';
        assert!(matches!(
            FrameHeader::decode(&bytes),
            Err(ControlError::BadMagic { .. })
        ));
        let bytes = FrameHeader::new(1, MAX_BODY + 1, 0).encode();
        assert!(matches!(
            FrameHeader::decode(&bytes),
            Err(ControlError::BodyTooLong { len, .. }) if len == u64::from(MAX_BODY) + 1
        ));
        assert!(FrameHeader::decode(&FrameHeader::new(1, MAX_BODY, 0).encode()).is_ok());
    }

    #[test]
    fn unknown_versions_and_kinds_decode() {
        let header = FrameHeader {
            version: 9,
            kind: 999,
            len: 3,
            request_id: 4,
        };
        let decoded = FrameHeader::decode(&header.encode()).unwrap();
        assert_eq!(decoded, header);
        assert!(matches!(
            decoded.check_version(),
            Err(ControlError::UnsupportedVersion { version: 9, .. })
        ));
    }

    #[test]
    fn reading_distinguishes_clean_end_from_truncation() {
        assert_eq!(read_header(&mut &[][..]).unwrap(), None);
        let bytes = FrameHeader::new(5, 8, 1).encode();
        assert!(matches!(
            read_header(&mut &bytes[..10]),
            Err(ControlError::Truncated {
                expected: 16,
                got: 10
            })
        ));
        assert!(matches!(
            read_body(&mut &[1u8, 2, 3][..], 8),
            Err(ControlError::Truncated {
                expected: 8,
                got: 3
            })
        ));
        assert!(matches!(
            skip_body(&mut &[1u8, 2, 3][..], 4),
            Err(ControlError::Truncated {
                expected: 4,
                got: 3
            })
        ));
        assert_eq!(
            read_body(&mut &[1u8, 2, 3, 4][..], 3).unwrap(),
            vec![1, 2, 3]
        );
    }

    #[test]
    fn encode_frame_puts_header_and_body_together() {
        let frame = encode_frame(&Message::Probe { nonce: 0x0102 }, 77).unwrap();
        assert_eq!(frame.len(), HEADER_LEN + 8);
        let header = FrameHeader::decode(frame[..HEADER_LEN].try_into().unwrap()).unwrap();
        assert_eq!(header, FrameHeader::new(5, 8, 77));
        assert_eq!(
            Message::decode(header.kind, &frame[HEADER_LEN..]).unwrap(),
            Message::Probe { nonce: 0x0102 }
        );
    }

    proptest! {
        #[test]
        fn header_round_trips(version: u16, kind: u16, len in 0..=MAX_BODY, request_id: u32) {
            let header = FrameHeader { version, kind, len, request_id };
            prop_assert_eq!(FrameHeader::decode(&header.encode()).unwrap(), header);
        }

        #[test]
        fn header_decode_never_panics_and_re_encodes_exactly(bytes: [u8; HEADER_LEN]) {
            if let Ok(header) = FrameHeader::decode(&bytes) {
                prop_assert_eq!(header.encode(), bytes);
            }
        }
    }
}
