//! Tests of the CUDA bindings.
//!
//! Without a driver (checked by `dlopen`ing libcuda.so.1 directly) the load error is checked;
//! with one, every wrapper is exercised on the GPU(s). The `gpu_` tests print
//! `skipped: no CUDA driver (...)` and return when there is no driver. Checks that could
//! crash the process (the driver reading an address it does not know with the CPU) and
//! CUDA IPC (a process cannot open its own handles) run in a child process: this test binary
//! started again on one `#[ignore]`d test, which does nothing unless `KVX_CUDA_CHILD` is set.

use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::process::{Command, Output};
use std::ptr;
use std::time::{Duration, Instant};

use super::driver::normalize_pci_bus_id;
use super::error::DriverVersion;
use super::*;

/// Whether `dlopen("libcuda.so.1")` succeeds here (the library is left loaded).
fn libcuda_loadable() -> bool {
    let name = CString::new(LIBRARY).unwrap();
    // SAFETY: name is NUL-terminated; the flags are valid.
    let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    !handle.is_null()
}

/// The driver, or `None` after printing why the GPU test is skipped.
fn gpu() -> Option<&'static Cuda> {
    match driver() {
        Ok(cuda) => Some(cuda),
        Err(e) => {
            println!("skipped: no CUDA driver ({e})");
            None
        }
    }
}

/// A byte pattern that differs at every offset of a page and from seed to seed.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(31).wrapping_add(i as u32 >> 11) as u8 ^ seed)
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex"))
        .collect()
}

/// The context current on this thread (null when none).
fn current_context(cuda: &Cuda) -> CUcontext {
    let mut ctx: CUcontext = ptr::null_mut();
    // SAFETY: ctx is a valid out-pointer.
    unsafe { cuda.ctx_get_current(&mut ctx) }
        .expect("cuCtxGetCurrent")
        .ok()
        .expect("cuCtxGetCurrent succeeds");
    ctx
}

/// Runs the `#[ignore]`d test `name` of this module in a new process of this test binary,
/// with `KVX_CUDA_CHILD=role` and `envs`.
fn run_child(name: &str, role: &str, envs: &[(&str, String)]) -> Output {
    let exe = std::env::current_exe().expect("the test binary's path");
    let module = module_path!()
        .split_once("::")
        .map_or(module_path!(), |(_, rest)| rest);
    let test = format!("{module}::{name}");
    let mut command = Command::new(exe);
    command
        .args([test.as_str(), "--exact", "--ignored", "--nocapture"])
        .args(["--test-threads", "1"])
        .env("KVX_CUDA_CHILD", role);
    for (key, value) in envs {
        command.env(key, value);
    }
    command.output().expect("start the child test process")
}

/// Panics with the child's output unless it exited successfully and printed `CHILD OK`.
fn expect_child_ok(what: &str, output: &Output) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    use std::os::unix::process::ExitStatusExt;
    if let Some(signal) = output.status.signal() {
        panic!(
            "{what}: the child process was killed by signal {signal} (a crash, not an error)\n\
             --- stdout\n{stdout}\n--- stderr\n{stderr}"
        );
    }
    assert!(
        output.status.success() && stdout.contains("CHILD OK"),
        "{what}: the child failed ({})\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        output.status
    );
    // (libtest prints the test's name and its first output on one line.)
    for line in stdout
        .lines()
        .filter_map(|l| l.find("CHILD").map(|at| &l[at..]))
    {
        println!("{what}: {line}");
    }
}

// ---------------------------------------------------------------------------------------
// Everywhere (no GPU needed)

#[test]
fn error_texts_say_what_and_why() {
    let oom = CudaError::Driver {
        call: "cuMemAlloc_v2",
        code: CUDA_ERROR_OUT_OF_MEMORY,
        name: "CUDA_ERROR_OUT_OF_MEMORY".into(),
        message: "out of memory".into(),
    };
    assert_eq!(
        oom.to_string(),
        "cuMemAlloc_v2 failed: CUDA_ERROR_OUT_OF_MEMORY (out of memory)"
    );
    assert_eq!(oom.call(), "cuMemAlloc_v2");
    assert_eq!(oom.code(), Some(2));
    assert!(!oom.is_unavailable());

    let missing = CudaError::MissingSymbol {
        library: LIBRARY.into(),
        symbol: "cuMemGetHandleForAddressRange",
        since: "11.7",
        driver_version: 11040,
    };
    let text = missing.to_string();
    assert!(text.contains("cuMemGetHandleForAddressRange"), "{text}");
    assert!(text.contains("CUDA driver 11.4"), "{text}");
    assert!(text.contains("CUDA 11.7"), "{text}");
    assert!(!missing.is_unavailable());
    assert_eq!(missing.code(), None);

    let no_lib = CudaError::LibraryNotFound {
        library: LIBRARY.into(),
        reason: "libcuda.so.1: cannot open shared object file: No such file or directory".into(),
    };
    assert!(no_lib.is_unavailable());
    assert!(no_lib
        .to_string()
        .starts_with("CUDA not available: dlopen(\"libcuda.so.1\")"));

    let stub = CudaError::InitFailed {
        library: LIBRARY.into(),
        code: CUDA_ERROR_STUB_LIBRARY,
        name: "CUDA_ERROR_STUB_LIBRARY".into(),
        message: "CUDA driver is a stub library".into(),
    };
    assert!(stub.is_unavailable());
    assert_eq!(stub.call(), "cuInit");
    assert!(stub.to_string().contains("stub"), "{stub}");

    let invalid = CudaError::invalid("cuIpcGetMemHandle", "0x10 is not device memory");
    assert_eq!(
        invalid.to_string(),
        "cuIpcGetMemHandle: 0x10 is not device memory"
    );

    assert_eq!(DriverVersion(12060).to_string(), "12.6");
    assert_eq!(DriverVersion(11070).to_string(), "11.7");
    assert_eq!(DriverVersion(0).to_string(), "unknown");
}

#[test]
fn pci_bus_ids_take_the_sysfs_form() {
    assert_eq!(normalize_pci_bus_id("0000:3B:00.0"), "0000:3b:00.0");
    assert_eq!(normalize_pci_bus_id("00000000:3B:00.0"), "0000:3b:00.0");
    assert_eq!(normalize_pci_bus_id("00010000:1A:00.0"), "00010000:1a:00.0");
    assert_eq!(normalize_pci_bus_id(" 0001:c1:00.0\n"), "0001:c1:00.0");
}

#[test]
fn ipc_handles_print_as_hex() {
    let mut bytes = [0u8; CU_IPC_HANDLE_SIZE];
    bytes[0] = 0xab;
    bytes[63] = 0x01;
    let text = format!("{:?}", IpcHandle(bytes));
    assert!(text.starts_with("IpcHandle(ab00"), "{text}");
    assert!(text.ends_with("01)"), "{text}");
    assert_eq!(text.len(), "IpcHandle()".len() + 128);
}

#[test]
fn load_from_says_why_not() {
    let missing = Cuda::load_from("/nonexistent/dir/libcuda.so.1").unwrap_err();
    assert!(
        matches!(missing, CudaError::LibraryNotFound { .. }),
        "{missing:?}"
    );
    assert!(missing.is_unavailable());
    let text = missing.to_string();
    assert!(text.contains("/nonexistent/dir/libcuda.so.1"), "{text}");
    assert!(text.contains("NVIDIA"), "{text}");

    let nul = Cuda::load_from("lib\0cuda").unwrap_err();
    assert!(nul.to_string().contains("NUL"), "{nul}");

    // A library that loads but is not a CUDA driver.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let foreign = Cuda::load_from("libc.so.6").unwrap_err();
        assert!(
            matches!(
                foreign,
                CudaError::NotDriver {
                    symbol: "cuInit",
                    ..
                }
            ),
            "{foreign:?}"
        );
        assert!(foreign.is_unavailable());
        assert!(foreign.to_string().contains("not NVIDIA's"), "{foreign}");
    }
}

#[test]
fn driver_without_libcuda_names_the_library() {
    if libcuda_loadable() {
        // A machine with the driver: it loads, or says why cuInit failed.
        match driver() {
            Ok(cuda) => println!("driver loaded: {cuda:?}"),
            Err(e) => {
                assert!(
                    matches!(e, CudaError::InitFailed { .. }),
                    "libcuda.so.1 loads but driver() failed otherwise: {e}"
                );
                println!("libcuda.so.1 loads but: {e}");
            }
        }
        return;
    }
    let e = driver().unwrap_err();
    assert!(e.is_unavailable(), "{e:?}");
    assert!(
        matches!(&e, CudaError::LibraryNotFound { library, .. } if library == LIBRARY),
        "{e:?}"
    );
    assert!(e.to_string().contains("libcuda.so.1"), "{e}");
    // Cached: the same error again, without a second dlopen.
    assert_eq!(driver().unwrap_err(), e);
    // Everything built on the driver says the same.
    assert_eq!(DeviceBuffer::alloc(0, 4096).unwrap_err(), e);
    assert_eq!(PinnedHost::alloc(4096).unwrap_err(), e);
    assert_eq!(Stream::new(0).unwrap_err(), e);
    assert_eq!(Event::new(0).unwrap_err(), e);
    assert_eq!(ipc_handle(0x1000).unwrap_err(), e);
    assert_eq!(ipc_open(0, &IpcHandle([0; 64])).unwrap_err(), e);
    assert_eq!(dmabuf_fd(0x20_0000, 0x20_0000).unwrap_err(), e);
    let mut byte = 0u8;
    // SAFETY: without a driver nothing is copied (the driver is looked up first).
    let copied = unsafe { memcpy(&mut byte as *mut u8 as u64, &byte as *const u8 as u64, 1) };
    assert_eq!(copied.unwrap_err(), e);
    let mut buf = vec![0u8; 64];
    // SAFETY: buf outlives the (never made) registration.
    let registered = unsafe { host_register(buf.as_mut_ptr(), buf.len()) };
    assert_eq!(registered.unwrap_err(), e);
}

// ---------------------------------------------------------------------------------------
// On a GPU machine

#[test]
fn gpu_devices() {
    let Some(cuda) = gpu() else { return };
    let count = cuda.device_count();
    println!(
        "{} (CUDA driver {}): {count} device(s), missing symbols {:?}",
        cuda.library(),
        DriverVersion(cuda.version()),
        cuda.missing_symbols()
    );
    assert!(count >= 1, "cuInit succeeded, so there is a device");
    assert!(cuda.version() >= 11000, "version {}", cuda.version());
    if cuda.version() >= 11070 {
        assert!(
            cuda.missing_symbols().is_empty(),
            "a CUDA {} driver lacks {:?}",
            DriverVersion(cuda.version()),
            cuda.missing_symbols()
        );
    }
    let sysfs = std::path::Path::new("/sys/bus/pci/devices");
    for device in 0..count {
        let id = cuda.pci_bus_id(device).expect("pci_bus_id");
        println!("device {device}: {id}");
        let parts: Vec<&str> = id.split([':', '.']).collect();
        assert_eq!(parts.len(), 4, "{id}");
        assert!(
            id.chars()
                .all(|c| c.is_ascii_digit() || matches!(c, 'a'..='f' | ':' | '.')),
            "{id}"
        );
        if sysfs.is_dir() && !sysfs.join(&id).exists() {
            println!("note: {id} is not in {} (a container?)", sysfs.display());
        }
        assert!(cuda.can_access_peer(device, device).unwrap());
        for peer in 0..count {
            if peer != device {
                println!(
                    "  can access peer {peer}: {}",
                    cuda.can_access_peer(device, peer).unwrap()
                );
            }
        }
    }
    let e = cuda.pci_bus_id(count).unwrap_err();
    assert!(e.to_string().contains("does not exist"), "{e}");
    let e = cuda.can_access_peer(0, count + 7).unwrap_err();
    assert!(e.to_string().contains("does not exist"), "{e}");
}

#[test]
fn gpu_alloc_and_device_memory() {
    let Some(cuda) = gpu() else { return };
    for device in 0..cuda.device_count() {
        for size in [1usize, 4096, (3 << 20) + 17] {
            let buf = DeviceBuffer::alloc(device, size).expect("alloc");
            assert_eq!(buf.len(), size);
            assert_eq!(buf.device(), device);
            let found = cuda
                .device_memory(buf.addr())
                .expect("device memory is found");
            println!(
                "device {device}: alloc {size} at {:#x} -> {found:?}",
                buf.addr()
            );
            assert_eq!(found.device, device);
            assert_eq!(found.base, buf.addr());
            assert!(found.len >= size as u64, "{found:?}");
            assert!(found.legacy_ipc, "cuMemAlloc memory is IPC-capable");
            for offset in [size / 2, size - 1] {
                let inner = cuda
                    .device_memory(buf.addr() + offset as u64)
                    .expect("interior pointers are device memory");
                assert_eq!(inner, found, "interior pointer +{offset}");
            }
        }
    }
    let e = DeviceBuffer::alloc(0, 0).unwrap_err();
    assert!(matches!(e, CudaError::Invalid { .. }), "{e:?}");
}

#[test]
fn gpu_host_pointers_are_not_device_memory() {
    let Some(cuda) = gpu() else { return };
    let heap = vec![7u8; 1 << 16];
    let stack = [0u8; 64];
    let pinned = PinnedHost::alloc(1 << 16).expect("pinned");
    let mut registered_mem = vec![0u8; 1 << 16];
    // SAFETY: registered_mem outlives the registration (dropped first, below).
    let registration =
        unsafe { host_register(registered_mem.as_mut_ptr(), registered_mem.len()) }.unwrap();
    for (what, addr) in [
        ("null", 0u64),
        ("heap", heap.as_ptr() as u64),
        ("stack", stack.as_ptr() as u64),
        ("pinned", pinned.addr()),
        ("registered", registration.addr()),
        (
            "code",
            gpu_host_pointers_are_not_device_memory as fn() as usize as u64,
        ),
        ("top of the address space", u64::MAX - 4095),
        ("unmapped low address", 0x1000),
    ] {
        assert_eq!(cuda.device_memory(addr), None, "{what} ({addr:#x})");
    }
    drop(registration);
}

#[test]
fn gpu_copy_round_trip() {
    let Some(cuda) = gpu() else { return };
    for device in 0..cuda.device_count() {
        let len = (1 << 20) + 4097;
        let buf = DeviceBuffer::alloc(device, len).unwrap();
        let data = pattern(len, device as u8);
        buf.copy_from_host(0, &data).unwrap();
        let mut back = vec![0u8; len];
        buf.copy_to_host(0, &mut back).unwrap();
        assert!(back == data, "round trip on device {device}");
        // Unaligned offsets and lengths.
        let part = pattern(12_345, 0x5a);
        buf.copy_from_host(4097, &part).unwrap();
        let mut back = vec![0u8; part.len()];
        buf.copy_to_host(4097, &mut back).unwrap();
        assert!(back == part);
        let mut edge = [0u8; 3];
        buf.copy_to_host(4096, &mut edge).unwrap();
        assert_eq!(edge, [data[4096], part[0], part[1]]);
        // Empty copies are no-ops, even at the end.
        buf.copy_from_host(len, &[]).unwrap();
        buf.copy_to_host(len, &mut []).unwrap();
        // Outside the buffer: refused before the driver is called.
        let e = buf.copy_from_host(len - 1, &[1, 2]).unwrap_err();
        assert!(matches!(e, CudaError::Invalid { .. }), "{e:?}");
        assert!(e.to_string().contains("outside"), "{e}");
        let e = buf.copy_to_host(usize::MAX, &mut [0u8; 2]).unwrap_err();
        assert!(matches!(e, CudaError::Invalid { .. }), "{e:?}");
    }
}

#[test]
fn gpu_stream_copy_async_and_events() {
    let Some(cuda) = gpu() else { return };
    let len = 4 << 20;
    let mut src = PinnedHost::alloc(len).unwrap();
    src.as_mut_slice().copy_from_slice(&pattern(len, 3));
    let mut dst = PinnedHost::alloc(len).unwrap();
    let a = DeviceBuffer::alloc(0, len).unwrap();
    let b = DeviceBuffer::alloc(0, len).unwrap();
    let stream = Stream::new(0).unwrap();
    assert_eq!(stream.device(), 0);
    // SAFETY: every range is a live allocation of len bytes, kept until the event below
    // reports completion; nothing else touches them meanwhile.
    unsafe {
        stream.copy_async(a.addr(), src.addr(), len).unwrap();
        stream.copy_async(b.addr(), a.addr(), len).unwrap();
        stream
            .copy_async(dst.as_mut_ptr() as u64, b.addr(), len)
            .unwrap();
        stream
            .copy_async(dst.as_mut_ptr() as u64, b.addr(), 0)
            .unwrap();
    }
    let event = stream.record().unwrap();
    assert_eq!(event.device(), 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut polls = 0u64;
    while !event.query().unwrap() {
        polls += 1;
        assert!(Instant::now() < deadline, "copies not done after 30 s");
        std::thread::yield_now();
    }
    println!("H2D + D2D + D2H of {len} bytes: done after {polls} polls");
    event.synchronize().unwrap();
    assert!(
        dst.as_slice() == src.as_slice(),
        "H2D, D2D, D2H through a stream"
    );

    // A kept event, recorded again; stream synchronize.
    let kept = Event::new(0).unwrap();
    assert!(
        kept.query().unwrap(),
        "an event never recorded counts as done"
    );
    dst.as_mut_slice().fill(0);
    // SAFETY: as above; completion is waited for with synchronize.
    unsafe {
        stream
            .copy_async(dst.as_mut_ptr() as u64, a.addr(), len)
            .unwrap()
    };
    stream.record_event(&kept).unwrap();
    kept.synchronize().unwrap();
    stream.synchronize().unwrap();
    assert!(dst.as_slice() == src.as_slice());

    // Peer copies between devices, and events of another device are refused.
    if cuda.device_count() >= 2 {
        let c = DeviceBuffer::alloc(1, len).unwrap();
        // SAFETY: as above.
        unsafe { stream.copy_async(c.addr(), a.addr(), len).unwrap() };
        stream.synchronize().unwrap();
        let mut back = vec![0u8; len];
        c.copy_to_host(0, &mut back).unwrap();
        assert!(back == src.as_slice(), "device 0 -> device 1");
        let other = Event::new(1).unwrap();
        let e = stream.record_event(&other).unwrap_err();
        assert!(matches!(e, CudaError::Invalid { .. }), "{e:?}");
    } else {
        println!("one device: peer copies not tested");
    }
    drop(stream);
}

#[test]
fn gpu_pinned_host() {
    let Some(cuda) = gpu() else { return };
    let len = (1 << 20) + 3;
    let mut pinned = PinnedHost::alloc(len).unwrap();
    assert_eq!(pinned.len(), len);
    assert!(
        pinned.as_slice().iter().all(|&b| b == 0),
        "zeroed at allocation"
    );
    let data = pattern(len, 9);
    pinned.as_mut_slice().copy_from_slice(&data);
    assert_eq!(cuda.device_memory(pinned.addr()), None);
    let dev = DeviceBuffer::alloc(0, len).unwrap();
    // SAFETY: both ranges are live allocations of len bytes; pinned is not used until
    // memcpy returns.
    unsafe { memcpy(dev.addr(), pinned.addr(), len).unwrap() };
    pinned.as_mut_slice().fill(0);
    // SAFETY: as above.
    unsafe { memcpy(pinned.as_mut_ptr() as u64, dev.addr(), len).unwrap() };
    assert!(pinned.as_slice() == data.as_slice());
    let e = PinnedHost::alloc(0).unwrap_err();
    assert!(matches!(e, CudaError::Invalid { .. }), "{e:?}");
}

#[test]
fn gpu_host_register() {
    let Some(_cuda) = gpu() else { return };
    let len = 1 << 20;
    let mut mem = pattern(len, 77);
    let expected = mem.clone();
    // SAFETY: mem outlives the registration (dropped explicitly below, before mem).
    let registration = unsafe { host_register(mem.as_mut_ptr(), len) }.unwrap();
    assert_eq!(registration.addr(), mem.as_ptr() as u64);
    assert_eq!(registration.len(), len);
    // SAFETY: as above.
    let again = unsafe { host_register(mem.as_mut_ptr(), len) }.unwrap_err();
    assert_eq!(
        again.code(),
        Some(CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED),
        "{again}"
    );
    println!("registering twice: {again}");
    let dev = DeviceBuffer::alloc(0, len).unwrap();
    let stream = Stream::new(0).unwrap();
    // SAFETY: mem is registered and outlives the copy (synchronized below).
    unsafe {
        stream
            .copy_async(dev.addr(), mem.as_ptr() as u64, len)
            .unwrap()
    };
    stream.synchronize().unwrap();
    let mut back = vec![0u8; len];
    dev.copy_to_host(0, &mut back).unwrap();
    assert!(back == expected);
    drop(registration);
    // Unregistered: it can be registered again.
    // SAFETY: as above.
    let again = unsafe { host_register(mem.as_mut_ptr(), len) }.unwrap();
    drop(again);
    drop(mem);
}

#[test]
fn gpu_ipc_handle_base_and_interior() {
    let Some(_cuda) = gpu() else { return };
    let buf = DeviceBuffer::alloc(0, 2 << 20).unwrap();
    let handle = ipc_handle(buf.addr()).expect("the base of a cuMemAlloc allocation");
    assert!(handle.0.iter().any(|&b| b != 0), "{handle:?}");
    let interior = ipc_handle(buf.addr() + 4096).unwrap_err();
    println!("interior pointer: {interior}");
    assert!(
        matches!(interior, CudaError::Invalid { .. }),
        "{interior:?}"
    );
    let text = interior.to_string();
    assert!(text.contains("4096 bytes into"), "{text}");
    assert!(text.contains("base address"), "{text}");
    let host = vec![0u8; 4096];
    let e = ipc_handle(host.as_ptr() as u64).unwrap_err();
    assert!(e.to_string().contains("not device memory"), "{e}");
    let pinned = PinnedHost::alloc(4096).unwrap();
    let e = ipc_handle(pinned.addr()).unwrap_err();
    assert!(e.to_string().contains("not device memory"), "{e}");
}

#[test]
fn gpu_ipc_across_processes() {
    let Some(cuda) = gpu() else { return };
    let len = (2 << 20) + 4096;
    let buf = DeviceBuffer::alloc(0, len).unwrap();
    buf.copy_from_host(0, &pattern(len, 1)).unwrap();
    let handle = ipc_handle(buf.addr()).unwrap();
    let mut devices = vec![0u32];
    if cuda.device_count() >= 2 && cuda.can_access_peer(1, 0).unwrap() {
        devices.push(1);
    }
    let mut current = 1u8;
    for (round, device) in devices.into_iter().enumerate() {
        let seed = 100 + round as u8;
        let output = run_child(
            "ipc_child",
            "ipc",
            &[
                ("KVX_CUDA_IPC_HANDLE", hex(&handle.0)),
                ("KVX_CUDA_IPC_LEN", len.to_string()),
                ("KVX_CUDA_IPC_DEVICE", device.to_string()),
                ("KVX_CUDA_IPC_EXPECT_SEED", current.to_string()),
                ("KVX_CUDA_IPC_WRITE_SEED", seed.to_string()),
            ],
        );
        expect_child_ok(&format!("CUDA IPC opened on device {device}"), &output);
        let mut back = vec![0u8; len];
        buf.copy_to_host(0, &mut back).unwrap();
        assert!(
            back == pattern(len, seed),
            "the child's writes through its mapping (device {device}) are in our allocation"
        );
        current = seed;
    }
}

/// The child of [`gpu_ipc_across_processes`]: maps the parent's allocation, checks its
/// bytes and overwrites them.
#[test]
#[ignore = "started by gpu_ipc_across_processes in a child process"]
fn ipc_child() {
    if std::env::var("KVX_CUDA_CHILD").as_deref() != Ok("ipc") {
        return;
    }
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is set"));
    let bytes = unhex(&var("KVX_CUDA_IPC_HANDLE"));
    let handle = IpcHandle(bytes.try_into().expect("64 bytes"));
    let len: usize = var("KVX_CUDA_IPC_LEN").parse().unwrap();
    let device: u32 = var("KVX_CUDA_IPC_DEVICE").parse().unwrap();
    let expect_seed: u8 = var("KVX_CUDA_IPC_EXPECT_SEED").parse().unwrap();
    let write_seed: u8 = var("KVX_CUDA_IPC_WRITE_SEED").parse().unwrap();
    let mapping = ipc_open(device, &handle).expect("ipc_open");
    println!(
        "CHILD mapped {} bytes at {:#x} on device {device}",
        mapping.len(),
        mapping.addr()
    );
    assert!(mapping.len() >= len as u64);
    assert_eq!(mapping.device(), device);
    let cuda = driver().unwrap();
    let found = cuda
        .device_memory(mapping.addr())
        .expect("a mapping is device memory");
    println!("CHILD device_memory of the mapping: {found:?}");
    let mut host = vec![0u8; len];
    // SAFETY: the mapping holds at least len bytes; host is a live buffer of len bytes.
    unsafe { memcpy(host.as_mut_ptr() as u64, mapping.addr(), len).unwrap() };
    assert!(host == pattern(len, expect_seed), "the parent's bytes");
    let fresh = pattern(len, write_seed);
    // SAFETY: as above.
    unsafe { memcpy(mapping.addr(), fresh.as_ptr() as u64, len).unwrap() };
    // Through a stream too (the transport's way), on the mapping's device.
    let stream = Stream::new(device).unwrap();
    let staging = PinnedHost::alloc(len).unwrap();
    // SAFETY: both ranges hold len bytes and live until the stream is synchronized.
    unsafe {
        stream
            .copy_async(staging.addr(), mapping.addr(), len)
            .unwrap()
    };
    stream.synchronize().unwrap();
    assert!(staging.as_slice() == fresh.as_slice());
    drop(mapping);
    println!("CHILD OK");
}

#[test]
fn gpu_dmabuf_fd() {
    let Some(cuda) = gpu() else { return };
    let len = 4 << 20;
    let buf = DeviceBuffer::alloc(0, len).unwrap();
    let page = crate::sys::page_size() as u64;
    println!("allocation at {:#x}", buf.addr());
    let e = dmabuf_fd(buf.addr() + 1, page).unwrap_err();
    assert!(e.to_string().contains("page"), "{e}");
    let e = dmabuf_fd(buf.addr(), 0).unwrap_err();
    assert!(matches!(e, CudaError::Invalid { .. }), "{e:?}");
    let heap = vec![0u8; 3 * page as usize];
    let aligned = (heap.as_ptr() as u64).next_multiple_of(page);
    let e = dmabuf_fd(aligned, page).unwrap_err();
    assert!(e.to_string().contains("not device memory"), "{e}");
    if buf.addr() % page != 0 {
        println!("note: cuMemAlloc returned an address not aligned to {page}");
        return;
    }
    let whole = cuda.device_memory(buf.addr()).unwrap().len;
    let e = dmabuf_fd(buf.addr(), whole.next_multiple_of(page) + page).unwrap_err();
    assert!(e.to_string().contains("past the end"), "{e}");
    match dmabuf_fd(buf.addr(), len as u64) {
        Ok(fd) => {
            let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
                .expect("the descriptor is open");
            println!("dma-buf fd {} -> {}", fd.as_raw_fd(), link.display());
            assert!(
                link.to_string_lossy().contains("dmabuf"),
                "not a dma-buf: {}",
                link.display()
            );
        }
        Err(e) => {
            println!("dma-buf export unavailable here: {e}");
            assert_eq!(e.call(), "cuMemGetHandleForAddressRange", "{e:?}");
            assert!(
                e.to_string().contains("cuMemGetHandleForAddressRange"),
                "{e}"
            );
        }
    }
}

#[test]
fn gpu_bad_pointers_are_errors() {
    let Some(cuda) = gpu() else { return };
    let dead = DeviceBuffer::alloc(0, 1 << 20).unwrap();
    let dead_addr = dead.addr();
    drop(dead);
    assert_eq!(cuda.device_memory(dead_addr), None, "a freed allocation");
    let e = ipc_handle(dead_addr).unwrap_err();
    assert!(matches!(e, CudaError::Invalid { .. }), "{e:?}");
    let e = dmabuf_fd(dead_addr, 1 << 20).unwrap_err();
    assert!(matches!(e, CudaError::Invalid { .. }), "{e:?}");
    assert!(Stream::new(cuda.device_count()).is_err());
    assert!(Event::new(cuda.device_count()).is_err());
    assert!(ipc_open(cuda.device_count(), &IpcHandle([0; 64])).is_err());
    // Past the end of an allocation: refused before the driver is called.
    let buf = DeviceBuffer::alloc(0, 8192).unwrap();
    let whole = cuda.device_memory(buf.addr()).unwrap().len as usize;
    let host = vec![0u8; whole + 1];
    // SAFETY: refused before any byte moves (the device end runs past its allocation).
    let e = unsafe { memcpy(buf.addr(), host.as_ptr() as u64, whole + 1) }.unwrap_err();
    assert!(e.to_string().contains("past the end"), "{e}");
    // The driver is given bad addresses (freed device memory, a garbage IPC handle) in
    // child processes: should it read such an address with the CPU, only the child dies.
    // (Unified `memcpy` with a freed device address is not among them: the driver takes
    // an address it does not know for host memory and the CPU faults on it, on the H100
    // with driver 580 too; `memcpy` is unsafe for that reason.)
    for case in ["dtoh-from", "garbage-ipc-handle"] {
        let output = run_child("bad_input_child", case, &[]);
        expect_child_ok(case, &output);
    }
}

/// The child of [`gpu_bad_pointers_are_errors`]: one call with a freed device address or
/// a garbage IPC handle, which must be an error.
#[test]
#[ignore = "started by gpu_bad_pointers_are_errors in a child process"]
fn bad_input_child() {
    let Ok(case) = std::env::var("KVX_CUDA_CHILD") else {
        return;
    };
    let cuda = driver().unwrap();
    let len = 1 << 20;
    let good = DeviceBuffer::alloc(0, len).unwrap();
    let dead = DeviceBuffer::alloc(0, len).unwrap();
    let dead_addr = dead.addr();
    drop(dead);
    let mut host = vec![0u8; len];
    let result = match case.as_str() {
        "dtoh-from" => {
            let _ctx = cuda.enter(0).unwrap();
            // SAFETY: host is valid for 4096 bytes; the device source is deliberately freed.
            unsafe { cuda.memcpy_dtoh(host.as_mut_ptr().cast(), dead_addr, 4096) }
                .and_then(|outcome| outcome.ok())
        }
        "garbage-ipc-handle" => ipc_open(0, &IpcHandle([0xa5; 64])).map(drop),
        _ => return,
    };
    println!("CHILD {case}: {result:?}");
    assert!(result.is_err(), "{case} succeeded");
    // The process (and context) still works afterwards.
    let data = pattern(4096, 5);
    good.copy_from_host(0, &data).unwrap();
    good.copy_to_host(0, &mut host[..4096]).unwrap();
    assert!(host[..4096] == data[..]);
    println!("CHILD OK");
}

#[test]
fn gpu_contexts_nest_and_restore() {
    let Some(cuda) = gpu() else { return };
    // A fresh thread has no current context.
    std::thread::spawn(move || {
        assert!(current_context(cuda).is_null());
        let outer = cuda.enter(0).unwrap();
        assert_eq!(outer.device(), 0);
        let ctx0 = current_context(cuda);
        assert!(!ctx0.is_null());
        {
            let inner = cuda.enter(0).unwrap();
            assert!(
                format!("{inner:?}").contains("pushed: false"),
                "entering the current context pushes nothing: {inner:?}"
            );
            assert_eq!(current_context(cuda), ctx0);
        }
        assert_eq!(
            current_context(cuda),
            ctx0,
            "the outer guard's context stays"
        );
        if cuda.device_count() >= 2 {
            let other = cuda.enter(1).unwrap();
            let ctx1 = current_context(cuda);
            assert!(!ctx1.is_null() && ctx1 != ctx0);
            // Work under another device's guard still goes to the right device.
            let buf = DeviceBuffer::alloc(0, 4096).unwrap();
            assert_eq!(cuda.device_memory(buf.addr()).unwrap().device, 0);
            assert_eq!(
                current_context(cuda),
                ctx1,
                "operations restore the context"
            );
            drop(buf);
            drop(other);
            assert_eq!(current_context(cuda), ctx0);
        }
        // Operations leave no context behind.
        drop(outer);
        assert!(current_context(cuda).is_null());
        let buf = DeviceBuffer::alloc(0, 4096).unwrap();
        assert!(current_context(cuda).is_null());
        drop(buf);
        assert!(current_context(cuda).is_null());
        let e = cuda.enter(cuda.device_count()).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
    })
    .join()
    .unwrap();
}

#[test]
fn gpu_many_threads() {
    let Some(cuda) = gpu() else { return };
    let count = cuda.device_count();
    let threads: Vec<_> = (0..8u32)
        .map(|t| {
            std::thread::spawn(move || {
                let device = t % count;
                let len = (256 << 10) + t as usize;
                let stream = Stream::new(device).unwrap();
                let a = DeviceBuffer::alloc(device, len).unwrap();
                let b = DeviceBuffer::alloc(device, len).unwrap();
                for round in 0..20u8 {
                    let data = pattern(len, round ^ t as u8);
                    a.copy_from_host(0, &data).unwrap();
                    // SAFETY: both are live allocations of len bytes, synchronized below.
                    unsafe { stream.copy_async(b.addr(), a.addr(), len).unwrap() };
                    stream.record().unwrap().synchronize().unwrap();
                    let mut back = vec![0u8; len];
                    b.copy_to_host(0, &mut back).unwrap();
                    assert!(back == data, "thread {t} round {round}");
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
}

#[test]
fn gpu_errors_name_the_call() {
    let Some(cuda) = gpu() else { return };
    let e = DeviceBuffer::alloc(0, 1 << 52).unwrap_err();
    println!("allocating 4 PiB: {e}");
    assert_eq!(e.code(), Some(CUDA_ERROR_OUT_OF_MEMORY), "{e:?}");
    assert!(
        e.to_string()
            .starts_with("cuMemAlloc_v2 failed: CUDA_ERROR_OUT_OF_MEMORY ("),
        "{e}"
    );
    let e = DeviceBuffer::alloc(cuda.device_count() + 2, 16).unwrap_err();
    assert!(matches!(e, CudaError::Invalid { .. }), "{e:?}");
    assert!(e.to_string().contains("does not exist"), "{e}");
    // The process still works after errors.
    let buf = DeviceBuffer::alloc(0, 4096).unwrap();
    buf.copy_from_host(0, &[1, 2, 3]).unwrap();
}
