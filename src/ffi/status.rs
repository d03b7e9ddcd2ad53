//! Status codes and the per-thread last error text.

use std::cell::RefCell;
use std::ffi::{c_char, CString};

use crate::memory::MemoryError;
use crate::Error;

/// Result of a kvxfer call: `KVX_OK`, `KVX_IN_PROGRESS`, or a negative `KVX_ERR_*`.
pub type kvx_status = i32;

// The error codes are written `0 - N` so that cbindgen emits `(0 - N)`: a bare `-N` in a
// C macro would turn `x-KVX_ERR_BUSY` into `x--6`.

/// Success (for a batch: every byte moved).
pub const KVX_OK: kvx_status = 0;
/// The batch is still moving bytes.
pub const KVX_IN_PROGRESS: kvx_status = 1;
/// A NULL pointer, bad enum value, reserved field set, or unusable buffer size.
pub const KVX_ERR_INVALID_ARGUMENT: kvx_status = 0 - 1;
/// A region or op of zero bytes. (Store, per key: a size of 0; objects have at least one
/// byte.)
pub const KVX_ERR_ZERO_LENGTH: kvx_status = 0 - 2;
/// An address range that wraps past the end of the address space.
pub const KVX_ERR_ADDRESS_OVERFLOW: kvx_status = 0 - 3;
/// The region overlaps a registered one.
pub const KVX_ERR_OVERLAP: kvx_status = 0 - 4;
/// The address (or part of an op's range) is not registered. (Store, per key: the buffer
/// is not wholly inside one region registered with the store's engine with
/// `KVX_ACCESS_LOCAL_READ` for a put, `KVX_ACCESS_LOCAL_WRITE` for a get.)
pub const KVX_ERR_NOT_REGISTERED: kvx_status = 0 - 5;
/// The region is used by an unfinished batch. (Store, per key of `kvx_store_remove`: the
/// object is being read; remove it later.)
pub const KVX_ERR_BUSY: kvx_status = 0 - 6;
/// A location string is not "cpu:N", "cuda:N" or "*".
pub const KVX_ERR_BAD_LOCATION: kvx_status = 0 - 7;
/// The location cannot be used for this call (e.g. a batch touching GPU memory over a
/// transport that copies with the CPU).
pub const KVX_ERR_UNSUPPORTED: kvx_status = 0 - 8;
/// The operating system refused memory.
pub const KVX_ERR_OUT_OF_MEMORY: kvx_status = 0 - 9;
/// A region lacks the access right an op needs.
pub const KVX_ERR_ACCESS_DENIED: kvx_status = 0 - 10;
/// The batch has more slices than `max_slices_per_batch`.
pub const KVX_ERR_BATCH_TOO_LARGE: kvx_status = 0 - 11;
/// `max_batches` batches are unfreed.
pub const KVX_ERR_TOO_MANY_BATCHES: kvx_status = 0 - 12;
/// The batch id was never issued, was freed, or is forged.
pub const KVX_ERR_UNKNOWN_BATCH: kvx_status = 0 - 13;
/// The peer id was never issued or was closed.
pub const KVX_ERR_UNKNOWN_PEER: kvx_status = 0 - 14;
/// `kvx_free_batch` on a batch that has not ended.
pub const KVX_ERR_BATCH_IN_PROGRESS: kvx_status = 0 - 15;
/// The batch was cancelled before every byte moved.
pub const KVX_ERR_CANCELLED: kvx_status = 0 - 16;
/// The batch's deadline passed before every byte moved.
pub const KVX_ERR_TIMED_OUT: kvx_status = 0 - 17;
/// A transport failed to move bytes.
pub const KVX_ERR_TRANSPORT: kvx_status = 0 - 18;
/// A configuration value is unusable.
pub const KVX_ERR_CONFIG: kvx_status = 0 - 19;
/// The engine could not start (threads, sockets).
pub const KVX_ERR_START: kvx_status = 0 - 20;
/// An op's source and destination overlap in one process.
pub const KVX_ERR_OVERLAPPING_OP: kvx_status = 0 - 22;
/// The region belongs to a `kvx_buffer`: free the buffer instead of unregistering it.
pub const KVX_ERR_OWNED_BY_BUFFER: kvx_status = 0 - 23;
/// A peer could not be reached, went away, or answered wrongly. (Store, per key: the
/// key's owner refused the item or answered wrongly, or the transfer to or from it
/// failed; `kvx_store_remove_all` and `kvx_store_get_stats`: a member could not be asked.)
pub const KVX_ERR_PEER: kvx_status = 0 - 24;
/// The bytes moved but the batch's notification was not delivered.
pub const KVX_ERR_NOTIFY: kvx_status = 0 - 25;
/// Store, per key: the key is empty, longer than `KVX_STORE_KEY_MAX` bytes, or NULL with a
/// non-zero length.
pub const KVX_ERR_BAD_KEY: kvx_status = 0 - 26;
/// Store, per key of a put: the key exists already (objects are immutable; the put left it
/// as it was).
pub const KVX_ERR_ALREADY_EXISTS: kvx_status = 0 - 27;
/// Store, per key of a put: the key's owner has no room for the object, even after
/// evicting.
pub const KVX_ERR_NO_SPACE: kvx_status = 0 - 28;
/// Store, per key: no object under the key (or its owner is gone).
pub const KVX_ERR_NOT_FOUND: kvx_status = 0 - 29;
/// Store, per key of a get: the object is larger than the buffer given for it; nothing
/// was read.
pub const KVX_ERR_SIZE_MISMATCH: kvx_status = 0 - 30;
/// Store, per key of a get: the read ended after the object's lease expired, so the bytes
/// in the buffer may be torn; read it again.
pub const KVX_ERR_LEASE_EXPIRED: kvx_status = 0 - 31;
/// Store, per key: no live member can own the key (members unreachable, or fewer members
/// than the replica asked for).
pub const KVX_ERR_UNAVAILABLE: kvx_status = 0 - 32;
/// A bug in kvxfer was caught at the boundary (a panic); the call had no effect beyond
/// what its text says.
pub const KVX_ERR_INTERNAL: kvx_status = 0 - 21;

/// The status code of an engine error.
pub(crate) fn status_of(error: &Error) -> kvx_status {
    match error {
        Error::Memory(m) => match m {
            MemoryError::ZeroLength { .. } => KVX_ERR_ZERO_LENGTH,
            MemoryError::NullAddress { .. } => KVX_ERR_INVALID_ARGUMENT,
            MemoryError::AddressOverflow { .. } => KVX_ERR_ADDRESS_OVERFLOW,
            MemoryError::OwnedByBuffer { .. } => KVX_ERR_OWNED_BY_BUFFER,
            MemoryError::Overlap { .. } | MemoryError::OverlapInRequest { .. } => KVX_ERR_OVERLAP,
            MemoryError::NotRegistered { .. } => KVX_ERR_NOT_REGISTERED,
            MemoryError::Busy { .. } | MemoryError::PeerBusy { .. } => KVX_ERR_BUSY,
            MemoryError::BadLocation(_) | MemoryError::NotGpuMemory { .. } => KVX_ERR_BAD_LOCATION,
            MemoryError::UnsupportedLocation { .. } => KVX_ERR_UNSUPPORTED,
            MemoryError::AllocationFailed { .. } => KVX_ERR_OUT_OF_MEMORY,
        },
        Error::ZeroLengthOp { .. } => KVX_ERR_ZERO_LENGTH,
        Error::AddressOverflow { .. } => KVX_ERR_ADDRESS_OVERFLOW,
        Error::NotRegistered { .. } => KVX_ERR_NOT_REGISTERED,
        Error::AccessDenied { .. } => KVX_ERR_ACCESS_DENIED,
        Error::OverlappingOp { .. } => KVX_ERR_OVERLAPPING_OP,
        Error::BatchTooLarge { .. } => KVX_ERR_BATCH_TOO_LARGE,
        Error::TooManyBatches { .. } => KVX_ERR_TOO_MANY_BATCHES,
        Error::UnknownBatch(_) => KVX_ERR_UNKNOWN_BATCH,
        Error::UnknownPeer(_) => KVX_ERR_UNKNOWN_PEER,
        Error::BatchInProgress(_) => KVX_ERR_BATCH_IN_PROGRESS,
        Error::Cancelled => KVX_ERR_CANCELLED,
        Error::TimedOut => KVX_ERR_TIMED_OUT,
        Error::Transport { .. } => KVX_ERR_TRANSPORT,
        Error::Config(_) => KVX_ERR_CONFIG,
        Error::Start(_) => KVX_ERR_START,
        Error::Peer { .. } => KVX_ERR_PEER,
        Error::BadSession { .. } => KVX_ERR_INVALID_ARGUMENT,
        Error::Notify(_) => KVX_ERR_NOTIFY,
        Error::NotificationTooLarge { .. } => KVX_ERR_INVALID_ARGUMENT,
        Error::NoListener => KVX_ERR_CONFIG,
        Error::GpuUnreachable { .. } => KVX_ERR_UNSUPPORTED,
        Error::GpuMemoryGone { .. } => KVX_ERR_NOT_REGISTERED,
    }
}

/// The name of a status code ("KVX_OK", "KVX_ERR_BUSY", ...; "KVX_UNKNOWN_STATUS" for a
/// number that is none). Static string.
#[no_mangle]
pub extern "C" fn kvx_status_name(status: kvx_status) -> *const c_char {
    let name: &'static str = match status {
        KVX_OK => "KVX_OK\0",
        KVX_IN_PROGRESS => "KVX_IN_PROGRESS\0",
        KVX_ERR_INVALID_ARGUMENT => "KVX_ERR_INVALID_ARGUMENT\0",
        KVX_ERR_ZERO_LENGTH => "KVX_ERR_ZERO_LENGTH\0",
        KVX_ERR_ADDRESS_OVERFLOW => "KVX_ERR_ADDRESS_OVERFLOW\0",
        KVX_ERR_OVERLAP => "KVX_ERR_OVERLAP\0",
        KVX_ERR_NOT_REGISTERED => "KVX_ERR_NOT_REGISTERED\0",
        KVX_ERR_BUSY => "KVX_ERR_BUSY\0",
        KVX_ERR_BAD_LOCATION => "KVX_ERR_BAD_LOCATION\0",
        KVX_ERR_UNSUPPORTED => "KVX_ERR_UNSUPPORTED\0",
        KVX_ERR_OUT_OF_MEMORY => "KVX_ERR_OUT_OF_MEMORY\0",
        KVX_ERR_ACCESS_DENIED => "KVX_ERR_ACCESS_DENIED\0",
        KVX_ERR_BATCH_TOO_LARGE => "KVX_ERR_BATCH_TOO_LARGE\0",
        KVX_ERR_TOO_MANY_BATCHES => "KVX_ERR_TOO_MANY_BATCHES\0",
        KVX_ERR_UNKNOWN_BATCH => "KVX_ERR_UNKNOWN_BATCH\0",
        KVX_ERR_UNKNOWN_PEER => "KVX_ERR_UNKNOWN_PEER\0",
        KVX_ERR_BATCH_IN_PROGRESS => "KVX_ERR_BATCH_IN_PROGRESS\0",
        KVX_ERR_CANCELLED => "KVX_ERR_CANCELLED\0",
        KVX_ERR_TIMED_OUT => "KVX_ERR_TIMED_OUT\0",
        KVX_ERR_TRANSPORT => "KVX_ERR_TRANSPORT\0",
        KVX_ERR_CONFIG => "KVX_ERR_CONFIG\0",
        KVX_ERR_START => "KVX_ERR_START\0",
        KVX_ERR_OVERLAPPING_OP => "KVX_ERR_OVERLAPPING_OP\0",
        KVX_ERR_OWNED_BY_BUFFER => "KVX_ERR_OWNED_BY_BUFFER\0",
        KVX_ERR_PEER => "KVX_ERR_PEER\0",
        KVX_ERR_NOTIFY => "KVX_ERR_NOTIFY\0",
        KVX_ERR_BAD_KEY => "KVX_ERR_BAD_KEY\0",
        KVX_ERR_ALREADY_EXISTS => "KVX_ERR_ALREADY_EXISTS\0",
        KVX_ERR_NO_SPACE => "KVX_ERR_NO_SPACE\0",
        KVX_ERR_NOT_FOUND => "KVX_ERR_NOT_FOUND\0",
        KVX_ERR_SIZE_MISMATCH => "KVX_ERR_SIZE_MISMATCH\0",
        KVX_ERR_LEASE_EXPIRED => "KVX_ERR_LEASE_EXPIRED\0",
        KVX_ERR_UNAVAILABLE => "KVX_ERR_UNAVAILABLE\0",
        KVX_ERR_INTERNAL => "KVX_ERR_INTERNAL\0",
        _ => "KVX_UNKNOWN_STATUS\0",
    };
    name.as_ptr().cast()
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

pub(crate) fn set_last_error(text: String) {
    // An interior NUL cannot come from our messages except through user strings; cut there.
    let text = CString::new(text).unwrap_or_else(|e| {
        let cut = e.nul_position();
        CString::new(&e.into_vec()[..cut]).unwrap_or_default()
    });
    // try_with: during thread teardown (a C++ thread_local destructor calling us) the slot
    // may be gone; losing the text then is better than a panic.
    let _ = LAST_ERROR.try_with(|slot| *slot.borrow_mut() = text);
}

/// The text of the last error returned on this thread ("" if none yet). Valid until the
/// next kvxfer call on this thread returns an error; copy it to keep it.
#[no_mangle]
pub extern "C" fn kvx_last_error() -> *const c_char {
    LAST_ERROR
        .try_with(|slot| slot.borrow().as_ptr())
        .unwrap_or(c"".as_ptr())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    #[test]
    fn every_status_has_a_distinct_name() {
        let mut names = std::collections::HashSet::new();
        // Every code from the lowest to the highest is in use.
        for code in KVX_ERR_UNAVAILABLE..=KVX_IN_PROGRESS {
            // SAFETY: kvx_status_name returns a static NUL-terminated string.
            let name = unsafe { CStr::from_ptr(kvx_status_name(code)) }
                .to_str()
                .unwrap();
            assert_ne!(name, "KVX_UNKNOWN_STATUS", "code {code} has no name");
            assert!(names.insert(name), "{name} used twice");
        }
        // SAFETY: as above.
        let unknown = unsafe { CStr::from_ptr(kvx_status_name(42)) };
        assert_eq!(unknown.to_str().unwrap(), "KVX_UNKNOWN_STATUS");
    }

    fn last_error_text() -> Vec<u8> {
        // SAFETY: kvx_last_error returns a valid NUL-terminated string that stays valid
        // until the next error on this thread; we copy it at once.
        unsafe { CStr::from_ptr(kvx_last_error()) }
            .to_bytes()
            .to_vec()
    }

    #[test]
    fn last_error_is_per_thread() {
        set_last_error("main thread error".into());
        std::thread::spawn(|| assert_eq!(last_error_text(), b""))
            .join()
            .unwrap();
        assert_eq!(last_error_text(), b"main thread error");
        set_last_error("cut\0here".into());
        assert_eq!(last_error_text(), b"cut");
    }
}
