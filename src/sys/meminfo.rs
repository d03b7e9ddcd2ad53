//! How much memory this process can still take: `MemAvailable` from /proc/meminfo, capped
//! by the headroom under every memory cgroup limit above the process (cgroup v2, or the v1
//! memory controller). Used to refuse an allocation that would otherwise get the whole
//! server OOM-killed when its pages are faulted in.
//!
//! Headroom = limit − usage + reclaimable file cache: a server that has just read its model
//! weights has its cgroup "full" of page cache the kernel will drop to make room, and that
//! must not look like an exhausted limit. Shared memory (our own memfd buffers) stays
//! counted as used.

use std::path::{Path, PathBuf};

/// Bytes this process can still allocate, or `None` when the kernel does not say.
pub fn available_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok();
    let system = meminfo.as_deref().and_then(mem_available);
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|c| cgroup_headroom(&c, Path::new("/sys/fs/cgroup")));
    match (system, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// `MemAvailable` of a /proc/meminfo text, in bytes.
fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// The file names of one cgroup version's memory controller.
struct Files {
    limit: &'static str,
    usage: &'static str,
    /// Keys of `memory.stat` whose sum is reclaimable file cache (including children).
    reclaimable: [&'static str; 2],
}

const V2: Files = Files {
    limit: "memory.max",
    usage: "memory.current",
    reclaimable: ["inactive_file", "active_file"],
};

const V1: Files = Files {
    limit: "memory.limit_in_bytes",
    usage: "memory.usage_in_bytes",
    reclaimable: ["total_inactive_file", "total_active_file"],
};

/// The smallest headroom over the process's memory cgroup (from the /proc/self/cgroup
/// text) and its ancestors under `root`; `None` when no limit is set. The v1 memory
/// controller wins over v2 when both are listed (hybrid hosts account memory in v1).
fn cgroup_headroom(proc_cgroup: &str, root: &Path) -> Option<u64> {
    let entry = |controller: &str| {
        proc_cgroup.lines().find_map(|line| {
            let mut fields = line.splitn(3, ':');
            let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
            (controllers == controller).then(|| path.trim().trim_start_matches('/').to_owned())
        })
    };
    let (base, leaf, files) = match (entry("memory"), entry("")) {
        (Some(path), _) => (root.join("memory"), path, &V1),
        (None, Some(path)) => (root.to_path_buf(), path, &V2),
        (None, None) => return None,
    };
    let mut dir: PathBuf = base.join(leaf);
    let mut headroom: Option<u64> = None;
    while dir.starts_with(&base) {
        if let Some(room) = room_in(&dir, files) {
            headroom = Some(headroom.map_or(room, |h| h.min(room)));
        }
        if dir == base || !dir.pop() {
            break;
        }
    }
    headroom
}

/// Headroom under the limit of one cgroup directory; `None` when it sets no limit.
fn room_in(dir: &Path, files: &Files) -> Option<u64> {
    let read_u64 = |file: &str| {
        std::fs::read_to_string(dir.join(file))
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    // "max" (v2) does not parse; v1 says "no limit" with a number near i64::MAX.
    let limit = read_u64(files.limit).filter(|&l| l < (1 << 62))?;
    let usage = read_u64(files.usage).unwrap_or(0);
    let stat = std::fs::read_to_string(dir.join("memory.stat")).unwrap_or_default();
    let reclaimable: u64 = stat
        .lines()
        .filter_map(|line| line.split_once(' '))
        .filter(|(key, _)| files.reclaimable.contains(key))
        .filter_map(|(_, value)| value.trim().parse::<u64>().ok())
        .sum();
    Some(limit.saturating_sub(usage.saturating_sub(reclaimable)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_mem_available_in_bytes() {
        let text = "MemTotal:       24000000 kB\nMemFree:  1 kB\nMemAvailable:   2048 kB\n";
        assert_eq!(mem_available(text), Some(2048 * 1024));
        assert_eq!(mem_available("MemTotal: 5 kB\n"), None);
        assert_eq!(mem_available("MemAvailable: lots kB\n"), None);
    }

    /// A throw-away cgroup tree under the temp dir.
    struct Tree(PathBuf);

    impl Tree {
        fn new(name: &str) -> Tree {
            let root = std::env::temp_dir().join(format!("kvx-cg-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            Tree(root)
        }

        fn file(&self, path: &str, text: &str) -> &Self {
            let path = self.0.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
            self
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn v2_headroom_is_the_tightest_limit_up_the_tree() {
        let t = Tree::new("v2");
        t.file("a/memory.max", "1000\n")
            .file("a/memory.current", "900\n")
            .file("a/b/memory.max", "max\n")
            .file("a/b/memory.current", "50\n");
        assert_eq!(cgroup_headroom("0::/a/b\n", &t.0), Some(100));
        assert_eq!(
            cgroup_headroom("1:cpu:/x\n", &t.0),
            None,
            "no memory cgroup line"
        );
    }

    #[test]
    fn reclaimable_page_cache_counts_as_room() {
        let t = Tree::new("cache");
        t.file("srv/memory.max", "8000\n")
            .file("srv/memory.current", "7900\n")
            .file(
                "srv/memory.stat",
                "anon 500\nfile 7400\nactive_file 3000\ninactive_file 4000\nshmem 400\n",
            );
        // 7900 used, of which 7000 is droppable file cache: 8000 - 900 = 7100 of room.
        assert_eq!(cgroup_headroom("0::/srv\n", &t.0), Some(7100));
    }

    #[test]
    fn v1_memory_controller_is_read_and_its_no_limit_value_ignored() {
        let t = Tree::new("v1");
        t.file("memory/memory.limit_in_bytes", "9223372036854771712\n")
            .file("memory/job/memory.limit_in_bytes", "4096\n")
            .file("memory/job/memory.usage_in_bytes", "3072\n")
            .file(
                "memory/job/memory.stat",
                "total_inactive_file 1024\ninactive_file 1\n",
            );
        let cgroup = "4:memory:/job\n0::/\n";
        assert_eq!(cgroup_headroom(cgroup, &t.0), Some(2048));
        t.file("memory/job/memory.limit_in_bytes", "9223372036854771712\n");
        assert_eq!(cgroup_headroom(cgroup, &t.0), None, "no limit anywhere");
    }

    #[test]
    fn this_machine_reports_something() {
        assert!(available_bytes().is_some_and(|b| b > 0));
    }
}
