//! The shared-memory transport's control messages: what two engines on one host say over a
//! Unix `SOCK_SEQPACKET` socket to prove who they are and to attach each other's regions.
//! Bytes themselves never travel here; they move through shared mappings or cross-memory
//! attach.
//!
//! ```text
//! datagram   header (16) | body (datagram length - 16)
//! header     magic "KVXS" | version u8 (1) | kind u8 | flags u16 (0) | request id u64
//! 1 Hello      target_engine u64 | client_engine u64 | client_nonce [16]            (32)
//! 2 HelloReply engine_id u64 | proof_addr u64 | pid u32 | proof_len u32
//!              | table_slots u32 | reserved u32 (0)                     + 2 fds     (32)
//! 3 Confirm    server_nonce [16]                                                    (16)
//! 4 Proven     -                                                                     (0)
//! 5 Attach     addr u64                                                              (8)
//! 6 Attached   addr u64 | len u64 | gen u64 | offset u64 | file_len u64
//!              | access u32 | slot u32 | map u32 | reserved u32 (0)   + 1 fd if map (56)
//! 7 Refused    code u32 | reason_len u32 | reason (UTF-8, <= 1024 bytes)     (8 + reason_len)
//! 8 AttachedCuda addr u64 | len u64 | gen u64 | offset u64 | access u32 | slot u32
//!              | pci_bus_id [16] (ASCII, NUL-padded) | handle [64]          no fd (120)
//! ```
//!
//! Everything little endian. [`decode`] is strict: every length is exact, reserved fields and
//! flags are zero and every field is within its limits, so whatever it accepts re-encodes
//! ([`Message::encode`]) to the very same bytes. File descriptors travel beside the bytes
//! (`SCM_RIGHTS`); [`Message::fds`] says how many each message must carry.

use crate::Access;

/// The first four bytes of every message.
pub const MAGIC: [u8; 4] = *b"KVXS";
/// The only version spoken.
pub const VERSION: u8 = 1;
/// Bytes of a header.
pub const HEADER_LEN: usize = 16;
/// Bytes of a nonce (`Hello`'s client nonce, the server nonce of the proof page).
pub const NONCE_LEN: usize = 16;
/// Bytes of a `Refused` reason, at most.
pub const MAX_REASON: usize = 1024;
/// Bytes of the largest datagram (a `Refused` with the longest reason; every other kind is
/// shorter, which is checked at compile time); receivers use a buffer of this size.
pub const MAX_MESSAGE: usize = HEADER_LEN + REFUSED_FIXED + MAX_REASON;
/// Slots a pin table may have, at most.
pub const MAX_TABLE_SLOTS: u32 = 1 << 20;
/// Bytes of a proof page, at least.
pub const MIN_PROOF_LEN: u32 = 32;
/// Bytes of a proof page, at most.
pub const MAX_PROOF_LEN: u32 = 1 << 20;
/// What a mapped region's offset in its memfd must be a multiple of (the page size).
pub const MAP_ALIGN: u64 = 4096;
/// Bytes of an `AttachedCuda` body.
pub const ATTACHED_CUDA_LEN: usize = 4 * 8 + 2 * 4 + PCI_BUS_ID_LEN + CUDA_IPC_HANDLE_LEN;
/// Bytes of [`CudaAttachment::pci_bus_id`]: the id in sysfs form, NUL-padded.
pub const PCI_BUS_ID_LEN: usize = 16;
/// Bytes of a CUDA IPC memory handle (`CUipcMemHandle`, from `cuIpcGetMemHandle`).
pub const CUDA_IPC_HANDLE_LEN: usize = 64;

const HELLO: u8 = 1;
const HELLO_REPLY: u8 = 2;
const CONFIRM: u8 = 3;
const PROVEN: u8 = 4;
const ATTACH: u8 = 5;
const ATTACHED: u8 = 6;
const REFUSED: u8 = 7;
const ATTACHED_CUDA: u8 = 8;

const HELLO_LEN: usize = 16 + NONCE_LEN;
const HELLO_REPLY_LEN: usize = 32;
const CONFIRM_LEN: usize = NONCE_LEN;
const ATTACH_LEN: usize = 8;
const ATTACHED_LEN: usize = 5 * 8 + 4 * 4;
/// `Refused`'s code and reason length, before the reason.
const REFUSED_FIXED: usize = 8;

// MAX_MESSAGE covers every fixed-length kind too.
const _: () = {
    let fixed = [
        HELLO_LEN,
        HELLO_REPLY_LEN,
        CONFIRM_LEN,
        ATTACH_LEN,
        ATTACHED_LEN,
        ATTACHED_CUDA_LEN,
    ];
    let mut i = 0;
    while i < fixed.len() {
        assert!(HEADER_LEN + fixed[i] <= MAX_MESSAGE);
        i += 1;
    }
    assert!(ATTACHED_CUDA_LEN == 120);
};

/// Reason codes of [`Message::Refused`].
pub mod code {
    /// The address is not the start of a region the server registered.
    pub const NOT_REGISTERED: u32 = 1;
    /// The region grants peers no access.
    pub const NO_REMOTE_ACCESS: u32 = 2;
    /// Every slot of the pin table is taken.
    pub const TABLE_FULL: u32 = 3;
    /// The client did not read the server's nonce from the proof page.
    pub const BAD_PROOF: u32 = 4;
    /// The server is not the engine the client asked for.
    pub const WRONG_ENGINE: u32 = 5;
    /// A message that does not decode or comes out of turn.
    pub const PROTOCOL: u32 = 6;
    /// A protocol version the server does not speak.
    pub const UNSUPPORTED_VERSION: u32 = 7;
    /// The server failed on its side (memfd, mapping, pinning).
    pub const INTERNAL: u32 = 8;

    /// The name of a code (its constant's name), `"UNKNOWN"` for codes not listed here.
    pub fn name(code: u32) -> &'static str {
        match code {
            NOT_REGISTERED => "NOT_REGISTERED",
            NO_REMOTE_ACCESS => "NO_REMOTE_ACCESS",
            TABLE_FULL => "TABLE_FULL",
            BAD_PROOF => "BAD_PROOF",
            WRONG_ENGINE => "WRONG_ENGINE",
            PROTOCOL => "PROTOCOL",
            UNSUPPORTED_VERSION => "UNSUPPORTED_VERSION",
            INTERNAL => "INTERNAL",
            _ => "UNKNOWN",
        }
    }
}

/// One control message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Client → server (kind 1): "I am `client_engine` and want `target_engine`".
    Hello {
        /// The engine the client means to reach.
        target_engine: u64,
        /// The client's own engine id.
        client_engine: u64,
        /// A fresh random nonce of the client.
        client_nonce: [u8; NONCE_LEN],
    },
    /// Server → client (kind 2): who the server is and where its proof page lies. Carries 2
    /// fds: the proof page memfd, then the pin table memfd.
    HelloReply {
        /// The server's engine id.
        engine_id: u64,
        /// Address of the proof page in the server's address space (non-zero).
        proof_addr: u64,
        /// The server's process id.
        pid: u32,
        /// Bytes of the proof page, within [`MIN_PROOF_LEN`]`..=`[`MAX_PROOF_LEN`].
        proof_len: u32,
        /// Slots of the pin table, within `1..=`[`MAX_TABLE_SLOTS`].
        table_slots: u32,
    },
    /// Client → server (kind 3): the server's nonce, as read from the proof page.
    Confirm {
        /// The nonce read.
        server_nonce: [u8; NONCE_LEN],
    },
    /// Server → client (kind 4): the proof holds; attaches may follow.
    Proven,
    /// Client → server (kind 5): attach the region starting at `addr`.
    Attach {
        /// Start of a region the server registered (non-zero).
        addr: u64,
    },
    /// Server → client (kind 6): the region is attached. Carries 1 fd unless its map is
    /// [`MapKind::None`].
    Attached(Attachment),
    /// Either way (kind 7): the request was refused.
    Refused {
        /// Why, one of [`code`].
        code: u32,
        /// What happened, for people; at most [`MAX_REASON`] bytes travel.
        reason: String,
    },
    /// Server → client (kind 8): a region in GPU memory, attached: the CUDA IPC handle of
    /// the GPU allocation holding it. The client maps it (`cuIpcOpenMemHandle`) on its GPU
    /// with the same PCI bus id and copies with the GPU. No fd.
    AttachedCuda(CudaAttachment),
}

/// A region the server attached for the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Attachment {
    /// Start of the region in the server's address space (non-zero).
    pub addr: u64,
    /// Bytes of the region (non-zero; the end, `addr + len`, fits in a u64).
    pub len: u64,
    /// Generation of the slot's liveness word when attached; odd (live).
    pub gen: u64,
    /// Raw bits of the region's [`Access`]; only bits of `Access::all()`.
    pub access: u32,
    /// Index of the region's slot in the pin table, below [`MAX_TABLE_SLOTS`].
    pub slot: u32,
    /// How the client may map the region.
    pub map: MapKind,
}

/// A region in GPU memory the server attached for the client: the CUDA IPC handle of the
/// allocation holding it and where the region lies in that allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CudaAttachment {
    /// Start of the region in the server's address space (non-zero).
    pub addr: u64,
    /// Bytes of the region (non-zero; `addr + len` fits in a u64).
    pub len: u64,
    /// Generation of the slot's liveness word when attached; odd (live).
    pub gen: u64,
    /// Bytes from the start of the GPU allocation the handle names to `addr` (`offset + len`
    /// fits in a u64).
    pub offset: u64,
    /// Raw bits of the region's [`Access`]; only bits of `Access::all()`.
    pub access: u32,
    /// Index of the region's slot in the pin table, below [`MAX_TABLE_SLOTS`].
    pub slot: u32,
    /// The GPU's PCI bus id in sysfs form (`"0000:3b:00.0"`), padded with NULs: non-empty,
    /// only ASCII hex digits, `':'` and `'.'`, then only NULs. Build it with
    /// [`CudaAttachment::with_pci_bus_id`], read it with [`CudaAttachment::pci_bus_id`].
    pub pci_bus_id: [u8; PCI_BUS_ID_LEN],
    /// The `cuIpcGetMemHandle` handle (opaque).
    pub handle: [u8; CUDA_IPC_HANDLE_LEN],
}

/// How a client reaches an attached region's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MapKind {
    /// No fd (map 0): cross-memory attach only.
    None,
    /// A read-only memfd (map 1).
    ReadOnly {
        /// Where the region's bytes start in the file; a multiple of [`MAP_ALIGN`].
        offset: u64,
        /// Bytes of the file; `offset + len <= file_len`.
        file_len: u64,
    },
    /// A read-write memfd (map 2), same rules as `ReadOnly`.
    ReadWrite {
        /// Where the region's bytes start in the file; a multiple of [`MAP_ALIGN`].
        offset: u64,
        /// Bytes of the file; `offset + len <= file_len`.
        file_len: u64,
    },
}

impl MapKind {
    /// The wire number, offset and file length.
    fn parts(&self) -> (u32, u64, u64) {
        match *self {
            MapKind::None => (0, 0, 0),
            MapKind::ReadOnly { offset, file_len } => (1, offset, file_len),
            MapKind::ReadWrite { offset, file_len } => (2, offset, file_len),
        }
    }
}

/// Why a datagram was refused (or a message would not round trip).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ShmWireError {
    /// Shorter than a header.
    #[error("shm message of {len} bytes is shorter than its {HEADER_LEN}-byte header")]
    Truncated {
        /// Bytes there were.
        len: usize,
    },
    /// The first four bytes are not "KVXS": not a kvxfer shm control socket.
    #[error("bad magic \"{}\" (expected \"KVXS\"): not a kvxfer shm control message", .0.escape_ascii())]
    BadMagic([u8; 4]),
    /// A version this build does not speak.
    #[error("unsupported shm protocol version {0} (this build speaks {VERSION})")]
    Version(u8),
    /// Header flags other than zero (none are defined).
    #[error("shm header flags {0:#06x} are not zero (no flags are defined)")]
    NonZeroFlags(u16),
    /// A kind number this build does not know.
    #[error("unknown shm message kind {0} (known kinds are 1 to 8)")]
    UnknownKind(u8),
    /// A body of the wrong length for its kind.
    #[error("{kind} body is {found} bytes, expected {expected}{}", length_rule(.kind))]
    BadLength {
        /// The message kind's name.
        kind: &'static str,
        /// Bytes the body should have (for `Refused`: 8 plus its reason length, or the
        /// most, 8 + [`MAX_REASON`], when the body is longer than that).
        expected: usize,
        /// Bytes the body has.
        found: usize,
    },
    /// A field out of its limits, a non-zero reserved field, a reason that is not UTF-8.
    #[error("invalid {kind} message: {reason}")]
    Invalid {
        /// The message kind's name.
        kind: &'static str,
        /// Which field, the value found and the rule it breaks.
        reason: String,
    },
}

fn length_rule(kind: &str) -> &'static str {
    if kind == kind_name(REFUSED) {
        " (8 + reason_len, and reason_len is at most 1024)"
    } else {
        ""
    }
}

/// The name of a known kind number.
fn kind_name(kind: u8) -> &'static str {
    match kind {
        ATTACHED_CUDA => "AttachedCuda",
        HELLO => "Hello",
        HELLO_REPLY => "HelloReply",
        CONFIRM => "Confirm",
        PROVEN => "Proven",
        ATTACH => "Attach",
        ATTACHED => "Attached",
        REFUSED => "Refused",
        _ => "unknown",
    }
}

impl Message {
    /// The kind number on the wire (1 to 8).
    pub fn kind(&self) -> u8 {
        match self {
            Message::Hello { .. } => HELLO,
            Message::HelloReply { .. } => HELLO_REPLY,
            Message::Confirm { .. } => CONFIRM,
            Message::Proven => PROVEN,
            Message::Attach { .. } => ATTACH,
            Message::Attached(_) => ATTACHED,
            Message::Refused { .. } => REFUSED,
            Message::AttachedCuda(_) => ATTACHED_CUDA,
        }
    }

    /// The kind's name (`"Hello"`, `"HelloReply"`, ...), as errors and logs print it.
    pub fn kind_name(&self) -> &'static str {
        kind_name(self.kind())
    }

    /// File descriptors this message must carry: 2 for `HelloReply` (proof page, pin
    /// table), 1 for `Attached` with a map (the memfd), 0 otherwise (`AttachedCuda`
    /// included: its handle travels in the body).
    pub fn fds(&self) -> usize {
        match self {
            Message::HelloReply { .. } => 2,
            Message::Attached(a) if a.map != MapKind::None => 1,
            _ => 0,
        }
    }

    /// The datagram of this message with request id `req`: header, then body. A `Refused`
    /// reason longer than [`MAX_REASON`] bytes is cut at a char boundary to fit, so the
    /// datagram is never longer than [`MAX_MESSAGE`].
    pub fn encode(&self, req: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + ATTACHED_CUDA_LEN);
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(self.kind());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&req.to_le_bytes());
        match self {
            Message::Hello {
                target_engine,
                client_engine,
                client_nonce,
            } => {
                out.extend_from_slice(&target_engine.to_le_bytes());
                out.extend_from_slice(&client_engine.to_le_bytes());
                out.extend_from_slice(client_nonce);
            }
            Message::HelloReply {
                engine_id,
                proof_addr,
                pid,
                proof_len,
                table_slots,
            } => {
                out.extend_from_slice(&engine_id.to_le_bytes());
                out.extend_from_slice(&proof_addr.to_le_bytes());
                out.extend_from_slice(&pid.to_le_bytes());
                out.extend_from_slice(&proof_len.to_le_bytes());
                out.extend_from_slice(&table_slots.to_le_bytes());
                out.extend_from_slice(&0u32.to_le_bytes());
            }
            Message::Confirm { server_nonce } => out.extend_from_slice(server_nonce),
            Message::Proven => {}
            Message::Attach { addr } => out.extend_from_slice(&addr.to_le_bytes()),
            Message::Attached(a) => {
                let (map, offset, file_len) = a.map.parts();
                out.extend_from_slice(&a.addr.to_le_bytes());
                out.extend_from_slice(&a.len.to_le_bytes());
                out.extend_from_slice(&a.gen.to_le_bytes());
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&file_len.to_le_bytes());
                out.extend_from_slice(&a.access.to_le_bytes());
                out.extend_from_slice(&a.slot.to_le_bytes());
                out.extend_from_slice(&map.to_le_bytes());
                out.extend_from_slice(&0u32.to_le_bytes());
            }
            Message::Refused { code, reason } => {
                let reason = cut_reason(reason);
                let reason_len = u32::try_from(reason.len()).expect("at most MAX_REASON bytes");
                out.extend_from_slice(&code.to_le_bytes());
                out.extend_from_slice(&reason_len.to_le_bytes());
                out.extend_from_slice(reason.as_bytes());
            }
            Message::AttachedCuda(a) => {
                out.extend_from_slice(&a.addr.to_le_bytes());
                out.extend_from_slice(&a.len.to_le_bytes());
                out.extend_from_slice(&a.gen.to_le_bytes());
                out.extend_from_slice(&a.offset.to_le_bytes());
                out.extend_from_slice(&a.access.to_le_bytes());
                out.extend_from_slice(&a.slot.to_le_bytes());
                out.extend_from_slice(&a.pci_bus_id);
                out.extend_from_slice(&a.handle);
            }
        }
        out
    }

    /// Whether this message survives the wire unchanged: `Ok` exactly when
    /// `decode(&self.encode(req))` gives this message back. Refuses fields out of their
    /// limits (as [`decode`] does) and a `Refused` reason longer than [`MAX_REASON`] bytes
    /// (which [`encode`](Message::encode) would cut). Senders may check with it before
    /// sending.
    pub fn validate(&self) -> Result<(), ShmWireError> {
        let invalid = |reason: String| ShmWireError::Invalid {
            kind: self.kind_name(),
            reason,
        };
        match self {
            Message::Hello { .. } | Message::Confirm { .. } | Message::Proven => {}
            Message::HelloReply {
                proof_addr,
                proof_len,
                table_slots,
                ..
            } => {
                if *proof_addr == 0 {
                    return Err(invalid("proof_addr is 0".into()));
                }
                if !(MIN_PROOF_LEN..=MAX_PROOF_LEN).contains(proof_len) {
                    return Err(invalid(format!(
                        "proof_len {proof_len} is outside {MIN_PROOF_LEN}..={MAX_PROOF_LEN}"
                    )));
                }
                if !(1..=MAX_TABLE_SLOTS).contains(table_slots) {
                    return Err(invalid(format!(
                        "table_slots {table_slots} is outside 1..={MAX_TABLE_SLOTS}"
                    )));
                }
            }
            Message::Attach { addr } => {
                if *addr == 0 {
                    return Err(invalid("addr is 0".into()));
                }
            }
            Message::Attached(a) => a.validate().map_err(invalid)?,
            Message::AttachedCuda(a) => a.validate().map_err(invalid)?,
            Message::Refused { reason, .. } => {
                if reason.len() > MAX_REASON {
                    return Err(ShmWireError::BadLength {
                        kind: self.kind_name(),
                        expected: REFUSED_FIXED + MAX_REASON,
                        found: REFUSED_FIXED + reason.len(),
                    });
                }
            }
        }
        Ok(())
    }
}

impl Attachment {
    /// The limits of an attachment; the error names the field, its value and the rule.
    fn validate(&self) -> Result<(), String> {
        let Attachment {
            addr,
            len,
            gen,
            access,
            slot,
            map,
        } = *self;
        validate_region(addr, len, gen, access, slot)?;
        if let MapKind::ReadOnly { offset, file_len } | MapKind::ReadWrite { offset, file_len } =
            map
        {
            if offset % MAP_ALIGN != 0 {
                return Err(format!(
                    "offset {offset:#x} is not a multiple of {MAP_ALIGN}"
                ));
            }
            let Some(end) = offset.checked_add(len) else {
                return Err(format!("offset {offset:#x} + len {len:#x} overflows"));
            };
            if end > file_len {
                return Err(format!(
                    "offset {offset:#x} + len {len:#x} = {end:#x} is past file_len {file_len:#x}"
                ));
            }
        }
        Ok(())
    }
}

impl CudaAttachment {
    /// The limits of a GPU attachment: those of [`Attachment`] for the fields they share,
    /// `offset + len` within a u64 and a well-formed [`pci_bus_id`](Self::pci_bus_id). The
    /// error names the field, its value and the rule.
    pub fn validate(&self) -> Result<(), String> {
        let CudaAttachment {
            addr,
            len,
            gen,
            offset,
            access,
            slot,
            pci_bus_id,
            handle: _,
        } = *self;
        validate_region(addr, len, gen, access, slot)?;
        if offset.checked_add(len).is_none() {
            return Err(format!("offset {offset:#x} + len {len:#x} overflows"));
        }
        let id_len = pci_bus_id
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(PCI_BUS_ID_LEN);
        if id_len == 0 {
            return Err("pci_bus_id is empty".into());
        }
        let (id, padding) = pci_bus_id.split_at(id_len);
        if let Some(at) = id.iter().position(|&b| !pci_bus_id_char(b)) {
            return Err(format!(
                "pci_bus_id byte {at} is {:#04x}, not an ASCII hex digit, ':' or '.'",
                id[at]
            ));
        }
        if let Some(at) = padding.iter().position(|&b| b != 0) {
            return Err(format!(
                "pci_bus_id byte {} is {:#04x} after the NUL padding began",
                id_len + at,
                padding[at]
            ));
        }
        Ok(())
    }

    /// The PCI bus id without its NUL padding (`"0000:3b:00.0"`). For a field that does not
    /// [`validate`](Self::validate): the longest UTF-8 prefix before the first NUL.
    pub fn pci_bus_id(&self) -> &str {
        let id = self
            .pci_bus_id
            .split(|&b| b == 0)
            .next()
            .unwrap_or_default();
        match std::str::from_utf8(id) {
            Ok(id) => id,
            Err(e) => std::str::from_utf8(&id[..e.valid_up_to()]).unwrap_or_default(),
        }
    }

    /// The padded `pci_bus_id` field for `id`: `None` if `id` is empty, longer than
    /// [`PCI_BUS_ID_LEN`] bytes or has a char other than ASCII hex digits, `':'` and `'.'`.
    pub fn with_pci_bus_id(id: &str) -> Option<[u8; PCI_BUS_ID_LEN]> {
        if id.is_empty() || id.len() > PCI_BUS_ID_LEN || !id.bytes().all(pci_bus_id_char) {
            return None;
        }
        let mut field = [0; PCI_BUS_ID_LEN];
        field[..id.len()].copy_from_slice(id.as_bytes());
        Some(field)
    }
}

/// Whether `b` may appear in a PCI bus id (before the padding).
fn pci_bus_id_char(b: u8) -> bool {
    b.is_ascii_hexdigit() || b == b':' || b == b'.'
}

/// The limits of the fields [`Attachment`] and [`CudaAttachment`] share; the error names
/// the field, its value and the rule.
fn validate_region(addr: u64, len: u64, gen: u64, access: u32, slot: u32) -> Result<(), String> {
    if addr == 0 {
        return Err("addr is 0".into());
    }
    if len == 0 {
        return Err(format!("len is 0 (region at {addr:#x})"));
    }
    if addr.checked_add(len).is_none() {
        return Err(format!(
            "addr {addr:#x} + len {len:#x} overflows the address space"
        ));
    }
    if gen % 2 == 0 {
        return Err(format!(
            "gen {gen} is even (a live slot's generation is odd)"
        ));
    }
    if Access::from_bits(access).is_none() {
        return Err(format!(
            "access {access:#x} has bits outside Access::all() ({:#x})",
            Access::all().bits()
        ));
    }
    if slot >= MAX_TABLE_SLOTS {
        return Err(format!(
            "slot {slot} is not below MAX_TABLE_SLOTS ({MAX_TABLE_SLOTS})"
        ));
    }
    Ok(())
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

/// Little-endian fields read in order from bytes whose length was checked first.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn array<const N: usize>(&mut self) -> [u8; N] {
        let (head, rest) = self
            .0
            .split_first_chunk::<N>()
            .expect("length checked before reading");
        self.0 = rest;
        *head
    }

    fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }
}

/// The body's fields, after checking that the body is exactly `expected` bytes.
fn exact(kind: u8, body: &[u8], expected: usize) -> Result<Fields<'_>, ShmWireError> {
    if body.len() != expected {
        return Err(ShmWireError::BadLength {
            kind: kind_name(kind),
            expected,
            found: body.len(),
        });
    }
    Ok(Fields(body))
}

fn reserved_zero(kind: u8, reserved: u32) -> Result<(), ShmWireError> {
    if reserved != 0 {
        return Err(ShmWireError::Invalid {
            kind: kind_name(kind),
            reason: format!("reserved field is {reserved:#x}, must be 0"),
        });
    }
    Ok(())
}

/// Decodes one datagram strictly into its request id and message: exact lengths, zero
/// flags and reserved fields, every field within its limits. Never panics; whatever it
/// accepts re-encodes to exactly `datagram`.
pub fn decode(datagram: &[u8]) -> Result<(u64, Message), ShmWireError> {
    let Some((header, body)) = datagram.split_first_chunk::<HEADER_LEN>() else {
        return Err(ShmWireError::Truncated {
            len: datagram.len(),
        });
    };
    let mut h = Fields(header);
    let magic = h.array::<4>();
    if magic != MAGIC {
        return Err(ShmWireError::BadMagic(magic));
    }
    let version = h.u8();
    if version != VERSION {
        return Err(ShmWireError::Version(version));
    }
    let kind = h.u8();
    let flags = h.u16();
    if flags != 0 {
        return Err(ShmWireError::NonZeroFlags(flags));
    }
    let req = h.u64();
    let message = match kind {
        HELLO => {
            let mut f = exact(kind, body, HELLO_LEN)?;
            Message::Hello {
                target_engine: f.u64(),
                client_engine: f.u64(),
                client_nonce: f.array(),
            }
        }
        HELLO_REPLY => {
            let mut f = exact(kind, body, HELLO_REPLY_LEN)?;
            let message = Message::HelloReply {
                engine_id: f.u64(),
                proof_addr: f.u64(),
                pid: f.u32(),
                proof_len: f.u32(),
                table_slots: f.u32(),
            };
            reserved_zero(kind, f.u32())?;
            message
        }
        CONFIRM => Message::Confirm {
            server_nonce: exact(kind, body, CONFIRM_LEN)?.array(),
        },
        PROVEN => {
            exact(kind, body, 0)?;
            Message::Proven
        }
        ATTACH => Message::Attach {
            addr: exact(kind, body, ATTACH_LEN)?.u64(),
        },
        ATTACHED => {
            let mut f = exact(kind, body, ATTACHED_LEN)?;
            let (addr, len, gen) = (f.u64(), f.u64(), f.u64());
            let (offset, file_len) = (f.u64(), f.u64());
            let (access, slot, map) = (f.u32(), f.u32(), f.u32());
            reserved_zero(kind, f.u32())?;
            let map = match map {
                0 if offset != 0 || file_len != 0 => {
                    return Err(ShmWireError::Invalid {
                        kind: kind_name(kind),
                        reason: format!(
                            "map 0 (no fd) with offset {offset} and file_len {file_len} \
                             (both must be 0)"
                        ),
                    })
                }
                0 => MapKind::None,
                1 => MapKind::ReadOnly { offset, file_len },
                2 => MapKind::ReadWrite { offset, file_len },
                other => {
                    return Err(ShmWireError::Invalid {
                        kind: kind_name(kind),
                        reason: format!(
                            "map {other} is unknown (0 none, 1 read-only, 2 read-write)"
                        ),
                    })
                }
            };
            Message::Attached(Attachment {
                addr,
                len,
                gen,
                access,
                slot,
                map,
            })
        }
        REFUSED => decode_refused(body)?,
        ATTACHED_CUDA => {
            let mut f = exact(kind, body, ATTACHED_CUDA_LEN)?;
            Message::AttachedCuda(CudaAttachment {
                addr: f.u64(),
                len: f.u64(),
                gen: f.u64(),
                offset: f.u64(),
                access: f.u32(),
                slot: f.u32(),
                pci_bus_id: f.array(),
                handle: f.array(),
            })
        }
        other => return Err(ShmWireError::UnknownKind(other)),
    };
    message.validate()?;
    Ok((req, message))
}

fn decode_refused(body: &[u8]) -> Result<Message, ShmWireError> {
    let bad_length = |expected| ShmWireError::BadLength {
        kind: kind_name(REFUSED),
        expected,
        found: body.len(),
    };
    let Some((fixed, reason)) = body.split_first_chunk::<REFUSED_FIXED>() else {
        return Err(bad_length(REFUSED_FIXED));
    };
    if reason.len() > MAX_REASON {
        return Err(bad_length(REFUSED_FIXED + MAX_REASON));
    }
    let mut f = Fields(fixed);
    let code = f.u32();
    let reason_len = f.u32();
    if usize::try_from(reason_len).ok() != Some(reason.len()) {
        let announced = usize::try_from(reason_len).unwrap_or(usize::MAX);
        return Err(bad_length(REFUSED_FIXED.saturating_add(announced)));
    }
    let reason = std::str::from_utf8(reason).map_err(|e| ShmWireError::Invalid {
        kind: kind_name(REFUSED),
        reason: format!("reason is not UTF-8: {e}"),
    })?;
    Ok(Message::Refused {
        code,
        reason: reason.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn nonce() -> impl Strategy<Value = [u8; NONCE_LEN]> {
        any::<[u8; NONCE_LEN]>()
    }

    /// Valid attachments, edges included: maps ending exactly at the file's end, regions
    /// ending at the top of the address space, the last slot.
    fn attachment() -> impl Strategy<Value = Attachment> {
        let addr_len = prop_oneof![
            (1u64..1 << 48, 1u64..1 << 32),
            (1u64..u64::MAX).prop_map(|addr| (addr, u64::MAX - addr)),
            (1u64..u64::MAX).prop_flat_map(|addr| (Just(addr), 1..=u64::MAX - addr)),
        ];
        (
            addr_len,
            any::<u64>().prop_map(|g| g | 1),
            0u32..=Access::all().bits(),
            prop_oneof![0..MAX_TABLE_SLOTS, Just(MAX_TABLE_SLOTS - 1)],
            0u8..3,
            0u64..1 << 20,
            prop_oneof![Just(0u64), 0u64..1 << 32, Just(u64::MAX)],
        )
            .prop_filter_map(
                "a map that holds the region",
                |((addr, len), gen, access, slot, map, page, spare)| {
                    let offset = page.checked_mul(MAP_ALIGN)?;
                    let file_len = offset.checked_add(len)?.saturating_add(spare);
                    let map = match map {
                        0 => MapKind::None,
                        1 => MapKind::ReadOnly { offset, file_len },
                        _ => MapKind::ReadWrite { offset, file_len },
                    };
                    Some(Attachment {
                        addr,
                        len,
                        gen,
                        access,
                        slot,
                        map,
                    })
                },
            )
    }

    /// PCI bus ids that validate: sysfs-style ones and any mix of the allowed chars, 1 to 16
    /// bytes long.
    fn pci_bus_id() -> impl Strategy<Value = [u8; PCI_BUS_ID_LEN]> {
        prop_oneof![
            "[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\\.[0-7]",
            "[0-9a-fA-F:.]{1,16}",
        ]
        .prop_map(|id| CudaAttachment::with_pci_bus_id(&id).expect("a valid id"))
    }

    /// Valid GPU attachments, edges included: regions and offsets ending at the top of the
    /// address space, the last slot.
    fn cuda_attachment() -> impl Strategy<Value = CudaAttachment> {
        let addr_len = prop_oneof![
            (1u64..1 << 48, 1u64..1 << 32),
            (1u64..u64::MAX).prop_map(|addr| (addr, u64::MAX - addr)),
            (1u64..u64::MAX).prop_flat_map(|addr| (Just(addr), 1..=u64::MAX - addr)),
        ];
        (
            addr_len,
            any::<u64>().prop_map(|g| g | 1),
            any::<u64>(),
            0u32..=Access::all().bits(),
            prop_oneof![0..MAX_TABLE_SLOTS, Just(MAX_TABLE_SLOTS - 1)],
            pci_bus_id(),
            any::<[u8; CUDA_IPC_HANDLE_LEN]>(),
        )
            .prop_map(
                |((addr, len), gen, offset, access, slot, pci_bus_id, handle)| CudaAttachment {
                    addr,
                    len,
                    gen,
                    // Any offset that leaves room for the region, the largest included.
                    offset: offset % (u64::MAX - len + 1),
                    access,
                    slot,
                    pci_bus_id,
                    handle,
                },
            )
    }

    fn reason(max: usize) -> impl Strategy<Value = String> {
        prop_oneof![
            proptest::collection::vec(any::<char>(), 0..40).prop_map(String::from_iter),
            proptest::collection::vec(any::<char>(), 0..=max / 4).prop_map(String::from_iter),
            Just("é".repeat(max / 2)),
        ]
        .prop_filter("fits", move |r| r.len() <= max)
    }

    /// Any message that survives the wire unchanged.
    fn message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (any::<u64>(), any::<u64>(), nonce()).prop_map(|(t, c, n)| Message::Hello {
                target_engine: t,
                client_engine: c,
                client_nonce: n,
            }),
            (
                any::<u64>(),
                1..=u64::MAX,
                any::<u32>(),
                MIN_PROOF_LEN..=MAX_PROOF_LEN,
                1..=MAX_TABLE_SLOTS
            )
                .prop_map(|(engine_id, proof_addr, pid, proof_len, table_slots)| {
                    Message::HelloReply {
                        engine_id,
                        proof_addr,
                        pid,
                        proof_len,
                        table_slots,
                    }
                }),
            nonce().prop_map(|server_nonce| Message::Confirm { server_nonce }),
            Just(Message::Proven),
            (1..=u64::MAX).prop_map(|addr| Message::Attach { addr }),
            attachment().prop_map(Message::Attached),
            cuda_attachment().prop_map(Message::AttachedCuda),
            (any::<u32>(), reason(MAX_REASON))
                .prop_map(|(code, reason)| Message::Refused { code, reason }),
        ]
    }

    /// Attachments with each field drawn around its limits, valid or not.
    fn any_attachment() -> impl Strategy<Value = Attachment> {
        let edge = || prop_oneof![Just(0u64), Just(1), Just(u64::MAX), any::<u64>()];
        (
            edge(),
            edge(),
            edge(),
            prop_oneof![0u32..32, any::<u32>()],
            prop_oneof![Just(MAX_TABLE_SLOTS), 0..=MAX_TABLE_SLOTS + 1, any::<u32>()],
            0u8..3,
            prop_oneof![
                Just(0u64),
                Just(MAP_ALIGN),
                (0u64..4).prop_map(|p| p * 4096 + 1),
                any::<u64>()
            ],
            edge(),
        )
            .prop_map(
                |(addr, len, gen, access, slot, map, offset, file_len)| Attachment {
                    addr,
                    len,
                    gen,
                    access,
                    slot,
                    map: match map {
                        0 if offset % 3 == 0 => MapKind::None,
                        1 => MapKind::ReadOnly { offset, file_len },
                        2 => MapKind::ReadWrite { offset, file_len },
                        _ => MapKind::ReadOnly {
                            offset: 0,
                            file_len: len,
                        },
                    },
                },
            )
    }

    /// GPU attachments with each field drawn around its limits, valid or not.
    fn any_cuda_attachment() -> impl Strategy<Value = CudaAttachment> {
        let edge = || prop_oneof![Just(0u64), Just(1), Just(u64::MAX), any::<u64>()];
        let id_byte = prop_oneof![
            3 => proptest::sample::select(&b"\0:.0fg"[..]),
            1 => any::<u8>(),
        ];
        (
            (edge(), edge(), edge(), edge()),
            prop_oneof![0u32..32, any::<u32>()],
            prop_oneof![Just(MAX_TABLE_SLOTS), 0..=MAX_TABLE_SLOTS + 1, any::<u32>()],
            prop_oneof![pci_bus_id(), proptest::array::uniform16(id_byte)].boxed(),
            any::<[u8; CUDA_IPC_HANDLE_LEN]>(),
        )
            .prop_map(
                |((addr, len, gen, offset), access, slot, pci_bus_id, handle)| CudaAttachment {
                    addr,
                    len,
                    gen,
                    offset,
                    access,
                    slot,
                    pci_bus_id,
                    handle,
                },
            )
    }

    fn header(kind: u8, req: u64) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&[VERSION, kind, 0, 0]);
        out.extend_from_slice(&req.to_le_bytes());
        out
    }

    proptest! {
        #[test]
        fn valid_messages_round_trip(m in message(), req: u64) {
            prop_assert_eq!(m.validate(), Ok(()));
            let bytes = m.encode(req);
            prop_assert!(bytes.len() <= MAX_MESSAGE);
            prop_assert_eq!(bytes[5], m.kind());
            prop_assert_eq!(decode(&bytes), Ok((req, m)));
        }

        #[test]
        fn validate_says_whether_a_message_round_trips(
            a in any_attachment(),
            cuda in any_cuda_attachment(),
            (proof_addr, proof_len, table_slots) in (
                prop_oneof![Just(0u64), any::<u64>()],
                prop_oneof![MIN_PROOF_LEN - 1..=MIN_PROOF_LEN, MAX_PROOF_LEN..=MAX_PROOF_LEN + 1, any::<u32>()],
                prop_oneof![0u32..=1, MAX_TABLE_SLOTS..=MAX_TABLE_SLOTS + 1, any::<u32>()],
            ),
            addr in prop_oneof![Just(0u64), any::<u64>()],
            req: u64,
        ) {
            let reply = Message::HelloReply { engine_id: 3, proof_addr, pid: 9, proof_len, table_slots };
            for m in [Message::Attached(a), Message::AttachedCuda(cuda), reply, Message::Attach { addr }] {
                let decoded = decode(&m.encode(req));
                match m.validate() {
                    Ok(()) => prop_assert_eq!(decoded, Ok((req, m))),
                    Err(e) => {
                        prop_assert!(matches!(e, ShmWireError::Invalid { .. }), "{}", e);
                        prop_assert_eq!(decoded, Err(e));
                    }
                }
            }
        }

        #[test]
        fn any_bytes_decode_canonically(bytes in proptest::collection::vec(any::<u8>(), 0..1100)) {
            if let Ok((req, m)) = decode(&bytes) {
                prop_assert_eq!(m.encode(req), bytes);
            }
        }

        #[test]
        fn any_body_decodes_canonically(
            kind in 0u8..10,
            req: u64,
            body in prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..64),
                proptest::collection::vec(prop_oneof![Just(0u8), Just(1), any::<u8>()], ATTACHED_LEN..=ATTACHED_LEN),
                proptest::collection::vec(
                    prop_oneof![Just(0u8), Just(1), Just(b'0'), Just(b':'), any::<u8>()],
                    ATTACHED_CUDA_LEN..=ATTACHED_CUDA_LEN,
                ),
                cuda_attachment().prop_map(|a| Message::AttachedCuda(a).encode(0)[HEADER_LEN..].to_vec()),
            ],
        ) {
            let mut bytes = header(kind, req);
            bytes.extend_from_slice(&body);
            if let Ok((r, m)) = decode(&bytes) {
                prop_assert_eq!(r, req);
                prop_assert_eq!(m.kind(), kind);
                prop_assert_eq!(m.validate(), Ok(()));
                prop_assert_eq!(m.encode(r), bytes);
            }
        }

        #[test]
        fn long_reasons_are_cut_at_a_char_boundary(reason in ".{0,1200}", pad in 0usize..4) {
            let reason = format!("{}{reason}", "x".repeat(pad));
            let m = Message::Refused { code: code::INTERNAL, reason: reason.clone() };
            let bytes = m.encode(1);
            prop_assert!(bytes.len() <= MAX_MESSAGE);
            let Ok((1, Message::Refused { code, reason: got })) = decode(&bytes) else {
                panic!("a cut Refused does not decode");
            };
            prop_assert_eq!(code, code::INTERNAL);
            prop_assert!(reason.starts_with(&got));
            prop_assert!(got.len() <= MAX_REASON);
            if got.len() < reason.len() {
                // The next char would not have fitted.
                let next = reason[got.len()..].chars().next().unwrap();
                prop_assert!(got.len() + next.len_utf8() > MAX_REASON);
            }
        }
    }

    fn good_attached() -> Attachment {
        Attachment {
            addr: 0x7f00_0000_1000,
            len: 1 << 20,
            gen: 3,
            access: Access::ALL.bits(),
            slot: 7,
            map: MapKind::ReadWrite {
                offset: 2 * MAP_ALIGN,
                file_len: 2 * MAP_ALIGN + (1 << 20),
            },
        }
    }

    fn good_cuda() -> CudaAttachment {
        CudaAttachment {
            addr: 0x7f00_2000_0000,
            len: 1 << 21,
            gen: 5,
            offset: 0x40_0000,
            access: Access::ALL.bits(),
            slot: 9,
            pci_bus_id: CudaAttachment::with_pci_bus_id("0000:3b:00.0").unwrap(),
            handle: std::array::from_fn(|i| i as u8),
        }
    }

    /// One valid message of every kind.
    fn every_kind() -> Vec<Message> {
        vec![
            Message::Hello {
                target_engine: 1,
                client_engine: 2,
                client_nonce: [5; NONCE_LEN],
            },
            Message::HelloReply {
                engine_id: 1,
                proof_addr: 0x1000,
                pid: 42,
                proof_len: 4096,
                table_slots: 1024,
            },
            Message::Confirm {
                server_nonce: [6; NONCE_LEN],
            },
            Message::Proven,
            Message::Attach { addr: 0x1000 },
            Message::Attached(good_attached()),
            Message::Refused {
                code: code::TABLE_FULL,
                reason: "pin table full".into(),
            },
            Message::AttachedCuda(good_cuda()),
        ]
    }

    fn invalid(bytes: &[u8]) -> (&'static str, String) {
        match decode(bytes) {
            Err(ShmWireError::Invalid { kind, reason }) => (kind, reason),
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    fn attached_bytes(a: Attachment) -> Vec<u8> {
        Message::Attached(a).encode(9)
    }

    #[test]
    fn kinds_names_and_fds() {
        let names = [
            "Hello",
            "HelloReply",
            "Confirm",
            "Proven",
            "Attach",
            "Attached",
            "Refused",
            "AttachedCuda",
        ];
        for (i, m) in every_kind().iter().enumerate() {
            assert_eq!(usize::from(m.kind()), i + 1);
            assert_eq!(m.kind_name(), names[i]);
            assert_eq!(decode(&m.encode(77)), Ok((77, m.clone())));
        }
        let fds: Vec<usize> = every_kind().iter().map(Message::fds).collect();
        assert_eq!(fds, [0, 2, 0, 0, 0, 1, 0, 0]);
        let unmapped = Attachment {
            map: MapKind::None,
            ..good_attached()
        };
        assert_eq!(Message::Attached(unmapped).fds(), 0);
        assert_eq!(code::name(code::BAD_PROOF), "BAD_PROOF");
        assert_eq!(code::name(code::INTERNAL), "INTERNAL");
        assert_eq!(code::name(0), "UNKNOWN");
        assert_eq!(code::name(9), "UNKNOWN");
    }

    #[test]
    fn the_longest_message_is_max_message() {
        let m = Message::Refused {
            code: code::PROTOCOL,
            reason: "r".repeat(MAX_REASON),
        };
        assert_eq!(m.encode(0).len(), MAX_MESSAGE);
        assert_eq!(MAX_MESSAGE, 1048);
        for m in every_kind() {
            assert!(m.encode(u64::MAX).len() <= MAX_MESSAGE);
        }
    }

    #[test]
    fn refuses_bad_headers() {
        let good = Message::Proven.encode(5);
        assert_eq!(good.len(), HEADER_LEN);
        for len in [0, 1, 4, 15] {
            assert_eq!(decode(&good[..len]), Err(ShmWireError::Truncated { len }));
        }
        let e = decode(&good[..3]).unwrap_err().to_string();
        assert!(e.contains("3 bytes"), "{e}");

        let mut bad = good.clone();
        bad[..4].copy_from_slice(b"KVXD");
        assert_eq!(decode(&bad), Err(ShmWireError::BadMagic(*b"KVXD")));
        let e = decode(&bad).unwrap_err().to_string();
        assert!(e.contains("\"KVXD\""), "{e}");

        let mut bad = good.clone();
        bad[4] = 2;
        assert_eq!(decode(&bad), Err(ShmWireError::Version(2)));
        assert!(decode(&bad).unwrap_err().to_string().contains("version 2"));

        let mut bad = good.clone();
        bad[6..8].copy_from_slice(&0x0100u16.to_le_bytes());
        assert_eq!(decode(&bad), Err(ShmWireError::NonZeroFlags(0x100)));
        assert!(decode(&bad).unwrap_err().to_string().contains("0x0100"));

        for kind in [0u8, 9, 255] {
            let mut bad = good.clone();
            bad[5] = kind;
            assert_eq!(decode(&bad), Err(ShmWireError::UnknownKind(kind)));
            let e = decode(&bad).unwrap_err().to_string();
            assert!(e.contains(&format!("kind {kind}")), "{e}");
            assert!(e.contains("1 to 8"), "{e}");
        }
    }

    #[test]
    fn refuses_bodies_one_byte_short_or_long() {
        for m in every_kind() {
            let good = m.encode(3);
            let body = good.len() - HEADER_LEN;
            let mut long = good.clone();
            long.push(0);
            let want = |found| ShmWireError::BadLength {
                kind: m.kind_name(),
                expected: body,
                found,
            };
            match &m {
                Message::Refused { .. } => {
                    // The reason length announces one byte more, or less, than there is.
                    assert_eq!(decode(&long), Err(want(body + 1)));
                    let short = &good[..good.len() - 1];
                    assert_eq!(decode(short), Err(want(body - 1)));
                }
                _ => {
                    assert_eq!(decode(&long), Err(want(body + 1)), "{m:?}");
                    if body > 0 {
                        let short = &good[..good.len() - 1];
                        assert_eq!(decode(short), Err(want(body - 1)), "{m:?}");
                    }
                }
            }
            let e = decode(&long).unwrap_err().to_string();
            assert!(e.starts_with(m.kind_name()), "{e}");
            assert!(e.contains(&format!("{} bytes", body + 1)), "{e}");
        }
        // A Refused body shorter than its code and reason length.
        let mut bad = header(REFUSED, 1);
        bad.extend_from_slice(&[0; 7]);
        assert_eq!(
            decode(&bad),
            Err(ShmWireError::BadLength {
                kind: "Refused",
                expected: 8,
                found: 7
            })
        );
    }

    #[test]
    fn refuses_bad_refused() {
        let refused = |reason_len: u32, reason: &[u8]| {
            let mut out = header(REFUSED, 1);
            out.extend_from_slice(&code::PROTOCOL.to_le_bytes());
            out.extend_from_slice(&reason_len.to_le_bytes());
            out.extend_from_slice(reason);
            out
        };
        // Bad UTF-8: a lone continuation byte, a cut two-byte char.
        for reason in [&b"ab\x80"[..], &"é".as_bytes()[..1]] {
            let (kind, why) = invalid(&refused(reason.len() as u32, reason));
            assert_eq!(kind, "Refused");
            assert!(why.contains("UTF-8"), "{why}");
        }
        // A reason over MAX_REASON, even with a matching reason_len.
        let long = vec![b'a'; MAX_REASON + 1];
        let e = decode(&refused(long.len() as u32, &long)).unwrap_err();
        assert_eq!(
            e,
            ShmWireError::BadLength {
                kind: "Refused",
                expected: 8 + MAX_REASON,
                found: 8 + MAX_REASON + 1
            }
        );
        assert!(e.to_string().contains("at most 1024"), "{e}");
        // reason_len not matching the bytes there are.
        assert_eq!(
            decode(&refused(5, b"abc")),
            Err(ShmWireError::BadLength {
                kind: "Refused",
                expected: 13,
                found: 11
            })
        );
        assert_eq!(
            decode(&refused(u32::MAX, b"abc")),
            Err(ShmWireError::BadLength {
                kind: "Refused",
                expected: 8 + u32::MAX as usize,
                found: 11
            })
        );
        assert_eq!(
            decode(&refused(0, b"abc")),
            Err(ShmWireError::BadLength {
                kind: "Refused",
                expected: 8,
                found: 11
            })
        );
        // The longest reason is fine; so is an empty one.
        let max = vec![b'z'; MAX_REASON];
        assert!(decode(&refused(MAX_REASON as u32, &max)).is_ok());
        assert!(decode(&refused(0, b"")).is_ok());
        // validate agrees that a long reason does not survive the wire.
        let m = Message::Refused {
            code: 1,
            reason: "a".repeat(MAX_REASON + 1),
        };
        assert!(matches!(
            m.validate(),
            Err(ShmWireError::BadLength {
                kind: "Refused",
                ..
            })
        ));
    }

    #[test]
    fn a_long_reason_is_cut_at_a_char_boundary() {
        // "é" is two bytes and straddles the limit: bytes 1023 and 1024.
        let reason = format!("{}é tail", "a".repeat(MAX_REASON - 1));
        let m = Message::Refused {
            code: code::NOT_REGISTERED,
            reason,
        };
        let bytes = m.encode(4);
        assert_eq!(bytes.len(), HEADER_LEN + 8 + MAX_REASON - 1);
        assert_eq!(
            decode(&bytes),
            Ok((
                4,
                Message::Refused {
                    code: code::NOT_REGISTERED,
                    reason: "a".repeat(MAX_REASON - 1),
                }
            ))
        );
        // A 4-byte char ending exactly at the limit is kept.
        let reason = format!("{}😀 tail", "a".repeat(MAX_REASON - 4));
        let m = Message::Refused { code: 1, reason };
        let Ok((_, Message::Refused { reason, .. })) = decode(&m.encode(0)) else {
            panic!("does not decode");
        };
        assert_eq!(reason.len(), MAX_REASON);
        assert!(reason.ends_with('😀'));
    }

    #[test]
    fn refuses_bad_hello_replies() {
        let reply = |proof_addr: u64, proof_len: u32, table_slots: u32| {
            Message::HelloReply {
                engine_id: 1,
                proof_addr,
                pid: 2,
                proof_len,
                table_slots,
            }
            .encode(1)
        };
        let cases = [
            (reply(0x1000, 4096, 0), "table_slots 0"),
            (
                reply(0x1000, 4096, MAX_TABLE_SLOTS + 1),
                "table_slots 1048577",
            ),
            (reply(0x1000, MIN_PROOF_LEN - 1, 8), "proof_len 31"),
            (reply(0x1000, MAX_PROOF_LEN + 1, 8), "proof_len 1048577"),
            (reply(0, 4096, 8), "proof_addr is 0"),
        ];
        for (bytes, what) in cases {
            let (kind, why) = invalid(&bytes);
            assert_eq!(kind, "HelloReply");
            assert!(why.contains(what), "{why} does not name {what}");
        }
        let mut bad = reply(0x1000, 4096, 8);
        bad[HEADER_LEN + 28] = 1;
        let (kind, why) = invalid(&bad);
        assert_eq!(kind, "HelloReply");
        assert!(why.contains("reserved field is 0x1"), "{why}");
        // The limits themselves are fine.
        for (len, slots) in [(MIN_PROOF_LEN, 1), (MAX_PROOF_LEN, MAX_TABLE_SLOTS)] {
            assert!(decode(&reply(1, len, slots)).is_ok());
        }
    }

    #[test]
    fn refuses_attach_of_null() {
        let (kind, why) = invalid(&Message::Attach { addr: 0 }.encode(1));
        assert_eq!(kind, "Attach");
        assert!(why.contains("addr is 0"), "{why}");
    }

    #[test]
    fn refuses_bad_attachments() {
        let good = good_attached();
        let rw = |offset, file_len| MapKind::ReadWrite { offset, file_len };
        let cases = [
            (Attachment { gen: 4, ..good }, "gen 4 is even"),
            (
                Attachment {
                    access: 0x10,
                    ..good
                },
                "access 0x10",
            ),
            (
                Attachment {
                    access: 0x1f,
                    ..good
                },
                "access 0x1f",
            ),
            (Attachment { len: 0, ..good }, "len is 0"),
            (Attachment { addr: 0, ..good }, "addr is 0"),
            (
                Attachment {
                    addr: u64::MAX - 10,
                    len: 11,
                    map: MapKind::None,
                    ..good
                },
                "overflows the address space",
            ),
            (
                Attachment {
                    slot: MAX_TABLE_SLOTS,
                    ..good
                },
                "slot 1048576",
            ),
            (
                Attachment {
                    map: MapKind::ReadOnly {
                        offset: 4096,
                        file_len: 4096 + good.len - 1,
                    },
                    ..good
                },
                "past file_len",
            ),
            (
                Attachment {
                    map: rw(100, 1 << 30),
                    ..good
                },
                "offset 0x64 is not a multiple of 4096",
            ),
            (
                Attachment {
                    map: rw(u64::MAX - 4095, u64::MAX),
                    ..good
                },
                "overflows",
            ),
        ];
        for (a, what) in cases {
            let (kind, why) = invalid(&attached_bytes(a));
            assert_eq!(kind, "Attached");
            assert!(why.contains(what), "{why} does not name {what}");
            assert_eq!(
                Message::Attached(a).validate(),
                Err(ShmWireError::Invalid { kind, reason: why })
            );
        }

        // Raw fields no Attachment can hold: map 3, map 0 with an offset or a file length,
        // a non-zero reserved field.
        let raw = attached_bytes(good);
        let at = |field: usize| HEADER_LEN + field;
        let mut bad = raw.clone();
        bad[at(48)..at(52)].copy_from_slice(&3u32.to_le_bytes());
        let (_, why) = invalid(&bad);
        assert!(why.contains("map 3 is unknown"), "{why}");
        let mut bad = raw.clone();
        bad[at(48)..at(52)].copy_from_slice(&0u32.to_le_bytes());
        let (_, why) = invalid(&bad);
        assert!(why.contains("map 0 (no fd) with offset 8192"), "{why}");
        let mut bad = Message::Attached(Attachment {
            map: MapKind::None,
            ..good
        })
        .encode(1);
        bad[at(32)] = 1; // file_len
        let (_, why) = invalid(&bad);
        assert!(why.contains("file_len 1"), "{why}");
        let mut bad = raw.clone();
        bad[at(55)] = 0x80;
        let (_, why) = invalid(&bad);
        assert!(why.contains("reserved field is 0x80000000"), "{why}");

        // Edges that are fine: a map ending exactly at the file's end, a region ending at
        // the top of the address space, the last slot, no access at all.
        let edges = [
            Attachment {
                map: rw(0, good.len),
                ..good
            },
            Attachment {
                addr: u64::MAX - 9,
                len: 9,
                map: MapKind::None,
                ..good
            },
            Attachment {
                slot: MAX_TABLE_SLOTS - 1,
                access: 0,
                gen: u64::MAX,
                ..good
            },
        ];
        for a in edges {
            assert_eq!(decode(&attached_bytes(a)), Ok((9, Message::Attached(a))));
        }
    }

    #[test]
    fn attached_cuda_bytes_are_pinned() {
        let a = CudaAttachment {
            addr: 0x0000_7f00_2000_0000,
            len: 0x20_0000,
            gen: 5,
            offset: 0x40_0000,
            access: 0b0101,
            slot: 9,
            pci_bus_id: CudaAttachment::with_pci_bus_id("0000:3b:00.0").unwrap(),
            handle: std::array::from_fn(|i| 0xa0 ^ i as u8),
        };
        let mut want = vec![
            b'K', b'V', b'X', b'S', 1, 8, 0, 0, // magic, version, kind 8, flags
            0x2a, 0, 0, 0, 0, 0, 0, 0, // request id 42
            0, 0, 0, 0x20, 0, 0x7f, 0, 0, // addr
            0, 0, 0x20, 0, 0, 0, 0, 0, // len
            5, 0, 0, 0, 0, 0, 0, 0, // gen
            0, 0, 0x40, 0, 0, 0, 0, 0, // offset
            5, 0, 0, 0, // access
            9, 0, 0, 0, // slot
        ];
        want.extend_from_slice(b"0000:3b:00.0\0\0\0\0");
        want.extend((0..64u8).map(|i| 0xa0 ^ i));
        assert_eq!(want.len(), HEADER_LEN + ATTACHED_CUDA_LEN);
        assert_eq!(ATTACHED_CUDA_LEN, 120);
        let m = Message::AttachedCuda(a);
        assert_eq!(m.encode(42), want);
        assert_eq!(decode(&want), Ok((42, m.clone())));
        assert_eq!(m.kind(), 8);
        assert_eq!(m.kind_name(), "AttachedCuda");
        assert_eq!(m.fds(), 0);
        assert_eq!(a.pci_bus_id(), "0000:3b:00.0");
        assert!(want.len() <= MAX_MESSAGE);
        // One byte short or long.
        for body in [
            ATTACHED_CUDA_LEN - 1,
            ATTACHED_CUDA_LEN + 1,
            0,
            ATTACHED_LEN,
        ] {
            let mut bytes = header(ATTACHED_CUDA, 1);
            bytes.extend(want[HEADER_LEN..].iter().copied().chain([0]).take(body));
            assert_eq!(
                decode(&bytes),
                Err(ShmWireError::BadLength {
                    kind: "AttachedCuda",
                    expected: 120,
                    found: body
                })
            );
        }
    }

    #[test]
    fn pci_bus_ids() {
        let id = CudaAttachment::with_pci_bus_id("0000:3b:00.0").unwrap();
        assert_eq!(&id, b"0000:3b:00.0\0\0\0\0");
        let full = CudaAttachment::with_pci_bus_id("00000000:3B:00.0").unwrap();
        assert_eq!(&full, b"00000000:3B:00.0");
        for bad in [
            "",
            "000000000:3b:00.0",
            "0000:3b:00.0 ",
            "0000:3g:00.0",
            "é",
            "0\0",
        ] {
            assert_eq!(CudaAttachment::with_pci_bus_id(bad), None, "{bad:?}");
        }
        let a = |pci_bus_id| CudaAttachment {
            pci_bus_id,
            ..good_cuda()
        };
        assert_eq!(a(id).pci_bus_id(), "0000:3b:00.0");
        assert_eq!(a(full).pci_bus_id(), "00000000:3B:00.0");
        assert_eq!(a(full).validate(), Ok(()));
        // Fields that do not validate still read without panicking.
        assert_eq!(a([0; 16]).pci_bus_id(), "");
        let mut odd = *b"ab\xffcd\0\0\0\0\0\0\0\0\0\0\0";
        assert_eq!(a(odd).pci_bus_id(), "ab");
        odd[2] = b'c';
        odd[9] = b'x';
        assert_eq!(a(odd).pci_bus_id(), "abccd");
    }

    #[test]
    fn refuses_bad_cuda_attachments() {
        let good = good_cuda();
        let pci = |id: &[u8]| {
            let mut field = [0; PCI_BUS_ID_LEN];
            field[..id.len()].copy_from_slice(id);
            field
        };
        let cases = [
            (CudaAttachment { addr: 0, ..good }, "addr is 0"),
            (CudaAttachment { len: 0, ..good }, "len is 0"),
            (
                CudaAttachment {
                    addr: u64::MAX - 10,
                    len: 11,
                    ..good
                },
                "overflows the address space",
            ),
            (CudaAttachment { gen: 4, ..good }, "gen 4 is even"),
            (
                CudaAttachment {
                    access: 0x10,
                    ..good
                },
                "access 0x10",
            ),
            (
                CudaAttachment {
                    slot: MAX_TABLE_SLOTS,
                    ..good
                },
                "slot 1048576",
            ),
            (
                CudaAttachment {
                    offset: u64::MAX - good.len + 1,
                    ..good
                },
                "offset 0xffffffffffe00000 + len 0x200000 overflows",
            ),
            (
                CudaAttachment {
                    pci_bus_id: [0; 16],
                    ..good
                },
                "pci_bus_id is empty",
            ),
            (
                CudaAttachment {
                    pci_bus_id: pci(b"\x00000:3b:00.0"),
                    ..good
                },
                "pci_bus_id is empty",
            ),
            (
                CudaAttachment {
                    pci_bus_id: pci(b"0000:3g:00.0"),
                    ..good
                },
                "pci_bus_id byte 6 is 0x67",
            ),
            (
                CudaAttachment {
                    pci_bus_id: pci(b"0000 3b:00.0"),
                    ..good
                },
                "pci_bus_id byte 4 is 0x20",
            ),
            (
                CudaAttachment {
                    pci_bus_id: pci(b"0000:3b\x0000.0"),
                    ..good
                },
                "pci_bus_id byte 8 is 0x30 after the NUL padding",
            ),
            (
                CudaAttachment {
                    pci_bus_id: pci(b"0000:3b:00.0\0\0\0\x01"),
                    ..good
                },
                "pci_bus_id byte 15 is 0x01 after the NUL padding",
            ),
        ];
        for (a, what) in cases {
            let (kind, why) = invalid(&Message::AttachedCuda(a).encode(2));
            assert_eq!(kind, "AttachedCuda");
            assert!(why.contains(what), "{why} does not name {what}");
            assert_eq!(a.validate(), Err(why.clone()));
            assert_eq!(
                Message::AttachedCuda(a).validate(),
                Err(ShmWireError::Invalid { kind, reason: why })
            );
        }
        // The shared fields are refused with the very words Attached uses.
        assert_eq!(
            CudaAttachment { gen: 2, ..good }.validate(),
            Attachment {
                gen: 2,
                ..good_attached()
            }
            .validate()
        );

        // Edges that are fine: a region at the top of the address space, an offset up to
        // the top, the last slot, no access at all, a 16-byte id, any handle.
        let edges = [
            CudaAttachment {
                addr: u64::MAX - 9,
                len: 9,
                offset: u64::MAX - 9,
                ..good
            },
            CudaAttachment {
                offset: 0,
                slot: MAX_TABLE_SLOTS - 1,
                access: 0,
                gen: u64::MAX,
                pci_bus_id: *b"0123456789abcdef",
                handle: [0xff; CUDA_IPC_HANDLE_LEN],
                ..good
            },
            CudaAttachment {
                pci_bus_id: pci(b"."),
                handle: [0; CUDA_IPC_HANDLE_LEN],
                ..good
            },
        ];
        for a in edges {
            assert_eq!(a.validate(), Ok(()));
            let m = Message::AttachedCuda(a);
            assert_eq!(decode(&m.encode(6)), Ok((6, m)));
        }
    }

    #[test]
    fn errors_say_what_was_wrong() {
        let e = ShmWireError::BadLength {
            kind: "Attached",
            expected: 56,
            found: 55,
        };
        assert_eq!(e.to_string(), "Attached body is 55 bytes, expected 56");
        let e = ShmWireError::Invalid {
            kind: "Attached",
            reason: "gen 4 is even".into(),
        };
        assert_eq!(e.to_string(), "invalid Attached message: gen 4 is even");
        let e = ShmWireError::BadMagic([b'G', b'E', b'T', 0xff]);
        assert!(e.to_string().contains("\"GET\\xff\""), "{e}");
    }
}
