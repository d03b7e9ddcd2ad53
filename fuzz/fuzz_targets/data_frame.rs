//! The data-lane wire decoders (`transport::tcp::wire`) on arbitrary input: the first 24
//! bytes as a header, the rest as request entries, and the whole input as a frame image.
//! Nothing panics. A header that decodes obeys its kind's limits and re-encodes to the same
//! 24 bytes, which decode to the same header; refusals name what was wrong (the magic or
//! version found, the unknown kind). Entries that decode are whole, non-empty, do not wrap,
//! stay within the count and byte limits, add up to the returned total and re-encode to
//! the same bytes. `decode_frame` agrees with the two decoders above.

#![no_main]

use kvxfer::transport::tcp::wire::{
    decode_entries, decode_frame, Entry, Header, Kind, WireError, ENTRY_LEN, HEADER_LEN, MAGIC,
    MAX_ENTRIES, MAX_GROUP_BYTES, MAX_MESSAGE, VERSION,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let header = data
        .get(..HEADER_LEN)
        .map(|h| <&[u8; HEADER_LEN]>::try_from(h).expect("24 bytes"));
    let decoded = header.map(check_header);
    let body = data.get(HEADER_LEN..).unwrap_or(&[]);
    let entries = check_entries(body);
    check_frame(data, decoded, body);
    // The entries decoder on every whole-entry prefix of the body agrees with the whole.
    if let Ok((all, total)) = &entries {
        let n = all.len() / 2;
        let mut half = Vec::new();
        let half_total = decode_entries(&body[..n * ENTRY_LEN], &mut half).expect("a prefix");
        assert_eq!(half[..], all[..n]);
        assert!(half_total <= *total);
    }
});

/// `Header::decode` on 24 bytes: limits per kind, exact re-encoding, precise refusals.
fn check_header(bytes: &[u8; HEADER_LEN]) -> Option<Header> {
    let magic = u32::from_le_bytes(bytes[0..4].try_into().unwrap());
    let version = u16::from_le_bytes([bytes[4], bytes[5]]);
    let kind = u16::from_le_bytes([bytes[6], bytes[7]]);
    match Header::decode(bytes) {
        Ok(h) => {
            assert_eq!(magic, MAGIC);
            assert_eq!(version, VERSION);
            assert_eq!(h.kind as u16, kind);
            match h.kind {
                Kind::Write | Kind::Read => {
                    assert!((1..=MAX_ENTRIES).contains(&h.count), "{h:?}");
                    assert_eq!(h.status, 0, "{h:?}");
                }
                Kind::Ack | Kind::ReadData => assert_eq!((h.count, h.status), (0, 0), "{h:?}"),
                Kind::Error => assert!(h.count <= MAX_MESSAGE, "{h:?}"),
            }
            let again = h.encode();
            assert_eq!(&again, bytes, "{h:?} does not re-encode to its bytes");
            assert_eq!(
                Header::decode(&again),
                Ok(h),
                "re-encoded {h:?} decodes differently"
            );
            Some(h)
        }
        Err(WireError::BadMagic(found)) => {
            assert_eq!(found, magic);
            assert_ne!(found, MAGIC);
            None
        }
        Err(WireError::Version(found)) => {
            assert_eq!(magic, MAGIC);
            assert_eq!(found, version);
            assert_ne!(found, VERSION);
            None
        }
        Err(WireError::UnknownKind(found)) => {
            assert_eq!((magic, version), (MAGIC, VERSION));
            assert_eq!(found, kind);
            assert!(!(1..=5).contains(&found), "known kind {found} refused");
            None
        }
        Err(e @ (WireError::TooMany { .. } | WireError::NonZero { .. })) => {
            assert_eq!((magic, version), (MAGIC, VERSION));
            assert!((1..=5).contains(&kind), "{e}");
            assert!(!e.to_string().is_empty());
            None
        }
        Err(e @ (WireError::BadEntry { .. } | WireError::Truncated { .. })) => {
            panic!("a header refused with {e}")
        }
    }
}

/// `decode_entries` on any bytes: what it accepts, and exact re-encoding.
fn check_entries(body: &[u8]) -> Result<(Vec<Entry>, u64), WireError> {
    // The output is cleared first.
    let mut out = vec![Entry { addr: 1, len: 1 }];
    match decode_entries(body, &mut out) {
        Ok(total) => {
            assert_eq!(body.len() % ENTRY_LEN, 0);
            assert_eq!(out.len(), body.len() / ENTRY_LEN);
            assert!(out.len() <= MAX_ENTRIES as usize);
            assert!(total <= MAX_GROUP_BYTES);
            assert_eq!(total, out.iter().map(|e| u64::from(e.len)).sum::<u64>());
            for e in &out {
                assert!(e.len > 0, "{e:?}");
                assert!(e.addr.checked_add(u64::from(e.len)).is_some(), "{e:?}");
            }
            let mut again = Vec::new();
            out.iter().for_each(|e| e.encode_into(&mut again));
            assert_eq!(again, body, "entries do not re-encode to their bytes");
            let mut twice = Vec::new();
            assert_eq!(decode_entries(&again, &mut twice), Ok(total));
            assert_eq!(twice, out);
            Ok((out, total))
        }
        Err(WireError::BadEntry { index, reason }) => {
            assert!(!reason.is_empty());
            assert!(
                index <= body.len() / ENTRY_LEN,
                "index {index} past the input"
            );
            assert!(
                out.len() <= index,
                "{} entries kept before bad entry {index}",
                out.len()
            );
            Err(WireError::BadEntry { index, reason })
        }
        Err(e) => panic!("entries refused with {e}"),
    }
}

/// `decode_frame` agrees with `Header::decode` and `decode_entries`, and refuses truncated
/// images (shorter than a header, or than the entries a request announces).
fn check_frame(data: &[u8], header: Option<Option<Header>>, body: &[u8]) {
    let Ok((h, entries)) = decode_frame(data) else {
        // Refused although the header and all announced entries are present and valid?
        if let Some(Some(h)) = header {
            if matches!(h.kind, Kind::Write | Kind::Read) {
                let want = h.count as usize * ENTRY_LEN;
                if body.len() >= want {
                    let mut out = Vec::new();
                    assert!(
                        decode_entries(&body[..want], &mut out).is_err(),
                        "decode_frame refused a valid {h:?}"
                    );
                }
            } else {
                panic!("decode_frame refused a valid {h:?}");
            }
        }
        return;
    };
    match header {
        Some(Some(expected)) => assert_eq!(h, expected),
        Some(None) => panic!("decode_frame accepted a header that Header::decode refuses"),
        None => panic!("decode_frame accepted {} bytes, less than a header", data.len()),
    }
    if matches!(h.kind, Kind::Write | Kind::Read) {
        assert_eq!(entries.len(), h.count as usize, "a truncated frame was accepted");
        let mut expected = Vec::new();
        decode_entries(&body[..entries.len() * ENTRY_LEN], &mut expected)
            .expect("decode_frame's entries decode");
        assert_eq!(entries, expected);
    } else {
        assert!(entries.is_empty(), "a {:?} frame with entries", h.kind);
    }
}
