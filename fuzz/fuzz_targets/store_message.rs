//! The store's request and reply decoders (`store::wire`) on arbitrary bodies, and on the
//! input behind a valid version byte and the kind its first byte picks (every request
//! and reply kind, and unknown kinds on both sides), so that every body decoder is
//! reached. Nothing panics. An accepted body is within `MAX_MESSAGE` (and the largest
//! request or reply), keeps every limit (at most `MAX_ITEMS` items, keys of 1 to
//! `MAX_KEY` bytes, non-zero Reserve lengths, refused reservations never `Ok`, missing
//! lookups only `NotFound` or `Failed`, found objects non-empty and not wrapping, Error
//! reasons within `MAX_REASON`), validates, and re-encodes to the very same bytes, whose
//! length `encoded_len` predicts. A decoded request is answered by a server-like reply
//! that `reply_matches` accepts and that fits `max_reply_len`, and a miscounted or
//! wrong-kind reply is rejected; a decoded reply matches a request of its kind and count
//! and nothing else. Refusals agree with the input: the version and kind found, counts
//! above the limit or past the end, bad keys only in requests, bad statuses only in
//! replies, and trailing bytes after a prefix that decodes. An Error reply of the input's
//! text is cut to `MAX_REASON` at a char boundary, and `batch_ranges` over keys whose
//! lengths the input gives covers the batch in chunks within both limits.

#![no_main]

use kvxfer::store::wire::{
    batch_ranges, check_key, encoded_len_of_keys, kind, reply_matches, ItemStatus, LookupItem,
    Reply, Request, ReserveItem, StoreStats, StoreWireError, MAX_ITEMS, MAX_KEY, MAX_MESSAGE,
    MAX_REASON, MAX_REPLY_LEN, MAX_REQUEST_LEN, VERSION,
};
use libfuzzer_sys::fuzz_target;

/// Kinds the first byte picks from: every known kind of both sides and their unknown
/// neighbours.
const KINDS: [u8; 21] = [
    0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89,
];

fuzz_target!(|data: &[u8]| {
    check_request(data);
    check_reply(data);
    if let Some((&pick, rest)) = data.split_first() {
        let mut framed = vec![VERSION, KINDS[usize::from(pick) % KINDS.len()]];
        framed.extend_from_slice(rest);
        check_request(&framed);
        check_reply(&framed);
    }
    check_cut(data);
    check_batches(data);
});

fn check_request(data: &[u8]) {
    let request = match Request::decode(data) {
        Ok(request) => request,
        Err(e) => return check_refusal(data, e, "request"),
    };
    assert!(data.len() <= MAX_MESSAGE && data.len() <= MAX_REQUEST_LEN);
    assert_eq!(data[0], VERSION);
    assert_eq!(data[1], request.kind());
    assert!(kind::is_request(data[1]));
    assert_eq!(request.kind_name(), kind::name(data[1]));
    assert!(request.len() <= MAX_ITEMS, "{} items", request.len());
    match &request {
        Request::Reserve { items } => {
            for (key, len) in items {
                assert_eq!(check_key(key), Ok(()));
                assert_ne!(*len, 0);
            }
        }
        Request::Commit { items } | Request::Abort { items } => {
            for (key, _) in items {
                assert_eq!(check_key(key), Ok(()));
            }
        }
        Request::Lookup { keys } | Request::Exists { keys } | Request::Remove { keys } => {
            for key in keys {
                assert_eq!(check_key(key), Ok(()));
            }
        }
        Request::Release { .. } | Request::RemoveAll | Request::Stats => {}
    }
    assert_eq!(request.validate(), Ok(()), "{request:?}");
    assert_eq!(request.encoded_len(), data.len());
    assert_eq!(
        request.encode(),
        data,
        "{request:?} does not re-encode to its bytes"
    );
    assert!(request.max_reply_len() <= MAX_REPLY_LEN);

    // A server's answer is accepted; one item more, or a reply of another kind, is not.
    let reply = server_reply(&request, data);
    assert_eq!(reply.validate(), Ok(()), "{reply:?}");
    assert!(reply.encoded_len() <= request.max_reply_len(), "{reply:?}");
    let reply = Reply::decode(&reply.encode()).expect("a valid reply decodes");
    assert_eq!(reply_matches(&request, &reply), Ok(()));
    assert_eq!(reply_matches(&request, &Reply::error(1, "no")), Ok(()));
    if let Some(more) = one_more(&reply) {
        assert!(matches!(
            reply_matches(&request, &more),
            Err(StoreWireError::CountMismatch { .. })
        ));
    }
    let other = if reply == Reply::Done {
        Reply::RemovedAll(0)
    } else {
        Reply::Done
    };
    assert!(matches!(
        reply_matches(&request, &other),
        Err(StoreWireError::KindMismatch { .. })
    ));
}

fn check_reply(data: &[u8]) {
    let reply = match Reply::decode(data) {
        Ok(reply) => reply,
        Err(e) => return check_refusal(data, e, "reply"),
    };
    assert!(data.len() <= MAX_MESSAGE && data.len() <= MAX_REPLY_LEN);
    assert_eq!(data[0], VERSION);
    assert_eq!(data[1], reply.kind());
    assert!(kind::is_reply(data[1]));
    assert_eq!(reply.kind_name(), kind::name(data[1]));
    if let Some(n) = reply.items() {
        assert!(n <= MAX_ITEMS, "{n} items");
    }
    match &reply {
        Reply::Reserved(items) => {
            for item in items {
                assert_ne!(*item, ReserveItem::Refused(ItemStatus::Ok));
            }
        }
        Reply::Found { items, .. } => {
            for item in items {
                match *item {
                    LookupItem::Found { addr, len, .. } => {
                        assert_ne!(len, 0);
                        assert!(addr.checked_add(len).is_some(), "{item:?}");
                    }
                    LookupItem::Missing(status) => assert!(
                        matches!(status, ItemStatus::NotFound | ItemStatus::Failed),
                        "{item:?}"
                    ),
                }
            }
        }
        Reply::Error { reason, .. } => assert!(reason.len() <= MAX_REASON),
        Reply::Statuses(_)
        | Reply::Existing(_)
        | Reply::Done
        | Reply::RemovedAll(_)
        | Reply::Stats(_) => {}
    }
    assert_eq!(reply.validate(), Ok(()), "{reply:?}");
    assert_eq!(reply.encoded_len(), data.len());
    assert_eq!(
        reply.encode(),
        data,
        "{reply:?} does not re-encode to its bytes"
    );

    // It answers a request of its kind and count, and no other.
    let n = reply.items().unwrap_or(0);
    let keys = |n: usize| vec![b"k".to_vec(); n];
    let pairs = |n: usize| vec![(b"k".to_vec(), 1); n];
    let request = |n: usize| match reply {
        Reply::Reserved(_) => Request::Reserve { items: pairs(n) },
        Reply::Statuses(_) => Request::Commit { items: pairs(n) },
        Reply::Found { .. } => Request::Lookup { keys: keys(n) },
        Reply::Existing(_) => Request::Exists { keys: keys(n) },
        Reply::Done => Request::Release { leases: vec![7; n] },
        Reply::RemovedAll(_) => Request::RemoveAll,
        Reply::Stats(_) | Reply::Error { .. } => Request::Stats,
    };
    assert_eq!(reply_matches(&request(n), &reply), Ok(()));
    let more = reply_matches(&request(n + 1), &reply);
    if reply.items().is_some() {
        assert!(matches!(more, Err(StoreWireError::CountMismatch { .. })));
    } else {
        assert_eq!(more, Ok(()));
    }
    let other = if matches!(reply, Reply::Done) {
        Request::Stats
    } else {
        Request::Release { leases: vec![] }
    };
    let wrong = reply_matches(&other, &reply);
    if matches!(reply, Reply::Error { .. }) {
        assert_eq!(wrong, Ok(()));
    } else {
        assert!(matches!(wrong, Err(StoreWireError::KindMismatch { .. })));
    }
}

/// A refusal agrees with the input it refused; `side` is `"request"` or `"reply"`.
fn check_refusal(data: &[u8], e: StoreWireError, side: &str) {
    let text = e.to_string();
    assert!(!text.is_empty());
    let known = |k: u8| {
        if side == "request" {
            kind::is_request(k)
        } else {
            kind::is_reply(k)
        }
    };
    // What must hold for a refusal inside a body: the header was fine.
    let in_body = |name: &str| {
        assert!(data.len() >= 2 && data.len() <= MAX_MESSAGE, "{text}");
        assert_eq!(data[0], VERSION, "{text}");
        assert!(known(data[1]), "{text}");
        assert_eq!(name, kind::name(data[1]), "{text}");
    };
    match e {
        StoreWireError::TooLong { len } => {
            assert_eq!(len, data.len());
            assert!(len > MAX_MESSAGE);
        }
        StoreWireError::Truncated {
            kind: name,
            needed,
            left,
            field,
        } => {
            assert!(needed > left, "{text}");
            if name == side {
                assert!(data.len() < 2, "{text}");
                assert_eq!(field, if data.is_empty() { "version" } else { "kind" });
            } else {
                in_body(name);
                assert!(left <= data.len() - 2, "{text}");
            }
        }
        StoreWireError::Version { found } => {
            assert_eq!(data.first(), Some(&found));
            assert_ne!(found, VERSION);
            assert!(text.contains(&format!("version {found}")), "{text}");
        }
        StoreWireError::UnknownKind { side: s, kind: k } => {
            assert_eq!(s, side);
            assert_eq!(data[0], VERSION);
            assert_eq!(data.get(1), Some(&k));
            assert!(!known(k), "known kind {k} refused");
            assert!(text.contains(&format!("kind {k}")), "{text}");
        }
        StoreWireError::TooMany {
            kind: name,
            count,
            limit,
            ..
        } => {
            in_body(name);
            assert_eq!(limit, MAX_ITEMS);
            assert!(count > limit, "{text}");
        }
        StoreWireError::CountPastEnd {
            kind: name,
            count,
            min_bytes,
            left,
            ..
        } => {
            in_body(name);
            assert!(count <= MAX_ITEMS && min_bytes > 0, "{text}");
            assert!(count * min_bytes > left && left < data.len(), "{text}");
        }
        StoreWireError::BadKey { item, len } => {
            assert_eq!(side, "request", "{text}");
            let (name, index) = item.expect("decoded keys are named");
            in_body(name);
            assert!(len == 0 || len > MAX_KEY, "{text}");
            assert!(index < MAX_ITEMS, "{text}");
        }
        StoreWireError::ZeroLength { .. } => {
            assert_eq!(side, "request");
            in_body("Reserve");
        }
        StoreWireError::BadStatus {
            kind: name, value, ..
        } => {
            assert_eq!(side, "reply", "{text}");
            in_body(name);
            assert!(matches!(name, "Reserved" | "Statuses" | "Found"), "{text}");
            assert!(ItemStatus::from_u8(value).is_none(), "{text}");
        }
        StoreWireError::StatusNotAllowed {
            kind: name, status, ..
        } => {
            // A decoded Reserved status 0 is a grant, so only Found gets here.
            in_body(name);
            assert_eq!(name, "Found", "{text}");
            assert!(
                !matches!(
                    status,
                    ItemStatus::Ok | ItemStatus::NotFound | ItemStatus::Failed
                ),
                "{text}"
            );
        }
        StoreWireError::BadBool { value, .. } => {
            in_body("Existing");
            assert!(value > 1, "{text}");
        }
        StoreWireError::BadExtent { addr, len, .. } => {
            in_body("Found");
            assert!(len == 0 || addr.checked_add(len).is_none(), "{text}");
        }
        StoreWireError::ReasonTooLong { len } => {
            in_body("Error");
            assert!(len > MAX_REASON, "{text}");
        }
        StoreWireError::ReasonNotUtf8 { valid_up_to } => {
            in_body("Error");
            assert!(valid_up_to < data.len(), "{text}");
        }
        StoreWireError::TrailingBytes { kind: name, count } => {
            in_body(name);
            assert!(count > 0 && count <= data.len() - 2, "{text}");
            // Without them, the body decodes.
            let whole = &data[..data.len() - count];
            if side == "request" {
                assert!(Request::decode(whole).is_ok(), "{text}");
            } else {
                assert!(Reply::decode(whole).is_ok(), "{text}");
            }
        }
        StoreWireError::KindMismatch { .. } | StoreWireError::CountMismatch { .. } => {
            panic!("a decoder refused with {e:?}")
        }
    }
}

/// A reply a well-behaved server could make to `request`, its choices drawn from `data`.
fn server_reply(request: &Request, data: &[u8]) -> Reply {
    let n = request.len();
    let byte = |i: usize| data.get(i % data.len().max(1)).copied().unwrap_or(0) ^ i as u8;
    match request {
        Request::Reserve { .. } => Reply::Reserved(
            (0..n)
                .map(|i| match ItemStatus::from_u8(byte(i) % 8) {
                    None | Some(ItemStatus::Ok) => ReserveItem::Granted {
                        addr: u64::from(byte(i)) << 12,
                        token: i as u64,
                    },
                    Some(status) => ReserveItem::Refused(status),
                })
                .collect(),
        ),
        Request::Commit { .. } | Request::Abort { .. } | Request::Remove { .. } => Reply::Statuses(
            (0..n)
                .map(|i| ItemStatus::ALL[usize::from(byte(i)) % ItemStatus::ALL.len()])
                .collect(),
        ),
        Request::Lookup { .. } => Reply::Found {
            lease_ms: u32::from(byte(0)) * 100,
            items: (0..n)
                .map(|i| match byte(i) % 3 {
                    0 => LookupItem::Missing(ItemStatus::NotFound),
                    1 => LookupItem::Missing(ItemStatus::Failed),
                    _ => LookupItem::Found {
                        addr: u64::MAX - 4096 * (i as u64 + 1),
                        len: 4096,
                        lease: i as u64,
                    },
                })
                .collect(),
        },
        Request::Exists { .. } => Reply::Existing((0..n).map(|i| byte(i) % 2 == 1).collect()),
        Request::Release { .. } => Reply::Done,
        Request::RemoveAll => Reply::RemovedAll(data.len() as u64),
        Request::Stats => {
            let mut stats = StoreStats {
                hits: data.len() as u64,
                ..StoreStats::default()
            };
            stats.add(&stats.clone());
            Reply::Stats(stats)
        }
    }
}

/// The reply with one item more, for per-item replies.
fn one_more(reply: &Reply) -> Option<Reply> {
    let mut reply = reply.clone();
    match &mut reply {
        Reply::Reserved(items) => items.push(ReserveItem::Refused(ItemStatus::NoSpace)),
        Reply::Statuses(statuses) => statuses.push(ItemStatus::Ok),
        Reply::Found { items, .. } => items.push(LookupItem::Missing(ItemStatus::NotFound)),
        Reply::Existing(answers) => answers.push(true),
        _ => return None,
    }
    Some(reply)
}

/// An Error carrying the input as text: its reason comes back cut to the longest
/// char-boundary prefix of at most `MAX_REASON` bytes, the same whether cut by
/// `Reply::error` or by `encode`.
fn check_cut(data: &[u8]) {
    // An odd first byte repeats the text past MAX_REASON (lossy text is never shorter).
    let times = match data.first() {
        Some(b) if b % 2 == 1 => MAX_REASON / data.len() + 1,
        _ => 1,
    };
    let reason = String::from_utf8_lossy(data).repeat(times);
    let code = data.len() as u16;
    let long = Reply::Error {
        code,
        reason: reason.clone(),
    };
    let cut = Reply::error(code, reason.clone());
    assert_eq!(cut.validate(), Ok(()));
    assert_eq!(long.validate().is_ok(), reason.len() <= MAX_REASON);
    let bytes = long.encode();
    assert_eq!(bytes, cut.encode());
    assert_eq!(bytes.len(), long.encoded_len());
    let Ok(Reply::Error {
        code: got_code,
        reason: got,
    }) = Reply::decode(&bytes)
    else {
        panic!("an encoded Error does not decode");
    };
    assert_eq!(got_code, code);
    assert!(reason.starts_with(&got));
    assert!(got.len() <= MAX_REASON);
    if let Some(next) = reason[got.len()..].chars().next() {
        assert!(got.len() + next.len_utf8() > MAX_REASON, "cut too early");
    }
}

/// `batch_ranges` over keys whose lengths are the input's bytes (plus one), with an
/// extra per item that the first byte picks (large ones make the byte limit bind).
fn check_batches(data: &[u8]) {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let extra = match pick % 4 {
        0 => 0,
        1 => 8,
        _ => usize::from(pick) << 14, // up to 4 MiB
    };
    let keys: Vec<Vec<u8>> = rest.iter().map(|&b| vec![b; usize::from(b) + 1]).collect();
    let ranges = batch_ranges(&keys, extra);
    let mut next = 0;
    for r in &ranges {
        assert_eq!(r.start, next);
        assert!(r.end > r.start && r.len() <= MAX_ITEMS, "{r:?}");
        let len = encoded_len_of_keys(keys[r.clone()].iter().map(Vec::as_slice), extra);
        assert!(len <= MAX_MESSAGE || r.len() == 1, "{r:?}: {len} bytes");
        if r.end < keys.len() {
            let more = encoded_len_of_keys(keys[r.start..=r.end].iter().map(Vec::as_slice), extra);
            assert!(
                more > MAX_MESSAGE || r.len() == MAX_ITEMS,
                "{r:?} stopped early"
            );
        }
        next = r.end;
    }
    assert_eq!(next, keys.len());
    // The estimate is the encoding's length.
    let chunk = &keys[..keys.len().min(MAX_ITEMS)];
    let lookup = Request::Lookup {
        keys: chunk.to_vec(),
    };
    let body = lookup.encode();
    assert_eq!(
        body.len(),
        encoded_len_of_keys(chunk.iter().map(Vec::as_slice), 0)
    );
    assert_eq!(Request::decode(&body), Ok(lookup));
    let reserve = Request::Reserve {
        items: chunk.iter().map(|k| (k.clone(), 1)).collect(),
    };
    assert_eq!(
        reserve.encode().len(),
        encoded_len_of_keys(chunk.iter().map(Vec::as_slice), 8)
    );
}
