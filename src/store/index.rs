//! The object index of a segment server: reservations, commits, leases, approximate-LRU
//! eviction and an optional SSD tier, as a pure state machine. Nothing here reads a clock
//! or does I/O: every method that needs the time takes `now`, and bytes are moved by the
//! server between the calls that hand out and take back the blocks.
//!
//! # Life of an object
//!
//! * `reserve` → *reserved* → `commit` → *in memory*; or `abort` / timeout → freed.
//! * *in memory* → `evict` (SSD tier) → *demoting* (still readable) → `demoted(ok)` →
//!   *on disk*; `demoted(!ok)` → back *in memory*.
//! * *on disk* → `promote_begin` → *promoting* → `promote_end(ok)` → *in memory*;
//!   `promote_end(!ok)` → back *on disk*.
//! * `evict` without an SSD tier, and the eviction inside `reserve` / `promote_begin`,
//!   drop objects in memory; a full disk drops objects on disk; `remove` drops any
//!   committed object that is not leased.
//!
//! Objects are immutable and put-if-absent: [`Index::reserve`] allocates memory and hands
//! out a token; the client writes the bytes there and [`Index::commit`]s, which makes the
//! object visible. A reservation never committed is reclaimed after
//! [`IndexConfig::reserve_timeout`] (by [`Index::reclaim`], or when its token or key is
//! used after the deadline).
//!
//! # The golden rule: leases
//!
//! [`Index::lookup`] of an object in memory grants a lease (an id, expiring
//! [`IndexConfig::lease`] after `now`). The memory of an object is never handed out again
//! (by `reserve` or `promote_begin`) while a live lease on it exists or a reservation holds
//! it: leased objects are never evicted nor removed, and an object demoted to disk while
//! leased keeps its memory until its last lease is released or expires (dropped by
//! [`Index::reclaim`]). A lease past its expiry no longer protects anything: checking that
//! the copy finished in time is the reader's job.
//!
//! # Eviction: CLOCK (second-chance FIFO)
//!
//! Committed objects in memory sit in a FIFO ordered by when they entered memory, each
//! with a *referenced* bit that `lookup` and `exists` set (O(1): no reordering on a hit).
//! A victim is found by taking the oldest entry: if its bit is set, the bit is cleared and
//! the entry goes to the back (its second chance); if it is leased it goes to the back too;
//! otherwise it is the victim. This is CLOCK with new entries inserted behind the hand:
//! an approximation of LRU in which a hit reorders nothing. A search visits each
//! entry at most twice, so it ends (with no victim when everything is leased). Objects on
//! disk have their own FIFO with the same rule; objects with a demotion or promotion in
//! flight are in neither and cannot be picked.
//!
//! [`Index::evict`] runs when memory used (less what pending demotions will free) is above
//! the high watermark and picks victims until it is at or below the low watermark. Without
//! an SSD tier victims are dropped; with one, each gets a disk block (dropping the least
//! recently used objects on disk if the disk is full; a victim that still finds no disk
//! block is dropped) and is returned as a [`Demotion`] for the server to copy. When an
//! allocation in `reserve` or `promote_begin` fails, victims are *dropped* (a demotion
//! cannot free memory at once) until it fits: a server with an SSD tier calls `evict`
//! after commits so that memory stays below the high watermark and this stays rare.
//!
//! # Removal during a demotion or promotion
//!
//! Removing an object whose bytes are being copied (a demotion or promotion in flight)
//! succeeds at once: the key is free again, but the memory and the disk block stay
//! allocated until the server reports the end of the copy with [`Index::demoted`] or
//! [`Index::promote_end`], so an in-flight copy can never write into someone else's block.
//! The server must always report the end of every demotion and promotion it was given.
//!
//! ```
//! use kvxfer::store::index::{Index, IndexConfig, Lookup, PutOutcome};
//! use std::time::Instant;
//!
//! let mut index = Index::new(IndexConfig { memory_capacity: 1 << 20, ..Default::default() });
//! let now = Instant::now();
//! let PutOutcome::Reserved(r) = index.reserve(b"page-1", 10_000, now) else { panic!() };
//! // ... the client writes 10 000 bytes at r.offset ...
//! index.commit(b"page-1", r.token, now)?;
//! let Lookup::Found(found) = index.lookup(b"page-1", now) else { panic!() };
//! assert_eq!((found.offset, found.len), (r.offset, 10_000));
//! // ... the reader copies the bytes before found.expires ...
//! assert!(index.release(found.lease));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::alloc::SegmentAllocator;

/// A key as stored: shared between the table and the eviction queues.
type Key = Arc<[u8]>;

/// Capacities, watermarks and timeouts of an [`Index`].
#[derive(Clone, Debug, PartialEq)]
pub struct IndexConfig {
    /// Bytes of the memory segment (rounded down to
    /// [`GRANULE`](super::alloc::GRANULE)).
    pub memory_capacity: u64,
    /// Bytes of the SSD file; 0 means no SSD tier (victims are dropped).
    pub disk_capacity: u64,
    /// Fraction of memory above which [`Index::evict`] evicts (0.0 to 1.0; out-of-range
    /// values are clamped, NaN means the default).
    pub high_watermark: f64,
    /// Fraction of memory [`Index::evict`] evicts down to (clamped to at most
    /// `high_watermark`).
    pub low_watermark: f64,
    /// A reservation not committed within this is reclaimed.
    pub reserve_timeout: Duration,
    /// How long a reader may copy an object it looked up.
    pub lease: Duration,
}

impl Default for IndexConfig {
    /// No capacity, watermarks 0.9 / 0.8, reservations reclaimed after 10 s, leases of 5 s.
    fn default() -> Self {
        IndexConfig {
            memory_capacity: 0,
            disk_capacity: 0,
            high_watermark: 0.9,
            low_watermark: 0.8,
            reserve_timeout: Duration::from_secs(10),
            lease: Duration::from_secs(5),
        }
    }
}

/// Where the bytes of a committed object are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tier {
    /// In the memory segment (possibly with a demotion in flight).
    Memory,
    /// In the SSD file (possibly with a promotion in flight).
    Disk,
}

/// Memory reserved for an object being put.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reservation {
    /// Where the client writes the object in the memory segment.
    pub offset: u64,
    /// The object's length in bytes (the block is this rounded up to a granule).
    pub len: u64,
    /// Passed to [`Index::commit`] or [`Index::abort`]; never reused.
    pub token: u64,
}

/// What [`Index::reserve`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutOutcome {
    /// Memory was reserved: write the bytes there, then commit.
    Reserved(Reservation),
    /// The key is already committed or reserved: objects are put-if-absent.
    AlreadyExists,
    /// The length is 0 or larger than memory, or nothing evictable is left to make room.
    NoSpace,
}

/// Why [`Index::commit`] failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CommitError {
    /// No reservation of this key has this token: the token or key is wrong, the
    /// reservation was aborted, or it passed its timeout and was reclaimed. Put the object
    /// again.
    #[error("no reservation with this key and token (wrong token or key, aborted, or reclaimed after its timeout): put the object again")]
    UnknownReservation,
}

/// Why [`Index::remove`] failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RemoveError {
    /// No committed object has this key (a reservation is not removable).
    #[error("no committed object with this key")]
    NotFound,
    /// A reader holds a live lease on the object; retry after the lease ends.
    #[error(
        "the object is being read under a lease: retry after the lease is released or expires"
    )]
    Leased,
}

/// An object found in memory, leased to the reader.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Found {
    /// Where the object is in the memory segment.
    pub offset: u64,
    /// The object's length in bytes.
    pub len: u64,
    /// The lease id, for [`Index::release`]; never reused.
    pub lease: u64,
    /// The bytes are protected until this instant (exclusive).
    pub expires: Instant,
}

/// What [`Index::lookup`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// In memory, leased.
    Found(Found),
    /// No committed object has this key (a reservation not yet committed is not found).
    NotFound,
    /// The object is on disk (no lease taken): promote it with [`Index::promote_begin`].
    /// The block stays valid until the next call that may evict from disk.
    OnDisk {
        /// Where the object is in the SSD file.
        disk_offset: u64,
        /// The object's length in bytes.
        len: u64,
    },
}

/// A victim of [`Index::evict`] to copy to disk: copy `len` bytes from memory at `offset`
/// to the SSD file at `disk_offset`, then call [`Index::demoted`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Demotion {
    /// The object's key.
    pub key: Vec<u8>,
    /// Where the object is in memory (it stays there, readable, until `demoted`).
    pub offset: u64,
    /// The object's length in bytes.
    pub len: u64,
    /// The disk block reserved for it.
    pub disk_offset: u64,
}

/// Counters and gauges of an [`Index`]: the store's [`StoreStats`](super::wire::StoreStats),
/// as a segment server reports them.
pub type IndexStats = super::wire::StoreStats;

#[derive(Debug)]
enum Entry {
    Reserved(Reserved),
    Object(Object),
}

#[derive(Debug)]
struct Reserved {
    offset: u64,
    len: u64,
    token: u64,
    deadline: Instant,
}

#[derive(Debug)]
struct Object {
    len: u64,
    place: Place,
    /// Set by lookups: the second chance of CLOCK.
    referenced: bool,
    /// Position in the queue of its tier (memory for `Memory`, disk for `Disk`; the
    /// other places are in no queue).
    seq: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    Memory { offset: u64 },
    Demoting { offset: u64, disk: u64 },
    Disk { disk: u64 },
    Promoting { disk: u64, offset: u64 },
}

/// The leases on one memory block (present only while it has at least one).
#[derive(Debug)]
struct Pins {
    len: u64,
    /// An object (or a removed one whose copy is in flight) still holds the block; when
    /// `false` the block is freed with its last lease.
    owned: bool,
    leases: Vec<(u64, Instant)>,
}

/// A removed object whose demotion or promotion is still in flight: its blocks stay
/// allocated until the server reports the end of the copy.
#[derive(Debug)]
struct Zombie {
    key: Key,
    offset: u64,
    disk: u64,
    len: u64,
}

/// The object index of one segment server (see the [module docs](self)).
#[derive(Debug)]
pub struct Index {
    config: IndexConfig,
    high_bytes: u64,
    low_bytes: u64,
    mem: SegmentAllocator,
    disk: SegmentAllocator,
    entries: HashMap<Key, Entry>,
    /// Reservations by (deadline, token).
    deadlines: BTreeMap<(Instant, u64), Key>,
    /// Blocks of aborted reservations, kept until the reservation's deadline: a writer
    /// that gave up may still have bytes in flight to them (freed by `reclaim`).
    held: BTreeMap<(Instant, u64), (u64, u64)>,
    /// CLOCK queues: seq → key, oldest first.
    mem_queue: BTreeMap<u64, Key>,
    disk_queue: BTreeMap<u64, Key>,
    /// Lease id → (memory offset, expiry).
    leases: HashMap<u64, (u64, Instant)>,
    lease_expiry: BTreeMap<(Instant, u64), ()>,
    /// Memory offset → leases on that block.
    pins: HashMap<u64, Pins>,
    /// Removed objects with a demotion in flight, by disk offset.
    demote_zombies: BTreeMap<u64, Zombie>,
    /// Removed objects with a promotion in flight, by key (at most one per key).
    promote_zombies: HashMap<Key, Zombie>,
    /// Bytes of memory that pending demotions will free.
    pending_demotion: u64,
    next_id: u64,
    next_seq: u64,
    stats: IndexStats,
}

/// `now + d`, saturating at the latest instant representable.
fn later(now: Instant, mut d: Duration) -> Instant {
    loop {
        if let Some(t) = now.checked_add(d) {
            return t;
        }
        d /= 2;
    }
}

fn fraction(x: f64, default: f64) -> f64 {
    if x.is_nan() {
        default
    } else {
        x.clamp(0.0, 1.0)
    }
}

impl Index {
    /// An empty index of `config.memory_capacity` bytes of memory and
    /// `config.disk_capacity` bytes of SSD (0: no SSD tier).
    pub fn new(config: IndexConfig) -> Self {
        let mem = SegmentAllocator::new(config.memory_capacity);
        let disk = SegmentAllocator::new(config.disk_capacity);
        let high = fraction(config.high_watermark, 0.9);
        let low = fraction(config.low_watermark, 0.8).min(high);
        let high_bytes = (mem.capacity() as f64 * high) as u64;
        let low_bytes = ((mem.capacity() as f64 * low) as u64).min(high_bytes);
        Index {
            stats: IndexStats {
                memory_capacity: mem.capacity(),
                disk_capacity: disk.capacity(),
                ..IndexStats::default()
            },
            config,
            high_bytes,
            low_bytes,
            mem,
            disk,
            entries: HashMap::new(),
            deadlines: BTreeMap::new(),
            held: BTreeMap::new(),
            mem_queue: BTreeMap::new(),
            disk_queue: BTreeMap::new(),
            leases: HashMap::new(),
            lease_expiry: BTreeMap::new(),
            pins: HashMap::new(),
            demote_zombies: BTreeMap::new(),
            promote_zombies: HashMap::new(),
            pending_demotion: 0,
            next_id: 0,
            next_seq: 0,
        }
    }

    /// The configuration given to [`new`](Self::new).
    pub fn config(&self) -> &IndexConfig {
        &self.config
    }

    /// Reserves memory for a new object of `len` bytes under `key`.
    ///
    /// [`AlreadyExists`](PutOutcome::AlreadyExists) if the key is committed (in memory or
    /// on disk) or reserved (a reservation past its timeout is reclaimed here instead).
    /// [`NoSpace`](PutOutcome::NoSpace) if `len` is 0 or larger than memory, or if no
    /// block fits even after dropping every evictable object (CLOCK order; leased objects,
    /// reservations and objects with a copy in flight are never evicted).
    pub fn reserve(&mut self, key: &[u8], len: u64, now: Instant) -> PutOutcome {
        match self.entries.get(key) {
            Some(Entry::Object(_)) => return PutOutcome::AlreadyExists,
            Some(Entry::Reserved(r)) if r.deadline > now => return PutOutcome::AlreadyExists,
            Some(Entry::Reserved(_)) => self.reclaim_reservation(key),
            None => {}
        }
        let Some(offset) = self.alloc_memory(len, now) else {
            return PutOutcome::NoSpace;
        };
        let token = self.fresh_id();
        let deadline = later(now, self.config.reserve_timeout);
        let key: Key = Arc::from(key);
        self.deadlines.insert((deadline, token), key.clone());
        self.entries.insert(
            key,
            Entry::Reserved(Reserved {
                offset,
                len,
                token,
                deadline,
            }),
        );
        self.stats.reservations += 1;
        PutOutcome::Reserved(Reservation { offset, len, token })
    }

    /// Makes the reservation of `key` with `token` a visible object. Fails if there is no
    /// such reservation, or if it is past its timeout (it is then reclaimed).
    pub fn commit(&mut self, key: &[u8], token: u64, now: Instant) -> Result<(), CommitError> {
        let (offset, len, deadline) = match self.entries.get(key) {
            Some(Entry::Reserved(r)) if r.token == token => (r.offset, r.len, r.deadline),
            _ => return Err(CommitError::UnknownReservation),
        };
        if deadline <= now {
            self.reclaim_reservation(key);
            return Err(CommitError::UnknownReservation);
        }
        let Some(k) = self.deadlines.remove(&(deadline, token)) else {
            return Err(CommitError::UnknownReservation);
        };
        let seq = self.fresh_seq();
        self.mem_queue.insert(seq, k.clone());
        self.entries.insert(
            k,
            Entry::Object(Object {
                len,
                place: Place::Memory { offset },
                referenced: false,
                seq,
            }),
        );
        self.stats.reservations -= 1;
        self.stats.objects_in_memory += 1;
        self.stats.puts += 1;
        Ok(())
    }

    /// Ends the reservation of `key` with `token`: the key may be reserved again at once,
    /// its memory is freed at the reservation's deadline (by [`reclaim`](Self::reclaim)).
    /// `false` if there is none (wrong token or key, committed, already aborted or
    /// reclaimed).
    pub fn abort(&mut self, key: &[u8], token: u64) -> bool {
        match self.entries.get(key) {
            Some(Entry::Reserved(r)) if r.token == token => {}
            _ => return false,
        }
        let Some(Entry::Reserved(r)) = self.entries.remove(key) else {
            return false;
        };
        // The key is free at once; the block only at the reservation's deadline (the
        // writer that gave up may have bytes in flight to it).
        self.deadlines.remove(&(r.deadline, r.token));
        self.held.insert((r.deadline, r.token), (r.offset, r.len));
        self.stats.reservations -= 1;
        true
    }

    /// Looks `key` up. A committed object in memory is leased to the caller until
    /// `now + lease` (its memory is not reused before that or [`release`](Self::release))
    /// and counts as recently used (a hit); one on disk is reported as
    /// [`OnDisk`](Lookup::OnDisk) and counts nothing yet: the caller promotes it and looks
    /// it up again (the hit), or reports it missing ([`note_miss`](Self::note_miss)). A key
    /// that is absent or only reserved is [`NotFound`](Lookup::NotFound) (a miss).
    pub fn lookup(&mut self, key: &[u8], now: Instant) -> Lookup {
        let (len, place) = match self.entries.get_mut(key) {
            Some(Entry::Object(obj)) => {
                obj.referenced = true;
                (obj.len, obj.place)
            }
            _ => {
                self.stats.misses += 1;
                return Lookup::NotFound;
            }
        };
        match place {
            Place::Memory { offset } | Place::Demoting { offset, .. } => {
                self.stats.hits += 1;
                let lease = self.fresh_id();
                let expires = later(now, self.config.lease);
                self.leases.insert(lease, (offset, expires));
                self.lease_expiry.insert((expires, lease), ());
                self.pins
                    .entry(offset)
                    .or_insert_with(|| Pins {
                        len,
                        owned: true,
                        leases: Vec::new(),
                    })
                    .leases
                    .push((lease, expires));
                self.stats.leases += 1;
                Lookup::Found(Found {
                    offset,
                    len,
                    lease,
                    expires,
                })
            }
            Place::Disk { disk } | Place::Promoting { disk, .. } => Lookup::OnDisk {
                disk_offset: disk,
                len,
            },
        }
    }

    /// Counts a lookup answered "not found" after all (an object on disk that could not
    /// be promoted).
    pub fn note_miss(&mut self) {
        self.stats.misses += 1;
    }

    /// Ends a lease early. `false` if it is unknown (already released, dropped after its
    /// expiry, or never granted).
    pub fn release(&mut self, lease: u64) -> bool {
        self.drop_lease(lease)
    }

    /// Whether `key` is committed (in memory or on disk); if so it counts as recently used.
    pub fn exists(&mut self, key: &[u8], now: Instant) -> bool {
        let _ = now;
        match self.entries.get_mut(key) {
            Some(Entry::Object(obj)) => {
                obj.referenced = true;
                true
            }
            _ => false,
        }
    }

    /// Where the bytes of the committed object `key` are, without counting as a use.
    pub fn tier(&self, key: &[u8]) -> Option<Tier> {
        match self.entries.get(key) {
            Some(Entry::Object(obj)) => Some(match obj.place {
                Place::Memory { .. } | Place::Demoting { .. } => Tier::Memory,
                Place::Disk { .. } | Place::Promoting { .. } => Tier::Disk,
            }),
            _ => None,
        }
    }

    /// Removes the committed object `key`. A reservation is not removable
    /// ([`NotFound`](RemoveError::NotFound)); an object in memory with a live lease is not
    /// removed ([`Leased`](RemoveError::Leased)). An object with a copy in flight is
    /// removed at once, its blocks freed when the copy is reported done.
    pub fn remove(&mut self, key: &[u8], now: Instant) -> Result<(), RemoveError> {
        let (len, place, seq) = match self.entries.get(key) {
            Some(Entry::Object(obj)) => (obj.len, obj.place, obj.seq),
            _ => return Err(RemoveError::NotFound),
        };
        if let Place::Memory { offset } | Place::Demoting { offset, .. } = place {
            if self.pinned(offset, now) {
                return Err(RemoveError::Leased);
            }
        }
        let Some((k, _)) = self.entries.remove_entry(key) else {
            return Err(RemoveError::NotFound);
        };
        match place {
            Place::Memory { offset } => {
                self.mem_queue.remove(&seq);
                self.release_memory(offset, len, Some(now));
                self.stats.objects_in_memory -= 1;
            }
            Place::Disk { disk } => {
                self.disk_queue.remove(&seq);
                self.disk.free(disk, len);
                self.stats.objects_on_disk -= 1;
            }
            Place::Demoting { offset, disk } => {
                self.demote_zombies.insert(
                    disk,
                    Zombie {
                        key: k,
                        offset,
                        disk,
                        len,
                    },
                );
                self.stats.objects_in_memory -= 1;
            }
            Place::Promoting { disk, offset } => {
                self.promote_zombies.insert(
                    k.clone(),
                    Zombie {
                        key: k,
                        offset,
                        disk,
                        len,
                    },
                );
                self.stats.objects_on_disk -= 1;
            }
        }
        Ok(())
    }

    /// Removes every committed object that is not leased; returns how many.
    pub fn remove_all(&mut self, now: Instant) -> u64 {
        let keys: Vec<Key> = self
            .entries
            .iter()
            .filter(|(_, e)| matches!(e, Entry::Object(_)))
            .map(|(k, _)| k.clone())
            .collect();
        let mut removed = 0;
        for key in keys {
            if self.remove(&key, now).is_ok() {
                removed += 1;
            }
        }
        removed
    }

    /// Frees the reservations whose timeout has passed and drops the leases past their
    /// expiry (freeing memory kept only for them). Returns how many reservations were
    /// reclaimed. The server calls this periodically (e.g. every second).
    pub fn reclaim(&mut self, now: Instant) -> u64 {
        let mut reclaimed = 0;
        while let Some((&(deadline, _), key)) = self.deadlines.first_key_value() {
            if deadline > now {
                break;
            }
            let key = key.clone();
            self.reclaim_reservation(&key);
            reclaimed += 1;
        }
        while let Some((&(deadline, token), &(offset, len))) = self.held.first_key_value() {
            if deadline > now {
                break;
            }
            self.held.remove(&(deadline, token));
            self.mem.free(offset, len);
        }
        while let Some((&(expires, lease), ())) = self.lease_expiry.first_key_value() {
            if expires > now {
                break;
            }
            self.drop_lease(lease);
            self.stats.expired_leases += 1;
        }
        reclaimed
    }

    /// Evicts if memory used (less what pending demotions will free) is above the high
    /// watermark, picking victims in CLOCK order among committed, unleased objects in
    /// memory until it is at or below the low watermark. Without an SSD tier the victims
    /// are dropped and the result is empty; with one, each victim gets a disk block and is
    /// returned as a [`Demotion`] (it stays in memory and readable until
    /// [`demoted`](Self::demoted)).
    pub fn evict(&mut self, now: Instant) -> Vec<Demotion> {
        self.evict_until(0, self.low_bytes, now)
    }

    /// Just enough eviction for `incoming` more bytes to stay at or below the high
    /// watermark (all of memory at most): a server with an SSD tier calls it before it
    /// reserves or promotes `incoming` bytes, so that room is made by demoting objects
    /// rather than by dropping them. Housekeeping's [`evict`](Self::evict) does the rest.
    pub fn evict_for(&mut self, incoming: u64, now: Instant) -> Vec<Demotion> {
        let incoming = SegmentAllocator::rounded(incoming).min(self.mem.capacity());
        self.evict_until(incoming, self.high_bytes, now)
    }

    /// Evicts while used + `incoming` is above `target` (nothing unless it is above the
    /// high watermark).
    fn evict_until(&mut self, incoming: u64, target: u64, now: Instant) -> Vec<Demotion> {
        let mut demotions = Vec::new();
        if self.effective_used().saturating_add(incoming) <= self.high_bytes {
            return demotions;
        }
        while self.effective_used().saturating_add(incoming) > target {
            let Some(key) = self.pick_memory_victim(now) else {
                break;
            };
            let (len, offset) = match self.entries.get(&key) {
                Some(Entry::Object(Object {
                    len,
                    place: Place::Memory { offset },
                    ..
                })) => (*len, *offset),
                _ => continue,
            };
            let disk = if self.disk.capacity() > 0 {
                self.alloc_disk(len)
            } else {
                None
            };
            match (disk, self.entries.get_mut(&key)) {
                (Some(disk), Some(Entry::Object(obj))) => {
                    obj.place = Place::Demoting { offset, disk };
                    self.pending_demotion += SegmentAllocator::rounded(len);
                    demotions.push(Demotion {
                        key: key.to_vec(),
                        offset,
                        len,
                        disk_offset: disk,
                    });
                }
                _ => self.drop_memory_victim(&key, now),
            }
        }
        demotions
    }

    /// Ends the demotion of `key` to `disk_offset`. With `ok` (the bytes are on disk) the
    /// object is now on disk and its memory is freed (or, if leased meanwhile, when its
    /// last lease ends); without, the disk block is freed and the object stays in memory.
    /// `false` if no such demotion is in flight.
    pub fn demoted(&mut self, key: &[u8], disk_offset: u64, ok: bool) -> bool {
        let found = match self.entries.get_key_value(key) {
            Some((k, Entry::Object(obj))) => match obj.place {
                Place::Demoting { offset, disk } if disk == disk_offset => {
                    Some((k.clone(), obj.len, offset, disk))
                }
                _ => None,
            },
            _ => None,
        };
        if let Some((k, len, offset, disk)) = found {
            self.pending_demotion = self
                .pending_demotion
                .saturating_sub(SegmentAllocator::rounded(len));
            let seq = self.fresh_seq();
            let place = if ok {
                self.disk_queue.insert(seq, k);
                Place::Disk { disk }
            } else {
                self.mem_queue.insert(seq, k);
                Place::Memory { offset }
            };
            if let Some(Entry::Object(obj)) = self.entries.get_mut(key) {
                obj.place = place;
                obj.seq = seq;
            }
            if ok {
                self.release_memory(offset, len, None);
                self.stats.objects_in_memory -= 1;
                self.stats.objects_on_disk += 1;
                self.stats.demotions += 1;
            } else {
                self.disk.free(disk, len);
            }
            return true;
        }
        match self.demote_zombies.get(&disk_offset) {
            Some(z) if *z.key == *key => {}
            _ => return false,
        }
        let Some(z) = self.demote_zombies.remove(&disk_offset) else {
            return false;
        };
        self.pending_demotion = self
            .pending_demotion
            .saturating_sub(SegmentAllocator::rounded(z.len));
        self.release_memory(z.offset, z.len, None);
        self.disk.free(z.disk, z.len);
        true
    }

    /// Starts promoting the on-disk object `key`: reserves memory for it (dropping
    /// evictable objects if needed) and returns `(memory offset, disk offset, len)`; the
    /// server copies the bytes, then calls [`promote_end`](Self::promote_end). `None` if
    /// the key is not on disk, a promotion of it is already in flight, or no memory can be
    /// found. Until `promote_end` the object is still reported on disk.
    pub fn promote_begin(&mut self, key: &[u8], now: Instant) -> Option<(u64, u64, u64)> {
        let (len, disk) = match self.entries.get(key) {
            Some(Entry::Object(Object {
                len,
                place: Place::Disk { disk },
                ..
            })) => (*len, *disk),
            _ => return None,
        };
        if self.promote_zombies.contains_key(key) {
            return None;
        }
        // Dropping memory victims never touches this object: it is in the disk queue.
        let offset = self.alloc_memory(len, now)?;
        match self.entries.get_mut(key) {
            Some(Entry::Object(obj)) => {
                self.disk_queue.remove(&obj.seq);
                obj.place = Place::Promoting { disk, offset };
                obj.referenced = true;
                Some((offset, disk, len))
            }
            _ => {
                self.mem.free(offset, len);
                None
            }
        }
    }

    /// Ends the promotion of `key`. With `ok` (the bytes are in memory) the object is in
    /// memory again and its disk block is freed; without, its memory is freed and it stays
    /// on disk. `false` if no promotion of `key` is in flight.
    pub fn promote_end(&mut self, key: &[u8], ok: bool, now: Instant) -> bool {
        let found = match self.entries.get_key_value(key) {
            Some((k, Entry::Object(obj))) => match obj.place {
                Place::Promoting { disk, offset } => Some((k.clone(), obj.len, disk, offset)),
                _ => None,
            },
            _ => None,
        };
        if let Some((k, len, disk, offset)) = found {
            let seq = self.fresh_seq();
            let place = if ok {
                self.mem_queue.insert(seq, k);
                Place::Memory { offset }
            } else {
                self.disk_queue.insert(seq, k);
                Place::Disk { disk }
            };
            if let Some(Entry::Object(obj)) = self.entries.get_mut(key) {
                obj.place = place;
                obj.seq = seq;
            }
            if ok {
                self.disk.free(disk, len);
                self.stats.objects_on_disk -= 1;
                self.stats.objects_in_memory += 1;
                self.stats.promotions += 1;
            } else {
                self.release_memory(offset, len, Some(now));
            }
            return true;
        }
        let Some(z) = self.promote_zombies.remove(key) else {
            return false;
        };
        self.release_memory(z.offset, z.len, Some(now));
        self.disk.free(z.disk, z.len);
        true
    }

    /// Counters and gauges.
    pub fn stats(&self) -> IndexStats {
        IndexStats {
            memory_used: self.mem.used(),
            disk_used: self.disk.used(),
            ..self.stats
        }
    }

    /// Bytes of memory allocated (in granules).
    pub fn memory_used(&self) -> u64 {
        self.mem.used()
    }

    fn fresh_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn fresh_seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    fn effective_used(&self) -> u64 {
        self.mem.used().saturating_sub(self.pending_demotion)
    }

    /// Whether the memory block at `offset` has a lease live at `now`.
    fn pinned(&self, offset: u64, now: Instant) -> bool {
        self.pins
            .get(&offset)
            .is_some_and(|p| p.leases.iter().any(|&(_, expires)| expires > now))
    }

    /// The owner of the memory block at `offset` lets it go: freed now, or kept until its
    /// last lease ends if one is live at `now` (with no `now`: if any lease is left).
    /// Expired leases of a block freed now are dropped.
    fn release_memory(&mut self, offset: u64, len: u64, now: Option<Instant>) {
        if let Some(p) = self.pins.get_mut(&offset) {
            let live = match now {
                Some(now) => p.leases.iter().any(|&(_, expires)| expires > now),
                None => !p.leases.is_empty(),
            };
            if live {
                p.owned = false;
                return;
            }
            if let Some(p) = self.pins.remove(&offset) {
                for (lease, expires) in p.leases {
                    self.leases.remove(&lease);
                    self.lease_expiry.remove(&(expires, lease));
                    self.stats.leases -= 1;
                    self.stats.expired_leases += 1;
                }
            }
        }
        self.mem.free(offset, len);
    }

    fn drop_lease(&mut self, lease: u64) -> bool {
        let Some((offset, expires)) = self.leases.remove(&lease) else {
            return false;
        };
        self.lease_expiry.remove(&(expires, lease));
        self.stats.leases -= 1;
        if let Some(p) = self.pins.get_mut(&offset) {
            p.leases.retain(|&(l, _)| l != lease);
            if p.leases.is_empty() {
                if let Some(p) = self.pins.remove(&offset) {
                    if !p.owned {
                        self.mem.free(offset, p.len);
                    }
                }
            }
        }
        true
    }

    /// Frees the reservation of `key` (there must be one) and counts it reclaimed.
    fn reclaim_reservation(&mut self, key: &[u8]) {
        if self.drop_reservation(key) {
            self.stats.reclaimed_reservations += 1;
        }
    }

    fn drop_reservation(&mut self, key: &[u8]) -> bool {
        match self.entries.get(key) {
            Some(Entry::Reserved(_)) => {}
            _ => return false,
        }
        let Some(Entry::Reserved(r)) = self.entries.remove(key) else {
            return false;
        };
        self.deadlines.remove(&(r.deadline, r.token));
        self.mem.free(r.offset, r.len);
        self.stats.reservations -= 1;
        true
    }

    /// Allocates memory, dropping CLOCK victims until it fits or none is left.
    fn alloc_memory(&mut self, len: u64, now: Instant) -> Option<u64> {
        if len == 0 || SegmentAllocator::rounded(len) > self.mem.capacity() {
            return None;
        }
        loop {
            if let Some(offset) = self.mem.alloc(len) {
                return Some(offset);
            }
            let victim = self.pick_memory_victim(now)?;
            self.drop_memory_victim(&victim, now);
        }
    }

    /// Allocates a disk block, dropping disk objects in CLOCK order until it fits or none
    /// is left.
    fn alloc_disk(&mut self, len: u64) -> Option<u64> {
        if SegmentAllocator::rounded(len) > self.disk.capacity() {
            return None;
        }
        loop {
            if let Some(disk) = self.disk.alloc(len) {
                return Some(disk);
            }
            let victim = self.pick_disk_victim()?;
            if let Some(Entry::Object(Object {
                len,
                place: Place::Disk { disk },
                ..
            })) = self.entries.remove(&victim)
            {
                self.disk.free(disk, len);
                self.stats.objects_on_disk -= 1;
                self.stats.evictions += 1;
            }
        }
    }

    /// Takes the next CLOCK victim out of the memory queue: the oldest object in memory
    /// that is neither referenced (its bit is cleared and it goes to the back) nor leased
    /// at `now` (it goes to the back). `None` once every object was seen twice.
    fn pick_memory_victim(&mut self, now: Instant) -> Option<Key> {
        let mut budget = self.mem_queue.len().saturating_mul(2).saturating_add(1);
        while budget > 0 {
            budget -= 1;
            let (_, key) = self.mem_queue.pop_first()?;
            let Some(Entry::Object(obj)) = self.entries.get_mut(&key) else {
                continue;
            };
            let Place::Memory { offset } = obj.place else {
                continue;
            };
            let leased = self
                .pins
                .get(&offset)
                .is_some_and(|p| p.leases.iter().any(|&(_, expires)| expires > now));
            if !obj.referenced && !leased {
                return Some(key);
            }
            obj.referenced = false;
            self.next_seq += 1;
            obj.seq = self.next_seq;
            self.mem_queue.insert(self.next_seq, key);
        }
        None
    }

    /// Takes the next CLOCK victim out of the disk queue.
    fn pick_disk_victim(&mut self) -> Option<Key> {
        let mut budget = self.disk_queue.len().saturating_mul(2).saturating_add(1);
        while budget > 0 {
            budget -= 1;
            let (_, key) = self.disk_queue.pop_first()?;
            let Some(Entry::Object(obj)) = self.entries.get_mut(&key) else {
                continue;
            };
            if !matches!(obj.place, Place::Disk { .. }) {
                continue;
            }
            if !obj.referenced {
                return Some(key);
            }
            obj.referenced = false;
            self.next_seq += 1;
            obj.seq = self.next_seq;
            self.disk_queue.insert(self.next_seq, key);
        }
        None
    }

    /// Drops a victim taken out of the memory queue: frees its memory, counts an eviction.
    fn drop_memory_victim(&mut self, key: &[u8], now: Instant) {
        if let Some(Entry::Object(Object {
            len,
            place: Place::Memory { offset },
            ..
        })) = self.entries.get(key)
        {
            let (len, offset) = (*len, *offset);
            self.entries.remove(key);
            self.release_memory(offset, len, Some(now));
            self.stats.objects_in_memory -= 1;
            self.stats.evictions += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::alloc::GRANULE;
    use proptest::prelude::*;
    use std::collections::{BTreeSet, HashSet};

    const G: u64 = GRANULE;
    const SEC: Duration = Duration::from_secs(1);

    fn config(mem_granules: u64, disk_granules: u64) -> IndexConfig {
        IndexConfig {
            memory_capacity: mem_granules * G,
            disk_capacity: disk_granules * G,
            ..IndexConfig::default()
        }
    }

    fn reserve(index: &mut Index, key: &[u8], len: u64, now: Instant) -> Reservation {
        match index.reserve(key, len, now) {
            PutOutcome::Reserved(r) => r,
            other => panic!("reserve {key:?}: {other:?}"),
        }
    }

    /// Reserves and commits; returns the memory offset.
    fn put(index: &mut Index, key: &[u8], len: u64, now: Instant) -> u64 {
        let r = reserve(index, key, len, now);
        index.commit(key, r.token, now).unwrap();
        r.offset
    }

    fn found(index: &mut Index, key: &[u8], now: Instant) -> Found {
        match index.lookup(key, now) {
            Lookup::Found(f) => f,
            other => panic!("lookup {key:?}: {other:?}"),
        }
    }

    /// Checks every structural invariant of the index: the blocks held in memory and on
    /// disk are disjoint, inside the capacity, allocated at their length and account for
    /// all that is used; queues, leases, pins and counters agree with the table.
    fn check(index: &Index) {
        let rounded = SegmentAllocator::rounded;
        let mut mem_blocks: Vec<(u64, u64, String)> = Vec::new();
        let mut disk_blocks: Vec<(u64, u64, String)> = Vec::new();
        let (mut reserved, mut in_mem, mut on_disk, mut pending) = (0, 0, 0, 0);
        let mut mem_queue = BTreeMap::new();
        let mut disk_queue = BTreeMap::new();
        let mut owned_offsets = HashSet::new();
        for (key, entry) in &index.entries {
            let name = format!("{key:?}");
            match entry {
                Entry::Reserved(r) => {
                    reserved += 1;
                    mem_blocks.push((r.offset, rounded(r.len), name));
                    assert_eq!(index.deadlines.get(&(r.deadline, r.token)), Some(key));
                }
                Entry::Object(obj) => match obj.place {
                    Place::Memory { offset } => {
                        in_mem += 1;
                        mem_blocks.push((offset, rounded(obj.len), name));
                        mem_queue.insert(obj.seq, key.clone());
                        owned_offsets.insert(offset);
                    }
                    Place::Demoting { offset, disk } => {
                        in_mem += 1;
                        pending += rounded(obj.len);
                        mem_blocks.push((offset, rounded(obj.len), name.clone()));
                        disk_blocks.push((disk, rounded(obj.len), name));
                        owned_offsets.insert(offset);
                    }
                    Place::Disk { disk } => {
                        on_disk += 1;
                        disk_blocks.push((disk, rounded(obj.len), name));
                        disk_queue.insert(obj.seq, key.clone());
                    }
                    Place::Promoting { disk, offset } => {
                        on_disk += 1;
                        mem_blocks.push((offset, rounded(obj.len), name.clone()));
                        disk_blocks.push((disk, rounded(obj.len), name));
                        assert!(!index.pins.contains_key(&offset), "promotion target leased");
                    }
                },
            }
        }
        for (&disk, z) in &index.demote_zombies {
            assert_eq!(disk, z.disk);
            pending += rounded(z.len);
            mem_blocks.push((z.offset, rounded(z.len), format!("zombie {:?}", z.key)));
            disk_blocks.push((z.disk, rounded(z.len), format!("zombie {:?}", z.key)));
            owned_offsets.insert(z.offset);
        }
        for (key, z) in &index.promote_zombies {
            assert_eq!(key, &z.key);
            mem_blocks.push((z.offset, rounded(z.len), format!("zombie {:?}", z.key)));
            disk_blocks.push((z.disk, rounded(z.len), format!("zombie {:?}", z.key)));
        }
        for (&(_, token), &(offset, len)) in &index.held {
            mem_blocks.push((offset, rounded(len), format!("aborted {token}")));
        }
        let mut lease_count = 0;
        for (&offset, pins) in &index.pins {
            assert!(!pins.leases.is_empty(), "empty pins kept");
            assert_eq!(pins.owned, owned_offsets.contains(&offset), "pins owner");
            if !pins.owned {
                mem_blocks.push((offset, rounded(pins.len), format!("orphan {offset:#x}")));
            }
            for &(lease, expires) in &pins.leases {
                lease_count += 1;
                assert_eq!(index.leases.get(&lease), Some(&(offset, expires)));
                assert!(index.lease_expiry.contains_key(&(expires, lease)));
            }
        }
        assert_eq!(lease_count, index.leases.len());
        assert_eq!(lease_count, index.lease_expiry.len());
        for (seg, blocks, what) in [
            (&index.mem, &mut mem_blocks, "memory"),
            (&index.disk, &mut disk_blocks, "disk"),
        ] {
            blocks.sort();
            let mut end = 0;
            let mut sum = 0;
            for (offset, len, name) in blocks.iter() {
                assert!(
                    *offset >= end,
                    "{what}: {name} at {offset:#x} overlaps the block before"
                );
                assert_eq!(seg.allocated_len(*offset), Some(*len), "{what}: {name}");
                end = offset + len;
                sum += len;
            }
            assert!(end <= seg.capacity(), "{what}: past the capacity");
            assert_eq!(sum, seg.used(), "{what}: used bytes not all accounted for");
            assert_eq!(blocks.len(), seg.allocations(), "{what}: stray allocation");
            assert!(seg.used() <= seg.capacity());
        }
        assert_eq!(mem_queue, index.mem_queue, "memory queue");
        assert_eq!(disk_queue, index.disk_queue, "disk queue");
        assert_eq!(pending, index.pending_demotion);
        assert_eq!(index.deadlines.len() as u64, reserved);
        let s = index.stats();
        assert_eq!(s.reservations, reserved);
        assert_eq!(s.objects_in_memory, in_mem);
        assert_eq!(s.objects_on_disk, on_disk);
        assert_eq!(s.leases, lease_count as u64);
        assert_eq!(s.memory_used, index.memory_used());
        assert!(s.memory_used <= s.memory_capacity && s.disk_used <= s.disk_capacity);
    }

    #[test]
    fn reserve_commit_lookup_release() {
        let now = Instant::now();
        let mut index = Index::new(config(16, 0));
        let r = reserve(&mut index, b"a", 5000, now);
        assert_eq!(r.len, 5000);
        assert_eq!(index.memory_used(), 2 * G);
        assert_eq!(index.stats().reservations, 1);
        index.commit(b"a", r.token, now).unwrap();
        assert!(index.exists(b"a", now));
        assert_eq!(index.tier(b"a"), Some(Tier::Memory));
        let f = found(&mut index, b"a", now);
        assert_eq!(
            (f.offset, f.len, f.expires),
            (r.offset, 5000, now + 5 * SEC)
        );
        assert_ne!(f.lease, r.token);
        assert_eq!(index.lookup(b"b", now), Lookup::NotFound);
        let s = index.stats();
        assert_eq!(
            (
                s.puts,
                s.hits,
                s.misses,
                s.leases,
                s.objects_in_memory,
                s.reservations
            ),
            (1, 1, 1, 1, 1, 0)
        );
        check(&index);
        assert!(index.release(f.lease));
        assert!(!index.release(f.lease), "double release");
        assert!(!index.release(0));
        assert!(!index.release(r.token), "a token is not a lease");
        assert_eq!(index.stats().leases, 0);
        check(&index);
    }

    /// A writer that gave up may still have bytes in flight to an aborted reservation's
    /// block: it is not handed out again before the reservation's deadline.
    #[test]
    fn an_aborted_reservation_keeps_its_block_until_its_deadline() {
        let now = Instant::now();
        let mut index = Index::new(config(2, 0));
        let r = reserve(&mut index, b"a", G, now);
        assert!(index.abort(b"a", r.token));
        // The key is free, the block is not: the other granule goes to the next one.
        let r2 = reserve(&mut index, b"a", G, now);
        assert_ne!(r2.offset, r.offset);
        assert_eq!(index.reserve(b"b", G, now), PutOutcome::NoSpace);
        let deadline = now + index.config().reserve_timeout;
        index.reclaim(deadline - Duration::from_millis(1));
        assert_eq!(index.reserve(b"b", G, now), PutOutcome::NoSpace);
        index.reclaim(deadline);
        let r3 = reserve(&mut index, b"b", G, deadline);
        assert_eq!(r3.offset, r.offset, "the block is free after the deadline");
    }

    #[test]
    fn put_if_absent() {
        let now = Instant::now();
        let mut index = Index::new(config(16, 0));
        let r = reserve(&mut index, b"k", G, now);
        assert_eq!(index.reserve(b"k", G, now), PutOutcome::AlreadyExists);
        index.commit(b"k", r.token, now).unwrap();
        assert_eq!(index.reserve(b"k", 2 * G, now), PutOutcome::AlreadyExists);
        assert_eq!(
            index.commit(b"k", r.token, now),
            Err(CommitError::UnknownReservation),
            "double commit"
        );
        // After an abort the key is free again (its block only at the deadline: see
        // an_aborted_reservation_keeps_its_block_until_its_deadline).
        let r2 = reserve(&mut index, b"j", G, now);
        assert!(!index.abort(b"j", r2.token + 1));
        assert!(!index.abort(b"k", r2.token));
        assert!(index.abort(b"j", r2.token));
        assert!(!index.abort(b"j", r2.token), "double abort");
        let r3 = reserve(&mut index, b"j", G, now);
        assert_ne!(r3.token, r2.token);
        assert_eq!(
            index.commit(b"j", r2.token, now),
            Err(CommitError::UnknownReservation),
            "the aborted token must not commit the new reservation"
        );
        index.commit(b"j", r3.token, now).unwrap();
        assert_eq!(index.stats().puts, 2);
        check(&index);
    }

    #[test]
    fn zero_or_oversized_reservations_get_no_space() {
        let now = Instant::now();
        let mut index = Index::new(config(4, 0));
        assert_eq!(index.reserve(b"z", 0, now), PutOutcome::NoSpace);
        assert_eq!(index.reserve(b"z", 4 * G + 1, now), PutOutcome::NoSpace);
        assert_eq!(index.reserve(b"z", u64::MAX, now), PutOutcome::NoSpace);
        reserve(&mut index, b"z", 4 * G, now);
        let mut none = Index::new(IndexConfig::default());
        assert_eq!(none.reserve(b"z", 1, now), PutOutcome::NoSpace);
        check(&index);
        check(&none);
    }

    #[test]
    fn uncommitted_reservation_is_invisible_and_reclaimed() {
        let t0 = Instant::now();
        let mut index = Index::new(config(16, 0));
        let r = reserve(&mut index, b"k", G, t0);
        assert_eq!(index.lookup(b"k", t0), Lookup::NotFound);
        assert!(!index.exists(b"k", t0));
        assert_eq!(index.remove(b"k", t0), Err(RemoveError::NotFound));
        assert_eq!(index.remove_all(t0), 0);
        assert_eq!(index.reclaim(t0 + 9 * SEC), 0);
        assert_eq!(index.stats().reservations, 1);
        assert_eq!(index.reclaim(t0 + 10 * SEC), 1);
        assert_eq!(index.memory_used(), 0);
        let s = index.stats();
        assert_eq!(
            (s.reservations, s.reclaimed_reservations, s.misses),
            (0, 1, 1)
        );
        assert_eq!(
            index.commit(b"k", r.token, t0 + 10 * SEC),
            Err(CommitError::UnknownReservation)
        );
        let r2 = reserve(&mut index, b"k", G, t0 + 10 * SEC);
        assert_ne!(r2.token, r.token);
        index.commit(b"k", r2.token, t0 + 11 * SEC).unwrap();
        check(&index);
    }

    #[test]
    fn expired_reservation_is_reclaimed_by_commit_or_reserve() {
        let t0 = Instant::now();
        let mut index = Index::new(config(16, 0));
        let r = reserve(&mut index, b"k", G, t0);
        // A late commit fails and reclaims, even before `reclaim` runs.
        assert_eq!(
            index.commit(b"k", r.token, t0 + 10 * SEC),
            Err(CommitError::UnknownReservation)
        );
        assert_eq!(index.stats().reclaimed_reservations, 1);
        assert_eq!(index.memory_used(), 0);
        // A new reserve of a key whose reservation expired takes it over.
        let r = reserve(&mut index, b"j", G, t0);
        assert_eq!(
            index.reserve(b"j", G, t0 + 9 * SEC),
            PutOutcome::AlreadyExists
        );
        let r2 = reserve(&mut index, b"j", G, t0 + 10 * SEC);
        assert_eq!(index.stats().reclaimed_reservations, 2);
        assert_eq!(
            index.commit(b"j", r.token, t0 + 10 * SEC),
            Err(CommitError::UnknownReservation)
        );
        index.commit(b"j", r2.token, t0 + 10 * SEC).unwrap();
        check(&index);
    }

    #[test]
    fn stale_tokens_never_match() {
        let now = Instant::now();
        let mut index = Index::new(config(16, 0));
        let a = reserve(&mut index, b"a", G, now);
        let b = reserve(&mut index, b"b", G, now);
        assert_eq!(
            index.commit(b"a", b.token, now),
            Err(CommitError::UnknownReservation),
            "another key's token"
        );
        assert_eq!(
            index.commit(b"c", a.token, now),
            Err(CommitError::UnknownReservation),
            "wrong key"
        );
        assert_eq!(
            index.commit(b"a", 0, now),
            Err(CommitError::UnknownReservation)
        );
        assert_eq!(
            index.commit(b"a", u64::MAX, now),
            Err(CommitError::UnknownReservation)
        );
        index.commit(b"a", a.token, now).unwrap();
        index.commit(b"b", b.token, now).unwrap();
        let f = found(&mut index, b"a", now);
        assert_eq!(
            index.commit(b"a", f.lease, now),
            Err(CommitError::UnknownReservation)
        );
        assert!(
            !index.abort(b"a", a.token),
            "a committed object is not aborted"
        );
        // Ids are unique across tokens and leases.
        let ids: BTreeSet<u64> = [a.token, b.token, f.lease].into();
        assert_eq!(ids.len(), 3);
        check(&index);
    }

    /// Ten objects fill memory; five are used, then eviction (watermarks 0.9/0.8) takes the
    /// two oldest unused, not the used ones.
    #[test]
    fn eviction_prefers_least_recently_used() {
        let now = Instant::now();
        let mut index = Index::new(config(100, 0));
        let keys: Vec<Vec<u8>> = (b'a'..=b'j').map(|c| vec![c]).collect();
        for k in &keys {
            put(&mut index, k, 10 * G, now);
        }
        assert_eq!(index.memory_used(), 100 * G);
        for k in &keys[..5] {
            let f = found(&mut index, k, now);
            assert!(index.release(f.lease));
        }
        assert!(
            index.evict(now).is_empty(),
            "no SSD tier: victims are dropped"
        );
        assert_eq!(index.memory_used(), 80 * G);
        let gone: Vec<&Vec<u8>> = keys.iter().filter(|k| index.tier(k).is_none()).collect();
        assert_eq!(gone, [&keys[5], &keys[6]]);
        assert_eq!(index.stats().evictions, 2);
        // Below the high watermark nothing happens.
        assert!(index.evict(now).is_empty());
        assert_eq!(index.stats().evictions, 2);
        // Touching with `exists` counts as a use too: h, i, j used, so a..e go next
        // (their bits were cleared by the first round).
        for k in &keys[7..] {
            assert!(index.exists(k, now));
        }
        put(&mut index, b"x", 10 * G, now);
        put(&mut index, b"y", 10 * G, now);
        assert!(index.evict(now).is_empty());
        let gone: Vec<&Vec<u8>> = keys[..5]
            .iter()
            .filter(|k| index.tier(k).is_none())
            .collect();
        assert_eq!(gone, [&keys[0], &keys[1]]);
        check(&index);
    }

    #[test]
    fn eviction_skips_leased_objects_until_their_lease_expires() {
        let t0 = Instant::now();
        let mut index = Index::new(config(100, 0));
        let keys: Vec<Vec<u8>> = (b'a'..=b'j').map(|c| vec![c]).collect();
        for k in &keys {
            put(&mut index, k, 10 * G, t0);
        }
        // a and b are being read (leases live until t0 + 5 s); the lookup also marks them
        // used, so age them with a round of eviction pressure first.
        let fa = found(&mut index, &keys[0], t0);
        let fb = found(&mut index, &keys[1], t0);
        index.entries.values_mut().for_each(|e| {
            if let Entry::Object(o) = e {
                o.referenced = false;
            }
        });
        assert!(index.evict(t0).is_empty());
        let gone: Vec<&Vec<u8>> = keys.iter().filter(|k| index.tier(k).is_none()).collect();
        assert_eq!(gone, [&keys[2], &keys[3]], "leased a, b skipped");
        assert_eq!(index.remove(&keys[0], t0), Err(RemoveError::Leased));
        // Skipped leased objects went to the back of the queue, as if used. Leave only a
        // and b, fill up again: after expiry the leases no longer protect them.
        for k in &keys[4..] {
            assert_eq!(index.remove(k, t0), Ok(()));
        }
        for k in &keys[2..] {
            put(&mut index, k, 10 * G, t0);
        }
        assert_eq!(index.memory_used(), 100 * G);
        assert!(index.evict(t0 + 5 * SEC).is_empty());
        assert_eq!(index.tier(&keys[0]), None);
        assert_eq!(index.tier(&keys[1]), None);
        // Their expired leases were dropped with the memory.
        let s = index.stats();
        assert_eq!((s.leases, s.expired_leases), (0, 2));
        assert!(!index.release(fa.lease));
        assert!(!index.release(fb.lease));
        check(&index);
    }

    #[test]
    fn reserve_evicts_to_make_room() {
        let now = Instant::now();
        let mut index = Index::new(config(4, 0));
        let a = put(&mut index, b"a", 2 * G, now);
        put(&mut index, b"b", 2 * G, now);
        assert!(index.exists(b"b", now));
        let r = reserve(&mut index, b"c", 2 * G, now);
        assert_eq!(r.offset, a, "a was the least recently used");
        assert_eq!(index.tier(b"a"), None);
        assert_eq!(index.tier(b"b"), Some(Tier::Memory));
        assert_eq!(index.stats().evictions, 1);
        check(&index);
    }

    #[test]
    fn no_space_when_everything_is_leased_or_reserved() {
        let t0 = Instant::now();
        let mut index = Index::new(config(4, 0));
        let a = put(&mut index, b"a", 2 * G, t0);
        let ra = found(&mut index, b"a", t0);
        let rb = reserve(&mut index, b"b", 2 * G, t0);
        assert_eq!(index.reserve(b"c", G, t0), PutOutcome::NoSpace);
        assert_eq!(index.reserve(b"c", G, t0 + 4 * SEC), PutOutcome::NoSpace);
        assert_eq!(index.stats().evictions, 0);
        assert_eq!(index.stats().objects_in_memory, 1);
        // The lease ends: a can go.
        assert!(index.release(ra.lease));
        let rc = reserve(&mut index, b"c", 2 * G, t0 + 4 * SEC);
        assert_eq!(rc.offset, a);
        // The reservation is not evicted, even far past its timeout, until reclaimed.
        assert_eq!(index.reserve(b"d", G, t0 + 60 * SEC), PutOutcome::NoSpace);
        assert_eq!(index.reclaim(t0 + 60 * SEC), 2);
        assert_eq!(
            index.commit(b"b", rb.token, t0 + 60 * SEC),
            Err(CommitError::UnknownReservation)
        );
        reserve(&mut index, b"d", 4 * G, t0 + 60 * SEC);
        check(&index);
    }

    #[test]
    fn memory_under_a_live_lease_is_never_reallocated() {
        let t0 = Instant::now();
        let mut index = Index::new(config(8, 0));
        let a = put(&mut index, b"a", 8 * G, t0);
        let f = found(&mut index, b"a", t0);
        for i in 0..50u32 {
            let now = t0 + Duration::from_millis(u64::from(i) * 99);
            assert!(now < f.expires);
            assert_eq!(index.reserve(&i.to_le_bytes(), G, now), PutOutcome::NoSpace);
            assert_eq!(index.remove_all(now), 0);
            assert!(index.evict(now).is_empty());
            assert_eq!(index.reclaim(now), 0);
        }
        assert_eq!(index.tier(b"a"), Some(Tier::Memory));
        // At the expiry instant the lease no longer protects.
        let r = reserve(&mut index, b"b", G, f.expires);
        assert_eq!(r.offset, a);
        check(&index);
    }

    #[test]
    fn remove_and_remove_all() {
        let now = Instant::now();
        let mut index = Index::new(config(16, 0));
        for k in [b"a", b"b", b"c", b"d"] {
            put(&mut index, k, G, now);
        }
        reserve(&mut index, b"r", G, now);
        let f = found(&mut index, b"b", now);
        assert_eq!(index.remove(b"a", now), Ok(()));
        assert_eq!(index.remove(b"a", now), Err(RemoveError::NotFound));
        assert_eq!(index.remove(b"b", now), Err(RemoveError::Leased));
        assert_eq!(index.remove(b"r", now), Err(RemoveError::NotFound));
        assert_eq!(index.remove_all(now), 2, "c and d; b is leased, r reserved");
        assert!(index.exists(b"b", now));
        assert!(index.release(f.lease));
        assert_eq!(index.remove_all(now), 1);
        assert_eq!(index.memory_used(), G, "only the reservation is left");
        let s = index.stats();
        assert_eq!(
            (s.objects_in_memory, s.reservations, s.evictions),
            (0, 1, 0)
        );
        check(&index);
    }

    #[test]
    fn reclaim_drops_expired_leases() {
        let t0 = Instant::now();
        let mut index = Index::new(config(16, 0));
        put(&mut index, b"a", G, t0);
        let f1 = found(&mut index, b"a", t0);
        let f2 = found(&mut index, b"a", t0 + 2 * SEC);
        assert_eq!(index.stats().leases, 2);
        assert_eq!(index.reclaim(t0 + 5 * SEC), 0);
        let s = index.stats();
        assert_eq!((s.leases, s.expired_leases), (1, 1));
        assert!(!index.release(f1.lease));
        assert_eq!(index.remove(b"a", t0 + 6 * SEC), Err(RemoveError::Leased));
        assert_eq!(index.remove(b"a", t0 + 7 * SEC), Ok(()));
        assert!(!index.release(f2.lease), "dropped with the memory");
        assert_eq!(index.stats().expired_leases, 2);
        assert_eq!(index.memory_used(), 0);
        check(&index);
    }

    /// Memory 10 granules, disk 20: objects demote to disk and promote back.
    #[test]
    fn ssd_demotion_and_promotion_round_trip() {
        let t0 = Instant::now();
        let mut index = Index::new(config(10, 20));
        for k in [b"a", b"b", b"c", b"d", b"e"] {
            put(&mut index, k, 2 * G, t0);
        }
        let d = index.evict(t0);
        // 100% > 90%: demote down to 80%, i.e. one object (the oldest).
        assert_eq!(d.len(), 1);
        assert_eq!((d[0].key.as_slice(), d[0].len), (&b"a"[..], 2 * G));
        assert!(
            index.evict(t0).is_empty(),
            "pending demotions count as freed"
        );
        assert_eq!(
            index.memory_used(),
            10 * G,
            "memory kept while the copy runs"
        );
        assert_eq!(index.stats().disk_used, 2 * G);
        // Readable (and leasable) during the demotion.
        let f = found(&mut index, b"a", t0);
        assert_eq!(f.offset, d[0].offset);
        assert_eq!(index.remove(b"a", t0), Err(RemoveError::Leased));
        assert!(
            !index.demoted(b"a", d[0].disk_offset + G, true),
            "wrong disk offset"
        );
        assert!(!index.demoted(b"b", d[0].disk_offset, true), "wrong key");
        assert!(index.demoted(b"a", d[0].disk_offset, true));
        assert!(!index.demoted(b"a", d[0].disk_offset, true), "twice");
        assert_eq!(index.tier(b"a"), Some(Tier::Disk));
        assert_eq!(
            index.lookup(b"a", t0),
            Lookup::OnDisk {
                disk_offset: d[0].disk_offset,
                len: 2 * G
            }
        );
        // The leased memory is kept until the lease ends.
        assert_eq!(index.memory_used(), 10 * G);
        check(&index);
        assert!(index.release(f.lease));
        assert_eq!(index.memory_used(), 8 * G);
        check(&index);
        // Promote back.
        let (mem, disk, len) = index.promote_begin(b"a", t0).unwrap();
        assert_eq!((disk, len), (d[0].disk_offset, 2 * G));
        assert_eq!(index.promote_begin(b"a", t0), None, "already promoting");
        assert!(matches!(index.lookup(b"a", t0), Lookup::OnDisk { .. }));
        assert_eq!(index.evict(t0).len(), 1, "memory full again: b demoted");
        check(&index);
        assert!(index.promote_end(b"a", true, t0));
        assert!(!index.promote_end(b"a", true, t0), "twice");
        let f = found(&mut index, b"a", t0);
        assert_eq!(f.offset, mem);
        let s = index.stats();
        assert_eq!((s.demotions, s.promotions, s.evictions), (1, 1, 0));
        assert_eq!((s.objects_in_memory, s.objects_on_disk), (5, 0));
        assert_eq!(s.disk_used, 2 * G, "a's disk block freed, b's reserved");
        check(&index);
    }

    #[test]
    fn failed_demotion_and_promotion_keep_the_object() {
        let t0 = Instant::now();
        let mut index = Index::new(config(10, 20));
        for k in [b"a", b"b", b"c", b"d", b"e"] {
            put(&mut index, k, 2 * G, t0);
        }
        let d = index.evict(t0);
        assert_eq!(d.len(), 1);
        assert!(index.demoted(&d[0].key, d[0].disk_offset, false));
        assert_eq!(index.tier(b"a"), Some(Tier::Memory));
        let s = index.stats();
        assert_eq!((s.disk_used, s.memory_used, s.demotions), (0, 10 * G, 0));
        check(&index);
        // Demote again (a is back at the end of the queue: b goes), this time for good.
        let d = index.evict(t0);
        assert_eq!(d[0].key, b"b");
        assert!(index.demoted(b"b", d[0].disk_offset, true));
        assert_eq!(index.memory_used(), 8 * G);
        let (mem, _, _) = index.promote_begin(b"b", t0).unwrap();
        assert_eq!(index.memory_used(), 10 * G);
        assert!(index.promote_end(b"b", false, t0));
        assert_eq!(index.memory_used(), 8 * G);
        assert_eq!(index.tier(b"b"), Some(Tier::Disk));
        assert_eq!(
            index.lookup(b"b", t0),
            Lookup::OnDisk {
                disk_offset: d[0].disk_offset,
                len: 2 * G
            }
        );
        let (mem2, _, _) = index.promote_begin(b"b", t0).unwrap();
        assert_eq!(mem2, mem);
        assert!(index.promote_end(b"b", true, t0));
        assert_eq!(index.stats().promotions, 1);
        check(&index);
    }

    #[test]
    fn full_disk_drops_its_least_recently_used_objects() {
        let t0 = Instant::now();
        let mut index = Index::new(IndexConfig {
            high_watermark: 0.5,
            low_watermark: 0.5,
            ..config(4, 4)
        });
        // Each round: two objects of 2 granules fill memory; one is demoted.
        let mut demoted = Vec::new();
        for round in 0..6u8 {
            for k in [[round, 0], [round, 1]] {
                if index.tier(&k).is_none() {
                    put(&mut index, &k, 2 * G, t0);
                }
            }
            for d in index.evict(t0) {
                assert!(index.demoted(&d.key, d.disk_offset, true));
                demoted.push(d.key);
            }
            // Keep the first demoted object in use: it must survive on disk.
            assert!(index.exists(&demoted[0], t0));
            check(&index);
        }
        assert_eq!(index.tier(&demoted[0]), Some(Tier::Disk));
        let on_disk = demoted
            .iter()
            .filter(|k| index.tier(k) == Some(Tier::Disk))
            .count();
        assert_eq!(on_disk, 2, "disk holds two objects");
        assert!(index.stats().evictions >= 3);
        check(&index);
    }

    #[test]
    fn objects_larger_than_the_disk_are_dropped() {
        let t0 = Instant::now();
        let mut index = Index::new(config(10, 2));
        put(&mut index, b"big", 10 * G, t0);
        assert!(index.evict(t0).is_empty());
        assert_eq!(index.tier(b"big"), None);
        assert_eq!(index.stats().evictions, 1);
        check(&index);
    }

    #[test]
    fn remove_during_demotion_or_promotion_holds_the_blocks_until_the_copy_ends() {
        let t0 = Instant::now();
        let mut index = Index::new(config(10, 20));
        for k in [b"a", b"b", b"c", b"d", b"e"] {
            put(&mut index, k, 2 * G, t0);
        }
        let d = index.evict(t0).pop().unwrap();
        assert_eq!(index.remove(b"a", t0), Ok(()));
        assert_eq!(index.tier(b"a"), None);
        assert_eq!(
            index.memory_used(),
            10 * G,
            "memory held by the in-flight copy"
        );
        assert_eq!(index.stats().disk_used, 2 * G);
        check(&index);
        // The key is free: a new object of the same key, in other memory.
        assert!(index.remove(b"b", t0).is_ok());
        let a2 = put(&mut index, b"a", 2 * G, t0);
        assert_ne!(a2, d.offset);
        // A stale report with the wrong offset changes nothing; the right one frees.
        assert!(!index.demoted(b"a", d.disk_offset + 2 * G, true));
        assert!(index.demoted(b"a", d.disk_offset, true));
        assert_eq!(
            index.tier(b"a"),
            Some(Tier::Memory),
            "the new object is untouched"
        );
        assert_eq!(index.stats().disk_used, 0);
        assert_eq!(index.stats().demotions, 0);
        check(&index);

        // Now a promotion: put "p" on disk, start promoting, remove it.
        let mut index = Index::new(config(10, 20));
        for k in [b"p", b"b", b"c", b"d", b"e"] {
            put(&mut index, k, 2 * G, t0);
        }
        let d = index.evict(t0).pop().unwrap();
        assert!(index.demoted(b"p", d.disk_offset, true));
        let (mem, disk, _) = index.promote_begin(b"p", t0).unwrap();
        assert_eq!(index.remove(b"p", t0), Ok(()));
        assert_eq!(index.tier(b"p"), None);
        let used = index.stats();
        assert_eq!(used.memory_used, 10 * G);
        check(&index);
        // A new "p" is put and demoted; it cannot be promoted while the old copy runs.
        assert!(index.remove(b"b", t0).is_ok());
        put(&mut index, b"p", 2 * G, t0);
        let mut d2 = index.evict(t0);
        while d2.first().is_some_and(|d| d.key != b"p") {
            let d = d2.remove(0);
            assert!(index.demoted(&d.key, d.disk_offset, false));
            assert!(index.exists(&d.key, t0));
            d2 = index.evict(t0);
        }
        let d2 = d2.pop().expect("p demoted");
        assert!(index.demoted(b"p", d2.disk_offset, true));
        assert_eq!(
            index.promote_begin(b"p", t0),
            None,
            "old promotion still in flight"
        );
        assert!(index.promote_end(b"p", true, t0), "ends the old one");
        assert_eq!(index.tier(b"p"), Some(Tier::Disk), "the new p is untouched");
        assert_ne!(disk, d2.disk_offset);
        let (mem2, _, _) = index.promote_begin(b"p", t0).unwrap();
        let _ = (mem, mem2);
        assert!(index.promote_end(b"p", true, t0));
        assert_eq!(index.tier(b"p"), Some(Tier::Memory));
        assert!(!index.promote_end(b"p", true, t0));
        check(&index);
    }

    #[test]
    fn odd_configurations_do_not_panic() {
        let now = Instant::now();
        for (high, low) in [
            (f64::NAN, f64::NAN),
            (2.0, -1.0),
            (0.5, 0.9),
            (f64::INFINITY, f64::NEG_INFINITY),
            (0.0, 0.0),
        ] {
            let mut index = Index::new(IndexConfig {
                high_watermark: high,
                low_watermark: low,
                reserve_timeout: Duration::MAX,
                lease: Duration::MAX,
                ..config(8, 8)
            });
            assert!(index.low_bytes <= index.high_bytes);
            assert!(index.high_bytes <= 8 * G);
            put(&mut index, b"a", G, now);
            let f = found(&mut index, b"a", now);
            assert!(f.expires > now);
            for d in index.evict(now) {
                index.demoted(&d.key, d.disk_offset, true);
            }
            assert_eq!(index.reclaim(now + Duration::from_secs(1 << 40)), 0);
            check(&index);
        }
    }

    // ---- the model-checked random sequences ----

    #[derive(Clone, Debug)]
    enum Op {
        Reserve { key: u8, len: u64 },
        Commit { pick: usize, stale: bool },
        Abort { key: u8 },
        Lookup { key: u8 },
        Release { pick: usize },
        Exists { key: u8 },
        Remove { key: u8 },
        RemoveAll,
        Reclaim,
        Evict,
        FinishDemotion { pick: usize, ok: bool },
        PromoteBegin { pick: usize, key: u8 },
        FinishPromotion { pick: usize, ok: bool },
        BogusDemoted { key: u8, granule: u64, ok: bool },
        BogusPromoteEnd { key: u8, ok: bool },
        Advance { ms: u64 },
    }

    const KEYS: u8 = 12;

    fn op() -> impl Strategy<Value = Op> {
        let key = 0..KEYS;
        prop_oneof![
            6 => (key.clone(), prop_oneof![1 => Just(0u64), 20 => 1u64..=6 * G])
                .prop_map(|(key, len)| Op::Reserve { key, len }),
            6 => (any::<usize>(), proptest::bool::weighted(0.1))
                .prop_map(|(pick, stale)| Op::Commit { pick, stale }),
            1 => key.clone().prop_map(|key| Op::Abort { key }),
            5 => key.clone().prop_map(|key| Op::Lookup { key }),
            3 => any::<usize>().prop_map(|pick| Op::Release { pick }),
            1 => key.clone().prop_map(|key| Op::Exists { key }),
            1 => key.clone().prop_map(|key| Op::Remove { key }),
            1 => Just(Op::RemoveAll),
            1 => Just(Op::Reclaim),
            3 => Just(Op::Evict),
            3 => (any::<usize>(), proptest::bool::weighted(0.8))
                .prop_map(|(pick, ok)| Op::FinishDemotion { pick, ok }),
            3 => (any::<usize>(), key.clone()).prop_map(|(pick, key)| Op::PromoteBegin { pick, key }),
            2 => (any::<usize>(), proptest::bool::weighted(0.8))
                .prop_map(|(pick, ok)| Op::FinishPromotion { pick, ok }),
            1 => (key.clone(), 0u64..40, any::<bool>())
                .prop_map(|(key, granule, ok)| Op::BogusDemoted { key, granule, ok }),
            1 => (key, any::<bool>()).prop_map(|(key, ok)| Op::BogusPromoteEnd { key, ok }),
            2 => (0u64..40).prop_map(|ms| Op::Advance { ms }),
        ]
    }

    #[derive(Clone, Copy, Debug)]
    struct ModelRes {
        token: u64,
        offset: u64,
        len: u64,
        deadline: Instant,
    }

    #[derive(Clone, Copy, Debug)]
    struct ModelObj {
        /// Stamp written into every granule of the object's bytes (its reservation token).
        tag: u64,
        len: u64,
        tier: Tier,
        mem: Option<u64>,
    }

    #[derive(Clone, Copy, Debug)]
    struct ModelLease {
        id: u64,
        offset: u64,
        len: u64,
        tag: u64,
        expires: Instant,
        gone: bool,
    }

    /// The index under test, simulated bytes (one stamp per granule of memory and disk),
    /// and what the model expects.
    struct Sim {
        index: Index,
        now: Instant,
        mem: Vec<u64>,
        disk: Vec<u64>,
        reserved: HashMap<u8, ModelRes>,
        objects: HashMap<u8, ModelObj>,
        leases: Vec<ModelLease>,
        demotions: Vec<(Demotion, u64)>,
        promotions: BTreeMap<u8, (u64, u64, u64, u64)>,
        puts: u64,
        hits: u64,
        misses: u64,
        reclaimed: u64,
        granted: u64,
        released: u64,
    }

    fn stamp(bytes: &mut [u64], offset: u64, len: u64, tag: u64) {
        let (a, n) = (
            (offset / G) as usize,
            (SegmentAllocator::rounded(len) / G) as usize,
        );
        bytes[a..a + n].fill(tag);
    }

    fn stamped(bytes: &[u64], offset: u64, len: u64, tag: u64) -> bool {
        let (a, n) = (
            (offset / G) as usize,
            (SegmentAllocator::rounded(len) / G) as usize,
        );
        bytes[a..a + n].iter().all(|&t| t == tag)
    }

    fn overlaps(a: u64, a_len: u64, b: u64, b_len: u64) -> bool {
        let (a_end, b_end) = (
            a + SegmentAllocator::rounded(a_len),
            b + SegmentAllocator::rounded(b_len),
        );
        a < b_end && b < a_end
    }

    impl Sim {
        fn live_lease_on(&self, offset: u64) -> bool {
            self.leases
                .iter()
                .any(|l| !l.gone && l.offset == offset && l.expires > self.now)
        }

        /// Golden rule: a block handed out never overlaps memory under a live lease.
        fn assert_not_leased(&self, offset: u64, len: u64) {
            for l in &self.leases {
                if !l.gone && l.expires > self.now {
                    assert!(
                        !overlaps(offset, len, l.offset, l.len),
                        "memory {offset:#x}+{len} handed out under live lease {l:?}"
                    );
                }
            }
        }

        /// After a failed allocation every object still in the memory queue is leased.
        fn assert_nothing_evictable(&self) {
            for key in self.index.mem_queue.values() {
                if let Some(Entry::Object(Object {
                    place: Place::Memory { offset },
                    ..
                })) = self.index.entries.get(key)
                {
                    assert!(
                        self.index.pinned(*offset, self.now),
                        "{key:?} was evictable"
                    );
                }
            }
        }

        fn step(&mut self, op: Op) {
            let now = self.now;
            let before = self.index.stats();
            let mut removed: Vec<u8> = Vec::new();
            let mut may_evict = false;
            match op {
                Op::Reserve { key, len } => {
                    if self.reserved.get(&key).is_some_and(|r| r.deadline <= now) {
                        self.reserved.remove(&key);
                        self.reclaimed += 1;
                    }
                    let exists =
                        self.reserved.contains_key(&key) || self.objects.contains_key(&key);
                    may_evict = true;
                    match self.index.reserve(&[key], len, now) {
                        PutOutcome::AlreadyExists => assert!(exists),
                        PutOutcome::NoSpace => {
                            assert!(!exists);
                            if len > 0 && len <= self.index.mem.capacity() {
                                self.assert_nothing_evictable();
                            }
                        }
                        PutOutcome::Reserved(r) => {
                            assert!(!exists);
                            assert_eq!(r.len, len);
                            self.assert_not_leased(r.offset, len);
                            stamp(&mut self.mem, r.offset, len, r.token);
                            self.reserved.insert(
                                key,
                                ModelRes {
                                    token: r.token,
                                    offset: r.offset,
                                    len,
                                    deadline: later(now, self.index.config.reserve_timeout),
                                },
                            );
                        }
                    }
                }
                Op::Commit { pick, stale } => {
                    let mut keys: Vec<u8> = self.reserved.keys().copied().collect();
                    keys.sort_unstable();
                    let key = keys
                        .get(pick % keys.len().max(1))
                        .copied()
                        .unwrap_or((pick % 256) as u8);
                    match self.reserved.get(&key).copied() {
                        Some(r) => {
                            let token = if stale { r.token + 1 } else { r.token };
                            let got = self.index.commit(&[key], token, now);
                            if stale {
                                assert_eq!(got, Err(CommitError::UnknownReservation));
                            } else if r.deadline <= now {
                                assert_eq!(got, Err(CommitError::UnknownReservation));
                                self.reserved.remove(&key);
                                self.reclaimed += 1;
                            } else {
                                assert_eq!(got, Ok(()));
                                self.reserved.remove(&key);
                                self.puts += 1;
                                let obj = ModelObj {
                                    tag: r.token,
                                    len: r.len,
                                    tier: Tier::Memory,
                                    mem: Some(r.offset),
                                };
                                self.objects.insert(key, obj);
                            }
                        }
                        None => {
                            let token = self.index.next_id;
                            assert!(self.index.commit(&[key], token, now).is_err());
                        }
                    }
                }
                Op::Abort { key } => match self.reserved.remove(&key) {
                    Some(r) => assert!(self.index.abort(&[key], r.token)),
                    None => assert!(!self.index.abort(&[key], self.index.next_id)),
                },
                Op::Lookup { key } => {
                    match (self.index.lookup(&[key], now), self.objects.get(&key)) {
                        (Lookup::NotFound, None) => self.misses += 1,
                        (Lookup::Found(f), Some(o)) => {
                            self.hits += 1;
                            assert_eq!(o.tier, Tier::Memory);
                            assert_eq!((Some(f.offset), f.len), (o.mem, o.len));
                            assert_eq!(f.expires, later(now, self.index.config.lease));
                            assert!(
                                stamped(&self.mem, f.offset, f.len, o.tag),
                                "read wrong bytes"
                            );
                            self.granted += 1;
                            self.leases.push(ModelLease {
                                id: f.lease,
                                offset: f.offset,
                                len: f.len,
                                tag: o.tag,
                                expires: f.expires,
                                gone: false,
                            });
                        }
                        (Lookup::OnDisk { disk_offset, len }, Some(o)) => {
                            assert_eq!(o.tier, Tier::Disk);
                            assert_eq!(len, o.len);
                            assert!(
                                stamped(&self.disk, disk_offset, len, o.tag),
                                "disk has wrong bytes"
                            );
                        }
                        (got, want) => panic!("lookup {key}: got {got:?}, model {want:?}"),
                    }
                }
                Op::Release { pick } => {
                    if !self.leases.is_empty() {
                        let i = pick % self.leases.len();
                        let l = self.leases[i];
                        let got = self.index.release(l.id);
                        if l.gone {
                            assert!(!got, "released twice");
                        } else if l.expires > now {
                            assert!(got, "live lease unknown");
                        }
                        if got {
                            self.released += 1;
                        }
                        self.leases[i].gone = true;
                    } else {
                        assert!(!self.index.release(self.index.next_id));
                    }
                }
                Op::Exists { key } => {
                    assert_eq!(
                        self.index.exists(&[key], now),
                        self.objects.contains_key(&key)
                    );
                }
                Op::Remove { key } => {
                    let want = match self.objects.get(&key) {
                        None => Err(RemoveError::NotFound),
                        Some(o) if o.mem.is_some_and(|m| self.live_lease_on(m)) => {
                            Err(RemoveError::Leased)
                        }
                        Some(_) => Ok(()),
                    };
                    assert_eq!(self.index.remove(&[key], now), want);
                    if want.is_ok() {
                        self.objects.remove(&key);
                        removed.push(key);
                    }
                }
                Op::RemoveAll => {
                    let removable: Vec<u8> = self
                        .objects
                        .iter()
                        .filter(|(_, o)| !o.mem.is_some_and(|m| self.live_lease_on(m)))
                        .map(|(&k, _)| k)
                        .collect();
                    assert_eq!(self.index.remove_all(now), removable.len() as u64);
                    for k in removable {
                        self.objects.remove(&k);
                        removed.push(k);
                    }
                }
                Op::Reclaim => {
                    let expired: Vec<u8> = self
                        .reserved
                        .iter()
                        .filter(|(_, r)| r.deadline <= now)
                        .map(|(&k, _)| k)
                        .collect();
                    assert_eq!(self.index.reclaim(now), expired.len() as u64);
                    self.reclaimed += expired.len() as u64;
                    for k in expired {
                        self.reserved.remove(&k);
                    }
                    for l in &mut self.leases {
                        if l.expires <= now {
                            l.gone = true;
                        }
                    }
                    assert!(self.index.leases.values().all(|&(_, e)| e > now));
                }
                Op::Evict => {
                    may_evict = true;
                    let was_above = self.index.effective_used() > self.index.high_bytes;
                    let demotions = self.index.evict(now);
                    if !was_above {
                        assert!(demotions.is_empty());
                        assert_eq!(self.index.stats(), before);
                    }
                    if self.index.disk.capacity() == 0 {
                        assert!(demotions.is_empty());
                    }
                    for d in demotions {
                        assert_eq!(d.key.len(), 1);
                        let o = self.objects[&d.key[0]];
                        assert_eq!(
                            (Some(d.offset), d.len, o.tier),
                            (o.mem, o.len, Tier::Memory)
                        );
                        assert!(!self.live_lease_on(d.offset), "leased victim");
                        self.demotions.push((d, o.tag));
                    }
                    if was_above && self.index.effective_used() > self.index.low_bytes {
                        self.assert_nothing_evictable();
                    }
                }
                Op::FinishDemotion { pick, ok } => {
                    if self.demotions.is_empty() {
                        return;
                    }
                    let (d, tag) = self.demotions.remove(pick % self.demotions.len());
                    assert!(
                        stamped(&self.mem, d.offset, d.len, tag),
                        "memory changed under a demotion"
                    );
                    if ok {
                        let (a, n) = (
                            (d.offset / G) as usize,
                            (SegmentAllocator::rounded(d.len) / G) as usize,
                        );
                        let src = self.mem[a..a + n].to_vec();
                        let b = (d.disk_offset / G) as usize;
                        self.disk[b..b + n].copy_from_slice(&src);
                    }
                    assert!(self.index.demoted(&d.key, d.disk_offset, ok));
                    if let Some(o) = self.objects.get_mut(&d.key[0]) {
                        if o.tag == tag && ok {
                            o.tier = Tier::Disk;
                            o.mem = None;
                        }
                    }
                }
                Op::PromoteBegin { pick, key } => {
                    let mut on_disk: Vec<u8> = self
                        .objects
                        .iter()
                        .filter(|(_, o)| o.tier == Tier::Disk)
                        .map(|(&k, _)| k)
                        .collect();
                    on_disk.sort_unstable();
                    let key = if pick % 4 == 0 || on_disk.is_empty() {
                        key
                    } else {
                        on_disk[pick % on_disk.len()]
                    };
                    may_evict = true;
                    let want_some = self.objects.get(&key).is_some_and(|o| o.tier == Tier::Disk)
                        && !self.promotions.contains_key(&key);
                    match self.index.promote_begin(&[key], now) {
                        None => {
                            if want_some {
                                self.assert_nothing_evictable();
                            }
                        }
                        Some((mem, disk, len)) => {
                            assert!(want_some);
                            let o = self.objects[&key];
                            assert_eq!(len, o.len);
                            self.assert_not_leased(mem, len);
                            assert!(stamped(&self.disk, disk, len, o.tag));
                            self.promotions.insert(key, (mem, disk, len, o.tag));
                        }
                    }
                }
                Op::FinishPromotion { pick, ok } => {
                    let Some(&key) = self
                        .promotions
                        .keys()
                        .nth(pick % self.promotions.len().max(1))
                    else {
                        return;
                    };
                    let (mem, disk, len, tag) = self.promotions.remove(&key).unwrap();
                    assert!(
                        stamped(&self.disk, disk, len, tag),
                        "disk changed under a promotion"
                    );
                    if ok {
                        let (a, n) = (
                            (disk / G) as usize,
                            (SegmentAllocator::rounded(len) / G) as usize,
                        );
                        let src = self.disk[a..a + n].to_vec();
                        let b = (mem / G) as usize;
                        self.mem[b..b + n].copy_from_slice(&src);
                    }
                    assert!(self.index.promote_end(&[key], ok, now));
                    if let Some(o) = self.objects.get_mut(&key) {
                        if o.tag == tag && ok {
                            o.tier = Tier::Memory;
                            o.mem = Some(mem);
                        }
                    }
                }
                Op::BogusDemoted { key, granule, ok } => {
                    let disk_offset = granule * G;
                    if self
                        .demotions
                        .iter()
                        .any(|(d, _)| d.key == [key] && d.disk_offset == disk_offset)
                    {
                        return;
                    }
                    assert!(!self.index.demoted(&[key], disk_offset, ok));
                    assert_eq!(self.index.stats(), before);
                }
                Op::BogusPromoteEnd { key, ok } => {
                    if self.promotions.contains_key(&key) {
                        return;
                    }
                    assert!(!self.index.promote_end(&[key], ok, now));
                    assert_eq!(self.index.stats(), before);
                }
                Op::Advance { ms } => self.now += Duration::from_millis(ms),
            }
            self.after(before, removed, may_evict);
        }

        fn after(&mut self, before: IndexStats, removed: Vec<u8>, may_evict: bool) {
            check(&self.index);
            // Objects vanish only by an explained removal or a counted eviction.
            let after = self.index.stats();
            let vanished: Vec<u8> = self
                .objects
                .keys()
                .copied()
                .filter(|&k| self.index.tier(&[k]).is_none())
                .collect();
            let evicted_from_memory = vanished.len() as u64;
            let evictions = after.evictions - before.evictions;
            if !may_evict {
                assert_eq!(evictions, 0);
                assert!(vanished.is_empty(), "{vanished:?} vanished");
            }
            assert!(evicted_from_memory <= evictions, "uncounted loss");
            for k in vanished {
                assert!(!removed.contains(&k));
                self.objects.remove(&k);
            }
            // Everything committed in the index is known to the model, in the same tier.
            for (key, entry) in &self.index.entries {
                if let Entry::Object(_) = entry {
                    let o = self
                        .objects
                        .get(&key[0])
                        .expect("object unknown to the model");
                    assert_eq!(self.index.tier(key), Some(o.tier));
                }
            }
            // Every live lease still protects the bytes it was granted on.
            for l in &self.leases {
                if !l.gone && l.expires > self.now {
                    assert!(self.index.leases.contains_key(&l.id), "live lease lost");
                    assert!(
                        stamped(&self.mem, l.offset, l.len, l.tag),
                        "bytes under live lease {l:?} overwritten"
                    );
                }
            }
            for &id in self.index.leases.keys() {
                assert!(
                    self.leases.iter().any(|l| l.id == id && !l.gone),
                    "stray lease"
                );
            }
            let in_mem = self
                .objects
                .values()
                .filter(|o| o.tier == Tier::Memory)
                .count() as u64;
            let want = IndexStats {
                memory_capacity: self.index.mem.capacity(),
                memory_used: after.memory_used,
                disk_capacity: self.index.disk.capacity(),
                disk_used: after.disk_used,
                objects_in_memory: in_mem,
                objects_on_disk: self.objects.len() as u64 - in_mem,
                reservations: self.reserved.len() as u64,
                leases: self.granted - self.released - after.expired_leases,
                puts: self.puts,
                hits: self.hits,
                misses: self.misses,
                evictions: after.evictions,
                demotions: after.demotions,
                promotions: after.promotions,
                reclaimed_reservations: self.reclaimed,
                expired_leases: after.expired_leases,
            };
            assert_eq!(after, want);
            assert!(after.memory_used <= after.memory_capacity);
            assert!(after.disk_used <= after.disk_capacity);
        }

        /// Completes every copy in flight, so that the final state can be checked empty.
        fn drain(&mut self) {
            while !self.demotions.is_empty() {
                self.step(Op::FinishDemotion { pick: 0, ok: true });
            }
            while !self.promotions.is_empty() {
                self.step(Op::FinishPromotion { pick: 0, ok: true });
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Random operation sequences against a model: blocks never overlap in memory or
        /// on disk, bytes under a live lease are never overwritten (each block is stamped
        /// with its object's tag and copies are simulated), stats match the model, used
        /// never exceeds capacity; at the end, with every copy finished, every lease
        /// released and everything removed, nothing is left allocated.
        #[test]
        fn random_sequences_against_a_model(
            mem_granules in 4u64..24,
            disk_granules in prop_oneof![Just(0u64), 4u64..40],
            high in 0.5f64..1.0,
            low in 0.3f64..1.0,
            ops in proptest::collection::vec(op(), 1..200),
        ) {
            let base = Instant::now();
            let config = IndexConfig {
                memory_capacity: mem_granules * G,
                disk_capacity: disk_granules * G,
                high_watermark: high,
                low_watermark: low,
                reserve_timeout: Duration::from_millis(100),
                lease: Duration::from_millis(60),
            };
            let mut sim = Sim {
                index: Index::new(config),
                now: base,
                mem: vec![0; mem_granules as usize],
                disk: vec![0; disk_granules as usize],
                reserved: HashMap::new(),
                objects: HashMap::new(),
                leases: Vec::new(),
                demotions: Vec::new(),
                promotions: BTreeMap::new(),
                puts: 0,
                hits: 0,
                misses: 0,
                reclaimed: 0,
                granted: 0,
                released: 0,
            };
            for op in ops {
                sim.step(op);
            }
            sim.drain();
            for i in 0..sim.leases.len() {
                sim.step(Op::Release { pick: i });
            }
            let keys: Vec<u8> = sim.reserved.keys().copied().collect();
            for key in keys {
                sim.step(Op::Abort { key });
            }
            sim.step(Op::RemoveAll);
            // Aborted reservations' blocks are free once their deadlines have passed.
            sim.index.reclaim(sim.now + Duration::from_secs(1 << 30));
            let s = sim.index.stats();
            prop_assert_eq!((s.memory_used, s.disk_used, s.leases, s.reservations), (0, 0, 0, 0));
            prop_assert_eq!((s.objects_in_memory, s.objects_on_disk), (0, 0));
            prop_assert!(sim.index.pins.is_empty() && sim.index.deadlines.is_empty());
            prop_assert!(sim.index.demote_zombies.is_empty() && sim.index.promote_zombies.is_empty());
            prop_assert_eq!(sim.index.mem.largest_free(), sim.index.mem.capacity());
        }
    }
}
