//! Checks the CUDA driver through kvxfer's own bindings (`kvxfer::sys::cuda`): the driver
//! version, the devices with their PCI addresses and peer access, then a quick self-check
//! per device — allocate, find the allocation from an interior pointer, copy a pattern
//! there and back (synchronously and through a stream), export an IPC handle and a dma-buf.
//! Says exactly why when CUDA cannot be used.
//!
//! ```text
//! cargo run --release --example kvxfer_cuda_probe
//! ```
//!
//! Exit status: 0 when every check passed, 1 when CUDA is unavailable, 2 when a check failed.

use std::process::ExitCode;

use kvxfer::sys::cuda::{
    dmabuf_fd, driver, ipc_handle, CudaError, DeviceBuffer, PinnedHost, Stream,
};

fn main() -> ExitCode {
    let cuda = match driver() {
        Ok(cuda) => cuda,
        Err(e) => {
            println!("{e}");
            return ExitCode::from(1);
        }
    };
    let version = cuda.version();
    println!(
        "driver: {} loaded, CUDA {}.{} ({version})",
        cuda.library(),
        version / 1000,
        (version % 1000) / 10
    );
    let missing = cuda.missing_symbols();
    if missing.is_empty() {
        println!("symbols: all present");
    } else {
        println!("symbols: missing {missing:?} (the features needing them will fail)");
    }
    let count = cuda.device_count();
    println!("{count} device(s)");
    for device in 0..count {
        match cuda.pci_bus_id(device) {
            Ok(id) => println!("  cuda:{device}  {id}"),
            Err(e) => println!("  cuda:{device}  pci_bus_id failed: {e}"),
        }
    }
    if count > 1 {
        println!("peer access (row can access column):");
        for a in 0..count {
            let row: Vec<&str> = (0..count)
                .map(|b| match cuda.can_access_peer(a, b) {
                    Ok(true) => "yes",
                    Ok(false) => "no",
                    Err(_) => "err",
                })
                .collect();
            println!("  cuda:{a}  {}", row.join(" "));
        }
    }

    let mut failed = 0;
    for device in 0..count {
        match self_check(device) {
            Ok(()) => println!("cuda:{device}: self-check passed"),
            Err(e) => {
                println!("cuda:{device}: self-check FAILED: {e}");
                failed += 1;
            }
        }
    }
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    }
}

/// Allocates on `device`, checks pointer detection, copies a pattern there and back two
/// ways, and tries the IPC and dma-buf exports.
fn self_check(device: u32) -> Result<(), String> {
    let cuda = driver().map_err(|e| e.to_string())?;
    let len = 8 << 20;
    let fail = |what: &str, e: CudaError| format!("{what}: {e}");
    let buf = DeviceBuffer::alloc(device, len).map_err(|e| fail("alloc", e))?;
    println!("cuda:{device}: allocated {len} bytes at {:#x}", buf.addr());

    let inner = buf.addr() + 12345;
    match cuda.device_memory(inner) {
        Some(m) if m.device == device && m.base == buf.addr() && m.len >= len as u64 => {
            println!("cuda:{device}: detect: {inner:#x} is in {m:?}")
        }
        other => return Err(format!("detect: {inner:#x} gave {other:?}")),
    }
    let host = vec![0u8; 4096];
    if let Some(m) = cuda.device_memory(host.as_ptr() as u64) {
        return Err(format!(
            "detect: a heap pointer was taken for device memory {m:?}"
        ));
    }

    let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4093) as u8).collect();
    buf.copy_from_host(0, &data)
        .map_err(|e| fail("copy to device", e))?;
    let mut back = vec![0u8; len];
    buf.copy_to_host(0, &mut back)
        .map_err(|e| fail("copy to host", e))?;
    if back != data {
        return Err("copy round trip: the bytes differ".into());
    }

    let stream = Stream::new(device).map_err(|e| fail("stream", e))?;
    let mut pinned = PinnedHost::alloc(len).map_err(|e| fail("pinned alloc", e))?;
    let start = std::time::Instant::now();
    // SAFETY: buf and pinned are live allocations of len bytes, not touched until the
    // event below reports completion.
    unsafe { stream.copy_async(pinned.as_mut_ptr() as u64, buf.addr(), len) }
        .map_err(|e| fail("copy_async", e))?;
    let event = stream.record().map_err(|e| fail("record", e))?;
    event
        .synchronize()
        .map_err(|e| fail("event synchronize", e))?;
    let elapsed = start.elapsed();
    if pinned.as_slice() != data.as_slice() {
        return Err("stream copy to pinned memory: the bytes differ".into());
    }
    println!(
        "cuda:{device}: copy round trip ok; stream D2H of {} MiB in {elapsed:.2?} ({:.1} GB/s)",
        len >> 20,
        len as f64 / elapsed.as_secs_f64() / 1e9
    );

    match ipc_handle(buf.addr()) {
        Ok(_) => println!("cuda:{device}: IPC handle exported"),
        Err(e) => return Err(fail("ipc_handle", e)),
    }
    match ipc_handle(inner) {
        Ok(_) => return Err("ipc_handle accepted an interior pointer".into()),
        Err(e) => println!("cuda:{device}: IPC of an interior pointer refused: {e}"),
    }
    match dmabuf_fd(buf.addr(), len as u64) {
        Ok(fd) => println!("cuda:{device}: dma-buf export ok ({fd:?})"),
        Err(e) => println!("cuda:{device}: dma-buf export unavailable: {e}"),
    }
    Ok(())
}
