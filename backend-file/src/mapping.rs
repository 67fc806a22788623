//! An export's file mapped into memory a window at a time, so a large
//! READ to a client on this machine is copied once, by the kernel, from
//! the page cache straight into the socket, where reading it into a buffer
//! and sending that copies it twice. On tmpfs a writable export's windows
//! take large WRITEs the same way, from the socket straight into the file
//! (see `ExportFile::mapped_sink`).
//!
//! Windows stay mapped: mapping a range for one READ and unmapping it
//! after cost as much as the copy it saved (a C test of 1 MiB sends into a
//! unix socket from tmpfs: read and send 2635-2930 MiB/s, a mapping per
//! send 2648-2917, one mapping kept 3535-4281, and the sender's CPU per
//! MiB 338-389 -> 230-276 µs), because every page of a fresh mapping
//! faults. A kept window's page tables cost 2 MiB per GiB touched, and
//! only cached pages are touched (see `ExportFile::mapped_source`), so
//! they stay under 0.2% of the page cache the export occupies; an export
//! keeps at most [`WINDOWS_KEPT`], the least recently used going.

use braid_core::server::{MappedRange, MappedWindow};
use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// Bytes per window, and their alignment in the file. A READ that crosses
/// a window's end is not sent from a mapping.
pub(crate) const WINDOW: u64 = 1 << 30;

/// Windows an export keeps mapped.
pub(crate) const WINDOWS_KEPT: usize = 4;

/// One mapped window, unmapped when the last range in it goes.
struct Window {
    base: *mut libc::c_void,
    len: usize,
    writable: bool,
}

// SAFETY: the window is a shared mapping that only the kernel reads and
// writes (see `MappedRange` and `MappedSink`), but for the copies of
// `ExportFile::copied_into_mapping` (what overlapping WRITEs in flight
// leave there is undefined, as on any block device); its address can
// move between threads.
unsafe impl Send for Window {}
// SAFETY: as above; nothing in it changes after it is made.
unsafe impl Sync for Window {}

impl MappedWindow for Window {
    fn base(&self) -> *const u8 {
        self.base as *const u8
    }

    fn mapped_len(&self) -> usize {
        self.len
    }

    fn writable(&self) -> bool {
        self.writable
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        // SAFETY: `base` and `len` are exactly what mmap returned and took,
        // and no range refers to the window any more.
        unsafe { libc::munmap(self.base, self.len) };
    }
}

/// The windows an export keeps, least recently used first.
#[derive(Default)]
pub(crate) struct Mappings {
    kept: Mutex<Vec<(u64, Arc<Window>)>>,
    /// Set once the file refused to be mapped, so it is not asked again.
    unmappable: AtomicBool,
    /// Windows are mapped for writing too: only where WRITEs may be
    /// received into them (a writable export on tmpfs or ramfs).
    writable: bool,
}

impl std::fmt::Debug for Mappings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        write!(f, "Mappings({} windows)", kept.len())
    }
}

impl Mappings {
    /// Windows mapped for reading, and for writing too if `writable`.
    pub(crate) fn new(writable: bool) -> Mappings {
        Mappings {
            writable,
            ..Mappings::default()
        }
    }

    /// `[offset, offset + len)` of `file` (of `size` bytes) in a mapped
    /// window, mapping the window if need be; `None` if the range crosses
    /// a window's end or the file cannot be mapped.
    pub(crate) fn range(
        &self,
        file: &File,
        size: u64,
        offset: u64,
        len: u32,
    ) -> Option<MappedRange> {
        if self.unmappable.load(Ordering::Relaxed) || len == 0 {
            return None;
        }
        let index = offset / WINDOW;
        let start = index * WINDOW;
        let end = offset.checked_add(u64::from(len))?;
        if end > size || end > start + WINDOW {
            return None;
        }
        let mut kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        let window = match kept.iter().position(|(i, _)| *i == index) {
            Some(at) => {
                let entry = kept.remove(at);
                let window = entry.1.clone();
                kept.push(entry);
                window
            }
            None => {
                let window = match map(file, start, WINDOW.min(size - start), self.writable) {
                    Ok(w) => Arc::new(w),
                    Err(e) => {
                        if !self.unmappable.swap(true, Ordering::Relaxed) {
                            tracing::warn!(error = %e, "the export's file cannot be mapped: large READs to clients on this machine are read and sent");
                        }
                        return None;
                    }
                };
                if kept.len() == WINDOWS_KEPT {
                    // Unmapped once the READs sending from it are done.
                    kept.remove(0);
                }
                kept.push((index, window.clone()));
                window
            }
        };
        MappedRange::new(window, (offset - start) as usize, len as usize)
    }

    /// How many windows are mapped now.
    #[cfg(test)]
    fn windows(&self) -> usize {
        self.kept.lock().unwrap().len()
    }
}

/// Maps `len` bytes of `file` from `start` (page-aligned) for reading,
/// and for writing if `writable`.
fn map(file: &File, start: u64, len: u64, writable: bool) -> std::io::Result<Window> {
    let len = usize::try_from(len).map_err(std::io::Error::other)?;
    let offset = libc::off_t::try_from(start).map_err(std::io::Error::other)?;
    let protection = if writable {
        libc::PROT_READ | libc::PROT_WRITE
    } else {
        libc::PROT_READ
    };
    // SAFETY: a fresh shared mapping of an open file; the kernel picks the
    // address. Nothing in this process reads or writes it (see the module
    // docs), so a file shrunk under it cannot raise SIGBUS here.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            protection,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            offset,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Window {
        base,
        len,
        writable,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::fs::FileExt;
    use std::os::unix::net::UnixStream;

    /// Sends a mapped range into a socket the way the NBD face does: the
    /// kernel reads the mapping.
    fn send(range: &MappedRange, to: &UnixStream) -> std::io::Result<usize> {
        let iov = libc::iovec {
            iov_base: range.addr() as *mut libc::c_void,
            iov_len: range.len(),
        };
        // SAFETY: one iovec over a live mapping; the fd is open.
        let n = unsafe { libc::writev(to.as_raw_fd(), &iov, 1) };
        if n < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    fn file_of(dir: &std::path::Path, size: u64) -> File {
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join("f"))
            .unwrap();
        file.set_len(size).unwrap();
        file
    }

    #[test]
    fn a_range_sent_from_a_window_is_the_files_bytes_even_after_a_write() {
        let dir = tempfile::tempdir().unwrap();
        let file = file_of(dir.path(), 1 << 20);
        file.write_all_at(&[1u8; 4096], 8192).unwrap();
        let maps = Mappings::new(false);
        let range = maps.range(&file, 1 << 20, 8192, 4096).unwrap();
        let (a, mut b) = UnixStream::pair().unwrap();
        assert_eq!(send(&range, &a).unwrap(), 4096);
        let mut got = vec![0u8; 4096];
        b.read_exact(&mut got).unwrap();
        assert!(got.iter().all(|&x| x == 1));
        // A shared mapping sees writes made through the file since.
        file.write_all_at(&[2u8; 4096], 8192).unwrap();
        let again = maps.range(&file, 1 << 20, 8192, 4096).unwrap();
        assert_eq!(send(&again, &a).unwrap(), 4096);
        b.read_exact(&mut got).unwrap();
        assert!(got.iter().all(|&x| x == 2));
        assert_eq!(maps.windows(), 1, "the second range reused the window");
    }

    #[test]
    fn ranges_past_the_end_or_across_a_window_are_not_mapped() {
        let dir = tempfile::tempdir().unwrap();
        let size = WINDOW + (1 << 20);
        let file = file_of(dir.path(), size);
        let maps = Mappings::new(false);
        assert!(maps.range(&file, size, size - 4096, 8192).is_none());
        assert!(maps.range(&file, size, WINDOW - 4096, 8192).is_none());
        assert!(maps.range(&file, size, 0, 0).is_none());
        // The last window is as long as what is left of the file.
        let tail = maps.range(&file, size, WINDOW, 1 << 20).unwrap();
        assert_eq!(tail.len(), 1 << 20);
    }

    #[test]
    fn an_export_keeps_only_its_most_recently_used_windows() {
        let dir = tempfile::tempdir().unwrap();
        let size = WINDOW * (WINDOWS_KEPT as u64 + 2);
        let file = file_of(dir.path(), size);
        let maps = Mappings::new(false);
        let first = maps.range(&file, size, 0, 4096).unwrap();
        for w in 1..=WINDOWS_KEPT as u64 + 1 {
            maps.range(&file, size, w * WINDOW, 4096).unwrap();
            assert!(maps.windows() <= WINDOWS_KEPT);
        }
        assert_eq!(maps.windows(), WINDOWS_KEPT);
        // The first window left the cache but stays mapped for its range.
        let (a, mut b) = UnixStream::pair().unwrap();
        assert_eq!(send(&first, &a).unwrap(), 4096);
        let mut got = vec![9u8; 4096];
        b.read_exact(&mut got).unwrap();
        assert!(got.iter().all(|&x| x == 0));
    }

    #[test]
    fn a_file_shrunk_under_a_window_fails_the_send_instead_of_killing_the_process() {
        let dir = tempfile::tempdir().unwrap();
        let file = file_of(dir.path(), 1 << 20);
        file.write_all_at(&[3u8; 1 << 20], 0).unwrap();
        let maps = Mappings::new(false);
        let range = maps.range(&file, 1 << 20, 0, 1 << 20).unwrap();
        file.set_len(0).unwrap();
        let (a, _b) = UnixStream::pair().unwrap();
        // Nothing of the lost pages can be copied: the kernel says EFAULT
        // (a user-space read would have raised SIGBUS).
        let e = send(&range, &a).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EFAULT));
    }
}
