//! Resident memory of the braid processes under test: once idle, then the
//! peak, sampled in the background while the workloads run.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Resident KiB of `pid`, if it is alive: VmRSS less the pages of files
/// it maps shared. `braid serve` maps its exports' files that way to send
/// large READs from, and on tmpfs to receive large WRITEs into
/// (backend-file's `mapping.rs`); those pages are the page cache's, there
/// whether or not it maps them, and counted once by the kernel however
/// many processes map them. Shared memory that only looks like a file
/// (memfd, shared anonymous memory, System V segments) is counted.
pub(crate) fn rss_kib(pid: u32) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    Some(own_resident_kib(&smaps))
}

/// The sum of `Rss:` over the mappings of `smaps` that are not shared
/// mappings of a file.
fn own_resident_kib(smaps: &str) -> u64 {
    let mut counted = true;
    let mut kib = 0;
    for line in smaps.lines() {
        if let Some(rss) = line.strip_prefix("Rss:") {
            if counted {
                kib += rss
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap_or(0);
            }
            continue;
        }
        // A mapping's first line: "start-end perms offset dev inode path".
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        if range.contains('-') && range.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            let path = fields.nth(3).unwrap_or("");
            let memory = ["/memfd:", "/dev/zero", "/SYSV"]
                .iter()
                .any(|p| path.starts_with(p));
            counted = !(perms.ends_with('s') && path.starts_with('/') && !memory);
        }
    }
    kib
}

/// Samples the peak resident size of some processes until stopped.
pub(crate) struct PeakSampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<u64>>,
}

impl PeakSampler {
    pub(crate) fn start(pids: Vec<u32>) -> PeakSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = vec![0u64; pids.len()];
            while !flag.load(Ordering::Relaxed) {
                for (p, &pid) in peak.iter_mut().zip(&pids) {
                    *p = (*p).max(rss_kib(pid).unwrap_or(0));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            peak
        });
        PeakSampler { stop, thread }
    }

    /// Peak KiB per process, in the order given.
    pub(crate) fn finish(self) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::own_resident_kib;

    #[test]
    fn a_shared_file_mapping_is_not_counted_but_shared_memory_is() {
        let smaps = "\
55d0c0000000-55d0c0100000 r-xp 00000000 08:01 1234 /usr/bin/braid
Size:               1024 kB
Rss:                 800 kB
7f0000000000-7f0040000000 r--s 00000000 00:1a 99 /dev/shm/b/disk.img
Size:            1048576 kB
Rss:              809408 kB
7f1000000000-7f1000100000 rw-p 00000000 00:00 0 
Size:               1024 kB
Rss:                 900 kB
7f2000000000-7f2000010000 rw-s 00000000 00:0e 17 anon_inode:[io_uring]
Rss:                  64 kB
7f3000000000-7f3040000000 rw-s 40000000 00:1a 99 /dev/shm/b/disk.img
Rss:              524288 kB
7f4000000000-7f4000100000 rw-s 00000000 00:01 5 /memfd:staging (deleted)
Rss:                 512 kB
7f5000000000-7f5000100000 rw-s 00000000 00:01 6 /dev/zero (deleted)
Rss:                 256 kB
";
        assert_eq!(own_resident_kib(smaps), 800 + 900 + 64 + 512 + 256);
    }
}
