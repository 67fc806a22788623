//! Resident memory of the braid processes under test: once idle, then the
//! peak, sampled in the background while the workloads run.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// VmRSS of `pid` in KiB, if it is alive.
pub(crate) fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
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
