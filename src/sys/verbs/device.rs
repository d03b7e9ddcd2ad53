//! Owning wrappers for device discovery: the device list and open contexts.

use std::ffi::{c_int, CStr};
use std::io;
use std::marker::PhantomData;
use std::ptr::NonNull;

use super::bindings::{ibv_context, ibv_device, ibv_device_attr, ibv_gid, ibv_port_attr};
use super::Verbs;

/// An `errno`-style result of libibverbs as `io::Result`: 0 is success, a positive value is
/// the error number (most calls), a negative one means "see `errno`" (the sysfs-backed
/// ones).
fn check(rc: c_int, call: &str) -> io::Result<()> {
    match rc {
        0 => Ok(()),
        rc if rc > 0 => Err(io::Error::from_raw_os_error(rc)),
        rc => Err(last_error(call, rc)),
    }
}

/// `errno` after a failed call, or an error naming the call when `errno` was not set.
fn last_error(call: &str, rc: c_int) -> io::Error {
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(0) | None => io::Error::other(format!("{call} failed (returned {rc}, errno not set)")),
        Some(_) => err,
    }
}

/// The RDMA devices present when it was made (`ibv_get_device_list`); freed on drop.
/// Contexts opened from its devices stay valid after it is dropped.
pub struct DeviceList {
    verbs: &'static Verbs,
    list: NonNull<*mut ibv_device>,
    len: usize,
}

// SAFETY: the list is an immutable array owned by this value; libibverbs may be called
// from any thread, and nothing here has thread affinity.
unsafe impl Send for DeviceList {}
// SAFETY: shared access only reads the array and calls thread-safe libibverbs functions.
unsafe impl Sync for DeviceList {}

impl DeviceList {
    /// Lists the devices. Fails with the `errno` of `ibv_get_device_list`: `ENOSYS` when the
    /// kernel has no RDMA user-verbs support (see [`super::kernel_support`] for why),
    /// `ENOMEM`, ... An empty list is not an error: RDMA support without devices.
    pub fn new(verbs: &'static Verbs) -> io::Result<DeviceList> {
        let mut num: c_int = 0;
        // SAFETY: num is valid for one write; the list is owned by the DeviceList built
        // below and freed exactly once in its Drop.
        let list = unsafe { verbs.get_device_list(&mut num) };
        match NonNull::new(list) {
            Some(list) => Ok(DeviceList {
                verbs,
                list,
                len: usize::try_from(num).unwrap_or(0),
            }),
            None => Err(last_error("ibv_get_device_list", 0)),
        }
    }

    /// How many devices.
    pub fn len(&self) -> usize {
        self.len
    }

    /// No devices at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Device `index`, if there is one.
    pub fn get(&self, index: usize) -> Option<Device<'_>> {
        if index >= self.len {
            return None;
        }
        // SAFETY: the array has len non-null elements followed by a NULL, and index < len.
        let device = unsafe { *self.list.as_ptr().add(index) };
        NonNull::new(device).map(|ptr| Device {
            verbs: self.verbs,
            ptr,
            _list: PhantomData,
        })
    }

    /// The devices in the library's order.
    pub fn iter(&self) -> Devices<'_> {
        Devices {
            list: self,
            next: 0,
        }
    }

    /// The device called `name` (`mlx5_0`, `rxe1`), if present.
    pub fn find(&self, name: &str) -> Option<Device<'_>> {
        self.iter().find(|d| d.name() == name)
    }
}

impl Drop for DeviceList {
    fn drop(&mut self) {
        // SAFETY: the list came from get_device_list and is freed only here; Device values
        // borrow the list, so none outlives it.
        unsafe { self.verbs.free_device_list(self.list.as_ptr()) };
    }
}

impl std::fmt::Debug for DeviceList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.iter().map(|d| d.name()))
            .finish()
    }
}

impl<'a> IntoIterator for &'a DeviceList {
    type Item = Device<'a>;
    type IntoIter = Devices<'a>;
    fn into_iter(self) -> Devices<'a> {
        self.iter()
    }
}

/// Iterator over a [`DeviceList`].
pub struct Devices<'a> {
    list: &'a DeviceList,
    next: usize,
}

impl<'a> Iterator for Devices<'a> {
    type Item = Device<'a>;
    fn next(&mut self) -> Option<Device<'a>> {
        while self.next < self.list.len {
            let i = self.next;
            self.next += 1;
            if let Some(device) = self.list.get(i) {
                return Some(device);
            }
        }
        None
    }
}

/// One device of a [`DeviceList`], valid while the list is.
#[derive(Clone, Copy)]
pub struct Device<'a> {
    verbs: &'static Verbs,
    ptr: NonNull<ibv_device>,
    _list: PhantomData<&'a DeviceList>,
}

impl Device<'_> {
    /// The kernel's name for the device (`mlx5_0`, `rxe0`).
    pub fn name(&self) -> String {
        // SAFETY: the device belongs to a live list (the lifetime ties it to the list).
        let name = unsafe { self.verbs.get_device_name(self.ptr.as_ptr()) };
        if name.is_null() {
            return String::new();
        }
        // SAFETY: a non-null name is a NUL-terminated string inside the device, alive as
        // long as the list; it is copied out at once.
        unsafe { CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned()
    }

    /// The raw device, for calls this layer does not wrap.
    pub fn as_ptr(&self) -> *mut ibv_device {
        self.ptr.as_ptr()
    }

    /// Opens the device (`ibv_open_device`). Fails with its `errno` (`EPERM`/`EACCES`
    /// without access to `/dev/infiniband/uverbsN`, ...).
    pub fn open(&self) -> io::Result<Context> {
        // SAFETY: the device belongs to a live list; the context is owned by the Context
        // built below and closed exactly once in its Drop.
        let ctx = unsafe { self.verbs.open_device(self.ptr.as_ptr()) };
        match NonNull::new(ctx) {
            Some(ptr) => Ok(Context {
                verbs: self.verbs,
                ptr,
            }),
            None => Err(last_error("ibv_open_device", 0)),
        }
    }
}

impl std::fmt::Debug for Device<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Device").field(&self.name()).finish()
    }
}

/// An open device (`struct ibv_context`), closed on drop.
///
/// Objects created on it through the raw calls (PDs, CQs, QPs, MRs, channels) must be
/// destroyed before it is dropped; the transport that creates them owns that ordering.
pub struct Context {
    verbs: &'static Verbs,
    ptr: NonNull<ibv_context>,
}

// SAFETY: an ibv_context may be used from any thread: libibverbs and its providers lock
// internally (verbs are thread-safe by specification).
unsafe impl Send for Context {}
// SAFETY: as for Send; the methods here only query.
unsafe impl Sync for Context {}

impl Context {
    /// The raw context, for the calls this layer does not wrap. Valid while `self` is.
    pub fn as_ptr(&self) -> *mut ibv_context {
        self.ptr.as_ptr()
    }

    /// The library this context was opened with.
    pub fn verbs(&self) -> &'static Verbs {
        self.verbs
    }

    /// The device's name (`mlx5_0`, `rxe0`).
    pub fn name(&self) -> String {
        // SAFETY: the context is open, so its device pointer is valid for its lifetime
        // (the library keeps the device alive while a context refers to it).
        let device = unsafe { (*self.ptr.as_ptr()).device };
        if device.is_null() {
            return String::new();
        }
        // SAFETY: device is the context's live device.
        let name = unsafe { self.verbs.get_device_name(device) };
        if name.is_null() {
            return String::new();
        }
        // SAFETY: a NUL-terminated string inside the live device, copied out at once.
        unsafe { CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned()
    }

    /// `ibv_query_device`: the device's attributes and limits (`phys_port_cnt`,
    /// `max_mr_size`, `max_qp_wr`, `node_guid` in network byte order, ...).
    pub fn query_device(&self) -> io::Result<ibv_device_attr> {
        let mut attr = ibv_device_attr::default();
        // SAFETY: the context is open; attr is valid for one write.
        let rc = unsafe { self.verbs.query_device(self.as_ptr(), &mut attr) };
        check(rc, "ibv_query_device")?;
        Ok(attr)
    }

    /// `ibv_query_port` for port `port` (ports count from 1): state, MTUs, link layer,
    /// LID, GID table length (`port_cap_flags2` is always 0, see [`Verbs::query_port`]).
    pub fn query_port(&self, port: u8) -> io::Result<ibv_port_attr> {
        let mut attr = ibv_port_attr::default();
        // SAFETY: the context is open; attr is valid for one write.
        let rc = unsafe { self.verbs.query_port(self.as_ptr(), port, &mut attr) };
        check(rc, "ibv_query_port")?;
        Ok(attr)
    }

    /// `ibv_query_gid`: entry `index` of port `port`'s GID table (all zero for an unused
    /// entry; an error past the table's end).
    pub fn query_gid(&self, port: u8, index: u32) -> io::Result<ibv_gid> {
        let index = c_int::try_from(index)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "GID index out of range"))?;
        let mut gid = ibv_gid::default();
        // SAFETY: the context is open; gid is valid for one write.
        let rc = unsafe { self.verbs.query_gid(self.as_ptr(), port, index, &mut gid) };
        check(rc, "ibv_query_gid")?;
        Ok(gid)
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        let name = self.name();
        // SAFETY: the context is open and closed only here; by the type's contract nothing
        // created on it is left.
        let rc = unsafe { self.verbs.close_device(self.as_ptr()) };
        if rc != 0 {
            log::warn!(
                "ibv_close_device({name}) failed: {}",
                last_error("ibv_close_device", rc)
            );
        }
    }
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Context").field(&self.name()).finish()
    }
}
