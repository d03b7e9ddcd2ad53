//! The control plane's decoders on arbitrary input: the first 16 bytes as a frame header,
//! the rest as the body of every message kind (and of the kind the header names). Nothing
//! panics; a header that decodes re-encodes to the same 16 bytes; a message that decodes
//! re-encodes (with its own kind) to a body that decodes to the same message and keeps
//! the bounds (descriptors validate, RDMA QP numbers and PSNs fit 24 bits); refusals name
//! the kind they concern.

#![no_main]

use kvxfer::control::{ControlError, FrameHeader, Message, HEADER_LEN, MAX_BODY, RDMA_MTUS};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (header, body) = if data.len() >= HEADER_LEN {
        data.split_at(HEADER_LEN)
    } else {
        (&[][..], data)
    };
    let mut header_kind = None;
    if let Ok(bytes) = <&[u8; HEADER_LEN]>::try_from(header) {
        match FrameHeader::decode(bytes) {
            Ok(decoded) => {
                assert!(decoded.len <= MAX_BODY);
                assert_eq!(
                    &decoded.encode(),
                    bytes,
                    "header does not re-encode exactly"
                );
                header_kind = Some(decoded.kind);
            }
            Err(ControlError::BadMagic { found }) => {
                assert_eq!(found.to_le_bytes(), bytes[..4], "wrong magic reported")
            }
            Err(ControlError::BodyTooLong { len, max }) => assert!(len > u64::from(max)),
            Err(other) => panic!("header {bytes:?} refused with {other:?}"),
        }
    }
    // Every known kind (1 to 14) and one unknown kind on each side.
    for kind in (0..=15).chain(header_kind) {
        check(kind, body);
    }
});

fn check(kind: u16, body: &[u8]) {
    match Message::decode(kind, body) {
        Ok(message) => {
            match &message {
                Message::Handshake(d) | Message::HandshakeReply(d) | Message::Refresh(d) => {
                    if let Err(e) = d.validate() {
                        panic!("a decoded descriptor does not validate: {e}")
                    }
                    for key in &d.rkeys {
                        assert!(usize::from(key.nic) < d.rdma_nics.len());
                    }
                    for nic in &d.rdma_nics {
                        assert!(RDMA_MTUS.contains(&nic.mtu));
                    }
                }
                Message::RdmaConnect(r) => {
                    assert!(r.validate().is_ok(), "{r:?}");
                    assert!(r.qpn < 1 << 24 && r.psn < 1 << 24, "{r:?}");
                    assert!(RDMA_MTUS.contains(&r.initiator.mtu), "{r:?}");
                }
                Message::RdmaConnectReply(r) => {
                    assert!(r.validate().is_ok(), "{r:?}");
                    assert!(r.qpn < 1 << 24 && r.psn < 1 << 24, "{r:?}");
                }
                _ => {}
            }
            let (again_kind, again) = message.encode();
            assert_eq!(again_kind, kind, "{message:?} encodes with another kind");
            match Message::decode(kind, &again) {
                Ok(decoded) => assert_eq!(decoded, message, "re-encoding changed the message"),
                Err(e) => panic!("{message:?} re-encodes to a body that is refused: {e}"),
            }
        }
        Err(ControlError::UnknownKind { kind: k }) => {
            assert_eq!(k, kind);
            assert!(
                !(1..=14).contains(&kind),
                "known kind {kind} refused as unknown"
            );
        }
        Err(ControlError::Malformed { kind: k, reason }) => {
            assert_eq!(k, kind);
            assert!(!reason.is_empty(), "no reason for a malformed {kind} body");
        }
        Err(other) => panic!("body of kind {kind} refused with {other:?}"),
    }
}
