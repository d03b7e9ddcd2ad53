//! GPU memory on a machine with the CUDA driver (the H100 of the `device` tool): device
//! memory registered without a location is detected as `cuda:N`, and batches that would
//! copy it with the CPU are refused instead of faulting. Without a driver every test says
//! why it is skipped.

use kvxfer::sys::cuda::{driver, DeviceBuffer};
use kvxfer::{Access, Engine, EngineConfig, Location, Op};

/// The driver, or `None` after saying why the test is skipped.
fn gpu() -> Option<&'static kvxfer::sys::cuda::Cuda> {
    match driver() {
        Ok(cuda) if cuda.device_count() > 0 => Some(cuda),
        Ok(_) => {
            println!("skipped: the CUDA driver sees no device");
            None
        }
        Err(e) => {
            println!("skipped: no CUDA driver ({e})");
            None
        }
    }
}

#[test]
fn device_memory_is_detected_and_never_copied_by_the_cpu() {
    let Some(_cuda) = gpu() else { return };
    let engine = Engine::new(EngineConfig::default()).unwrap();
    let vram = DeviceBuffer::alloc(0, 1 << 20).expect("cuMemAlloc");
    // SAFETY: the buffer outlives its registration (unregistered below).
    unsafe {
        engine
            .register(vram.addr(), 1 << 20, None, Access::ALL)
            .unwrap();
    }
    let region = engine.region(vram.addr()).expect("registered");
    assert_eq!(region.location(), Location::Cuda(0), "VRAM not detected");
    // An interior range of the allocation is detected too.
    let host = engine.allocate(1 << 20, Location::Any).unwrap();
    assert!(
        !matches!(
            engine.region(host.addr()).unwrap().location(),
            Location::Cuda(_)
        ),
        "host memory taken for VRAM"
    );
    let op = Op::write(host.addr(), vram.addr(), 4096);
    match engine.submit(engine.local_peer(), &[op]) {
        Err(kvxfer::Error::GpuUnreachable { location, .. }) => {
            assert_eq!(location, Location::Cuda(0))
        }
        other => panic!("a CPU copy into VRAM was not refused: {other:?}"),
    }
    engine.unregister(vram.addr()).unwrap();
    println!(
        "VRAM at {:#x} detected as cuda:0; CPU copies refused",
        vram.addr()
    );
}
