//! The SSD tier of a segment server: when the segment is above its watermark, objects are
//! demoted to a cache file on local disk and promoted back on a hit. The file is read and
//! written with io_uring ([`SegmentFile`]), `O_DIRECT` where the filesystem allows it, with
//! the segment registered as fixed buffers where the kernel allows it. All offsets and
//! lengths are multiples of 4096 (the allocators guarantee it); the file is deleted when
//! the tier is dropped.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::memory::Region;
use crate::sys::uring_file::{SegmentFile, UringFile};

/// Tiers opened by this process so far (part of each file's name).
static OPENED: AtomicU64 = AtomicU64::new(0);

/// A cache file on local disk tied to one segment.
#[derive(Debug)]
pub struct SsdTier {
    file: SegmentFile,
}

impl SsdTier {
    /// Creates a cache file of `capacity` bytes (a non-zero multiple of 4096) in `dir`,
    /// named uniquely (`kvxfer-ssd-<pid>-<n>-<random>.cache`), for the engine-allocated
    /// `segment` (e.g. `buffer.region()`; the tier keeps it mapped while it lives). Logs a
    /// warning once if the file cannot use `O_DIRECT` or the segment cannot be registered
    /// as fixed buffers, saying why. Fails if the file cannot be created, io_uring is
    /// unavailable, or `segment` is caller memory (not engine-allocated).
    pub fn open(dir: &Path, capacity: u64, segment: &Arc<Region>) -> io::Result<SsdTier> {
        let name = format!(
            "kvxfer-ssd-{}-{}-{:016x}.cache",
            std::process::id(),
            OPENED.fetch_add(1, Ordering::Relaxed),
            RandomState::new().hash_one(0u8),
        );
        let file = UringFile::create(&dir.join(name), capacity)?;
        let file = SegmentFile::over_mapping(file, Arc::clone(segment), Region::shared_mapping)?;
        if let Some(why) = file.file().why_not_direct() {
            log::warn!(
                "kvxfer: SSD tier {} uses buffered I/O, not O_DIRECT: {why}",
                file.file().path().display()
            );
        }
        if let Some(why) = file.file().why_not_fixed() {
            log::warn!("kvxfer: SSD tier {}: {why}", file.file().path().display());
        }
        Ok(SsdTier { file })
    }

    /// Copies objects from the segment to the file, each `(segment offset, disk offset,
    /// length)`, all in one submission; one result per item, in order. An item not aligned
    /// to 4096 or outside the segment or the file fails with `InvalidInput` and writes
    /// nothing.
    pub fn demote(&self, items: &[(u64, u64, u64)]) -> Vec<io::Result<()>> {
        self.file.write_many_from_segment(items)
    }

    /// Copies objects from the file back into the segment, each `(disk offset, segment
    /// offset, length)`, all in one submission; one result per item, in order. Checked as
    /// [`demote`](Self::demote); an item whose segment range overlaps an earlier item's
    /// fails too.
    pub fn promote(&self, items: &[(u64, u64, u64)]) -> Vec<io::Result<()>> {
        self.file.read_many_into_segment(items)
    }

    /// The file's size in bytes.
    pub fn capacity(&self) -> u64 {
        self.file.file().len()
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        self.file.file().path()
    }

    /// One line for logs: path, capacity, whether `O_DIRECT` and fixed buffers are in use
    /// and, if not, why.
    pub fn describe(&self) -> String {
        let file = self.file.file();
        let io = match file.why_not_direct() {
            None => "O_DIRECT".to_owned(),
            Some(why) => format!("buffered I/O ({why})"),
        };
        let fixed = match file.why_not_fixed() {
            None if file.fixed_buffers() => "segment registered as fixed buffers".to_owned(),
            None => "plain READ/WRITE".to_owned(),
            Some(why) => why,
        };
        format!(
            "SSD tier {}: {} bytes, {io}, {fixed}",
            file.path().display(),
            self.capacity()
        )
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::memory::{Access, Buffer, Location, RegionSpec, Registry};

    const PAGE: u64 = 4096;
    const MIB: u64 = 1 << 20;

    /// A directory of its own for one test (removed at the end if empty).
    struct TestDir(PathBuf);

    impl TestDir {
        fn new(under_target: bool, name: &str) -> TestDir {
            let pid = std::process::id();
            let dir = if under_target {
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("target")
                    .join(format!("ssd-tier-test-{pid}-{name}"))
            } else {
                std::env::temp_dir().join(format!("kvxfer-ssd-tier-test-{pid}-{name}"))
            };
            std::fs::create_dir_all(&dir).unwrap();
            TestDir(dir)
        }

        fn files(&self) -> usize {
            std::fs::read_dir(&self.0).unwrap().count()
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(&self.0);
        }
    }

    fn segment(len: usize) -> Buffer {
        Buffer::allocate(&Arc::new(Registry::new()), len, Location::Any, Access::ALL).unwrap()
    }

    /// Opens a tier, or `None` (printing why) when io_uring is unavailable here.
    fn open(dir: &Path, capacity: u64, segment: &Buffer) -> Option<SsdTier> {
        match SsdTier::open(dir, capacity, segment.region()) {
            Ok(tier) => Some(tier),
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                println!("skipped: {e}");
                None
            }
            Err(e) => panic!("cannot open an SSD tier in {}: {e}", dir.display()),
        }
    }

    fn pattern(seed: u64, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| {
                let x = (i as u64 / 8 + seed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                (x >> (8 * (i % 8))) as u8 ^ (x >> 56) as u8
            })
            .collect()
    }

    /// Demotes objects, clears the segment, promotes them back to other places.
    fn demote_and_promote(under_target: bool) {
        let dir = TestDir::new(under_target, "round-trip");
        let seg_len = 24 * MIB as usize;
        let seg = segment(seg_len);
        let Some(tier) = open(&dir.0, 48 * MIB, &seg) else {
            return;
        };
        println!("{}", tier.describe());
        assert_eq!(tier.capacity(), 48 * MIB);
        assert!(tier.path().starts_with(&dir.0));
        assert!(tier.describe().contains(&tier.path().display().to_string()));
        let data = pattern(1, seg_len);
        seg.write_at(0, &data).unwrap();
        // (segment offset, disk offset, len): a 10 MiB object and many small ones.
        let mut objects = vec![(0, 30 * MIB, 10 * MIB)];
        for i in 0..40 {
            objects.push((10 * MIB + i * 3 * PAGE, i * 5 * PAGE, (1 + i % 3) * PAGE));
        }
        let results = tier.demote(&objects);
        assert_eq!(results.len(), objects.len());
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        seg.fill(0, seg_len, 0).unwrap();
        // Back to the segment, each object 12 MiB further on (wrapping inside the segment).
        let moved = |s: u64| (s + 12 * MIB) % (24 * MIB);
        let back: Vec<(u64, u64, u64)> =
            objects.iter().map(|&(s, d, l)| (d, moved(s), l)).collect();
        let results = tier.promote(&back);
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        let got = seg.to_vec();
        for &(s, _, l) in &objects {
            let (from, to, l) = (s as usize, moved(s) as usize, l as usize);
            assert!(
                got[to..to + l] == data[from..from + l],
                "object at segment offset {s} came back different"
            );
        }
        let path = tier.path().to_owned();
        drop(tier);
        assert!(!path.exists(), "the cache file is deleted with the tier");
    }

    #[test]
    fn round_trip_under_target() {
        demote_and_promote(true);
    }

    #[test]
    fn round_trip_in_temp_dir() {
        demote_and_promote(false);
    }

    #[test]
    fn bad_items_fail_alone() {
        let dir = TestDir::new(true, "bad-items");
        let seg = segment(16 * PAGE as usize);
        let Some(tier) = open(&dir.0, 8 * PAGE, &seg) else {
            return;
        };
        let data = pattern(2, 16 * PAGE as usize);
        seg.write_at(0, &data).unwrap();
        let results = tier.demote(&[
            (0, 0, PAGE),                // fine
            (100, PAGE, PAGE),           // segment offset not aligned
            (PAGE, 8 * PAGE, PAGE),      // past the end of the file
            (16 * PAGE, 2 * PAGE, PAGE), // past the end of the segment
            (PAGE, PAGE, 2 * PAGE),      // fine
        ]);
        let invalid =
            |r: &io::Result<()>| matches!(r, Err(e) if e.kind() == io::ErrorKind::InvalidInput);
        assert!(results[0].is_ok() && results[4].is_ok(), "{results:?}");
        assert!(results[1..4].iter().all(invalid), "{results:?}");
        seg.fill(0, 16 * PAGE as usize, 0).unwrap();
        let results = tier.promote(&[(0, 0, 3 * PAGE), (0, 3 * PAGE, 5)]);
        assert!(results[0].is_ok() && invalid(&results[1]), "{results:?}");
        let got = seg.to_vec();
        assert!(got[..3 * PAGE as usize] == data[..3 * PAGE as usize]);
        assert!(got[3 * PAGE as usize..].iter().all(|&b| b == 0));
    }

    #[test]
    fn open_refuses_bad_input_and_leaves_no_file() {
        let dir = TestDir::new(true, "refuse");
        let seg = segment(PAGE as usize);
        // A caller-memory region: nothing keeps it mapped, so no tier over it.
        let registry = Registry::new();
        let caller = registry
            .register(vec![RegionSpec::caller(
                1 << 40,
                PAGE,
                Some(Location::Any),
                Access::ALL,
            )])
            .unwrap()
            .remove(0);
        match SsdTier::open(&dir.0, PAGE, &caller) {
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                println!("skipped: {e}");
                return;
            }
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}"),
            Ok(_) => panic!("a tier over caller memory"),
        }
        assert_eq!(dir.files(), 0, "the refused tier's file is deleted");
        for capacity in [0, 100] {
            let r = SsdTier::open(&dir.0, capacity, seg.region());
            assert!(
                matches!(&r, Err(e) if e.kind() == io::ErrorKind::InvalidInput),
                "{r:?}"
            );
        }
        assert!(SsdTier::open(&dir.0.join("missing"), PAGE, seg.region()).is_err());
        // Two tiers in one directory get different files.
        let (Some(a), Some(b)) = (open(&dir.0, PAGE, &seg), open(&dir.0, PAGE, &seg)) else {
            return;
        };
        assert_ne!(a.path(), b.path());
        assert_eq!(dir.files(), 2);
        drop((a, b));
        assert_eq!(dir.files(), 0);
    }
}
