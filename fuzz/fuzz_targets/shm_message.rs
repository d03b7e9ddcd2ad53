//! The shared-memory control messages (`transport::shm::wire`) on arbitrary datagrams: the
//! input as it is, and the input behind a valid header of the kind its first byte picks
//! (so that every body decoder is reached at once). Nothing panics. A datagram that decodes
//! is at most `MAX_MESSAGE` bytes, re-encodes to the same bytes, which decode to the same
//! request id and message; its fields keep their limits (Attached and AttachedCuda:
//! non-zero, non-wrapping region, odd generation, known access bits, slot within the table;
//! Attached: map within the file, page-aligned; AttachedCuda: non-wrapping offset, a
//! non-empty PCI bus id of hex digits, ':' and '.', NUL-padded) and `fds()` matches its
//! kind. Refusals agree with the header bytes: `Truncated` only below 16 bytes,
//! `BadMagic`/`Version`/`NonZeroFlags`/`UnknownKind` carry what was found (an unknown kind
//! is never 1 to 8), `BadLength` reports the body's length for a known
//! kind, `Invalid` names a known kind whose body has its length. Finally a `Refused` built
//! from the input's text encodes within `MAX_MESSAGE`, its reason cut to the longest prefix
//! that fits at a char boundary.

#![no_main]

use kvxfer::transport::shm::wire::{
    decode, Attachment, CudaAttachment, MapKind, Message, ShmWireError, ATTACHED_CUDA_LEN,
    HEADER_LEN, MAGIC, MAX_MESSAGE, MAX_PROOF_LEN, MAX_REASON, MAX_TABLE_SLOTS, MIN_PROOF_LEN,
    VERSION,
};
use libfuzzer_sys::fuzz_target;

/// Kinds 1 to 8: name and body length (`None`: variable, Refused).
const KINDS: [(&str, Option<usize>); 8] = [
    ("Hello", Some(32)),
    ("HelloReply", Some(32)),
    ("Confirm", Some(16)),
    ("Proven", Some(0)),
    ("Attach", Some(8)),
    ("Attached", Some(56)),
    ("Refused", None),
    ("AttachedCuda", Some(120)),
];

fuzz_target!(|data: &[u8]| {
    check(data);
    if let Some((&pick, rest)) = data.split_first() {
        let kind = pick % 10; // 0 and 9 stay unknown
        let mut framed = MAGIC.to_vec();
        framed.extend_from_slice(&[VERSION, kind, 0, 0]);
        framed.extend_from_slice(
            &u64::from(pick)
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .to_le_bytes(),
        );
        framed.extend_from_slice(rest);
        check(&framed);
    }
    check_cut(data);
});

fn known(kind: u8) -> Option<(&'static str, Option<usize>)> {
    KINDS.get(usize::from(kind).checked_sub(1)?).copied()
}

/// `decode` on one datagram, accepted or refused.
fn check(data: &[u8]) {
    let magic: Option<[u8; 4]> = data.get(..4).map(|m| m.try_into().unwrap());
    let version = data.get(4).copied();
    let kind = data.get(5).copied();
    let flags = data.get(6..8).map(|f| u16::from_le_bytes([f[0], f[1]]));
    let req = data
        .get(8..16)
        .map(|r| u64::from_le_bytes(r.try_into().unwrap()));
    let body = data.len().saturating_sub(HEADER_LEN);
    // The header checks that must have passed for a refusal past them.
    let header_ok = |upto: usize| {
        assert!(data.len() >= HEADER_LEN);
        assert_eq!(magic, Some(MAGIC));
        if upto > 0 {
            assert_eq!(version, Some(VERSION));
        }
        if upto > 1 {
            assert_eq!(flags, Some(0));
        }
        if upto > 2 {
            assert!(known(kind.unwrap()).is_some(), "kind {kind:?} passed");
        }
    };
    match decode(data) {
        Ok((id, m)) => {
            header_ok(3);
            assert!(data.len() <= MAX_MESSAGE, "{} bytes accepted", data.len());
            assert_eq!(Some(id), req);
            assert_eq!(Some(m.kind()), kind);
            let (name, len) = known(m.kind()).unwrap();
            assert_eq!(m.kind_name(), name);
            if let Some(len) = len {
                assert_eq!(body, len, "{m:?}");
            }
            check_limits(&m, body);
            assert_eq!(m.validate(), Ok(()), "{m:?}");
            let again = m.encode(id);
            assert_eq!(again, data, "{m:?} does not re-encode to its bytes");
            assert_eq!(decode(&again), Ok((id, m)));
        }
        Err(e) => {
            let text = e.to_string();
            assert!(!text.is_empty());
            match e {
                ShmWireError::Truncated { len } => {
                    assert_eq!(len, data.len());
                    assert!(len < HEADER_LEN);
                }
                ShmWireError::BadMagic(found) => {
                    assert!(data.len() >= HEADER_LEN);
                    assert_eq!(Some(found), magic);
                    assert_ne!(found, MAGIC);
                }
                ShmWireError::Version(found) => {
                    header_ok(0);
                    assert_eq!(Some(found), version);
                    assert_ne!(found, VERSION);
                    assert!(text.contains(&format!("version {found}")), "{text}");
                }
                ShmWireError::NonZeroFlags(found) => {
                    header_ok(1);
                    assert_eq!(Some(found), flags);
                    assert_ne!(found, 0);
                }
                ShmWireError::UnknownKind(found) => {
                    header_ok(2);
                    assert_eq!(Some(found), kind);
                    assert!(!(1..=8).contains(&found), "known kind {found} refused");
                    assert!(text.contains(&format!("kind {found}")), "{text}");
                }
                ShmWireError::BadLength {
                    kind: name,
                    expected,
                    found,
                } => {
                    header_ok(3);
                    let (known_name, len) = known(kind.unwrap()).unwrap();
                    assert_eq!(name, known_name);
                    assert_eq!(found, body, "{text}");
                    assert_ne!(expected, found, "{text}");
                    match len {
                        Some(len) => assert_eq!(expected, len, "{text}"),
                        // Refused: the shortest body, the longest, or what reason_len says.
                        None if body < 8 => assert_eq!(expected, 8, "{text}"),
                        None if body > 8 + MAX_REASON => {
                            assert_eq!(expected, 8 + MAX_REASON, "{text}")
                        }
                        None => {
                            let at = HEADER_LEN + 4;
                            let reason_len =
                                u32::from_le_bytes(data[at..at + 4].try_into().unwrap());
                            assert_eq!(expected as u64, 8 + u64::from(reason_len), "{text}");
                        }
                    }
                    assert!(text.starts_with(name), "{text}");
                }
                ShmWireError::Invalid {
                    kind: name,
                    ref reason,
                } => {
                    header_ok(3);
                    let (known_name, len) = known(kind.unwrap()).unwrap();
                    assert_eq!(name, known_name);
                    assert!(!reason.is_empty());
                    assert!(text.contains(name), "{text}");
                    match len {
                        Some(len) => assert_eq!(body, len, "{text}"),
                        None => assert!((8..=8 + MAX_REASON).contains(&body), "{text}"),
                    }
                    // Hello, Confirm and Proven have no field that could be out of limits.
                    assert!(!matches!(name, "Proven" | "Confirm" | "Hello"), "{text}");
                }
            }
        }
    }
}

/// The limits every accepted message keeps, checked here independently of the decoder.
fn check_limits(m: &Message, body: usize) {
    let fds = match m {
        Message::HelloReply {
            proof_addr,
            proof_len,
            table_slots,
            ..
        } => {
            assert_ne!(*proof_addr, 0);
            assert!((MIN_PROOF_LEN..=MAX_PROOF_LEN).contains(proof_len), "{m:?}");
            assert!((1..=MAX_TABLE_SLOTS).contains(table_slots), "{m:?}");
            2
        }
        Message::Attach { addr } => {
            assert_ne!(*addr, 0);
            0
        }
        Message::Attached(a) => check_attachment(a),
        Message::AttachedCuda(a) => {
            assert_eq!(body, ATTACHED_CUDA_LEN);
            check_cuda_attachment(a)
        }
        Message::Refused { reason, .. } => {
            assert!(reason.len() <= MAX_REASON);
            assert_eq!(body, 8 + reason.len());
            0
        }
        Message::Hello { .. } | Message::Confirm { .. } | Message::Proven => 0,
    };
    assert_eq!(m.fds(), fds, "{m:?}");
}

/// An attachment's invariants; returns the fds its message carries.
fn check_attachment(a: &Attachment) -> usize {
    assert_ne!(a.addr, 0, "{a:?}");
    assert_ne!(a.len, 0, "{a:?}");
    assert!(a.addr.checked_add(a.len).is_some(), "{a:?}");
    assert_eq!(a.gen % 2, 1, "{a:?}");
    assert_eq!(a.access & !0b1111, 0, "{a:?}");
    assert!(a.slot < MAX_TABLE_SLOTS, "{a:?}");
    match a.map {
        MapKind::None => 0,
        MapKind::ReadOnly { offset, file_len } | MapKind::ReadWrite { offset, file_len } => {
            assert_eq!(offset % 4096, 0, "{a:?}");
            let end = offset.checked_add(a.len).expect("map end overflows");
            assert!(end <= file_len, "{a:?}");
            1
        }
    }
}

/// A GPU attachment's invariants; returns the fds its message carries (none).
fn check_cuda_attachment(a: &CudaAttachment) -> usize {
    assert_ne!(a.addr, 0, "{a:?}");
    assert_ne!(a.len, 0, "{a:?}");
    assert!(a.addr.checked_add(a.len).is_some(), "{a:?}");
    assert!(a.offset.checked_add(a.len).is_some(), "{a:?}");
    assert_eq!(a.gen % 2, 1, "{a:?}");
    assert_eq!(a.access & !0b1111, 0, "{a:?}");
    assert!(a.slot < MAX_TABLE_SLOTS, "{a:?}");
    // The id: 1 to 16 bytes of hex digits, ':' and '.', then only NULs.
    let id = a.pci_bus_id();
    assert!(!id.is_empty() && id.len() <= 16, "{a:?}");
    assert!(
        id.bytes()
            .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.'),
        "{a:?}"
    );
    assert_eq!(&a.pci_bus_id[..id.len()], id.as_bytes());
    assert!(a.pci_bus_id[id.len()..].iter().all(|&b| b == 0), "{a:?}");
    assert_eq!(CudaAttachment::with_pci_bus_id(id), Some(a.pci_bus_id));
    0
}

/// A `Refused` carrying the input as text: encodes within `MAX_MESSAGE`, and its reason
/// comes back cut to the longest char-boundary prefix of at most `MAX_REASON` bytes.
fn check_cut(data: &[u8]) {
    // An odd first byte repeats the text past MAX_REASON (lossy text is never shorter).
    let times = match data.first() {
        Some(b) if b % 2 == 1 => MAX_REASON / data.len() + 1,
        _ => 1,
    };
    let reason = String::from_utf8_lossy(data).repeat(times);
    let m = Message::Refused {
        code: data.len() as u32,
        reason: reason.clone(),
    };
    let bytes = m.encode(7);
    assert!(bytes.len() <= MAX_MESSAGE);
    let Ok((7, Message::Refused { code, reason: got })) = decode(&bytes) else {
        panic!("an encoded Refused does not decode");
    };
    assert_eq!(code, data.len() as u32);
    assert!(reason.starts_with(&got));
    assert!(got.len() <= MAX_REASON);
    assert_eq!(m.validate().is_ok(), got.len() == reason.len());
    if let Some(next) = reason[got.len()..].chars().next() {
        assert!(got.len() + next.len_utf8() > MAX_REASON, "cut too early");
    }
}
