//! The store's requests and replies: what a client says to a segment server (the owner of
//! a key) and what the server answers, one reply per request. Both travel as the opaque
//! body of a control frame (at most [`MAX_BODY`](crate::control::frame::MAX_BODY)); this
//! module only encodes and decodes those bodies.
//!
//! ```text
//! body         version u8 (1) | kind u8 | fields
//! key          len u32 (1..=256) | bytes
//! vec<T>       count u32 (<= 8192) | count × T
//!
//! requests (client → server)                              replies (server → client)
//!  1 Reserve   vec<key | len u64 (> 0)>                   0x81 Reserved   vec<reserve item>
//!  2 Commit    vec<key | token u64>                       0x82 Statuses   vec<status u8>
//!  3 Abort     vec<key | token u64>                       0x83 Found      lease_ms u32 | vec<lookup item>
//!  4 Lookup    vec<key>                                   0x84 Existing   vec<u8 (0 or 1)>
//!  5 Release   vec<lease u64>                             0x85 Done       -
//!  6 Exists    vec<key>                                   0x86 RemovedAll count u64
//!  7 Remove    vec<key>                                   0x87 Stats      16 × u64 (StoreStats, in order)
//!  8 RemoveAll -                                          0x88 Error      code u16 | len u32 (<= 1024) | UTF-8
//!  9 Stats     -
//!
//! reserve item  0 (granted) | addr u64 | token u64        (17 bytes)   or  status u8 (≠ 0)  (1 byte)
//! lookup item   0 (found) | addr u64 | len u64 | lease u64 (25 bytes)  or  status u8 (3 NotFound, 6 Failed)
//! ```
//!
//! Everything is little endian. A reply kind is its request kind's number with the high
//! bit set, so a reply fed to [`Request::decode`] (or a request to [`Reply::decode`]) is
//! refused as an unknown kind. Which reply answers which request:
//!
//! | request                  | reply (or [`Reply::Error`] for any)         |
//! |--------------------------|---------------------------------------------|
//! | Reserve                  | Reserved, one item per request item         |
//! | Commit / Abort / Remove  | Statuses, one per request item              |
//! | Lookup                   | Found, one item per key                     |
//! | Exists                   | Existing, one per key                       |
//! | Release                  | Done                                        |
//! | RemoveAll                | RemovedAll                                  |
//! | Stats                    | Stats                                       |
//!
//! [`reply_matches`] checks this; a client calls it before trusting a reply.
//!
//! Decoding is strict: a wrong version, an unknown kind, a count above [`MAX_ITEMS`] or
//! larger than the bytes left could hold (checked before anything is allocated), a key
//! that is empty or longer than [`MAX_KEY`], a zero `len` to reserve, an unknown status
//! byte, a status an item never carries, an Existing byte other than 0 or 1, a Found
//! object that is empty or wraps past the end of the address space, a reason over
//! [`MAX_REASON`] bytes or not UTF-8, a body over [`MAX_MESSAGE`] bytes, and trailing
//! bytes are all refused with a [`StoreWireError`] naming the kind, the field, the value
//! and the limit. Whatever decodes re-encodes to the very same bytes. `validate` says
//! whether a message built in memory survives the wire unchanged.
//!
//! # Splitting a batch
//!
//! A request carries at most [`MAX_ITEMS`] keys (or leases). With keys of at most
//! [`MAX_KEY`] bytes such a request encodes to at most [`MAX_REQUEST_LEN`] bytes (about
//! 2.1 MiB) and any reply to it to at most [`MAX_REPLY_LEN`] bytes (Found items are the
//! largest, 25 bytes each: about 200 KiB), both under [`MAX_MESSAGE`] (checked at compile
//! time). So a client splits a larger batch into consecutive chunks of at most
//! [`MAX_ITEMS`] items, one request per chunk; [`batch_ranges`] computes those chunks and
//! also keeps each request's bytes ([`encoded_len_of_keys`]) within [`MAX_MESSAGE`], so
//! it stays right should the limits ever change. Every key should pass [`check_key`]
//! first: a request with a bad key is refused whole.
//!
//! ```
//! use kvxfer::store::wire::{batch_ranges, reply_matches, Reply, Request, ItemStatus};
//!
//! let keys: Vec<Vec<u8>> = (0..20_000u32).map(|i| i.to_le_bytes().to_vec()).collect();
//! let ranges = batch_ranges(&keys, 0);
//! assert_eq!(ranges, [0..8192, 8192..16384, 16384..20_000]);
//!
//! let request = Request::Remove { keys: keys[ranges[2].clone()].to_vec() };
//! let body = request.encode();
//! assert_eq!(Request::decode(&body), Ok(request.clone()));
//!
//! // The server's answer, as the client receives it.
//! let reply = Reply::Statuses(vec![ItemStatus::NotFound; request.len()]);
//! let reply = Reply::decode(&reply.encode())?;
//! reply_matches(&request, &reply)?;
//! # Ok::<(), kvxfer::store::wire::StoreWireError>(())
//! ```

use std::fmt;
use std::ops::Range;

/// The only version spoken (the first byte of every body).
pub const VERSION: u8 = 1;
/// Bytes of a key, at most (and at least 1).
pub const MAX_KEY: usize = 256;
/// Items (keys, leases, statuses, ...) of one request or reply, at most.
pub const MAX_ITEMS: usize = 8192;
/// Bytes of an encoded body, at most; a longer body is refused before it is read.
pub const MAX_MESSAGE: usize = 4 << 20;
/// Bytes of an [`Reply::Error`] reason, at most; [`Reply::encode`] cuts longer ones.
pub const MAX_REASON: usize = 1024;
/// A client writes a reservation's bytes within this of sending its Reserve, or gives up
/// (and Aborts). Servers reclaim an uncommitted reservation no sooner than this plus a
/// margin for bytes still in flight when the client gave up, so a late write never lands
/// in memory given to another object.
pub const WRITE_WINDOW: std::time::Duration = std::time::Duration::from_secs(5);
/// Bytes before the fields: version and kind.
pub const HEADER_LEN: usize = 2;
/// Bytes of a granted [`ReserveItem`] on the wire (a refused one is 1 byte).
pub const GRANTED_ITEM_LEN: usize = 1 + 8 + 8;
/// Bytes of a found [`LookupItem`] on the wire (a missing one is 1 byte).
pub const FOUND_ITEM_LEN: usize = 1 + 8 + 8 + 8;
/// Bytes of [`StoreStats`] on the wire (16 little-endian u64).
pub const STATS_LEN: usize = 16 * 8;
/// Bytes of the longest valid request: [`MAX_ITEMS`] keys of [`MAX_KEY`] bytes, each
/// with a u64 (Reserve, Commit, Abort).
pub const MAX_REQUEST_LEN: usize = HEADER_LEN + 4 + MAX_ITEMS * (4 + MAX_KEY + 8);
/// Bytes of the longest valid reply: Found with [`MAX_ITEMS`] found items.
pub const MAX_REPLY_LEN: usize = max(
    HEADER_LEN + 4 + 4 + MAX_ITEMS * FOUND_ITEM_LEN,
    max(
        HEADER_LEN + 4 + MAX_ITEMS * GRANTED_ITEM_LEN,
        max(HEADER_LEN + STATS_LEN, MAX_ERROR_LEN),
    ),
);

/// Bytes of the longest Error reply.
const MAX_ERROR_LEN: usize = HEADER_LEN + 2 + 4 + MAX_REASON;

const fn max(a: usize, b: usize) -> usize {
    if a > b {
        a
    } else {
        b
    }
}

const _: () = assert!(MAX_REQUEST_LEN <= MAX_MESSAGE);
const _: () = assert!(MAX_REPLY_LEN <= MAX_MESSAGE);
const _: () = assert!(MAX_MESSAGE <= crate::control::frame::MAX_BODY as usize);

/// Message kind numbers (the second byte of a body): requests 1 to 9, replies 0x81 to
/// 0x88.
pub mod kind {
    /// [`Request::Reserve`](super::Request::Reserve).
    pub const RESERVE: u8 = 1;
    /// [`Request::Commit`](super::Request::Commit).
    pub const COMMIT: u8 = 2;
    /// [`Request::Abort`](super::Request::Abort).
    pub const ABORT: u8 = 3;
    /// [`Request::Lookup`](super::Request::Lookup).
    pub const LOOKUP: u8 = 4;
    /// [`Request::Release`](super::Request::Release).
    pub const RELEASE: u8 = 5;
    /// [`Request::Exists`](super::Request::Exists).
    pub const EXISTS: u8 = 6;
    /// [`Request::Remove`](super::Request::Remove).
    pub const REMOVE: u8 = 7;
    /// [`Request::RemoveAll`](super::Request::RemoveAll).
    pub const REMOVE_ALL: u8 = 8;
    /// [`Request::Stats`](super::Request::Stats).
    pub const STATS: u8 = 9;
    /// [`Reply::Reserved`](super::Reply::Reserved).
    pub const RESERVED: u8 = 0x81;
    /// [`Reply::Statuses`](super::Reply::Statuses).
    pub const STATUSES: u8 = 0x82;
    /// [`Reply::Found`](super::Reply::Found).
    pub const FOUND: u8 = 0x83;
    /// [`Reply::Existing`](super::Reply::Existing).
    pub const EXISTING: u8 = 0x84;
    /// [`Reply::Done`](super::Reply::Done).
    pub const DONE: u8 = 0x85;
    /// [`Reply::RemovedAll`](super::Reply::RemovedAll).
    pub const REMOVED_ALL: u8 = 0x86;
    /// [`Reply::Stats`](super::Reply::Stats).
    pub const STATS_REPLY: u8 = 0x87;
    /// [`Reply::Error`](super::Reply::Error).
    pub const ERROR: u8 = 0x88;

    /// Whether `kind` is a request kind this build knows.
    pub fn is_request(kind: u8) -> bool {
        (RESERVE..=STATS).contains(&kind)
    }

    /// Whether `kind` is a reply kind this build knows.
    pub fn is_reply(kind: u8) -> bool {
        (RESERVED..=ERROR).contains(&kind)
    }

    /// The name of a kind (`"Reserve"`, `"Found"`, ...), `"unknown"` for kinds this build
    /// does not know.
    pub fn name(kind: u8) -> &'static str {
        match kind {
            RESERVE => "Reserve",
            COMMIT => "Commit",
            ABORT => "Abort",
            LOOKUP => "Lookup",
            RELEASE => "Release",
            EXISTS => "Exists",
            REMOVE => "Remove",
            REMOVE_ALL => "RemoveAll",
            STATS => "Stats",
            RESERVED => "Reserved",
            STATUSES => "Statuses",
            FOUND => "Found",
            EXISTING => "Existing",
            DONE => "Done",
            REMOVED_ALL => "RemovedAll",
            STATS_REPLY => "Stats",
            ERROR => "Error",
            _ => "unknown",
        }
    }
}

/// Codes of [`Reply::Error`]: why a server refused a whole request. Decoders accept any
/// code (a newer server may send codes this build does not know;
/// [`name`](error_code::name) says `"UNKNOWN"`).
pub mod error_code {
    /// This engine serves no store segment (it contributes no memory to the store).
    pub const NO_SEGMENT: u16 = 1;
    /// The request's version is not spoken here.
    pub const UNSUPPORTED_VERSION: u16 = 2;
    /// The request did not decode (the reason says why); it was not executed.
    pub const MALFORMED: u16 = 3;
    /// The server cannot take the request now (e.g. it is shutting down its segment);
    /// retry later or elsewhere.
    pub const BUSY: u16 = 4;
    /// The server failed on its side.
    pub const INTERNAL: u16 = 5;

    /// The name of a code (its constant's name), `"UNKNOWN"` for codes not listed here.
    pub fn name(code: u16) -> &'static str {
        match code {
            NO_SEGMENT => "NO_SEGMENT",
            UNSUPPORTED_VERSION => "UNSUPPORTED_VERSION",
            MALFORMED => "MALFORMED",
            BUSY => "BUSY",
            INTERNAL => "INTERNAL",
            _ => "UNKNOWN",
        }
    }
}

/// A store request, client → segment server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Put-if-absent, step 1 (kind 1): reserve room for each `(key, len)` (`len > 0`
    /// bytes). Answered by [`Reply::Reserved`]: where to write each object and the token
    /// that commits (or aborts) it.
    Reserve {
        /// `(key, len)` pairs.
        items: Vec<(Vec<u8>, u64)>,
    },
    /// Put-if-absent, step 2 (kind 2): the bytes of each `(key, token)` reservation are
    /// written; make the objects visible. Answered by [`Reply::Statuses`].
    Commit {
        /// `(key, token)` pairs, tokens as [`ReserveItem::Granted`] gave them.
        items: Vec<(Vec<u8>, u64)>,
    },
    /// Drops reservations (kind 3), e.g. after the write failed. Answered by
    /// [`Reply::Statuses`].
    Abort {
        /// `(key, token)` pairs, tokens as [`ReserveItem::Granted`] gave them.
        items: Vec<(Vec<u8>, u64)>,
    },
    /// Get, step 1 (kind 4): where each key's object lies, with a lease per found key
    /// that keeps the object in place until released or expired. Answered by
    /// [`Reply::Found`].
    Lookup {
        /// The keys.
        keys: Vec<Vec<u8>>,
    },
    /// Get, step 2 (kind 5): the objects are read; release their leases. Answered by
    /// [`Reply::Done`].
    Release {
        /// Leases as [`LookupItem::Found`] gave them.
        leases: Vec<u64>,
    },
    /// Whether each key is stored (kind 6). Answered by [`Reply::Existing`].
    Exists {
        /// The keys.
        keys: Vec<Vec<u8>>,
    },
    /// Removes objects (kind 7). Answered by [`Reply::Statuses`].
    Remove {
        /// The keys.
        keys: Vec<Vec<u8>>,
    },
    /// Removes every object of the segment that is not leased (kind 8). Answered by
    /// [`Reply::RemovedAll`].
    RemoveAll,
    /// The segment's counters (kind 9). Answered by [`Reply::Stats`].
    Stats,
}

/// What happened to one item of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ItemStatus {
    /// Done: committed, aborted, removed.
    Ok = 0,
    /// Reserve: the key is stored or being reserved already (put-if-absent).
    AlreadyExists = 1,
    /// Reserve: no room in the segment, even after eviction.
    NoSpace = 2,
    /// Lookup, Remove: no object under the key.
    NotFound = 3,
    /// Remove: the object is leased by a reader; retry when its leases end.
    Leased = 4,
    /// Commit, Abort: no reservation of the key with that token (never made, already
    /// committed or aborted, or reclaimed after it expired).
    UnknownReservation = 5,
    /// The server failed on this item (e.g. an SSD read error).
    Failed = 6,
}

impl ItemStatus {
    /// Every status, in wire order.
    pub const ALL: [ItemStatus; 7] = [
        ItemStatus::Ok,
        ItemStatus::AlreadyExists,
        ItemStatus::NoSpace,
        ItemStatus::NotFound,
        ItemStatus::Leased,
        ItemStatus::UnknownReservation,
        ItemStatus::Failed,
    ];

    /// The status of a wire byte, `None` for bytes above 6.
    pub fn from_u8(value: u8) -> Option<ItemStatus> {
        ItemStatus::ALL.get(usize::from(value)).copied()
    }

    /// The wire byte.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The variant's name (`"Ok"`, `"AlreadyExists"`, ...), as errors and logs print it.
    pub fn name(self) -> &'static str {
        match self {
            ItemStatus::Ok => "Ok",
            ItemStatus::AlreadyExists => "AlreadyExists",
            ItemStatus::NoSpace => "NoSpace",
            ItemStatus::NotFound => "NotFound",
            ItemStatus::Leased => "Leased",
            ItemStatus::UnknownReservation => "UnknownReservation",
            ItemStatus::Failed => "Failed",
        }
    }
}

impl fmt::Display for ItemStatus {
    /// The [`name`](ItemStatus::name).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The answer to one item of a [`Request::Reserve`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReserveItem {
    /// Room is reserved: write the object's bytes at `addr` (in the server's registered
    /// memory), then commit with `token`.
    Granted {
        /// Where the object's bytes go, in the server's address space.
        addr: u64,
        /// What commits or aborts the reservation.
        token: u64,
    },
    /// Not reserved, and why; never [`ItemStatus::Ok`].
    Refused(ItemStatus),
}

/// The answer to one key of a [`Request::Lookup`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LookupItem {
    /// The object: `len` bytes at `addr` (in the server's registered memory), held in
    /// place by `lease` until released or expired.
    Found {
        /// Where the object's bytes are, in the server's address space.
        addr: u64,
        /// Bytes of the object (> 0; `addr + len` does not wrap).
        len: u64,
        /// What releases the hold on the object.
        lease: u64,
    },
    /// No object to read: [`ItemStatus::NotFound`] or [`ItemStatus::Failed`], never
    /// another status.
    Missing(ItemStatus),
}

/// The counters of a segment server ([`Reply::Stats`]; its index keeps them); a client
/// adds up its members' with [`StoreStats::add`]. On the wire: the 16 fields as u64, in
/// declaration order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct StoreStats {
    /// Bytes of the memory segment.
    pub memory_capacity: u64,
    /// Bytes of memory allocated (objects, reservations, blocks kept for leases or
    /// in-flight copies, aborted reservations until their deadline), in granules.
    pub memory_used: u64,
    /// Bytes of the SSD tier (0 without one).
    pub disk_capacity: u64,
    /// Bytes of the SSD tier allocated.
    pub disk_used: u64,
    /// Committed objects in memory (including those with a demotion in flight).
    pub objects_in_memory: u64,
    /// Committed objects on disk (including those with a promotion in flight).
    pub objects_on_disk: u64,
    /// Reservations not yet committed, aborted or reclaimed.
    pub reservations: u64,
    /// Leases not yet released or dropped (an expired lease is dropped by the index's
    /// `reclaim`, or when its object's memory is freed).
    pub leases: u64,
    /// Objects committed, ever.
    pub puts: u64,
    /// Lookups that found a committed object in memory (one on disk counts once
    /// promoted), ever.
    pub hits: u64,
    /// Lookups that found none, ever.
    pub misses: u64,
    /// Objects dropped to make room (from memory, or from disk to make room there), ever.
    pub evictions: u64,
    /// Objects moved from memory to the SSD tier, ever.
    pub demotions: u64,
    /// Objects moved from the SSD tier back to memory, ever.
    pub promotions: u64,
    /// Reservations reclaimed after their timeout, ever.
    pub reclaimed_reservations: u64,
    /// Leases dropped after their expiry (not released), ever.
    pub expired_leases: u64,
}

/// The names of [`StoreStats`]' fields, in wire order.
const STATS_FIELDS: [&str; 16] = [
    "memory_capacity",
    "memory_used",
    "disk_capacity",
    "disk_used",
    "objects_in_memory",
    "objects_on_disk",
    "reservations",
    "leases",
    "puts",
    "hits",
    "misses",
    "evictions",
    "demotions",
    "promotions",
    "reclaimed_reservations",
    "expired_leases",
];

impl StoreStats {
    /// Adds `other`'s counters to these, field by field (saturating at `u64::MAX`).
    pub fn add(&mut self, other: &StoreStats) {
        let sum = self
            .to_array()
            .iter()
            .zip(other.to_array())
            .map(|(a, b)| a.saturating_add(b))
            .collect::<Vec<u64>>();
        *self = StoreStats::from_array(sum.try_into().expect("16 fields"));
    }

    /// The fields in wire order.
    fn to_array(self) -> [u64; 16] {
        [
            self.memory_capacity,
            self.memory_used,
            self.disk_capacity,
            self.disk_used,
            self.objects_in_memory,
            self.objects_on_disk,
            self.reservations,
            self.leases,
            self.puts,
            self.hits,
            self.misses,
            self.evictions,
            self.demotions,
            self.promotions,
            self.reclaimed_reservations,
            self.expired_leases,
        ]
    }

    /// The stats of fields in wire order.
    fn from_array(v: [u64; 16]) -> StoreStats {
        let [memory_capacity, memory_used, disk_capacity, disk_used, objects_in_memory, objects_on_disk, reservations, leases, puts, hits, misses, evictions, demotions, promotions, reclaimed_reservations, expired_leases] =
            v;
        StoreStats {
            memory_capacity,
            memory_used,
            disk_capacity,
            disk_used,
            objects_in_memory,
            objects_on_disk,
            reservations,
            leases,
            puts,
            hits,
            misses,
            evictions,
            demotions,
            promotions,
            reclaimed_reservations,
            expired_leases,
        }
    }
}

/// A store reply, segment server → client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// To [`Request::Reserve`] (kind 0x81): one item per request item, in order.
    Reserved(Vec<ReserveItem>),
    /// To [`Request::Commit`], [`Request::Abort`] and [`Request::Remove`] (kind 0x82): one
    /// status per request item, in order.
    Statuses(Vec<ItemStatus>),
    /// To [`Request::Lookup`] (kind 0x83): one item per key, in order.
    Found {
        /// How long each lease lasts, in milliseconds from when the server granted it
        /// (the client should finish reading well before, counting from when it sent the
        /// request).
        lease_ms: u32,
        /// The answers.
        items: Vec<LookupItem>,
    },
    /// To [`Request::Exists`] (kind 0x84): whether each key is stored, in order (one byte
    /// each on the wire, 0 or 1).
    Existing(Vec<bool>),
    /// To [`Request::Release`] (kind 0x85): the leases are released (unknown or expired
    /// ones are ignored).
    Done,
    /// To [`Request::RemoveAll`] (kind 0x86): how many objects were removed.
    RemovedAll(u64),
    /// To [`Request::Stats`] (kind 0x87).
    Stats(StoreStats),
    /// To any request (kind 0x88): the whole request was refused, nothing was done.
    Error {
        /// Why, one of [`error_code`] (others decode too).
        code: u16,
        /// What happened, for people; at most [`MAX_REASON`] bytes travel (see
        /// [`Reply::error`]).
        reason: String,
    },
}

/// Why a body does not decode, a message would not survive the wire, or a reply does
/// not answer its request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreWireError {
    /// The body (or the encoding of a message) is longer than [`MAX_MESSAGE`].
    #[error("store message of {len} bytes is longer than the limit of {MAX_MESSAGE} bytes")]
    TooLong {
        /// Bytes there are (or would be).
        len: usize,
    },
    /// The body ends inside a field.
    #[error("store {kind} message ends inside its {field} (needs {needed} bytes, {left} left)")]
    Truncated {
        /// The message kind's name (`"request"` or `"reply"` while in the version and
        /// kind bytes).
        kind: &'static str,
        /// The field being read.
        field: &'static str,
        /// Bytes the field needs.
        needed: usize,
        /// Bytes there were left.
        left: usize,
    },
    /// A version this build does not speak.
    #[error("unsupported store protocol version {found} (this build speaks {VERSION})")]
    Version {
        /// The version byte found.
        found: u8,
    },
    /// A kind this build does not know (on this side: requests are 1 to 9, replies 0x81
    /// to 0x88).
    #[error("unknown store {side} kind {kind}{}", kind_hint(.side, *.kind))]
    UnknownKind {
        /// `"request"` or `"reply"`: what was being decoded.
        side: &'static str,
        /// The kind byte found.
        kind: u8,
    },
    /// More items than [`MAX_ITEMS`].
    #[error("{kind} carries {count} {field}, more than the limit of {limit}")]
    TooMany {
        /// The message kind's name.
        kind: &'static str,
        /// What is counted (`"items"`, `"keys"`, `"leases"`, ...).
        field: &'static str,
        /// The count found.
        count: usize,
        /// The limit ([`MAX_ITEMS`]).
        limit: usize,
    },
    /// A count that the bytes left cannot hold (refused before allocating).
    #[error(
        "{kind} announces {count} {field} of at least {min_bytes} bytes each, \
         but only {left} bytes are left"
    )]
    CountPastEnd {
        /// The message kind's name.
        kind: &'static str,
        /// What is counted.
        field: &'static str,
        /// The count found.
        count: usize,
        /// Bytes each item takes at least.
        min_bytes: usize,
        /// Bytes left after the count.
        left: usize,
    },
    /// A key that is empty or longer than [`MAX_KEY`].
    #[error("{}key of {len} bytes: a key is 1 to {MAX_KEY} bytes", item_prefix(.item))]
    BadKey {
        /// The message kind's name and the item's index, when the key is part of a
        /// message (`None` from [`check_key`]).
        item: Option<(&'static str, usize)>,
        /// Bytes of the key.
        len: usize,
    },
    /// A Reserve item with `len` 0.
    #[error("Reserve item {index} has len 0: an object has at least 1 byte")]
    ZeroLength {
        /// The item's index.
        index: usize,
    },
    /// A status byte above 6.
    #[error("{kind} item {index} has status byte {value}, not a known item status (0 to 6)")]
    BadStatus {
        /// The message kind's name.
        kind: &'static str,
        /// The item's index.
        index: usize,
        /// The byte found.
        value: u8,
    },
    /// A status the item never carries: a Reserved item refused with `Ok`, a Found item
    /// missing with anything but `NotFound` or `Failed`.
    #[error("{kind} item {index} has status {status}, but {}", allowed_statuses(.kind))]
    StatusNotAllowed {
        /// The message kind's name.
        kind: &'static str,
        /// The item's index.
        index: usize,
        /// The status found.
        status: ItemStatus,
    },
    /// An Existing byte other than 0 or 1.
    #[error("Existing item {index} is byte {value}, not 0 (absent) or 1 (present)")]
    BadBool {
        /// The item's index.
        index: usize,
        /// The byte found.
        value: u8,
    },
    /// A Found object that is empty or wraps past the end of the address space.
    #[error(
        "Found item {index} is {len} bytes at {addr:#x}: an object is at least 1 byte \
         and ends within the address space"
    )]
    BadExtent {
        /// The item's index.
        index: usize,
        /// The object's address.
        addr: u64,
        /// The object's length.
        len: u64,
    },
    /// An Error reason longer than [`MAX_REASON`].
    #[error("Error reason of {len} bytes exceeds the limit of {MAX_REASON} bytes")]
    ReasonTooLong {
        /// Bytes of the reason.
        len: usize,
    },
    /// An Error reason that is not UTF-8.
    #[error("Error reason is not UTF-8 (valid up to byte {valid_up_to})")]
    ReasonNotUtf8 {
        /// Bytes of the reason that are valid UTF-8.
        valid_up_to: usize,
    },
    /// Bytes after the message.
    #[error("{count} trailing bytes after the {kind} message")]
    TrailingBytes {
        /// The message kind's name.
        kind: &'static str,
        /// Bytes left over.
        count: usize,
    },
    /// A reply of a kind that does not answer the request.
    #[error("a {reply} reply does not answer a {request} request (expected {expected} or Error)")]
    KindMismatch {
        /// The request kind's name.
        request: &'static str,
        /// The reply kind's name.
        reply: &'static str,
        /// The reply kind's name that would answer it.
        expected: &'static str,
    },
    /// A per-item reply with another number of items than the request.
    #[error("{reply} reply has {answers} items for a {request} request of {items} items")]
    CountMismatch {
        /// The request kind's name.
        request: &'static str,
        /// Items of the request.
        items: usize,
        /// The reply kind's name.
        reply: &'static str,
        /// Items of the reply.
        answers: usize,
    },
}

fn kind_hint(side: &str, kind: u8) -> String {
    if side == "request" && kind::is_reply(kind) {
        format!(
            " (kind {kind} is the reply {}: requests are kinds 1 to 9)",
            kind::name(kind)
        )
    } else if side == "request" {
        " (requests are kinds 1 to 9)".into()
    } else if kind::is_request(kind) {
        format!(
            " (kind {kind} is the request {}: replies are kinds 129 to 136)",
            kind::name(kind)
        )
    } else {
        " (replies are kinds 129 to 136)".into()
    }
}

fn item_prefix(item: &Option<(&str, usize)>) -> String {
    match item {
        Some((kind, index)) => format!("{kind} item {index}: "),
        None => String::new(),
    }
}

fn allowed_statuses(kind: &str) -> &'static str {
    if kind == "Found" {
        "a missing Found item is NotFound or Failed"
    } else {
        "a refused Reserved item is never Ok"
    }
}

/// Checks a key: 1 to [`MAX_KEY`] bytes.
///
/// Errors: [`StoreWireError::BadKey`] (with no item) naming the key's length.
pub fn check_key(key: &[u8]) -> Result<(), StoreWireError> {
    check_key_at(key, None)
}

fn check_key_at(key: &[u8], item: Option<(&'static str, usize)>) -> Result<(), StoreWireError> {
    if key.is_empty() || key.len() > MAX_KEY {
        return Err(StoreWireError::BadKey {
            item,
            len: key.len(),
        });
    }
    Ok(())
}

/// Bytes of a request carrying `keys`, each followed by `per_item_extra` bytes: 8 for
/// Reserve, Commit and Abort (the len or token after each key), 0 for Lookup, Exists and
/// Remove. Saturates instead of overflowing.
pub fn encoded_len_of_keys<'a>(
    keys: impl IntoIterator<Item = &'a [u8]>,
    per_item_extra: usize,
) -> usize {
    keys.into_iter().fold(HEADER_LEN + 4, |n, key| {
        n.saturating_add(
            4usize
                .saturating_add(key.len())
                .saturating_add(per_item_extra),
        )
    })
}

/// Splits a batch of `keys` into consecutive index ranges, one request each: every range
/// has at most [`MAX_ITEMS`] keys and its request ([`encoded_len_of_keys`] with
/// `per_item_extra`) at most [`MAX_MESSAGE`] bytes, and each range is as long as those
/// limits allow. A key whose request alone is too long (only possible with keys over
/// [`MAX_KEY`], which [`check_key`] refuses) gets a range of its own. No keys, no ranges.
///
/// The replies to such requests fit too (see [`MAX_REPLY_LEN`]).
pub fn batch_ranges<K: AsRef<[u8]>>(keys: &[K], per_item_extra: usize) -> Vec<Range<usize>> {
    let mut ranges = Vec::new();
    let mut start = 0;
    let mut len = HEADER_LEN + 4;
    for (i, key) in keys.iter().enumerate() {
        let item = 4usize
            .saturating_add(key.as_ref().len())
            .saturating_add(per_item_extra);
        if i > start && (i - start == MAX_ITEMS || len.saturating_add(item) > MAX_MESSAGE) {
            ranges.push(start..i);
            start = i;
            len = HEADER_LEN + 4;
        }
        len = len.saturating_add(item);
    }
    if start < keys.len() {
        ranges.push(start..keys.len());
    }
    ranges
}

/// The longest prefix of `reason` of at most [`MAX_REASON`] bytes that ends on a char
/// boundary.
fn cut_reason(reason: &str) -> &str {
    let mut end = reason.len().min(MAX_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

/// A status byte no decoder accepts, written for statuses an item cannot carry in the
/// position where the status byte also tells a granted or found item (status 0).
const NEVER_STATUS: u8 = 0xff;

impl Request {
    /// The kind number on the wire (1 to 9, see [`kind`]).
    pub fn kind(&self) -> u8 {
        match self {
            Request::Reserve { .. } => kind::RESERVE,
            Request::Commit { .. } => kind::COMMIT,
            Request::Abort { .. } => kind::ABORT,
            Request::Lookup { .. } => kind::LOOKUP,
            Request::Release { .. } => kind::RELEASE,
            Request::Exists { .. } => kind::EXISTS,
            Request::Remove { .. } => kind::REMOVE,
            Request::RemoveAll => kind::REMOVE_ALL,
            Request::Stats => kind::STATS,
        }
    }

    /// The kind's name (`"Reserve"`, `"Lookup"`, ...), as errors and logs print it.
    pub fn kind_name(&self) -> &'static str {
        kind::name(self.kind())
    }

    /// Items of the request: pairs, keys or leases; 0 for RemoveAll and Stats.
    pub fn len(&self) -> usize {
        match self {
            Request::Reserve { items } | Request::Commit { items } | Request::Abort { items } => {
                items.len()
            }
            Request::Lookup { keys } | Request::Exists { keys } | Request::Remove { keys } => {
                keys.len()
            }
            Request::Release { leases } => leases.len(),
            Request::RemoveAll | Request::Stats => 0,
        }
    }

    /// Whether the request has no items (always for RemoveAll and Stats).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of [`encode`](Request::encode)'s output, computed without encoding.
    pub fn encoded_len(&self) -> usize {
        let keys = |keys: &[Vec<u8>]| encoded_len_of_keys(keys.iter().map(Vec::as_slice), 0);
        match self {
            Request::Reserve { items } | Request::Commit { items } | Request::Abort { items } => {
                encoded_len_of_keys(items.iter().map(|(k, _)| k.as_slice()), 8)
            }
            Request::Lookup { keys: k }
            | Request::Exists { keys: k }
            | Request::Remove { keys: k } => keys(k),
            Request::Release { leases } => {
                (HEADER_LEN + 4).saturating_add(leases.len().saturating_mul(8))
            }
            Request::RemoveAll | Request::Stats => HEADER_LEN,
        }
    }

    /// Bytes of the longest reply a server may give to this request: its kind's reply
    /// with every item at its largest, or an Error with the longest reason. At most
    /// [`MAX_REPLY_LEN`] for a request of at most [`MAX_ITEMS`] items.
    pub fn max_reply_len(&self) -> usize {
        let n = self.len();
        let items = |fixed: usize, each: usize| fixed.saturating_add(n.saturating_mul(each));
        let answer = match self {
            Request::Reserve { .. } => items(HEADER_LEN + 4, GRANTED_ITEM_LEN),
            Request::Commit { .. }
            | Request::Abort { .. }
            | Request::Remove { .. }
            | Request::Exists { .. } => items(HEADER_LEN + 4, 1),
            Request::Lookup { .. } => items(HEADER_LEN + 4 + 4, FOUND_ITEM_LEN),
            Request::Release { .. } => HEADER_LEN,
            Request::RemoveAll => HEADER_LEN + 8,
            Request::Stats => HEADER_LEN + STATS_LEN,
        };
        answer.max(MAX_ERROR_LEN)
    }

    /// The body of this request. Encodes anything; a request that does not
    /// [`validate`](Request::validate) encodes to a body that does not decode (or, for
    /// counts above `u32::MAX`, is cut off).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new(self.kind(), self.encoded_len());
        match self {
            Request::Reserve { items } | Request::Commit { items } | Request::Abort { items } => {
                w.count(items.len());
                for (key, value) in items {
                    w.key(key);
                    w.u64(*value);
                }
            }
            Request::Lookup { keys } | Request::Exists { keys } | Request::Remove { keys } => {
                w.count(keys.len());
                for key in keys {
                    w.key(key);
                }
            }
            Request::Release { leases } => {
                w.count(leases.len());
                for lease in leases {
                    w.u64(*lease);
                }
            }
            Request::RemoveAll | Request::Stats => {}
        }
        w.0
    }

    /// Whether this request survives the wire unchanged: `Ok` exactly when
    /// `Request::decode(&self.encode())` gives it back. Checks what decoding checks: at
    /// most [`MAX_ITEMS`] items, every key 1 to [`MAX_KEY`] bytes, every Reserve `len`
    /// non-zero, and at most [`MAX_MESSAGE`] bytes.
    pub fn validate(&self) -> Result<(), StoreWireError> {
        let name = self.kind_name();
        let (field, n) = (count_field(self.kind()), self.len());
        if n > MAX_ITEMS {
            return Err(StoreWireError::TooMany {
                kind: name,
                field,
                count: n,
                limit: MAX_ITEMS,
            });
        }
        match self {
            Request::Reserve { items } | Request::Commit { items } | Request::Abort { items } => {
                for (index, (key, value)) in items.iter().enumerate() {
                    check_key_at(key, Some((name, index)))?;
                    if matches!(self, Request::Reserve { .. }) && *value == 0 {
                        return Err(StoreWireError::ZeroLength { index });
                    }
                }
            }
            Request::Lookup { keys } | Request::Exists { keys } | Request::Remove { keys } => {
                for (index, key) in keys.iter().enumerate() {
                    check_key_at(key, Some((name, index)))?;
                }
            }
            Request::Release { .. } | Request::RemoveAll | Request::Stats => {}
        }
        let len = self.encoded_len();
        if len > MAX_MESSAGE {
            return Err(StoreWireError::TooLong { len });
        }
        Ok(())
    }

    /// Decodes a request body strictly (see the [module](self) docs). Never panics and
    /// allocates no more than the body's length allows; whatever it accepts re-encodes to
    /// exactly `body`.
    ///
    /// Errors: the first problem found, as a [`StoreWireError`].
    pub fn decode(body: &[u8]) -> Result<Request, StoreWireError> {
        let (kind, mut r) = Reader::open(body, "request")?;
        let request = match kind {
            kind::RESERVE => Request::Reserve {
                items: r.keyed(|index, len| {
                    if len == 0 {
                        Err(StoreWireError::ZeroLength { index })
                    } else {
                        Ok(())
                    }
                })?,
            },
            kind::COMMIT => Request::Commit {
                items: r.keyed(|_, _| Ok(()))?,
            },
            kind::ABORT => Request::Abort {
                items: r.keyed(|_, _| Ok(()))?,
            },
            kind::LOOKUP => Request::Lookup { keys: r.keys()? },
            kind::RELEASE => {
                let n = r.count(8)?;
                let mut leases = Vec::with_capacity(n);
                for _ in 0..n {
                    leases.push(r.u64("lease")?);
                }
                Request::Release { leases }
            }
            kind::EXISTS => Request::Exists { keys: r.keys()? },
            kind::REMOVE => Request::Remove { keys: r.keys()? },
            kind::REMOVE_ALL => Request::RemoveAll,
            kind::STATS => Request::Stats,
            other => {
                return Err(StoreWireError::UnknownKind {
                    side: "request",
                    kind: other,
                })
            }
        };
        r.finish()?;
        Ok(request)
    }
}

/// What the count of a kind's vector counts, as errors print it.
fn count_field(kind: u8) -> &'static str {
    match kind {
        kind::LOOKUP | kind::EXISTS | kind::REMOVE => "keys",
        kind::RELEASE => "leases",
        kind::STATUSES => "statuses",
        kind::EXISTING => "answers",
        _ => "items",
    }
}

impl Reply {
    /// An Error reply, its reason cut to at most [`MAX_REASON`] bytes at a char boundary
    /// (so that it validates).
    pub fn error(code: u16, reason: impl Into<String>) -> Reply {
        let mut reason = reason.into();
        let cut = cut_reason(&reason).len();
        reason.truncate(cut);
        Reply::Error { code, reason }
    }

    /// The kind number on the wire (0x81 to 0x88, see [`kind`]).
    pub fn kind(&self) -> u8 {
        match self {
            Reply::Reserved(_) => kind::RESERVED,
            Reply::Statuses(_) => kind::STATUSES,
            Reply::Found { .. } => kind::FOUND,
            Reply::Existing(_) => kind::EXISTING,
            Reply::Done => kind::DONE,
            Reply::RemovedAll(_) => kind::REMOVED_ALL,
            Reply::Stats(_) => kind::STATS_REPLY,
            Reply::Error { .. } => kind::ERROR,
        }
    }

    /// The kind's name (`"Reserved"`, `"Found"`, `"Stats"`, ...), as errors and logs
    /// print it.
    pub fn kind_name(&self) -> &'static str {
        kind::name(self.kind())
    }

    /// Items of a per-item reply (Reserved, Statuses, Found, Existing); `None` for the
    /// others.
    pub fn items(&self) -> Option<usize> {
        match self {
            Reply::Reserved(items) => Some(items.len()),
            Reply::Statuses(statuses) => Some(statuses.len()),
            Reply::Found { items, .. } => Some(items.len()),
            Reply::Existing(answers) => Some(answers.len()),
            Reply::Done | Reply::RemovedAll(_) | Reply::Stats(_) | Reply::Error { .. } => None,
        }
    }

    /// Bytes of [`encode`](Reply::encode)'s output, computed without encoding.
    pub fn encoded_len(&self) -> usize {
        let vec = |fixed: usize, sizes: &mut dyn Iterator<Item = usize>| {
            sizes.fold(fixed, usize::saturating_add)
        };
        match self {
            Reply::Reserved(items) => vec(
                HEADER_LEN + 4,
                &mut items.iter().map(|item| match item {
                    ReserveItem::Granted { .. } => GRANTED_ITEM_LEN,
                    ReserveItem::Refused(_) => 1,
                }),
            ),
            Reply::Found { items, .. } => vec(
                HEADER_LEN + 4 + 4,
                &mut items.iter().map(|item| match item {
                    LookupItem::Found { .. } => FOUND_ITEM_LEN,
                    LookupItem::Missing(_) => 1,
                }),
            ),
            Reply::Statuses(statuses) => (HEADER_LEN + 4).saturating_add(statuses.len()),
            Reply::Existing(answers) => (HEADER_LEN + 4).saturating_add(answers.len()),
            Reply::Done => HEADER_LEN,
            Reply::RemovedAll(_) => HEADER_LEN + 8,
            Reply::Stats(_) => HEADER_LEN + STATS_LEN,
            Reply::Error { reason, .. } => HEADER_LEN + 2 + 4 + cut_reason(reason).len(),
        }
    }

    /// The body of this reply. An Error reason longer than [`MAX_REASON`] bytes is cut at
    /// a char boundary to fit. Encodes anything else as it is; a reply that does not
    /// [`validate`](Reply::validate) encodes to a body that does not decode (a refused
    /// Reserved item or a missing Found item with status `Ok` is written as status byte
    /// 255, never as a granted or found item).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new(self.kind(), self.encoded_len());
        match self {
            Reply::Reserved(items) => {
                w.count(items.len());
                for item in items {
                    match *item {
                        ReserveItem::Granted { addr, token } => {
                            w.u8(ItemStatus::Ok.code());
                            w.u64(addr);
                            w.u64(token);
                        }
                        ReserveItem::Refused(ItemStatus::Ok) => w.u8(NEVER_STATUS),
                        ReserveItem::Refused(status) => w.u8(status.code()),
                    }
                }
            }
            Reply::Statuses(statuses) => {
                w.count(statuses.len());
                for status in statuses {
                    w.u8(status.code());
                }
            }
            Reply::Found { lease_ms, items } => {
                w.u32(*lease_ms);
                w.count(items.len());
                for item in items {
                    match *item {
                        LookupItem::Found { addr, len, lease } => {
                            w.u8(ItemStatus::Ok.code());
                            w.u64(addr);
                            w.u64(len);
                            w.u64(lease);
                        }
                        LookupItem::Missing(ItemStatus::Ok) => w.u8(NEVER_STATUS),
                        LookupItem::Missing(status) => w.u8(status.code()),
                    }
                }
            }
            Reply::Existing(answers) => {
                w.count(answers.len());
                for &present in answers {
                    w.u8(u8::from(present));
                }
            }
            Reply::Done => {}
            Reply::RemovedAll(count) => w.u64(*count),
            Reply::Stats(stats) => {
                for field in stats.to_array() {
                    w.u64(field);
                }
            }
            Reply::Error { code, reason } => {
                w.u16(*code);
                w.bytes(cut_reason(reason).as_bytes());
            }
        }
        w.0
    }

    /// Whether this reply survives the wire unchanged: `Ok` exactly when
    /// `Reply::decode(&self.encode())` gives it back. Checks what decoding checks: at most
    /// [`MAX_ITEMS`] items, no refused Reserved item with `Ok`, missing Found items only
    /// `NotFound` or `Failed`, found objects non-empty and not wrapping, an Error reason
    /// of at most [`MAX_REASON`] bytes (longer ones are cut by
    /// [`encode`](Reply::encode); [`Reply::error`] cuts them up front).
    pub fn validate(&self) -> Result<(), StoreWireError> {
        let name = self.kind_name();
        if let Some(n) = self.items() {
            if n > MAX_ITEMS {
                return Err(StoreWireError::TooMany {
                    kind: name,
                    field: count_field(self.kind()),
                    count: n,
                    limit: MAX_ITEMS,
                });
            }
        }
        match self {
            Reply::Reserved(items) => {
                for (index, item) in items.iter().enumerate() {
                    if let ReserveItem::Refused(status) = *item {
                        reserve_status(index, status)?;
                    }
                }
            }
            Reply::Found { items, .. } => {
                for (index, item) in items.iter().enumerate() {
                    match *item {
                        LookupItem::Found { addr, len, .. } => found_extent(index, addr, len)?,
                        LookupItem::Missing(status) => missing_status(index, status)?,
                    }
                }
            }
            Reply::Error { reason, .. } => {
                if reason.len() > MAX_REASON {
                    return Err(StoreWireError::ReasonTooLong { len: reason.len() });
                }
            }
            Reply::Statuses(_)
            | Reply::Existing(_)
            | Reply::Done
            | Reply::RemovedAll(_)
            | Reply::Stats(_) => {}
        }
        let len = self.encoded_len();
        if len > MAX_MESSAGE {
            return Err(StoreWireError::TooLong { len });
        }
        Ok(())
    }

    /// Decodes a reply body strictly (see the [module](self) docs). Never panics and
    /// allocates no more than the body's length allows; whatever it accepts re-encodes to
    /// exactly `body`.
    ///
    /// Errors: the first problem found, as a [`StoreWireError`].
    pub fn decode(body: &[u8]) -> Result<Reply, StoreWireError> {
        let (kind, mut r) = Reader::open(body, "reply")?;
        let reply = match kind {
            kind::RESERVED => {
                let n = r.count(1)?;
                let mut items = Vec::with_capacity(n);
                for index in 0..n {
                    let item = match r.status(index)? {
                        ItemStatus::Ok => ReserveItem::Granted {
                            addr: r.u64("addr")?,
                            token: r.u64("token")?,
                        },
                        status => ReserveItem::Refused(status),
                    };
                    items.push(item);
                }
                Reply::Reserved(items)
            }
            kind::STATUSES => {
                let n = r.count(1)?;
                let mut statuses = Vec::with_capacity(n);
                for index in 0..n {
                    statuses.push(r.status(index)?);
                }
                Reply::Statuses(statuses)
            }
            kind::FOUND => {
                let lease_ms = r.u32("lease_ms")?;
                let n = r.count(1)?;
                let mut items = Vec::with_capacity(n);
                for index in 0..n {
                    let item = match r.status(index)? {
                        ItemStatus::Ok => {
                            let (addr, len, lease) =
                                (r.u64("addr")?, r.u64("len")?, r.u64("lease")?);
                            found_extent(index, addr, len)?;
                            LookupItem::Found { addr, len, lease }
                        }
                        status => {
                            missing_status(index, status)?;
                            LookupItem::Missing(status)
                        }
                    };
                    items.push(item);
                }
                Reply::Found { lease_ms, items }
            }
            kind::EXISTING => {
                let n = r.count(1)?;
                let mut answers = Vec::with_capacity(n);
                for index in 0..n {
                    answers.push(match r.u8("answer")? {
                        0 => false,
                        1 => true,
                        value => return Err(StoreWireError::BadBool { index, value }),
                    });
                }
                Reply::Existing(answers)
            }
            kind::DONE => Reply::Done,
            kind::REMOVED_ALL => Reply::RemovedAll(r.u64("removed count")?),
            kind::STATS_REPLY => {
                let mut fields = [0u64; 16];
                for (field, name) in fields.iter_mut().zip(STATS_FIELDS) {
                    *field = r.u64(name)?;
                }
                Reply::Stats(StoreStats::from_array(fields))
            }
            kind::ERROR => {
                let code = r.u16("code")?;
                let len = r.u32("reason length")? as usize;
                if len > MAX_REASON {
                    return Err(StoreWireError::ReasonTooLong { len });
                }
                let bytes = r.take(len, "reason")?;
                let reason = std::str::from_utf8(bytes)
                    .map_err(|e| StoreWireError::ReasonNotUtf8 {
                        valid_up_to: e.valid_up_to(),
                    })?
                    .to_owned();
                Reply::Error { code, reason }
            }
            other => {
                return Err(StoreWireError::UnknownKind {
                    side: "reply",
                    kind: other,
                })
            }
        };
        r.finish()?;
        Ok(reply)
    }
}

fn reserve_status(index: usize, status: ItemStatus) -> Result<(), StoreWireError> {
    if status == ItemStatus::Ok {
        return Err(StoreWireError::StatusNotAllowed {
            kind: kind::name(kind::RESERVED),
            index,
            status,
        });
    }
    Ok(())
}

fn missing_status(index: usize, status: ItemStatus) -> Result<(), StoreWireError> {
    if !matches!(status, ItemStatus::NotFound | ItemStatus::Failed) {
        return Err(StoreWireError::StatusNotAllowed {
            kind: kind::name(kind::FOUND),
            index,
            status,
        });
    }
    Ok(())
}

fn found_extent(index: usize, addr: u64, len: u64) -> Result<(), StoreWireError> {
    if len == 0 || addr.checked_add(len).is_none() {
        return Err(StoreWireError::BadExtent { index, addr, len });
    }
    Ok(())
}

/// Whether `reply` is a well-formed answer to `request`: [`Reply::Error`], or the reply
/// kind that answers the request's kind (see the [module](self) docs) with, for per-item
/// replies, exactly one item per request item. The client calls this before trusting a
/// reply (the item checks themselves were made when the reply was decoded).
///
/// Errors: [`StoreWireError::KindMismatch`] or [`StoreWireError::CountMismatch`].
pub fn reply_matches(request: &Request, reply: &Reply) -> Result<(), StoreWireError> {
    let expected = match request {
        Request::Reserve { .. } => kind::RESERVED,
        Request::Commit { .. } | Request::Abort { .. } | Request::Remove { .. } => kind::STATUSES,
        Request::Lookup { .. } => kind::FOUND,
        Request::Exists { .. } => kind::EXISTING,
        Request::Release { .. } => kind::DONE,
        Request::RemoveAll => kind::REMOVED_ALL,
        Request::Stats => kind::STATS_REPLY,
    };
    if reply.kind() == kind::ERROR {
        return Ok(());
    }
    if reply.kind() != expected {
        return Err(StoreWireError::KindMismatch {
            request: request.kind_name(),
            reply: reply.kind_name(),
            expected: kind::name(expected),
        });
    }
    if let Some(answers) = reply.items() {
        if answers != request.len() {
            return Err(StoreWireError::CountMismatch {
                request: request.kind_name(),
                items: request.len(),
                reply: reply.kind_name(),
                answers,
            });
        }
    }
    Ok(())
}

/// Appends little-endian fields after the version and kind.
struct Writer(Vec<u8>);

impl Writer {
    fn new(kind: u8, capacity: usize) -> Writer {
        let mut out = Vec::with_capacity(capacity.min(MAX_MESSAGE));
        out.push(VERSION);
        out.push(kind);
        Writer(out)
    }

    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }

    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    /// A count. Counts beyond u32 cannot be decoded anyway; they are written saturated so
    /// that the decoder refuses the message.
    fn count(&mut self, n: usize) {
        self.u32(u32::try_from(n).unwrap_or(u32::MAX));
    }

    fn bytes(&mut self, b: &[u8]) {
        self.count(b.len());
        self.0.extend_from_slice(b);
    }

    fn key(&mut self, key: &[u8]) {
        self.bytes(key);
    }
}

/// Reads the fields of one message; every failure names the kind and field.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// The message kind's name.
    kind: &'static str,
    /// The kind number.
    number: u8,
}

impl<'a> Reader<'a> {
    /// Checks the body's length and version and reads its kind; `side` is `"request"` or
    /// `"reply"`.
    fn open(body: &'a [u8], side: &'static str) -> Result<(u8, Reader<'a>), StoreWireError> {
        if body.len() > MAX_MESSAGE {
            return Err(StoreWireError::TooLong { len: body.len() });
        }
        let mut r = Reader {
            buf: body,
            pos: 0,
            kind: side,
            number: 0,
        };
        let found = r.u8("version")?;
        if found != VERSION {
            return Err(StoreWireError::Version { found });
        }
        let number = r.u8("kind")?;
        let known = if side == "request" {
            kind::is_request(number)
        } else {
            kind::is_reply(number)
        };
        if known {
            r.kind = kind::name(number);
            r.number = number;
        }
        // Unknown kinds are refused by the caller's match.
        Ok((number, r))
    }

    fn left(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], StoreWireError> {
        let left = self.left();
        if n > left {
            return Err(StoreWireError::Truncated {
                kind: self.kind,
                field,
                needed: n,
                left,
            });
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], StoreWireError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, field)?);
        Ok(out)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, StoreWireError> {
        self.array(field).map(u8::from_le_bytes)
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, StoreWireError> {
        self.array(field).map(u16::from_le_bytes)
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, StoreWireError> {
        self.array(field).map(u32::from_le_bytes)
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, StoreWireError> {
        self.array(field).map(u64::from_le_bytes)
    }

    /// The count of the kind's vector, at most [`MAX_ITEMS`], of items of at least
    /// `min_bytes` each that fit in the bytes left.
    fn count(&mut self, min_bytes: usize) -> Result<usize, StoreWireError> {
        let field = count_field(self.number);
        let count = self.u32("count")? as usize;
        if count > MAX_ITEMS {
            return Err(StoreWireError::TooMany {
                kind: self.kind,
                field,
                count,
                limit: MAX_ITEMS,
            });
        }
        let left = self.left();
        if count.saturating_mul(min_bytes) > left {
            return Err(StoreWireError::CountPastEnd {
                kind: self.kind,
                field,
                count,
                min_bytes,
                left,
            });
        }
        Ok(count)
    }

    /// Key `index`: its length checked before its bytes are copied.
    fn key(&mut self, index: usize) -> Result<Vec<u8>, StoreWireError> {
        let len = self.u32("key length")? as usize;
        if len == 0 || len > MAX_KEY {
            return Err(StoreWireError::BadKey {
                item: Some((self.kind, index)),
                len,
            });
        }
        Ok(self.take(len, "key")?.to_vec())
    }

    /// A vector of keys.
    fn keys(&mut self) -> Result<Vec<Vec<u8>>, StoreWireError> {
        let n = self.count(4)?;
        let mut keys = Vec::with_capacity(n);
        for index in 0..n {
            keys.push(self.key(index)?);
        }
        Ok(keys)
    }

    /// A vector of `(key, u64)` pairs, each u64 checked by `check(index, value)`.
    fn keyed(
        &mut self,
        check: impl Fn(usize, u64) -> Result<(), StoreWireError>,
    ) -> Result<Vec<(Vec<u8>, u64)>, StoreWireError> {
        let field = if self.number == kind::RESERVE {
            "len"
        } else {
            "token"
        };
        let n = self.count(4 + 8)?;
        let mut items = Vec::with_capacity(n);
        for index in 0..n {
            let key = self.key(index)?;
            let value = self.u64(field)?;
            check(index, value)?;
            items.push((key, value));
        }
        Ok(items)
    }

    /// Status byte of item `index`.
    fn status(&mut self, index: usize) -> Result<ItemStatus, StoreWireError> {
        let value = self.u8("status")?;
        ItemStatus::from_u8(value).ok_or(StoreWireError::BadStatus {
            kind: self.kind,
            index,
            value,
        })
    }

    /// Refuses bytes after the message.
    fn finish(&self) -> Result<(), StoreWireError> {
        match self.left() {
            0 => Ok(()),
            count => Err(StoreWireError::TrailingBytes {
                kind: self.kind,
                count,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;

    fn le32(v: u32) -> [u8; 4] {
        v.to_le_bytes()
    }

    fn le64(v: u64) -> [u8; 8] {
        v.to_le_bytes()
    }

    /// One request of every kind with its exact bytes: the format, pinned.
    fn pinned_requests() -> Vec<(Request, Vec<u8>)> {
        vec![
            (
                Request::Reserve {
                    items: vec![(b"ab".to_vec(), 4096), (b"c".to_vec(), 1)],
                },
                [
                    &[1u8, 1, 2, 0, 0, 0][..],
                    &[2, 0, 0, 0, b'a', b'b', 0, 0x10, 0, 0, 0, 0, 0, 0],
                    &[1, 0, 0, 0, b'c', 1, 0, 0, 0, 0, 0, 0, 0],
                ]
                .concat(),
            ),
            (
                Request::Commit {
                    items: vec![(b"k".to_vec(), 0x0102_0304_0506_0708)],
                },
                vec![1, 2, 1, 0, 0, 0, 1, 0, 0, 0, b'k', 8, 7, 6, 5, 4, 3, 2, 1],
            ),
            (
                Request::Abort {
                    items: vec![(b"k".to_vec(), 0)],
                },
                vec![1, 3, 1, 0, 0, 0, 1, 0, 0, 0, b'k', 0, 0, 0, 0, 0, 0, 0, 0],
            ),
            (
                Request::Lookup {
                    keys: vec![b"x".to_vec(), b"yz".to_vec()],
                },
                vec![1, 4, 2, 0, 0, 0, 1, 0, 0, 0, b'x', 2, 0, 0, 0, b'y', b'z'],
            ),
            (
                Request::Release {
                    leases: vec![0x0102_0304_0506_0708, u64::MAX],
                },
                [
                    &[1u8, 5, 2, 0, 0, 0][..],
                    &le64(0x0102_0304_0506_0708),
                    &[0xff; 8],
                ]
                .concat(),
            ),
            (
                Request::Exists {
                    keys: vec![vec![0xff; 3]],
                },
                vec![1, 6, 1, 0, 0, 0, 3, 0, 0, 0, 0xff, 0xff, 0xff],
            ),
            (Request::Remove { keys: vec![] }, vec![1, 7, 0, 0, 0, 0]),
            (Request::RemoveAll, vec![1, 8]),
            (Request::Stats, vec![1, 9]),
        ]
    }

    fn numbered_stats() -> StoreStats {
        let mut fields = [0u64; 16];
        for (i, f) in fields.iter_mut().enumerate() {
            *f = i as u64 + 1;
        }
        StoreStats::from_array(fields)
    }

    /// One reply of every kind with its exact bytes.
    fn pinned_replies() -> Vec<(Reply, Vec<u8>)> {
        let mut stats_bytes = vec![1u8, 0x87];
        for i in 1..=16u64 {
            stats_bytes.extend_from_slice(&le64(i));
        }
        vec![
            (
                Reply::Reserved(vec![
                    ReserveItem::Granted {
                        addr: 0x1000,
                        token: 5,
                    },
                    ReserveItem::Refused(ItemStatus::NoSpace),
                ]),
                [
                    &[1u8, 0x81, 2, 0, 0, 0, 0][..],
                    &le64(0x1000),
                    &le64(5),
                    &[2],
                ]
                .concat(),
            ),
            (
                Reply::Statuses(vec![
                    ItemStatus::Ok,
                    ItemStatus::UnknownReservation,
                    ItemStatus::Leased,
                ]),
                vec![1, 0x82, 3, 0, 0, 0, 0, 5, 4],
            ),
            (
                Reply::Found {
                    lease_ms: 5000,
                    items: vec![
                        LookupItem::Found {
                            addr: 0x2000,
                            len: 0x100,
                            lease: 9,
                        },
                        LookupItem::Missing(ItemStatus::NotFound),
                        LookupItem::Missing(ItemStatus::Failed),
                    ],
                },
                [
                    &[1u8, 0x83][..],
                    &le32(5000),
                    &le32(3),
                    &[0],
                    &le64(0x2000),
                    &le64(0x100),
                    &le64(9),
                    &[3, 6],
                ]
                .concat(),
            ),
            (
                Reply::Existing(vec![true, false, true]),
                vec![1, 0x84, 3, 0, 0, 0, 1, 0, 1],
            ),
            (Reply::Done, vec![1, 0x85]),
            (
                Reply::RemovedAll(0x0102),
                vec![1, 0x86, 2, 1, 0, 0, 0, 0, 0, 0],
            ),
            (Reply::Stats(numbered_stats()), stats_bytes),
            (
                Reply::Error {
                    code: error_code::NO_SEGMENT,
                    reason: "né".into(),
                },
                vec![1, 0x88, 1, 0, 3, 0, 0, 0, b'n', 0xc3, 0xa9],
            ),
        ]
    }

    #[test]
    fn every_request_kind_has_pinned_bytes() {
        let names = [
            "Reserve",
            "Commit",
            "Abort",
            "Lookup",
            "Release",
            "Exists",
            "Remove",
            "RemoveAll",
            "Stats",
        ];
        let lens = [2, 1, 1, 2, 2, 1, 0, 0, 0];
        for (i, (request, bytes)) in pinned_requests().into_iter().enumerate() {
            assert_eq!(usize::from(request.kind()), i + 1);
            assert_eq!(request.kind_name(), names[i]);
            assert_eq!(kind::name(request.kind()), names[i]);
            assert!(kind::is_request(request.kind()) && !kind::is_reply(request.kind()));
            assert_eq!(request.len(), lens[i], "{request:?}");
            assert_eq!(request.is_empty(), lens[i] == 0);
            assert_eq!(request.encode(), bytes, "{request:?}");
            assert_eq!(request.encoded_len(), bytes.len());
            assert_eq!(request.validate(), Ok(()));
            assert_eq!(Request::decode(&bytes), Ok(request));
        }
    }

    #[test]
    fn every_reply_kind_has_pinned_bytes() {
        let names = [
            "Reserved",
            "Statuses",
            "Found",
            "Existing",
            "Done",
            "RemovedAll",
            "Stats",
            "Error",
        ];
        let items = [Some(2), Some(3), Some(3), Some(3), None, None, None, None];
        for (i, (reply, bytes)) in pinned_replies().into_iter().enumerate() {
            assert_eq!(usize::from(reply.kind()), 0x81 + i);
            assert_eq!(reply.kind_name(), names[i]);
            assert!(kind::is_reply(reply.kind()) && !kind::is_request(reply.kind()));
            assert_eq!(reply.items(), items[i]);
            assert_eq!(reply.encode(), bytes, "{reply:?}");
            assert_eq!(reply.encoded_len(), bytes.len());
            assert_eq!(reply.validate(), Ok(()));
            assert_eq!(Reply::decode(&bytes), Ok(reply));
        }
        assert_eq!(kind::name(0), "unknown");
        assert_eq!(kind::name(10), "unknown");
        assert_eq!(kind::name(0x80), "unknown");
        assert_eq!(kind::name(0x89), "unknown");
    }

    #[test]
    fn names_and_codes() {
        for (i, status) in ItemStatus::ALL.into_iter().enumerate() {
            assert_eq!(usize::from(status.code()), i);
            assert_eq!(ItemStatus::from_u8(status.code()), Some(status));
            assert_eq!(status.to_string(), status.name());
            assert_eq!(format!("{status:?}"), status.name());
        }
        assert_eq!(ItemStatus::from_u8(7), None);
        assert_eq!(ItemStatus::from_u8(255), None);
        assert_eq!(error_code::name(error_code::NO_SEGMENT), "NO_SEGMENT");
        assert_eq!(
            error_code::name(error_code::UNSUPPORTED_VERSION),
            "UNSUPPORTED_VERSION"
        );
        assert_eq!(error_code::name(error_code::MALFORMED), "MALFORMED");
        assert_eq!(error_code::name(error_code::BUSY), "BUSY");
        assert_eq!(error_code::name(error_code::INTERNAL), "INTERNAL");
        assert_eq!(error_code::name(0), "UNKNOWN");
        assert_eq!(error_code::name(6), "UNKNOWN");
        // Unknown codes decode (a newer server may send them).
        let e = Reply::error(0xbeef, "new");
        assert_eq!(Reply::decode(&e.encode()), Ok(e));
    }

    #[test]
    fn stats_add_sums_every_field() {
        let mut total = StoreStats::default();
        total.add(&numbered_stats());
        total.add(&numbered_stats());
        let doubled: Vec<u64> = (1..=16).map(|i| 2 * i).collect();
        assert_eq!(total.to_array().to_vec(), doubled);
        assert_eq!(total.memory_capacity, 2);
        assert_eq!(total.expired_leases, 32);
        let full = StoreStats {
            hits: u64::MAX,
            ..StoreStats::default()
        };
        total.add(&full);
        assert_eq!(total.hits, u64::MAX);
        assert_eq!(total.misses, 22);
        assert_eq!(StoreStats::from_array(total.to_array()), total);
    }

    #[test]
    fn the_largest_messages_fit() {
        assert_eq!(MAX_REQUEST_LEN, 2 + 4 + 8192 * 268);
        assert_eq!(MAX_REPLY_LEN, 2 + 4 + 4 + 8192 * 25);
        let key = vec![7u8; MAX_KEY];
        let reserve = Request::Reserve {
            items: vec![(key.clone(), u64::MAX); MAX_ITEMS],
        };
        let body = reserve.encode();
        assert_eq!(body.len(), MAX_REQUEST_LEN);
        assert_eq!(reserve.max_reply_len(), 2 + 4 + 8192 * 17);
        assert_eq!(Request::decode(&body), Ok(reserve));
        let lookup = Request::Lookup {
            keys: vec![key; MAX_ITEMS],
        };
        assert_eq!(lookup.max_reply_len(), MAX_REPLY_LEN);
        let found = Reply::Found {
            lease_ms: u32::MAX,
            items: vec![
                LookupItem::Found {
                    addr: 1,
                    len: u64::MAX - 1,
                    lease: 3,
                };
                MAX_ITEMS
            ],
        };
        let body = found.encode();
        assert_eq!(body.len(), MAX_REPLY_LEN);
        assert_eq!(Reply::decode(&body), Ok(found));
        let error = Reply::error(error_code::INTERNAL, "x".repeat(2 * MAX_REASON));
        assert_eq!(error.encoded_len(), MAX_ERROR_LEN);
        assert!(Request::Release { leases: vec![] }.max_reply_len() == MAX_ERROR_LEN);
        assert!(Request::Stats.max_reply_len() == MAX_ERROR_LEN);
    }

    #[test]
    fn chunking_a_batch() {
        let none: [&[u8]; 0] = [];
        assert!(batch_ranges(&none, 8).is_empty());
        assert_eq!(encoded_len_of_keys(none, 8), 6);
        let keys: Vec<Vec<u8>> = (0..MAX_ITEMS * 2 + 1).map(|_| vec![1; MAX_KEY]).collect();
        let ranges = batch_ranges(&keys, 8);
        assert_eq!(ranges, [0..8192, 8192..16384, 16384..16385]);
        assert_eq!(
            encoded_len_of_keys(keys[..MAX_ITEMS].iter().map(Vec::as_slice), 8),
            MAX_REQUEST_LEN
        );
        // Bytes bind when the items are large: 1 MiB of extra per item, 3 per request.
        let short: Vec<&[u8]> = vec![b"k"; 10];
        let big = 1 << 20;
        let ranges = batch_ranges(&short, big);
        assert_eq!(ranges, [0..3, 3..6, 6..9, 9..10]);
        for r in &ranges {
            assert!(encoded_len_of_keys(short[r.clone()].iter().copied(), big) <= MAX_MESSAGE);
        }
        // An item too large alone gets its own range.
        let ranges = batch_ranges(&short[..2], MAX_MESSAGE);
        assert_eq!(ranges, [0..1, 1..2]);
        assert_eq!(encoded_len_of_keys([&b"k"[..]], usize::MAX), usize::MAX);
    }

    #[test]
    fn keys_are_checked() {
        assert_eq!(check_key(b"k"), Ok(()));
        assert_eq!(check_key(&[0; MAX_KEY]), Ok(()));
        let e = check_key(b"").unwrap_err();
        assert_eq!(e, StoreWireError::BadKey { item: None, len: 0 });
        assert_eq!(e.to_string(), "key of 0 bytes: a key is 1 to 256 bytes");
        assert_eq!(
            check_key(&[0; MAX_KEY + 1]),
            Err(StoreWireError::BadKey {
                item: None,
                len: 257
            })
        );

        // In a request: by validate and by decode, naming the item.
        let request = Request::Exists {
            keys: vec![b"a".to_vec(), vec![]],
        };
        let want = StoreWireError::BadKey {
            item: Some(("Exists", 1)),
            len: 0,
        };
        assert_eq!(request.validate(), Err(want.clone()));
        assert_eq!(Request::decode(&request.encode()), Err(want.clone()));
        assert_eq!(
            want.to_string(),
            "Exists item 1: key of 0 bytes: a key is 1 to 256 bytes"
        );
        let request = Request::Commit {
            items: vec![(vec![1; MAX_KEY + 1], 3)],
        };
        let want = StoreWireError::BadKey {
            item: Some(("Commit", 0)),
            len: 257,
        };
        assert_eq!(request.validate(), Err(want.clone()));
        assert_eq!(Request::decode(&request.encode()), Err(want));
        // A huge announced key length is refused before anything is read or allocated.
        let mut body = vec![1, kind::LOOKUP, 1, 0, 0, 0];
        body.extend_from_slice(&le32(u32::MAX));
        assert_eq!(
            Request::decode(&body),
            Err(StoreWireError::BadKey {
                item: Some(("Lookup", 0)),
                len: u32::MAX as usize
            })
        );
    }

    #[test]
    fn refuses_bad_headers() {
        assert_eq!(
            Request::decode(&[]),
            Err(StoreWireError::Truncated {
                kind: "request",
                field: "version",
                needed: 1,
                left: 0
            })
        );
        let e = Reply::decode(&[1]).unwrap_err();
        assert_eq!(
            e,
            StoreWireError::Truncated {
                kind: "reply",
                field: "kind",
                needed: 1,
                left: 0
            }
        );
        assert_eq!(
            e.to_string(),
            "store reply message ends inside its kind (needs 1 bytes, 0 left)"
        );
        for version in [0u8, 2, 255] {
            let e = Request::decode(&[version, kind::STATS]).unwrap_err();
            assert_eq!(e, StoreWireError::Version { found: version });
            assert!(e.to_string().contains(&format!("version {version}")), "{e}");
            assert_eq!(
                Reply::decode(&[version, kind::DONE]),
                Err(StoreWireError::Version { found: version })
            );
        }
        for k in [0u8, 10, 0x80, 0x89, 255] {
            let e = Request::decode(&[1, k]).unwrap_err();
            assert_eq!(
                e,
                StoreWireError::UnknownKind {
                    side: "request",
                    kind: k
                }
            );
            assert!(
                e.to_string().contains(&format!("request kind {k} (")),
                "{e}"
            );
            assert_eq!(
                Reply::decode(&[1, k]),
                Err(StoreWireError::UnknownKind {
                    side: "reply",
                    kind: k
                })
            );
        }
        // A reply decoded as a request, and the other way round, say so.
        let e = Request::decode(&Reply::Done.encode()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown store request kind 133 (kind 133 is the reply Done: requests are kinds 1 to 9)"
        );
        let e = Reply::decode(&Request::Stats.encode()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown store reply kind 9 (kind 9 is the request Stats: replies are kinds 129 to 136)"
        );
        let e = Reply::decode(&[1, 0]).unwrap_err().to_string();
        assert!(e.ends_with("(replies are kinds 129 to 136)"), "{e}");
    }

    #[test]
    fn refuses_bodies_over_max_message() {
        let mut body = vec![0u8; MAX_MESSAGE + 1];
        body[0] = VERSION;
        body[1] = kind::RELEASE;
        let e = Request::decode(&body).unwrap_err();
        assert_eq!(
            e,
            StoreWireError::TooLong {
                len: MAX_MESSAGE + 1
            }
        );
        assert!(e.to_string().contains("4194305 bytes"), "{e}");
        body[1] = kind::EXISTING;
        assert_eq!(
            Reply::decode(&body),
            Err(StoreWireError::TooLong {
                len: MAX_MESSAGE + 1
            })
        );
        // `validate` cannot reach TooLong with today's limits: MAX_ITEMS items with keys
        // of at most MAX_KEY bytes encode within MAX_REQUEST_LEN and MAX_REPLY_LEN, both
        // under MAX_MESSAGE (asserted at compile time); its check guards changed limits.
    }

    #[test]
    fn refuses_counts_over_the_limit_or_past_the_end() {
        for (k, field, min) in [
            (kind::RESERVE, "items", 12),
            (kind::COMMIT, "items", 12),
            (kind::ABORT, "items", 12),
            (kind::LOOKUP, "keys", 4),
            (kind::RELEASE, "leases", 8),
            (kind::EXISTS, "keys", 4),
            (kind::REMOVE, "keys", 4),
        ] {
            let name = kind::name(k);
            let mut body = vec![1, k];
            body.extend_from_slice(&le32(MAX_ITEMS as u32 + 1));
            let e = Request::decode(&body).unwrap_err();
            assert_eq!(
                e,
                StoreWireError::TooMany {
                    kind: name,
                    field,
                    count: MAX_ITEMS + 1,
                    limit: MAX_ITEMS
                }
            );
            assert_eq!(
                e.to_string(),
                format!("{name} carries 8193 {field}, more than the limit of 8192")
            );
            let mut body = vec![1, k];
            body.extend_from_slice(&le32(MAX_ITEMS as u32));
            body.extend_from_slice(&[1; 100]);
            let e = Request::decode(&body).unwrap_err();
            assert_eq!(
                e,
                StoreWireError::CountPastEnd {
                    kind: name,
                    field,
                    count: MAX_ITEMS,
                    min_bytes: min,
                    left: 100
                }
            );
            assert!(e.to_string().contains("only 100 bytes are left"), "{e}");
        }
        for (k, field, fixed) in [
            (kind::RESERVED, "items", 0),
            (kind::STATUSES, "statuses", 0),
            (kind::FOUND, "items", 4),
            (kind::EXISTING, "answers", 0),
        ] {
            let name = kind::name(k);
            let mut body = vec![1, k];
            body.extend_from_slice(&vec![0; fixed]);
            body.extend_from_slice(&le32(u32::MAX));
            assert_eq!(
                Reply::decode(&body),
                Err(StoreWireError::TooMany {
                    kind: name,
                    field,
                    count: u32::MAX as usize,
                    limit: MAX_ITEMS
                })
            );
            let mut body = vec![1, k];
            body.extend_from_slice(&vec![0; fixed]);
            body.extend_from_slice(&le32(3));
            body.extend_from_slice(&[0, 0]);
            assert_eq!(
                Reply::decode(&body),
                Err(StoreWireError::CountPastEnd {
                    kind: name,
                    field,
                    count: 3,
                    min_bytes: 1,
                    left: 2
                })
            );
        }
        // validate refuses the same counts.
        let too_many = Request::Release {
            leases: vec![0; MAX_ITEMS + 1],
        };
        assert_eq!(
            too_many.validate(),
            Err(StoreWireError::TooMany {
                kind: "Release",
                field: "leases",
                count: MAX_ITEMS + 1,
                limit: MAX_ITEMS
            })
        );
        assert_eq!(
            Request::decode(&too_many.encode()),
            too_many.validate().map(|_| too_many)
        );
        let too_many = Reply::Existing(vec![true; MAX_ITEMS + 1]);
        let want = Err(StoreWireError::TooMany {
            kind: "Existing",
            field: "answers",
            count: MAX_ITEMS + 1,
            limit: MAX_ITEMS,
        });
        assert_eq!(too_many.validate(), want);
        assert_eq!(Reply::decode(&too_many.encode()), want.map(|()| too_many));
    }

    #[test]
    fn refuses_truncated_fields_naming_them() {
        let cases: [(&[u8], &str, &str, usize, usize); 8] = [
            (&[1, 1, 1, 0], "Reserve", "count", 4, 2),
            (
                &[
                    1, 1, 1, 0, 0, 0, 5, 0, 0, 0, b'k', b'k', b'k', b'k', b'k', 1, 0, 0,
                ],
                "Reserve",
                "len",
                8,
                3,
            ),
            (
                &[
                    1, 2, 1, 0, 0, 0, 5, 0, 0, 0, b'k', b'k', b'k', b'k', b'k', 1, 0, 0,
                ],
                "Commit",
                "token",
                8,
                3,
            ),
            (&[1, 4, 1, 0, 0, 0, 9, 0, 0, 0, b'k'], "Lookup", "key", 9, 1),
            (
                &[1, 4, 2, 0, 0, 0, 1, 0, 0, 0, b'k', 9, 0, 0],
                "Lookup",
                "key length",
                4,
                3,
            ),
            (&[1, 0x83, 0, 0, 0], "Found", "lease_ms", 4, 3),
            (&[1, 0x86, 0], "RemovedAll", "removed count", 8, 1),
            (&[1, 0x88, 1, 0, 4, 0, 0, 0, b'a'], "Error", "reason", 4, 1),
        ];
        for (body, kind, field, needed, left) in cases {
            let e = if body[1] & 0x80 == 0 {
                Request::decode(body).unwrap_err()
            } else {
                Reply::decode(body).unwrap_err()
            };
            assert_eq!(
                e,
                StoreWireError::Truncated {
                    kind,
                    field,
                    needed,
                    left
                },
                "{body:?}"
            );
            assert!(
                e.to_string()
                    .starts_with(&format!("store {kind} message ends inside its {field}")),
                "{e}"
            );
        }
        let mut stats = Reply::Stats(numbered_stats()).encode();
        stats.truncate(stats.len() - 1);
        assert_eq!(
            Reply::decode(&stats),
            Err(StoreWireError::Truncated {
                kind: "Stats",
                field: "expired_leases",
                needed: 8,
                left: 7
            })
        );
        let mut found = pinned_replies()[2].1.clone();
        found.truncate(10 + 1 + 8 + 3);
        found[6..10].copy_from_slice(&le32(1));
        assert_eq!(
            Reply::decode(&found),
            Err(StoreWireError::Truncated {
                kind: "Found",
                field: "len",
                needed: 8,
                left: 3
            })
        );
    }

    #[test]
    fn refuses_trailing_bytes() {
        for (request, mut bytes) in pinned_requests() {
            bytes.push(0);
            let e = Request::decode(&bytes).unwrap_err();
            assert_eq!(
                e,
                StoreWireError::TrailingBytes {
                    kind: request.kind_name(),
                    count: 1
                }
            );
            assert_eq!(
                e.to_string(),
                format!("1 trailing bytes after the {} message", request.kind_name())
            );
        }
        for (reply, mut bytes) in pinned_replies() {
            bytes.extend_from_slice(&[0, 0]);
            assert_eq!(
                Reply::decode(&bytes),
                Err(StoreWireError::TrailingBytes {
                    kind: reply.kind_name(),
                    count: 2
                })
            );
        }
    }

    #[test]
    fn refuses_a_zero_length_reservation() {
        let request = Request::Reserve {
            items: vec![(b"a".to_vec(), 1), (b"b".to_vec(), 0)],
        };
        let want = StoreWireError::ZeroLength { index: 1 };
        assert_eq!(request.validate(), Err(want.clone()));
        assert_eq!(Request::decode(&request.encode()), Err(want.clone()));
        assert!(want.to_string().contains("Reserve item 1 has len 0"));
        // Tokens may be anything, 0 included.
        let request = Request::Abort {
            items: vec![(b"b".to_vec(), 0)],
        };
        assert_eq!(Request::decode(&request.encode()), Ok(request));
    }

    #[test]
    fn refuses_bad_item_statuses() {
        for (k, kind_name) in [
            (kind::RESERVED, "Reserved"),
            (kind::STATUSES, "Statuses"),
            (kind::FOUND, "Found"),
        ] {
            for value in [7u8, 0x80, 0xff] {
                let mut body = vec![1, k];
                if k == kind::FOUND {
                    body.extend_from_slice(&le32(10));
                }
                body.extend_from_slice(&le32(2));
                body.extend_from_slice(&[3, value]);
                if k == kind::RESERVED {
                    body[6] = 2; // a valid refusal first
                }
                let e = Reply::decode(&body).unwrap_err();
                assert_eq!(
                    e,
                    StoreWireError::BadStatus {
                        kind: kind_name,
                        index: 1,
                        value
                    },
                    "{body:?}"
                );
                assert!(
                    e.to_string().contains(&format!("status byte {value}")),
                    "{e}"
                );
            }
        }
        // Statuses never carried: a refused reservation that is Ok, a missing object
        // that is anything but NotFound or Failed.
        let reply = Reply::Reserved(vec![ReserveItem::Refused(ItemStatus::Ok)]);
        let e = reply.validate().unwrap_err();
        assert_eq!(
            e,
            StoreWireError::StatusNotAllowed {
                kind: "Reserved",
                index: 0,
                status: ItemStatus::Ok
            }
        );
        assert_eq!(
            e.to_string(),
            "Reserved item 0 has status Ok, but a refused Reserved item is never Ok"
        );
        // Encoded as a byte no decoder takes, never as a granted item.
        assert_eq!(reply.encode(), [1, 0x81, 1, 0, 0, 0, 0xff]);
        assert!(matches!(
            Reply::decode(&reply.encode()),
            Err(StoreWireError::BadStatus { value: 0xff, .. })
        ));
        for status in ItemStatus::ALL {
            let reply = Reply::Found {
                lease_ms: 1,
                items: vec![LookupItem::Missing(status)],
            };
            let decoded = Reply::decode(&reply.encode());
            match status {
                ItemStatus::NotFound | ItemStatus::Failed => {
                    assert_eq!(reply.validate(), Ok(()));
                    assert_eq!(decoded, Ok(reply));
                }
                ItemStatus::Ok => {
                    assert!(reply.validate().is_err());
                    assert!(matches!(
                        decoded,
                        Err(StoreWireError::BadStatus { value: 0xff, .. })
                    ));
                }
                _ => {
                    let want = StoreWireError::StatusNotAllowed {
                        kind: "Found",
                        index: 0,
                        status,
                    };
                    assert_eq!(reply.validate(), Err(want.clone()));
                    assert_eq!(decoded, Err(want.clone()));
                    assert!(want.to_string().contains("NotFound or Failed"), "{want}");
                }
            }
            let reserved = Reply::Reserved(vec![ReserveItem::Refused(status)]);
            assert_eq!(reserved.validate().is_ok(), status != ItemStatus::Ok);
            let statuses = Reply::Statuses(vec![status]);
            assert_eq!(Reply::decode(&statuses.encode()), Ok(statuses));
        }
    }

    #[test]
    fn refuses_bad_existing_bytes() {
        let e = Reply::decode(&[1, 0x84, 3, 0, 0, 0, 1, 0, 2]).unwrap_err();
        assert_eq!(e, StoreWireError::BadBool { index: 2, value: 2 });
        assert_eq!(
            e.to_string(),
            "Existing item 2 is byte 2, not 0 (absent) or 1 (present)"
        );
    }

    #[test]
    fn refuses_bad_found_extents() {
        for (addr, len) in [(0x1000, 0), (u64::MAX, 1), (2, u64::MAX - 1)] {
            let reply = Reply::Found {
                lease_ms: 1,
                items: vec![LookupItem::Found {
                    addr,
                    len,
                    lease: 1,
                }],
            };
            let want = StoreWireError::BadExtent {
                index: 0,
                addr,
                len,
            };
            assert_eq!(reply.validate(), Err(want.clone()));
            assert_eq!(Reply::decode(&reply.encode()), Err(want.clone()));
            assert!(
                want.to_string()
                    .contains(&format!("{len} bytes at {addr:#x}")),
                "{want}"
            );
        }
        // Ending exactly at the top of the address space is fine.
        let reply = Reply::Found {
            lease_ms: 0,
            items: vec![LookupItem::Found {
                addr: 1,
                len: u64::MAX - 1,
                lease: 0,
            }],
        };
        assert_eq!(Reply::decode(&reply.encode()), Ok(reply));
    }

    #[test]
    fn error_reasons() {
        // Cut at a char boundary: "é" straddles bytes 1023 and 1024.
        let reason = format!("{}é tail", "a".repeat(MAX_REASON - 1));
        let long = Reply::Error {
            code: error_code::INTERNAL,
            reason: reason.clone(),
        };
        assert_eq!(
            long.validate(),
            Err(StoreWireError::ReasonTooLong { len: reason.len() })
        );
        let cut = Reply::error(error_code::INTERNAL, reason.clone());
        let Reply::Error { reason: got, .. } = &cut else {
            unreachable!()
        };
        assert_eq!(got.len(), MAX_REASON - 1);
        assert_eq!(cut.validate(), Ok(()));
        assert_eq!(long.encode(), cut.encode());
        assert_eq!(Reply::decode(&long.encode()), Ok(cut));

        let with = |len: u32, reason: &[u8]| {
            let mut body = vec![1, 0x88, 5, 0];
            body.extend_from_slice(&le32(len));
            body.extend_from_slice(reason);
            body
        };
        let e = Reply::decode(&with(MAX_REASON as u32 + 1, &[b'a'; MAX_REASON + 1])).unwrap_err();
        assert_eq!(
            e,
            StoreWireError::ReasonTooLong {
                len: MAX_REASON + 1
            }
        );
        assert!(
            e.to_string()
                .contains("1025 bytes exceeds the limit of 1024"),
            "{e}"
        );
        assert_eq!(
            Reply::decode(&with(u32::MAX, b"")),
            Err(StoreWireError::ReasonTooLong {
                len: u32::MAX as usize
            })
        );
        let e = Reply::decode(&with(3, b"ab\x80")).unwrap_err();
        assert_eq!(e, StoreWireError::ReasonNotUtf8 { valid_up_to: 2 });
        assert!(e.to_string().contains("not UTF-8"), "{e}");
        assert_eq!(
            Reply::decode(&with(1, &"é".as_bytes()[..1])),
            Err(StoreWireError::ReasonNotUtf8 { valid_up_to: 0 })
        );
        assert!(Reply::decode(&with(MAX_REASON as u32, &[b'z'; MAX_REASON])).is_ok());
        assert!(Reply::decode(&with(0, b"")).is_ok());
    }

    /// The reply a well-behaved server would make to `request`.
    fn server_reply(request: &Request, seed: u64) -> Reply {
        let n = request.len();
        let pick = |i: usize| (seed >> (i % 60)) & 3;
        match request {
            Request::Reserve { .. } => Reply::Reserved(
                (0..n)
                    .map(|i| match pick(i) {
                        0 => ReserveItem::Refused(ItemStatus::AlreadyExists),
                        1 => ReserveItem::Refused(ItemStatus::NoSpace),
                        _ => ReserveItem::Granted {
                            addr: 0x1000 * i as u64,
                            token: seed ^ i as u64,
                        },
                    })
                    .collect(),
            ),
            Request::Commit { .. } | Request::Abort { .. } | Request::Remove { .. } => {
                Reply::Statuses(
                    (0..n)
                        .map(|i| ItemStatus::ALL[(seed as usize + i) % 7])
                        .collect(),
                )
            }
            Request::Lookup { .. } => Reply::Found {
                lease_ms: seed as u32,
                items: (0..n)
                    .map(|i| match pick(i) {
                        0 => LookupItem::Missing(ItemStatus::NotFound),
                        1 => LookupItem::Missing(ItemStatus::Failed),
                        _ => LookupItem::Found {
                            addr: 0x1000 + i as u64,
                            len: 4096,
                            lease: i as u64,
                        },
                    })
                    .collect(),
            },
            Request::Exists { .. } => Reply::Existing((0..n).map(|i| pick(i) == 0).collect()),
            Request::Release { .. } => Reply::Done,
            Request::RemoveAll => Reply::RemovedAll(seed),
            Request::Stats => Reply::Stats(numbered_stats()),
        }
    }

    /// One more item than the reply has (or one less when it has some).
    fn off_by_one(reply: &Reply) -> Option<Reply> {
        let mut reply = reply.clone();
        match &mut reply {
            Reply::Reserved(items) => {
                items.push(ReserveItem::Refused(ItemStatus::NoSpace));
            }
            Reply::Statuses(statuses) => {
                if statuses.pop().is_none() {
                    statuses.push(ItemStatus::Ok);
                }
            }
            Reply::Found { items, .. } => {
                if items.pop().is_none() {
                    items.push(LookupItem::Missing(ItemStatus::NotFound));
                }
            }
            Reply::Existing(answers) => answers.push(false),
            _ => return None,
        }
        Some(reply)
    }

    #[test]
    fn reply_matches_its_request() {
        for (request, _) in pinned_requests() {
            let reply = server_reply(&request, 0x5a5a);
            assert_eq!(
                reply_matches(&request, &reply),
                Ok(()),
                "{request:?} {reply:?}"
            );
            assert_eq!(
                reply_matches(&request, &Reply::error(error_code::NO_SEGMENT, "none")),
                Ok(())
            );
            if let Some(wrong) = off_by_one(&reply) {
                let e = reply_matches(&request, &wrong).unwrap_err();
                assert_eq!(
                    e,
                    StoreWireError::CountMismatch {
                        request: request.kind_name(),
                        items: request.len(),
                        reply: reply.kind_name(),
                        answers: wrong.items().unwrap()
                    }
                );
            }
            for (other, _) in pinned_replies() {
                let ok = other.kind() == reply.kind() || other.kind() == kind::ERROR;
                match reply_matches(&request, &other) {
                    Err(StoreWireError::KindMismatch {
                        request: r,
                        reply: p,
                        expected,
                    }) => {
                        assert!(!ok);
                        assert_eq!((r, p), (request.kind_name(), other.kind_name()));
                        assert_eq!(expected, reply.kind_name());
                    }
                    Err(StoreWireError::CountMismatch { .. }) => assert!(ok),
                    Ok(()) => assert!(ok),
                    Err(e) => panic!("{e}"),
                }
            }
        }
        let e = reply_matches(&Request::Stats, &Reply::Done).unwrap_err();
        assert_eq!(
            e.to_string(),
            "a Done reply does not answer a Stats request (expected Stats or Error)"
        );
        let e = reply_matches(
            &Request::Lookup {
                keys: vec![b"a".to_vec(), b"b".to_vec()],
            },
            &Reply::Found {
                lease_ms: 1,
                items: vec![],
            },
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "Found reply has 0 items for a Lookup request of 2 items"
        );
    }

    // ---- property tests ----

    fn key() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            vec(any::<u8>(), 1..=16),
            vec(any::<u8>(), 1..=MAX_KEY),
            Just(vec![0xab; MAX_KEY]),
        ]
    }

    fn keys() -> impl Strategy<Value = Vec<Vec<u8>>> {
        vec(key(), 0..12)
    }

    fn status() -> impl Strategy<Value = ItemStatus> {
        (0u8..7).prop_map(|s| ItemStatus::from_u8(s).unwrap())
    }

    fn edge_u64() -> impl Strategy<Value = u64> {
        prop_oneof![Just(0u64), Just(1), Just(u64::MAX), any::<u64>()]
    }

    /// Any request that survives the wire.
    fn request() -> impl Strategy<Value = Request> {
        let pairs = |min: u64| {
            vec(
                (
                    key(),
                    prop_oneof![Just(min), Just(u64::MAX), min..=u64::MAX],
                ),
                0..12,
            )
        };
        prop_oneof![
            pairs(1).prop_map(|items| Request::Reserve { items }),
            pairs(0).prop_map(|items| Request::Commit { items }),
            pairs(0).prop_map(|items| Request::Abort { items }),
            keys().prop_map(|keys| Request::Lookup { keys }),
            vec(edge_u64(), 0..20).prop_map(|leases| Request::Release { leases }),
            keys().prop_map(|keys| Request::Exists { keys }),
            keys().prop_map(|keys| Request::Remove { keys }),
            Just(Request::RemoveAll),
            Just(Request::Stats),
        ]
    }

    fn reason() -> impl Strategy<Value = String> {
        prop_oneof![
            ".{0,40}",
            vec(any::<char>(), 0..=MAX_REASON / 4).prop_map(String::from_iter),
            Just("é".repeat(MAX_REASON / 2)),
        ]
    }

    /// Any reply that survives the wire.
    fn reply() -> impl Strategy<Value = Reply> {
        let reserve_item = prop_oneof![
            (edge_u64(), edge_u64()).prop_map(|(addr, token)| ReserveItem::Granted { addr, token }),
            (1u8..7).prop_map(|s| ReserveItem::Refused(ItemStatus::from_u8(s).unwrap())),
        ];
        let lookup_item = prop_oneof![
            (0..u64::MAX, edge_u64(), any::<bool>()).prop_map(|(addr, lease, to_top)| {
                let room = u64::MAX - addr;
                let len = if to_top { room } else { 1 + lease % room };
                LookupItem::Found { addr, len, lease }
            }),
            prop_oneof![Just(ItemStatus::NotFound), Just(ItemStatus::Failed)]
                .prop_map(LookupItem::Missing),
        ];
        let stats = vec(edge_u64(), 16).prop_map(|v| StoreStats::from_array(v.try_into().unwrap()));
        prop_oneof![
            vec(reserve_item, 0..12).prop_map(Reply::Reserved),
            vec(status(), 0..12).prop_map(Reply::Statuses),
            (any::<u32>(), vec(lookup_item, 0..12))
                .prop_map(|(lease_ms, items)| Reply::Found { lease_ms, items }),
            vec(any::<bool>(), 0..20).prop_map(Reply::Existing),
            Just(Reply::Done),
            edge_u64().prop_map(Reply::RemovedAll),
            stats.prop_map(Reply::Stats),
            (any::<u16>(), reason()).prop_map(|(code, reason)| Reply::Error { code, reason }),
        ]
    }

    /// Requests with fields around their limits, valid or not.
    fn near_request() -> impl Strategy<Value = Request> {
        let near_key = prop_oneof![key(), Just(vec![]), Just(vec![1; MAX_KEY + 1]),];
        let pairs = vec(
            (near_key.clone(), prop_oneof![Just(0u64), any::<u64>()]),
            0..6,
        );
        prop_oneof![
            pairs.clone().prop_map(|items| Request::Reserve { items }),
            pairs.prop_map(|items| Request::Commit { items }),
            vec(near_key, 0..6).prop_map(|keys| Request::Lookup { keys }),
        ]
    }

    /// Replies with fields around their limits, valid or not.
    fn near_reply() -> impl Strategy<Value = Reply> {
        let lookup_item = prop_oneof![
            (edge_u64(), edge_u64()).prop_map(|(addr, len)| LookupItem::Found {
                addr,
                len,
                lease: 7
            }),
            status().prop_map(LookupItem::Missing),
        ];
        prop_oneof![
            vec(status().prop_map(ReserveItem::Refused), 0..6).prop_map(Reply::Reserved),
            vec(lookup_item, 0..6).prop_map(|items| Reply::Found { lease_ms: 9, items }),
            (MAX_REASON - 2..MAX_REASON + 3).prop_map(|n| Reply::Error {
                code: 1,
                reason: "r".repeat(n)
            }),
        ]
    }

    /// Bodies behind a valid version and a kind, biased to small counts and lengths.
    fn framed_body() -> impl Strategy<Value = Vec<u8>> {
        let kind = prop_oneof![0u8..=10, 0x80u8..=0x89, any::<u8>()];
        let byte = prop_oneof![Just(0u8), Just(1), 2u8..8, any::<u8>()];
        (kind, vec(byte, 0..128)).prop_map(|(kind, rest)| {
            let mut body = vec![VERSION, kind];
            body.extend_from_slice(&rest);
            body
        })
    }

    proptest! {
        #[test]
        fn requests_round_trip(request in request()) {
            prop_assert_eq!(request.validate(), Ok(()));
            let body = request.encode();
            prop_assert_eq!(body.len(), request.encoded_len());
            prop_assert!(body.len() <= MAX_REQUEST_LEN);
            prop_assert_eq!(body[..2].to_vec(), vec![VERSION, request.kind()]);
            prop_assert_eq!(Request::decode(&body), Ok(request));
        }

        #[test]
        fn replies_round_trip(reply in reply()) {
            prop_assert_eq!(reply.validate(), Ok(()));
            let body = reply.encode();
            prop_assert_eq!(body.len(), reply.encoded_len());
            prop_assert_eq!(body[..2].to_vec(), vec![VERSION, reply.kind()]);
            prop_assert_eq!(Reply::decode(&body), Ok(reply));
        }

        #[test]
        fn validate_says_whether_a_message_round_trips(
            request in near_request(),
            reply in near_reply(),
        ) {
            let decoded = Request::decode(&request.encode());
            match request.validate() {
                Ok(()) => prop_assert_eq!(decoded, Ok(request)),
                Err(e) => prop_assert_eq!(decoded, Err(e)),
            }
            let decoded = Reply::decode(&reply.encode());
            match reply.validate() {
                Ok(()) => prop_assert_eq!(decoded, Ok(reply)),
                // Cut on encode, so it decodes, to something else.
                Err(StoreWireError::ReasonTooLong { .. }) => {
                    prop_assert!(decoded.is_ok());
                    prop_assert_ne!(decoded, Ok(reply));
                }
                // Written as status byte 255.
                Err(StoreWireError::StatusNotAllowed { status: ItemStatus::Ok, .. }) => {
                    let bad_status = matches!(decoded, Err(StoreWireError::BadStatus { value: 0xff, .. }));
                    prop_assert!(bad_status, "{:?}", decoded);
                }
                Err(e) => prop_assert_eq!(decoded, Err(e)),
            }
        }

        #[test]
        fn truncation_anywhere_is_an_error(request in request(), reply in reply()) {
            let body = request.encode();
            for cut in 0..body.len() {
                prop_assert!(Request::decode(&body[..cut]).is_err(), "cut at {}", cut);
            }
            let body = reply.encode();
            for cut in 0..body.len() {
                prop_assert!(Reply::decode(&body[..cut]).is_err(), "cut at {}", cut);
            }
        }

        #[test]
        fn arbitrary_bytes_decode_canonically(
            body in prop_oneof![vec(any::<u8>(), 0..64), framed_body()],
        ) {
            if let Ok(request) = Request::decode(&body) {
                prop_assert_eq!(request.validate(), Ok(()));
                prop_assert_eq!(request.encode(), body.clone());
            }
            if let Ok(reply) = Reply::decode(&body) {
                prop_assert_eq!(reply.validate(), Ok(()));
                prop_assert_eq!(reply.encode(), body);
            }
        }

        #[test]
        fn mutated_messages_decode_canonically(
            request in request(),
            reply in reply(),
            at in any::<prop::sample::Index>(),
            byte: u8,
        ) {
            let mut body = request.encode();
            let i = at.index(body.len());
            body[i] = byte;
            if let Ok(decoded) = Request::decode(&body) {
                prop_assert_eq!(decoded.encode(), body);
            }
            let mut body = reply.encode();
            let i = at.index(body.len());
            body[i] = byte;
            if let Ok(decoded) = Reply::decode(&body) {
                prop_assert_eq!(decoded.encode(), body);
            }
        }

        #[test]
        fn server_replies_match_and_miscounts_do_not(request in request(), seed: u64) {
            let reply = server_reply(&request, seed);
            prop_assert_eq!(reply.validate(), Ok(()));
            prop_assert!(reply.encoded_len() <= request.max_reply_len());
            let reply = Reply::decode(&reply.encode()).unwrap();
            prop_assert_eq!(reply_matches(&request, &reply), Ok(()));
            prop_assert_eq!(reply_matches(&request, &Reply::error(3, "no")), Ok(()));
            if let Some(wrong) = off_by_one(&reply) {
                let miscount = matches!(
                    reply_matches(&request, &wrong),
                    Err(StoreWireError::CountMismatch { .. })
                );
                prop_assert!(miscount);
            }
        }

        #[test]
        fn batch_ranges_cover_the_batch(
            lens in vec(prop_oneof![1usize..=MAX_KEY, Just(MAX_KEY)], 0..40),
            extra in prop_oneof![Just(0usize), Just(8), 0usize..(2 << 20)],
        ) {
            let keys: Vec<Vec<u8>> = lens.iter().map(|&n| vec![0; n]).collect();
            let ranges = batch_ranges(&keys, extra);
            let mut next = 0;
            for r in &ranges {
                prop_assert_eq!(r.start, next);
                prop_assert!(r.end > r.start && r.len() <= MAX_ITEMS);
                let len = encoded_len_of_keys(keys[r.clone()].iter().map(Vec::as_slice), extra);
                prop_assert!(len <= MAX_MESSAGE || r.len() == 1);
                // As long as allowed: one more key would not have fitted.
                if r.end < keys.len() {
                    let more = encoded_len_of_keys(keys[r.start..=r.end].iter().map(Vec::as_slice), extra);
                    prop_assert!(more > MAX_MESSAGE || r.len() == MAX_ITEMS);
                }
                next = r.end;
            }
            prop_assert_eq!(next, keys.len());
        }
    }
}
