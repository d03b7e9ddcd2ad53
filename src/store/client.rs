//! The store client: batched put-if-absent, get-into and exists over the members' segment
//! servers, zero-copy from and into the caller's registered memory.
//!
//! A key's owners are the members rendezvous hashing ranks first among the live ones
//! ([`placement`](super::placement)). A member that cannot be reached is skipped for a
//! while (`member_retry`) and its keys go to the next owner, which answers what it holds
//! (usually "not found"): clients that disagree about membership see misses, never wrong
//! bytes, because objects are immutable.
//!
//! * put: Reserve at the owner (put-if-absent, an address in its segment) → the engine
//!   WRITEs the bytes one-sided → Commit (visible); on a failed write, Abort.
//! * get: Lookup (an address, a length and a lease) → the engine READs the bytes → the
//!   lease is released in the background. A read that ended after its lease expired is
//!   reported as an error, never as data.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::placement::owners;
use super::server::{SegmentConfig, SegmentServer};
use super::wire::{
    check_key, reply_matches, ItemStatus, LookupItem, Reply, Request, ReserveItem, StoreStats,
    MAX_ITEMS, WRITE_WINDOW,
};
use crate::engine::{Engine, Op, PeerId, StoreService};
use crate::memory::Access;

/// How a store client finds and uses its members.
#[derive(Clone, Debug, PartialEq)]
pub struct StoreConfig {
    /// The members' sessions (`host:port` of their engines' control listeners). This
    /// engine's own session is added when it contributes a segment.
    pub members: Vec<String>,
    /// The segment this process contributes (`None` or zero bytes: a pure client).
    pub segment: Option<SegmentConfig>,
    /// Copies of each object (on the first `replicas` owners). Default 1.
    pub replicas: usize,
    /// How long one request or transfer to a member may take. Default 10 s.
    pub timeout: Duration,
    /// How long a member that could not be reached is skipped. Default 2 s.
    pub member_retry: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            members: Vec::new(),
            segment: None,
            replicas: 1,
            timeout: Duration::from_secs(10),
            member_retry: Duration::from_secs(2),
        }
    }
}

/// Errors of a whole store call.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The argument lists differ in length.
    #[error(
        "{keys} keys, {ptrs} buffers and {sizes} sizes: the lists must have one entry per key"
    )]
    LengthMismatch {
        /// Keys given.
        keys: usize,
        /// Buffers given.
        ptrs: usize,
        /// Sizes given.
        sizes: usize,
    },
    /// No member to store anything on.
    #[error("the store has no members: list the store nodes' sessions, or contribute memory")]
    NoMembers,
    /// A member is not `host:port`, or listed twice.
    #[error("member {member:?}: {reason}")]
    BadMember {
        /// The member as given.
        member: String,
        /// What is wrong.
        reason: String,
    },
    /// A bad configuration value.
    #[error("store configuration: {0}")]
    BadConfig(String),
    /// The contributed segment could not be set up.
    #[error("cannot contribute a store segment: {0}")]
    Segment(String),
    /// The engine refused (no listener, ...).
    #[error(transparent)]
    Engine(#[from] crate::engine::Error),
}

/// Why one key of a batch did not succeed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ItemError {
    /// The key is empty or longer than 256 bytes.
    #[error("bad key: {0}")]
    BadKey(String),
    /// A size of 0.
    #[error("size 0: objects have at least one byte")]
    ZeroSize,
    /// The caller's buffer is not (wholly) inside memory registered with the engine.
    #[error("the buffer [{addr:#x}, +{len}) is not inside one region registered with the engine ({need})")]
    NotRegistered {
        /// Buffer address.
        addr: u64,
        /// Buffer length.
        len: u64,
        /// The right it needs.
        need: &'static str,
    },
    /// put: the key exists (objects are immutable).
    #[error("the key already exists (objects are immutable)")]
    AlreadyExists,
    /// put: the owner has no room, even after evicting.
    #[error("no space at the key's owner {owner}")]
    NoSpace {
        /// The owner's session.
        owner: String,
    },
    /// get: no such object (or its owner is gone).
    #[error("not found")]
    NotFound,
    /// get: the object is larger than the buffer.
    #[error("the object has {stored} bytes, more than the {buffer}-byte buffer")]
    SizeMismatch {
        /// The object's size.
        stored: u64,
        /// The buffer's size.
        buffer: u64,
    },
    /// get: the read ended after the object's lease expired; the bytes read may be torn
    /// and are not reported as data.
    #[error("the read took longer than the object's {lease_ms} ms lease; read it again")]
    LeaseExpired {
        /// The lease's length.
        lease_ms: u32,
    },
    /// remove: someone is reading the object.
    #[error("the object is being read; remove it later")]
    Busy,
    /// No live member can own the key.
    #[error("no member can take the key: {0}")]
    Unavailable(String),
    /// The owner answered with a failure, or the transfer failed.
    #[error("{0}")]
    Failed(String),
}

/// Per key result of a put.
pub type PutResult = Result<(), ItemError>;
/// Per key result of a get: the object's size (bytes written into the buffer).
pub type GetResult = Result<u64, ItemError>;

/// Which keys exist, and how many lead the list without a gap (what a prefix cache asks:
/// the pages it can read back in order).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Existence {
    /// Per key.
    pub found: Vec<bool>,
    /// Keys `0..prefix` all exist; key `prefix` (if any) does not.
    pub prefix: usize,
}

struct Member {
    session: String,
    state: Mutex<MemberState>,
}

#[derive(Default)]
struct MemberState {
    peer: Option<PeerId>,
    down_until: Option<Instant>,
    why: String,
}

struct Inner {
    engine: Arc<Engine>,
    members: Vec<Member>,
    replicas: usize,
    timeout: Duration,
    retry: Duration,
    /// Set when the store is dropped: leases still queued for release are left to
    /// expire instead of delaying the drop.
    closing: std::sync::atomic::AtomicBool,
    /// Leases to release (member, lease ids), sent by the releaser thread, or by a remove
    /// first (so that an object just read is not reported busy).
    releases: Mutex<Vec<(usize, Vec<u64>)>>,
    queued: Condvar,
    /// Held while releases are sent.
    sending: Mutex<()>,
}

/// Up to this many owner groups of a request that moves no data go one after the other.
const SEQUENTIAL_GROUPS: usize = 4;

/// `now + d`, or a year from now when that does not fit the clock (a caller's
/// `Duration::MAX` means "practically never").
fn later(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .or_else(|| now.checked_add(Duration::from_secs(365 * 86_400)))
        .unwrap_or(now)
}

/// A reply that did not come: the member is unreachable (skip it) or answered nonsense.
enum CallError {
    Unreachable(String),
    Failed(String),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A store client (and, if it contributes memory, a member).
pub struct Store {
    inner: Arc<Inner>,
    server: Option<Arc<SegmentServer>>,
    releaser: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("members", &self.members())
            .field("segment", &self.server)
            .finish()
    }
}

impl Store {
    /// Joins the store: contributes `config.segment` (served by `engine` from now on) and
    /// uses `config.members`. Nothing is contacted yet: members are opened on first use.
    pub fn setup(engine: Arc<Engine>, config: StoreConfig) -> Result<Store, StoreError> {
        if config.replicas == 0 {
            return Err(StoreError::BadConfig("replicas must be at least 1".into()));
        }
        if config.timeout.is_zero() {
            return Err(StoreError::BadConfig("timeout must not be zero".into()));
        }
        let mut sessions: Vec<String> = Vec::new();
        for m in &config.members {
            crate::engine::split_session(m).map_err(|reason| StoreError::BadMember {
                member: m.clone(),
                reason,
            })?;
            if sessions.contains(m) {
                return Err(StoreError::BadMember {
                    member: m.clone(),
                    reason: "listed twice".into(),
                });
            }
            sessions.push(m.clone());
        }
        // Members are reached through the engine's peers, which need its listener.
        let own = engine
            .session_id()
            .ok_or(crate::engine::Error::NoListener)?
            .to_string();
        let contributes = config.segment.as_ref().is_some_and(|s| s.memory_bytes > 0);
        if contributes && !sessions.contains(&own) {
            sessions.push(own);
        }
        if sessions.is_empty() {
            return Err(StoreError::NoMembers);
        }
        let inner = Arc::new(Inner {
            engine,
            members: sessions
                .into_iter()
                .map(|session| Member {
                    session,
                    state: Mutex::new(MemberState::default()),
                })
                .collect(),
            replicas: config.replicas,
            timeout: config.timeout,
            retry: config.member_retry,
            closing: std::sync::atomic::AtomicBool::new(false),
            releases: Mutex::new(Vec::new()),
            queued: Condvar::new(),
            sending: Mutex::new(()),
        });
        let releasing = Arc::clone(&inner);
        let releaser = std::thread::Builder::new()
            .name("kvx-store-release".into())
            .spawn(move || releasing.release_loop())
            .map_err(|e| StoreError::BadConfig(format!("cannot start a thread: {e}")))?;
        let mut store = Store {
            inner,
            server: None,
            releaser: Some(releaser),
        };
        if contributes {
            let segment = config.segment.as_ref().expect("checked above");
            let engine = &store.inner.engine;
            let server = SegmentServer::start(engine, segment).map_err(StoreError::Segment)?;
            if !engine.set_store_service_if_none(Arc::clone(&server) as Arc<dyn StoreService>)? {
                server.stop();
                return Err(StoreError::Segment(
                    "this engine already serves a store segment (one per engine)".into(),
                ));
            }
            store.server = Some(server);
        }
        Ok(store)
    }

    /// The members' sessions, in placement order.
    pub fn members(&self) -> Vec<String> {
        self.inner
            .members
            .iter()
            .map(|m| m.session.clone())
            .collect()
    }

    /// The segment this process contributes, if any.
    pub fn segment(&self) -> Option<&Arc<SegmentServer>> {
        self.server.as_ref()
    }

    /// Puts each key's bytes (`sizes[i]` bytes at `ptrs[i]`, inside memory registered
    /// with the engine) if the key does not exist yet. One result per key.
    pub fn batch_put_from(
        &self,
        keys: &[&[u8]],
        ptrs: &[u64],
        sizes: &[u64],
    ) -> Result<Vec<PutResult>, StoreError> {
        let (mut results, valid) = self.checked(keys, ptrs, sizes, Access::LOCAL_READ)?;
        let inner = &self.inner;
        let mut taken = vec![Vec::new(); keys.len()];
        for _ in 0..inner.replicas {
            let done = inner.drive(&valid, keys, &mut taken, true, |m, items| {
                inner.put_group(m, items, keys, ptrs, sizes)
            });
            for (i, r) in done {
                // The best replica's answer: Ok, else AlreadyExists, else the first error.
                let better = match (&results[i], &r) {
                    (None, _) => true,
                    (Some(Ok(())), _) => false,
                    (Some(_), Ok(())) => true,
                    (Some(Err(ItemError::AlreadyExists)), _) => false,
                    (Some(_), Err(ItemError::AlreadyExists)) => true,
                    _ => false,
                };
                if better {
                    results[i] = Some(r);
                }
            }
        }
        Ok(results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(ItemError::Unavailable("no owner".into()))))
            .collect())
    }

    /// Reads each key's object into `ptrs[i]` (a buffer of `sizes[i]` bytes inside
    /// memory registered with the engine). One result per key: the object's size.
    pub fn batch_get_into(
        &self,
        keys: &[&[u8]],
        ptrs: &[u64],
        sizes: &[u64],
    ) -> Result<Vec<GetResult>, StoreError> {
        let (mut results, mut todo) = self.checked(keys, ptrs, sizes, Access::LOCAL_WRITE)?;
        let inner = &self.inner;
        let mut taken = vec![Vec::new(); keys.len()];
        for _ in 0..inner.replicas {
            let done = inner.drive(&todo, keys, &mut taken, true, |m, items| {
                inner.get_group(m, items, keys, ptrs, sizes)
            });
            todo.clear();
            for (i, r) in done {
                // A miss or failure at this replica: the next one may have it. The answer
                // kept is the data, else the first that is not "unavailable".
                if r.is_err() {
                    todo.push(i);
                }
                let keep = matches!(
                    (&results[i], &r),
                    (None, _) | (_, Ok(_)) | (Some(Err(ItemError::Unavailable(_))), _)
                );
                if keep {
                    results[i] = Some(r);
                }
            }
        }
        Ok(results
            .into_iter()
            .map(|r| r.unwrap_or(Err(ItemError::NotFound)))
            .collect())
    }

    /// Which keys exist, and the longest existing prefix. A key that is invalid or whose
    /// owners cannot be reached counts as missing.
    pub fn batch_exists(&self, keys: &[&[u8]]) -> Result<Existence, StoreError> {
        let mut found = vec![false; keys.len()];
        let mut todo: Vec<usize> = (0..keys.len())
            .filter(|&i| check_key(keys[i]).is_ok())
            .collect();
        let inner = &self.inner;
        let mut taken = vec![Vec::new(); keys.len()];
        // Several owners: ask them all at once first (what they answer is settled; the
        // rest goes the usual way below).
        let mut asked = vec![false; keys.len()];
        for (i, f) in inner.exists_at_once(&todo, keys, &mut taken) {
            found[i] = f;
            asked[i] = true;
        }
        // Left: keys not asked yet and, with replicas, those missing at their first owner
        // (asked of the next ones).
        todo.retain(|&i| !found[i] && (!asked[i] || inner.replicas > 1));
        for _ in 0..inner.replicas {
            let done = inner.drive(&todo, keys, &mut taken, false, |m, items| {
                let request = Request::Exists {
                    keys: items.iter().map(|&i| keys[i].to_vec()).collect(),
                };
                match inner.call(m, &request)? {
                    Reply::Existing(e) => {
                        Ok(items.iter().copied().zip(e.into_iter().map(Ok)).collect())
                    }
                    other => Err(unexpected(&other)),
                }
            });
            todo.clear();
            for (i, r) in done {
                if r == Ok(true) {
                    found[i] = true;
                } else {
                    todo.push(i);
                }
            }
        }
        let prefix = found.iter().take_while(|&&f| f).count();
        Ok(Existence { found, prefix })
    }

    /// Removes each key's object. One result per key (`NotFound`, `Busy` while read).
    pub fn remove(&self, keys: &[&[u8]]) -> Result<Vec<PutResult>, StoreError> {
        self.inner.flush_releases();
        let mut results: Vec<PutResult> = keys
            .iter()
            .map(|k| check_key(k).map_err(|e| ItemError::BadKey(e.to_string())))
            .collect();
        let valid: Vec<usize> = (0..keys.len()).filter(|&i| results[i].is_ok()).collect();
        let inner = &self.inner;
        let mut first = vec![true; keys.len()];
        let mut taken = vec![Vec::new(); keys.len()];
        for _ in 0..inner.replicas {
            let done = inner.drive(&valid, keys, &mut taken, false, |m, items| {
                let request = Request::Remove {
                    keys: items.iter().map(|&i| keys[i].to_vec()).collect(),
                };
                match inner.call(m, &request)? {
                    Reply::Statuses(s) => Ok(items
                        .iter()
                        .copied()
                        .zip(s.into_iter().map(|s| match s {
                            ItemStatus::Ok => Ok(()),
                            ItemStatus::NotFound => Err(ItemError::NotFound),
                            ItemStatus::Leased => Err(ItemError::Busy),
                            other => Err(ItemError::Failed(format!("remove: {other}"))),
                        }))
                        .collect()),
                    other => Err(unexpected(&other)),
                }
            });
            for (i, r) in done {
                // Removed from any replica counts; the first answer otherwise.
                if first[i] || r.is_ok() {
                    results[i] = r;
                    first[i] = false;
                }
            }
        }
        Ok(results)
    }

    /// Removes every object no one is reading, on every reachable member; returns how
    /// many, and the members that could not be reached.
    pub fn remove_all(&self) -> (u64, Vec<(String, String)>) {
        self.inner.flush_releases();
        let mut removed = 0;
        let mut failed = Vec::new();
        for (m, member) in self.inner.members.iter().enumerate() {
            match self.inner.call(m, &Request::RemoveAll) {
                Ok(Reply::RemovedAll(n)) => removed += n,
                Ok(other) => failed.push((member.session.clone(), describe(&unexpected(&other)))),
                Err(e) => failed.push((member.session.clone(), describe(&e))),
            }
        }
        (removed, failed)
    }

    /// Every member's counters (or why it could not be asked).
    pub fn member_stats(&self) -> Vec<(String, Result<StoreStats, String>)> {
        self.inner
            .members
            .iter()
            .enumerate()
            .map(|(m, member)| {
                let r = match self.inner.call(m, &Request::Stats) {
                    Ok(Reply::Stats(s)) => Ok(s),
                    Ok(other) => Err(describe(&unexpected(&other))),
                    Err(e) => Err(describe(&e)),
                };
                (member.session.clone(), r)
            })
            .collect()
    }

    /// The counters of every reachable member, summed.
    pub fn stats(&self) -> StoreStats {
        let mut total = StoreStats::default();
        for (_, s) in self.member_stats() {
            if let Ok(s) = s {
                total.add(&s);
            }
        }
        total
    }

    /// Checks every item (key, size, buffer registered with `access`): the results of
    /// the bad ones (the rest `None`) and the indices of the good ones.
    #[allow(clippy::type_complexity)]
    fn checked<T>(
        &self,
        keys: &[&[u8]],
        ptrs: &[u64],
        sizes: &[u64],
        access: Access,
    ) -> Result<(Vec<Option<Result<T, ItemError>>>, Vec<usize>), StoreError> {
        same_lengths(keys.len(), ptrs.len(), sizes.len())?;
        let mut results: Vec<Option<Result<T, ItemError>>> =
            (0..keys.len()).map(|_| None).collect();
        let mut good = Vec::with_capacity(keys.len());
        for i in 0..keys.len() {
            match self.check_item(keys[i], ptrs[i], sizes[i], access) {
                Ok(()) => good.push(i),
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        Ok((results, good))
    }

    fn check_item(&self, key: &[u8], ptr: u64, size: u64, access: Access) -> Result<(), ItemError> {
        check_key(key).map_err(|e| ItemError::BadKey(e.to_string()))?;
        if size == 0 {
            return Err(ItemError::ZeroSize);
        }
        if !self.inner.engine.is_registered(ptr, size, access) {
            return Err(ItemError::NotRegistered {
                addr: ptr,
                len: size,
                need: if access.contains(Access::LOCAL_WRITE) {
                    "the engine writes it: LOCAL_WRITE"
                } else {
                    "the engine reads it: LOCAL_READ"
                },
            });
        }
        Ok(())
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.inner
            .closing
            .store(true, std::sync::atomic::Ordering::Release);
        self.inner.queued.notify_all();
        if let Some(t) = self.releaser.take() {
            let _ = t.join();
        }
        if let Some(server) = self.server.take() {
            // Stop serving only if the engine still serves this segment.
            let ours = Arc::clone(&server) as Arc<dyn StoreService>;
            if let Some(current) = self.inner.engine.store_service() {
                if Arc::ptr_eq(&current, &ours) {
                    let _ = self.inner.engine.set_store_service(None);
                }
            }
            server.stop();
        }
    }
}

fn same_lengths(keys: usize, ptrs: usize, sizes: usize) -> Result<(), StoreError> {
    if keys == ptrs && keys == sizes {
        Ok(())
    } else {
        Err(StoreError::LengthMismatch { keys, ptrs, sizes })
    }
}

fn unexpected(reply: &Reply) -> CallError {
    CallError::Failed(format!("unexpected reply {}", reply.kind_name()))
}

fn describe(e: &CallError) -> String {
    match e {
        CallError::Unreachable(why) | CallError::Failed(why) => why.clone(),
    }
}

impl Inner {
    /// Leases end early here, off the callers' path; one lost only delays eviction of
    /// its object until the lease expires. Ends when the store is dropped (what is still
    /// queued then is left to expire).
    fn release_loop(&self) {
        let closing = || self.closing.load(std::sync::atomic::Ordering::Acquire);
        loop {
            {
                let mut q = lock(&self.releases);
                while q.is_empty() && !closing() {
                    q = self.queued.wait(q).unwrap_or_else(PoisonError::into_inner);
                }
            }
            if closing() {
                return;
            }
            self.flush_releases();
        }
    }

    fn send_releases(&self, batch: Vec<(usize, Vec<u64>)>) {
        for (m, leases) in batch {
            if self.is_live(m) {
                let _ = self.call(m, &Request::Release { leases });
            }
        }
    }

    fn queue_release(&self, m: usize, leases: Vec<u64>) {
        lock(&self.releases).push((m, leases));
        self.queued.notify_one();
    }

    /// Sends the queued releases now, after any the releaser is sending (a remove calls
    /// it first, so that an object just read is not reported busy).
    fn flush_releases(&self) {
        let _one_at_a_time = lock(&self.sending);
        let batch = std::mem::take(&mut *lock(&self.releases));
        self.send_releases(batch);
    }

    /// Whether member `m` may be used now (not marked down, or its time is up).
    fn is_live(&self, m: usize) -> bool {
        let s = lock(&self.members[m].state);
        s.down_until.is_none_or(|t| Instant::now() >= t)
    }

    fn mark_down(&self, m: usize, why: &str) {
        let mut s = lock(&self.members[m].state);
        log::warn!(
            "kvxfer store: member {} is skipped for {:?}: {why}",
            self.members[m].session,
            self.retry
        );
        s.down_until = Some(later(self.retry));
        s.why = why.to_string();
        s.peer = None;
    }

    fn peer(&self, m: usize) -> Result<PeerId, CallError> {
        let member = &self.members[m];
        if let Some(peer) = lock(&member.state).peer {
            return Ok(peer);
        }
        let peer = self
            .engine
            .open_peer(&member.session)
            .map_err(|e| CallError::Unreachable(e.to_string()))?;
        lock(&member.state).peer = Some(peer);
        Ok(peer)
    }

    /// One request to member `m` and its checked reply.
    fn call(&self, m: usize, request: &Request) -> Result<Reply, CallError> {
        let peer = self.peer(m)?;
        let body = self
            .engine
            .store_call(peer, request.encode(), self.timeout)
            .map_err(|e| CallError::Unreachable(e.to_string()))?;
        self.checked_reply(m, request, &body)
    }

    /// The reply in `body` if it is well formed, answers `request` and is no refusal.
    fn checked_reply(&self, m: usize, request: &Request, body: &[u8]) -> Result<Reply, CallError> {
        let reply = Reply::decode(body).map_err(|e| {
            CallError::Failed(format!(
                "member {}: a malformed reply: {e}",
                self.members[m].session
            ))
        })?;
        reply_matches(request, &reply).map_err(|e| {
            CallError::Failed(format!(
                "member {}: a reply that does not answer the request: {e}",
                self.members[m].session
            ))
        })?;
        if let Reply::Error { code, reason } = reply {
            return Err(CallError::Failed(format!(
                "member {} refused: {} {code}: {reason}",
                self.members[m].session,
                super::wire::error_code::name(code)
            )));
        }
        Ok(reply)
    }

    /// One Exists per owner group, all sent before any reply is read
    /// ([`Engine::store_call_many`]), when `todo` spans several owners; the keys answered
    /// (each owner added to `taken`), the rest left to the caller.
    fn exists_at_once(
        &self,
        todo: &[usize],
        keys: &[&[u8]],
        taken: &mut [Vec<usize>],
    ) -> Vec<(usize, bool)> {
        let names: Vec<String> = self.members.iter().map(|m| m.session.clone()).collect();
        let live: Vec<bool> = (0..names.len()).map(|m| self.is_live(m)).collect();
        let (groups, _) = group_by_owner(&names, todo, keys, taken, &live);
        if groups.len() < 2 || groups.iter().any(|(_, g)| g.len() > MAX_ITEMS) {
            return Vec::new();
        }
        let mut asked = Vec::new();
        let mut calls = Vec::new();
        for (m, items) in groups {
            let Ok(peer) = self.peer(m) else { continue };
            let request = Request::Exists {
                keys: items.iter().map(|&i| keys[i].to_vec()).collect(),
            };
            calls.push((peer, request.encode()));
            asked.push((m, items, request));
        }
        let replies = self.engine.store_call_many(calls, self.timeout);
        let mut answered = Vec::new();
        for ((m, items, request), reply) in asked.into_iter().zip(replies) {
            let checked = reply
                .map_err(|e| CallError::Unreachable(e.to_string()))
                .and_then(|body| self.checked_reply(m, &request, &body));
            match checked {
                Ok(Reply::Existing(e)) => {
                    for (&i, f) in items.iter().zip(e) {
                        taken[i].push(m);
                        answered.push((i, f));
                    }
                }
                Ok(_) | Err(CallError::Failed(_)) => {}
                Err(CallError::Unreachable(why)) => self.mark_down(m, &why),
            }
        }
        answered
    }

    /// Runs `run` on the keys `items`, each sent to its best owner not in `taken[i]` (the
    /// members that served it in an earlier round: replicas go to distinct members), in
    /// groups per owner, which go in parallel when there are several (and they move data,
    /// or there are more than [`SEQUENTIAL_GROUPS`]). The keys of a
    /// member that cannot be reached are placed again without it; a member that failed
    /// is not tried again within this call. Each key that reached a member gets it added
    /// to `taken`.
    fn drive<T: Send>(
        &self,
        items: &[usize],
        keys: &[&[u8]],
        taken: &mut [Vec<usize>],
        moves_data: bool,
        run: impl Fn(usize, &[usize]) -> Result<Vec<(usize, Result<T, ItemError>)>, CallError> + Sync,
    ) -> Vec<(usize, Result<T, ItemError>)> {
        let names: Vec<String> = self.members.iter().map(|m| m.session.clone()).collect();
        let mut failed_here = vec![false; names.len()];
        let mut out = Vec::with_capacity(items.len());
        let mut todo = items.to_vec();
        for _ in 0..=self.members.len() {
            if todo.is_empty() {
                break;
            }
            let live: Vec<bool> = (0..names.len())
                .map(|m| !failed_here[m] && self.is_live(m))
                .collect();
            let (groups, orphans) = group_by_owner(&names, &todo, keys, taken, &live);
            out.extend(
                orphans
                    .into_iter()
                    .map(|i| (i, Err(ItemError::Unavailable(self.why_none())))),
            );
            todo.clear();
            let run_group = |m: usize, g: Vec<usize>| {
                let (done, failure) = chunked(&g, |c| run(m, c));
                (m, done, failure)
            };
            // Groups that move data overlap their transfers on threads; a few small
            // requests (exists, remove) go one after the other, cheaper than a thread each.
            let parallel = groups.len() > 1 && (moves_data || groups.len() > SEQUENTIAL_GROUPS);
            let answers: Vec<_> = if !parallel {
                groups.into_iter().map(|(m, g)| run_group(m, g)).collect()
            } else {
                std::thread::scope(|scope| {
                    let handles: Vec<_> = groups
                        .into_iter()
                        .map(|(m, g)| {
                            let run_group = &run_group;
                            scope.spawn(move || run_group(m, g))
                        })
                        .collect();
                    handles
                        .into_iter()
                        .map(|h| h.join().expect("a store request thread panicked"))
                        .collect()
                })
            };
            for (m, done, failure) in answers {
                for (i, _) in &done {
                    taken[*i].push(m);
                }
                out.extend(done);
                match failure {
                    None => {}
                    Some((CallError::Unreachable(why), rest)) => {
                        self.mark_down(m, &why);
                        failed_here[m] = true;
                        todo.extend(rest);
                    }
                    Some((CallError::Failed(why), rest)) => {
                        for &i in &rest {
                            taken[i].push(m);
                        }
                        out.extend(
                            rest.into_iter()
                                .map(|i| (i, Err(ItemError::Failed(why.clone())))),
                        )
                    }
                }
            }
        }
        out.extend(
            todo.into_iter()
                .map(|i| (i, Err(ItemError::Unavailable(self.why_none())))),
        );
        out
    }

    /// Why no member could take a key: the reasons members were skipped.
    fn why_none(&self) -> String {
        let down: Vec<String> = self
            .members
            .iter()
            .filter_map(|m| {
                let s = lock(&m.state);
                s.down_until.map(|_| format!("{}: {}", m.session, s.why))
            })
            .collect();
        if down.is_empty() {
            "every member already holds a copy (fewer members than replicas)".to_string()
        } else {
            format!("members unreachable ({})", down.join("; "))
        }
    }

    fn put_group(
        &self,
        m: usize,
        items: &[usize],
        keys: &[&[u8]],
        ptrs: &[u64],
        sizes: &[u64],
    ) -> Result<Vec<(usize, PutResult)>, CallError> {
        let request = Request::Reserve {
            items: items
                .iter()
                .map(|&i| (keys[i].to_vec(), sizes[i]))
                .collect(),
        };
        // The bytes must land within the write window from here (the server keeps the
        // reservation longer than that, never shorter).
        let write_deadline = later(self.timeout.min(WRITE_WINDOW));
        let Reply::Reserved(granted) = self.call(m, &request)? else {
            return Err(CallError::Failed("Reserve: unexpected reply".into()));
        };
        let owner = &self.members[m].session;
        let mut out = Vec::with_capacity(items.len());
        let mut ops = Vec::new();
        let mut written = Vec::new();
        for (&i, g) in items.iter().zip(granted) {
            match g {
                ReserveItem::Granted { addr, token } => {
                    ops.push(Op::write(ptrs[i], addr, sizes[i]));
                    written.push((i, token));
                }
                ReserveItem::Refused(ItemStatus::AlreadyExists) => {
                    out.push((i, Err(ItemError::AlreadyExists)))
                }
                ReserveItem::Refused(ItemStatus::NoSpace) => out.push((
                    i,
                    Err(ItemError::NoSpace {
                        owner: owner.clone(),
                    }),
                )),
                ReserveItem::Refused(s) => {
                    out.push((i, Err(ItemError::Failed(format!("{owner} refused: {s}")))))
                }
            }
        }
        if written.is_empty() {
            return Ok(out);
        }
        let tokens = |w: &[(usize, u64)]| -> Vec<(Vec<u8>, u64)> {
            w.iter().map(|&(i, t)| (keys[i].to_vec(), t)).collect()
        };
        if let Err(why) = self.transfer(m, &ops, write_deadline) {
            // Best effort: an abort that does not arrive is reclaimed by timeout.
            let _ = self.call(
                m,
                &Request::Abort {
                    items: tokens(&written),
                },
            );
            out.extend(
                written
                    .iter()
                    .map(|&(i, _)| (i, Err(ItemError::Failed(why.clone())))),
            );
            return Ok(out);
        }
        let Reply::Statuses(done) = self.call(
            m,
            &Request::Commit {
                items: tokens(&written),
            },
        )?
        else {
            return Err(CallError::Failed("Commit: unexpected reply".into()));
        };
        for (&(i, _), s) in written.iter().zip(done) {
            out.push((
                i,
                match s {
                    ItemStatus::Ok => Ok(()),
                    s => Err(ItemError::Failed(format!(
                        "{owner} did not commit ({s}): the reservation was reclaimed; put again"
                    ))),
                },
            ));
        }
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    fn get_group(
        &self,
        m: usize,
        items: &[usize],
        keys: &[&[u8]],
        ptrs: &[u64],
        sizes: &[u64],
    ) -> Result<Vec<(usize, GetResult)>, CallError> {
        let request = Request::Lookup {
            keys: items.iter().map(|&i| keys[i].to_vec()).collect(),
        };
        let asked = Instant::now();
        let Reply::Found {
            lease_ms,
            items: found,
        } = self.call(m, &request)?
        else {
            return Err(CallError::Failed("Lookup: unexpected reply".into()));
        };
        let mut out = Vec::with_capacity(items.len());
        let mut ops = Vec::new();
        let mut reading = Vec::new();
        let mut leases = Vec::new();
        for (&i, f) in items.iter().zip(found) {
            match f {
                LookupItem::Found { addr, len, lease } => {
                    leases.push(lease);
                    if len > sizes[i] {
                        out.push((
                            i,
                            Err(ItemError::SizeMismatch {
                                stored: len,
                                buffer: sizes[i],
                            }),
                        ));
                    } else {
                        ops.push(Op::read(ptrs[i], addr, len));
                        reading.push((i, len));
                    }
                }
                LookupItem::Missing(ItemStatus::NotFound) => {
                    out.push((i, Err(ItemError::NotFound)))
                }
                LookupItem::Missing(s) => out.push((
                    i,
                    Err(ItemError::Failed(format!(
                        "{} could not serve it: {s}",
                        self.members[m].session
                    ))),
                )),
            }
        }
        if !ops.is_empty() {
            // The lease is counted from before the request: never later than the server's.
            // Reading past it would only end in an error, so it is also the deadline.
            let lease = Duration::from_millis(u64::from(lease_ms));
            let deadline = asked.checked_add(lease.min(self.timeout)).unwrap_or(asked);
            let moved = self.transfer(m, &ops, deadline);
            let expired = asked.elapsed() >= lease;
            for (i, len) in reading {
                out.push((
                    i,
                    match &moved {
                        // Stopped at the lease's end (the deadline) or finished after it.
                        _ if expired => Err(ItemError::LeaseExpired { lease_ms }),
                        Err(why) => Err(ItemError::Failed(why.clone())),
                        Ok(()) => Ok(len),
                    },
                ));
            }
        }
        if !leases.is_empty() {
            self.queue_release(m, leases);
        }
        Ok(out)
    }

    /// Moves `ops` to or from member `m` by `deadline`; `Err` says why not.
    fn transfer(&self, m: usize, ops: &[Op], deadline: Instant) -> Result<(), String> {
        let peer = self.peer(m).map_err(|e| describe(&e))?;
        let id = self
            .engine
            .submit_with_deadline(peer, ops, deadline)
            .map_err(|e| e.to_string())?;
        let state = self
            .engine
            .wait(id, deadline.saturating_duration_since(Instant::now()));
        let _ = self.engine.free(id);
        state
            .map_err(|e| e.to_string())?
            .into_result()
            .map(drop)
            .map_err(|e| e.to_string())
    }
}

/// Groups `todo` by owner: each key's best live owner not in `taken[i]`; also the keys
/// with no such owner.
#[allow(clippy::type_complexity)]
fn group_by_owner(
    names: &[String],
    todo: &[usize],
    keys: &[&[u8]],
    taken: &[Vec<usize>],
    live: &[bool],
) -> (Vec<(usize, Vec<usize>)>, Vec<usize>) {
    let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
    let mut orphans = Vec::new();
    for &i in todo {
        let owner = owners(names, keys[i], names.len(), |m| live[m])
            .into_iter()
            .find(|m| !taken[i].contains(m));
        match owner {
            Some(m) => match groups.iter_mut().find(|g| g.0 == m) {
                Some(g) => g.1.push(i),
                None => groups.push((m, vec![i])),
            },
            None => orphans.push(i),
        }
    }
    (groups, orphans)
}

/// Runs `run` on `items` in chunks of at most [`MAX_ITEMS`] (one request each): the
/// results of the chunks that got an answer and, if one did not, why and the items of that
/// chunk and of those after it (not sent).
#[allow(clippy::type_complexity)]
fn chunked<T>(
    items: &[usize],
    run: impl Fn(&[usize]) -> Result<Vec<T>, CallError>,
) -> (Vec<T>, Option<(CallError, Vec<usize>)>) {
    let mut out = Vec::with_capacity(items.len());
    for (n, c) in items.chunks(MAX_ITEMS).enumerate() {
        match run(c) {
            Ok(done) => out.extend(done),
            Err(e) => return (out, Some((e, items[n * MAX_ITEMS..].to_vec()))),
        }
    }
    (out, None)
}
