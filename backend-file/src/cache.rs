//! Whether a file range is in the page cache, asked of the kernel with
//! `cachestat(2)` (Linux 6.5): a range that is can be sent by `sendfile`
//! without the sending thread waiting for a disk.

use std::fs::File;
use std::os::unix::io::AsRawFd;

/// `struct cachestat_range` of the kernel's uapi.
#[repr(C)]
struct Range {
    off: u64,
    len: u64,
}

/// `struct cachestat` of the kernel's uapi.
#[repr(C)]
#[derive(Default)]
struct Stat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// The same number on every architecture (new system calls share one
/// table since Linux 5.1); the libc crate names it only for some targets.
const SYS_CACHESTAT: libc::c_long = 451;

/// Whether every page of `[offset, offset + len)` is cached; `None` if the
/// kernel cannot tell (before 6.5, or a file system without a page cache).
pub(crate) fn all_cached(file: &File, offset: u64, len: u64) -> Option<bool> {
    if len == 0 {
        return Some(true);
    }
    let range = Range { off: offset, len };
    let mut stat = Stat::default();
    // SAFETY: both structs are the kernel's layout and live for the call;
    // the fd is open (borrowed from `file`).
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const Range,
            &mut stat as *mut Stat,
            0u32,
        )
    };
    if r != 0 {
        return None;
    }
    // The kernel counts whole pages touched by the range.
    // SAFETY: sysconf only reads the process's constants.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(512) as u64;
    let pages = (offset + len).div_ceil(page) - offset / page;
    Some(stat.nr_cache >= pages)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn a_range_just_written_is_cached_and_a_hole_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .unwrap();
        file.set_len(1 << 20).unwrap();
        file.write_all_at(&[7u8; 64 * 1024], 0).unwrap();
        let Some(written) = all_cached(&file, 0, 64 * 1024) else {
            return; // a kernel before cachestat: nothing to check here
        };
        assert!(written);
        assert_eq!(all_cached(&file, 100, 5000), Some(true));
        // Never written, never read: not in the cache.
        assert_eq!(all_cached(&file, 512 * 1024, 64 * 1024), Some(false));
        // Partly cached is not cached.
        assert_eq!(all_cached(&file, 32 * 1024, 64 * 1024), Some(false));
    }
}
