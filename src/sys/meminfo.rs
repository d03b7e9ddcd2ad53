//! How much memory this process can still take: `MemAvailable` from /proc/meminfo, capped
//! by the headroom under every cgroup (v2) memory limit above the process. Used to refuse
//! an allocation that would otherwise get the whole server OOM-killed when its pages are
//! faulted in.

use std::path::Path;

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

/// The smallest `memory.max - memory.current` over the process's cgroup (from the
/// /proc/self/cgroup text) and its ancestors under `root`; `None` when no limit is set.
fn cgroup_headroom(proc_cgroup: &str, root: &Path) -> Option<u64> {
    let path = proc_cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    let mut dir = root.join(path.trim().trim_start_matches('/'));
    let mut headroom: Option<u64> = None;
    while dir.starts_with(root) {
        let read = |file: &str| std::fs::read_to_string(dir.join(file)).ok();
        if let Some(max) = read("memory.max").and_then(|m| m.trim().parse::<u64>().ok()) {
            let current = read("memory.current")
                .and_then(|c| c.trim().parse::<u64>().ok())
                .unwrap_or(0);
            let room = max.saturating_sub(current);
            headroom = Some(headroom.map_or(room, |h| h.min(room)));
        }
        if !dir.pop() {
            break;
        }
    }
    headroom
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

    #[test]
    fn cgroup_headroom_is_the_tightest_limit_up_the_tree() {
        let root = std::env::temp_dir().join(format!("kvx-cgroup-{}", std::process::id()));
        let leaf = root.join("a/b");
        std::fs::create_dir_all(&leaf).unwrap();
        std::fs::write(root.join("a/memory.max"), "1000\n").unwrap();
        std::fs::write(root.join("a/memory.current"), "900\n").unwrap();
        std::fs::write(leaf.join("memory.max"), "max\n").unwrap();
        std::fs::write(leaf.join("memory.current"), "50\n").unwrap();
        assert_eq!(cgroup_headroom("0::/a/b\n", &root), Some(100));
        assert_eq!(
            cgroup_headroom("1:cpu:/x\n", &root),
            None,
            "no cgroup v2 line"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn this_machine_reports_something() {
        assert!(available_bytes().is_some_and(|b| b > 0));
    }
}
