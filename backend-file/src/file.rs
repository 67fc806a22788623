use crate::block_crcs::BlockCrcs;
use crate::lock::{lock, LockMode};
use crate::mapping::Mappings;
use crate::streaming_copy::copy_streaming;
use braid_core::server::{
    Backend, BackendOp, Extent, IoQueue, MappedRange, MappedSink, SpliceSource,
};
use braid_core::staging::{StagedBuffer, Staging};
use braid_core::wire::Status;
use bytes::Bytes;
use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// How to open an export's file.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Create the file (sparse) with this size if it does not exist; grow
    /// a smaller existing regular file to it.
    pub create_size: Option<u64>,
    /// Refuse writes and open read-only.
    pub read_only: bool,
    /// Bypass the page cache (O_DIRECT).
    pub direct: bool,
    /// Skip the lock that keeps other processes (and other exports) off the
    /// file; only for read-only exports of files someone else may write.
    pub shared: bool,
}

/// One open export.
#[derive(Debug)]
pub struct ExportFile {
    /// Shared with replies that `sendfile` from it.
    file: Arc<File>,
    path: PathBuf,
    size: u64,
    is_block_device: bool,
    /// Set once pwritev2 with RWF_DSYNC proved unsupported here.
    no_dsync_write: AtomicBool,
    /// Set once fallocate proved unsupported here.
    no_fallocate: AtomicBool,
    /// O_DIRECT: buffers must be aligned.
    direct: bool,
    /// Set once RWF_NOWAIT proved unsupported for reads / writes here.
    no_nowait_read: AtomicBool,
    no_nowait_write: AtomicBool,
    /// On tmpfs or ramfs: the page cache is the medium, so no IO ever waits
    /// for a device. These filesystems refuse RWF_NOWAIT (EOPNOTSUPP), yet
    /// every read and write of theirs can run inline.
    memory_backed: bool,
    /// Where reads would rather land (a fabric's registered memory).
    staging: ReadBuffers,
    /// Buffered writes to a regular file take turns here. The kernel
    /// serialises them anyway (tmpfs, ext4, xfs and btrfs hold the inode
    /// lock exclusively for a buffered write), but its waiters spin on the
    /// lock while its holder copies: with four channels of 1 MiB writes,
    /// 8% of the server's CPU was `rwsem_spin_on_owner`. Waiting here
    /// sleeps instead. `None` for O_DIRECT and block devices, whose writes
    /// do run in parallel.
    write_turn: Option<Mutex<()>>,
    /// Checksums of blocks large cached reads hashed, for the next read of
    /// them. `None` for a shared export: someone else may write the file.
    crcs: Option<Arc<BlockCrcs>>,
    /// Windows of the file mapped to send large READs from. `None` for
    /// O_DIRECT exports, which promise to bypass the cache, and for files
    /// that are neither regular nor block devices (mapping `/dev/zero`
    /// maps fresh memory, not the device).
    mappings: Option<Mappings>,
    /// Ranges handed out of `mappings` to send from / receive into.
    mapped_reads: AtomicU64,
    mapped_writes: AtomicU64,
    /// WRITEs copied into the mapping once received (see
    /// [`ExportFile::try_execute_now`]).
    mapped_copies: AtomicU64,
}

/// A fabric's read buffers, if it offered any.
#[derive(Default)]
struct ReadBuffers(Option<Arc<dyn Staging>>);

impl std::fmt::Debug for ReadBuffers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "staged" } else { "heap" })
    }
}

impl ReadBuffers {
    fn buffer(&self, len: usize) -> Option<Box<dyn StagedBuffer>> {
        self.0.as_ref()?.buffer(len)
    }
}

/// Whether `file` lives on a filesystem with no device under it.
fn on_memory_filesystem(file: &File) -> bool {
    const TMPFS_MAGIC: libc::c_long = 0x0102_1994;
    const RAMFS_MAGIC: libc::c_long = 0x8584_58f6u32 as libc::c_long;
    // SAFETY: fstatfs writes into the zeroed struct we own; the fd is open.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) };
    r == 0 && matches!(st.f_type as libc::c_long, TMPFS_MAGIC | RAMFS_MAGIC)
}

/// Alignment O_DIRECT needs on every device we meet (logical block sizes
/// are 512 or 4096).
pub(crate) const DIRECT_ALIGN: usize = 4096;

/// The smallest WRITE copied into the file's mapping rather than
/// written (see [`ExportFile::try_execute_now`]): below it a `pwrite`
/// costs no more than the cache check the copy needs first.
const MAPPED_WRITE_MIN: usize = 64 << 10;

/// A zeroed buffer of `len` bytes whose start is DIRECT_ALIGN-aligned, as a
/// window into a slightly larger allocation (so it becomes `Bytes` without
/// a copy).
fn aligned(len: usize) -> (Vec<u8>, usize) {
    let v = vec![0u8; len + DIRECT_ALIGN];
    let off = v.as_ptr().align_offset(DIRECT_ALIGN);
    (v, off)
}

impl ExportFile {
    /// Opens (or creates) `path`.
    pub fn open(path: impl AsRef<Path>, opts: &OpenOptions) -> io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        let mut o = std::fs::OpenOptions::new();
        o.read(true).write(!opts.read_only);
        if opts.create_size.is_some() && !opts.read_only {
            o.create(true);
        }
        if opts.direct {
            o.custom_flags(libc::O_DIRECT);
        }
        let mut file = o.open(&path).map_err(|e| with_path(e, &path, "open"))?;
        if opts.shared && !opts.read_only {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: only a read-only export may be shared", path.display()),
            ));
        }
        if !opts.shared {
            let mode = if opts.read_only {
                LockMode::Shared
            } else {
                LockMode::Exclusive
            };
            lock(&file, &path, mode)?;
        }
        let meta = file.metadata().map_err(|e| with_path(e, &path, "stat"))?;
        let is_block_device = meta.file_type().is_block_device();
        let mut size = if is_block_device {
            file.seek(SeekFrom::End(0))
                .map_err(|e| with_path(e, &path, "size"))?
        } else {
            meta.len()
        };
        if let Some(want) = opts.create_size {
            if !is_block_device && size < want && !opts.read_only {
                // set_len makes the file sparse: no blocks until written.
                file.set_len(want)
                    .map_err(|e| with_path(e, &path, "resize"))?;
                size = want;
            }
        }
        // A regular file only: /dev/full and friends live on devtmpfs too.
        let memory_backed = meta.file_type().is_file() && on_memory_filesystem(&file);
        Ok(ExportFile {
            file: Arc::new(file),
            path,
            size,
            is_block_device,
            no_dsync_write: AtomicBool::new(false),
            no_fallocate: AtomicBool::new(false),
            direct: opts.direct,
            no_nowait_read: AtomicBool::new(false),
            no_nowait_write: AtomicBool::new(false),
            memory_backed,
            staging: ReadBuffers::default(),
            write_turn: (!opts.direct && !is_block_device).then(Mutex::default),
            crcs: (!opts.shared).then(Arc::default),
            // Writable only where WRITEs may be received into the mapping.
            mappings: (!opts.direct && (is_block_device || meta.file_type().is_file()))
                .then(|| Mappings::new(memory_backed && !opts.read_only)),
            mapped_reads: AtomicU64::new(0),
            mapped_writes: AtomicU64::new(0),
            mapped_copies: AtomicU64::new(0),
        })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Where it lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether it is a raw block device.
    pub fn is_block_device(&self) -> bool {
        self.is_block_device
    }

    pub(crate) fn is_direct(&self) -> bool {
        self.direct
    }

    pub(crate) fn is_memory_backed(&self) -> bool {
        self.memory_backed
    }

    pub(crate) fn raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }

    pub(crate) fn staged_buffer(&self, len: usize) -> Option<Box<dyn StagedBuffer>> {
        self.staging.buffer(len)
    }

    fn read(&self, offset: u64, len: u32) -> io::Result<Bytes> {
        let len = len as usize;
        if self.direct {
            let (mut v, off) = aligned(len);
            self.file.read_exact_at(&mut v[off..off + len], offset)?;
            return Ok(Bytes::from(v).slice(off..off + len));
        }
        if let Some(mut buf) = self.staging.buffer(len) {
            read_exact(&self.file, buf.bytes_mut(), offset)?;
            return Ok(buf.into_bytes());
        }
        read_fresh(&self.file, len, offset).map(Bytes::from)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        if self.direct && data.as_ptr().align_offset(DIRECT_ALIGN) != 0 {
            // Network buffers are not aligned; O_DIRECT needs them to be.
            let (mut v, off) = aligned(data.len());
            v[off..off + data.len()].copy_from_slice(data);
            return self.write_buffer(offset, &v[off..off + data.len()], fua);
        }
        self.write_buffer(offset, data, fua)
    }

    fn write_buffer(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        if fua && !self.no_dsync_write.load(Ordering::Relaxed) {
            match pwrite_dsync(&self.file, data, offset) {
                Ok(()) => return Ok(()),
                Err(e) if unsupported(&e) => self.no_dsync_write.store(true, Ordering::Relaxed),
                Err(e) => return Err(e),
            }
        }
        {
            // Not held through a sync: other writes need not wait for it.
            let _turn = self
                .write_turn
                .as_ref()
                .map(|turn| turn.lock().unwrap_or_else(PoisonError::into_inner));
            self.file.write_all_at(data, offset)?;
        }
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn zero(
        &self,
        offset: u64,
        len: u32,
        punch: bool,
        fua: bool,
        fast_only: bool,
    ) -> io::Result<()> {
        let mode = if punch {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        let mut done = false;
        if !self.no_fallocate.load(Ordering::Relaxed) {
            match fallocate(&self.file, mode, offset, u64::from(len)) {
                Ok(()) => done = true,
                Err(e) if unsupported(&e) => {
                    // Try the other mode once before giving up on fallocate.
                    let other = mode ^ (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE);
                    match fallocate(&self.file, other, offset, u64::from(len)) {
                        Ok(()) => done = true,
                        Err(e) if unsupported(&e) => {
                            self.no_fallocate.store(true, Ordering::Relaxed)
                        }
                        Err(e) => return Err(e),
                    }
                }
                Err(e) => return Err(e),
            }
        }
        if !done && fast_only {
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        if !done {
            const CHUNK: usize = 1 << 20;
            let (zeroes, off) = aligned(CHUNK.min(len as usize));
            let zeroes = &zeroes[off..off + CHUNK.min(len as usize)];
            let mut at = 0usize;
            while at < len as usize {
                let n = zeroes.len().min(len as usize - at);
                self.file.write_all_at(&zeroes[..n], offset + at as u64)?;
                at += n;
            }
        }
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    /// The file to `sendfile` `[offset, offset + len)` from, if every page
    /// of it is cached now (always, on tmpfs): the kernel then sends the
    /// page cache's own pages, with no copy through this process. Not for
    /// O_DIRECT exports, which promise to bypass the cache, nor where the
    /// kernel cannot tell (before Linux 6.5): a miss would block the loop.
    pub fn splice_source(&self, offset: u64, len: u32) -> Option<SpliceSource> {
        let end = offset.checked_add(u64::from(len))?;
        if self.direct || end > self.size {
            return None;
        }
        let cached =
            self.memory_backed || crate::cache::all_cached(&self.file, offset, u64::from(len))?;
        cached.then(|| SpliceSource {
            file: self.file.clone(),
            offset,
        })
    }

    /// `[offset, offset + len)` mapped, if the kernel says every page of
    /// it is cached now: an uncached range is read faster by one `pread`,
    /// with the kernel's readahead, than by the mapping's page faults. On
    /// tmpfs too, unlike [`ExportFile::splice_source`]: there a page
    /// faulted in through a mapping is allocated, where `pread` of a hole
    /// returns zeroes and allocates nothing, so a sparse export read
    /// through its mapping would fill the machine's memory.
    pub fn mapped_source(&self, offset: u64, len: u32) -> Option<MappedRange> {
        let range = self.mapped_if_cached(offset, len)?;
        self.mapped_reads.fetch_add(1, Ordering::Relaxed);
        Some(range)
    }

    /// `[offset, offset + len)` in a mapped window, if it lies in the
    /// export and the kernel says every page of it is cached now.
    fn mapped_if_cached(&self, offset: u64, len: u32) -> Option<MappedRange> {
        let mappings = self.mappings.as_ref()?;
        let end = offset.checked_add(u64::from(len))?;
        if end > self.size || !crate::cache::all_cached(&self.file, offset, u64::from(len))? {
            return None;
        }
        mappings.range(&self.file, self.size, offset, len)
    }

    /// `[offset, offset + len)` mapped for a WRITE's payload to be received
    /// straight into, on tmpfs or ramfs only, and only where every page is
    /// in memory already: writing such a page through the mapping neither
    /// waits nor allocates. On a disk's filesystem a write fault may wait
    /// (a page under writeback, dirty throttling, a block to allocate) on
    /// the connection's own thread, where `pwritev2` with RWF_NOWAIT says
    /// so and the write goes to the pool. On tmpfs a hole's page would be
    /// allocated by the fault, and a full filesystem would show only as a
    /// failed copy. Checksums kept of the range go now, and again once the
    /// sink is dropped.
    pub fn mapped_sink(&self, offset: u64, len: u32) -> Option<MappedSink> {
        if !self.memory_backed {
            return None;
        }
        let range = self.mapped_if_cached(offset, len)?;
        let crcs = self.crcs.clone();
        let changing = move || {
            if let Some(crcs) = &crcs {
                crcs.changing(offset, u64::from(len));
            }
        };
        let sink = MappedSink::new(range, Box::new(changing.clone()))?;
        changing();
        self.mapped_writes.fetch_add(1, Ordering::Relaxed);
        Some(sink)
    }

    /// How many WRITEs were copied into the mapping once received (see
    /// [`ExportFile::try_execute_now`]).
    pub fn mapped_copies(&self) -> u64 {
        self.mapped_copies.load(Ordering::Relaxed)
    }

    /// How many ranges were handed out to send READs from and to receive
    /// WRITEs into (see [`ExportFile::mapped_source`] and
    /// [`ExportFile::mapped_sink`]).
    pub fn mapped_transfers(&self) -> (u64, u64) {
        (
            self.mapped_reads.load(Ordering::Relaxed),
            self.mapped_writes.load(Ordering::Relaxed),
        )
    }

    /// Performs `op` if the kernel can do it without blocking: a buffered
    /// read whose data is all in the page cache, or a buffered write that
    /// needs no writeback throttling (`RWF_NOWAIT`). `None`: use
    /// [`ExportFile::execute`] on a thread that may block.
    pub fn try_execute_now(&self, op: &BackendOp) -> Option<io::Result<Bytes>> {
        // O_DIRECT IO waits for the device even with RWF_NOWAIT. A cached
        // READ of any size is read here, on the thread that sends it: the
        // data is still in this core's cache when the socket copies it
        // (1 MiB sequential reads at QD8 on tmpfs: over NBD on a unix
        // socket 2452-2553 -> 2924-2951 IOPS and server CPU 443-460 ->
        // 335 us per IO; over braid's protocol 2688-3005 -> 3124-3127 MiB/s,
        // server CPU -19%; over NBD on TCP no change). A WRITE of any size
        // too, for the same reason: its data was just received (and
        // checksummed) on this thread. Callers that would rather go on
        // receiving meanwhile keep large writes for the pool themselves
        // (the NBD face does).
        // Nothing on tmpfs waits for a device: FLUSH, TRIM and zeroing are
        // page-cache operations there too.
        let data_op = matches!(op, BackendOp::Read { .. } | BackendOp::Write { .. });
        if self.direct || !(data_op || self.memory_backed) {
            return None;
        }
        if self.memory_backed {
            if let BackendOp::Write {
                offset,
                data,
                fua: false,
            } = op
            {
                if self.copied_into_mapping(*offset, data) {
                    return Some(Ok(Bytes::new()));
                }
            }
            return Some(self.execute(op));
        }

        let (result, unsupported_flag) = match op {
            BackendOp::Read { offset, len } if !self.no_nowait_read.load(Ordering::Relaxed) => {
                let r = match self.staging.buffer(*len as usize) {
                    Some(mut staged) => pread_nowait(&self.file, staged.bytes_mut(), *offset)
                        .map(|n| (n, ReadBuf::Staged(staged))),
                    // Not zeroed first: a read may be as large as a payload.
                    None => pread_nowait_fresh(&self.file, *len as usize, *offset)
                        .map(|v| (v.len(), ReadBuf::Heap(v))),
                };
                match r {
                    // Partly cached: the pool redoes the whole read.
                    Ok((n, buf)) if n == *len as usize => return Some(Ok(buf.into_bytes())),
                    Ok(_) => return None,
                    Err(e) => (e, &self.no_nowait_read),
                }
            }
            BackendOp::Write {
                offset,
                data,
                fua: false,
            } if !self.no_nowait_write.load(Ordering::Relaxed) => {
                self.changing(op);
                let written = pwrite_nowait(&self.file, data, *offset);
                self.changing(op);
                match written {
                    Ok(n) if n == data.len() => return Some(Ok(Bytes::new())),
                    // A short write: the pool writes it all again (same data).
                    Ok(_) => return None,
                    Err(e) => (e, &self.no_nowait_write),
                }
            }
            _ => return None,
        };
        if result.raw_os_error() == Some(libc::EAGAIN) {
            return None;
        }
        if unsupported(&result) {
            unsupported_flag.store(true, Ordering::Relaxed);
            return None;
        }
        Some(Err(result))
    }

    /// Copies a large WRITE's payload, already received and checked, into
    /// the export's mapping instead of `pwrite`-ing it: on tmpfs or ramfs
    /// only, and only where every page is in memory already (see
    /// [`ExportFile::mapped_sink`]: such a copy neither waits nor
    /// allocates). The copy skips the `pwrite` path's per-page lookups and
    /// locks: in a C test on tmpfs, 1 MiB from a buffer in cache into a
    /// mapping whose pages were mapped before took 96-145 µs, a `pwrite`
    /// 246-253 µs (`process_vm_writev` into the mapping, which would leave
    /// the copy to the kernel, 226-284). Its stores bypass the cache
    /// ([`copy_streaming`]): the destination is seldom in it, and is not
    /// read again soon. Whether it did.
    ///
    /// Unlike every other use of the mapping, this process writes it
    /// itself, so a file cut short under it would end the daemon with
    /// SIGBUS where a system call returns EFAULT. A writable export is
    /// never `shared`: braid holds its file's lock (`lock.rs`), so only a
    /// process that ignores the lock could cut it short, in the moment
    /// between the check of its pages here and the copy.
    fn copied_into_mapping(&self, offset: u64, data: &[u8]) -> bool {
        if data.len() < MAPPED_WRITE_MIN {
            return false;
        }
        let Ok(len) = u32::try_from(data.len()) else {
            return false;
        };
        // Writable only where WRITEs may go into it (tmpfs or ramfs).
        let Some(sink) = self
            .mapped_if_cached(offset, len)
            .and_then(|range| MappedSink::new(range, Box::new(|| ())))
        else {
            return false;
        };
        self.changing_range(offset, u64::from(len));
        // SAFETY: the range lies in a writable shared mapping of the file
        // that stays mapped while `sink` holds its window, and is `len`
        // bytes long; every page is in memory, so the copy cannot fault on
        // a page to allocate (which would SIGBUS on a full tmpfs). Other
        // writers of the same bytes (an overlapping WRITE in flight) leave
        // them undefined, as a block device does.
        unsafe { copy_streaming(sink.addr(), data) };
        self.changing_range(offset, u64::from(len));
        self.mapped_copies.fetch_add(1, Ordering::Relaxed);
        true
    }

    fn changing_range(&self, offset: u64, len: u64) {
        if let Some(crcs) = &self.crcs {
            crcs.changing(offset, len);
        }
    }

    /// The payload checksum of `len` bytes from `offset`, for a reply that
    /// leaves by `sendfile` (see [`ExportFile::splice_source`]): combined
    /// from the blocks' checksums where an earlier read kept them, the rest
    /// read and hashed.
    pub fn payload_crc(&self, offset: u64, len: u32) -> io::Result<u32> {
        match &self.crcs {
            Some(crcs) => crcs.checksum(&self.file, offset, len),
            None => BlockCrcs::read_and_hash(&self.file, offset, len),
        }
    }

    /// How many 4 KiB blocks of file replies were not read for their
    /// checksum, because one was kept (see [`ExportFile::payload_crc`]).
    pub fn checksums_reused(&self) -> u64 {
        self.crcs.as_deref().map_or(0, BlockCrcs::reused)
    }

    /// Call before and after `op` changes the file: checksums kept of its
    /// range go.
    pub(crate) fn changing(&self, op: &BackendOp) {
        if let Some((offset, len)) = changed_range(op) {
            self.changing_range(offset, len);
        }
    }

    /// Performs one operation.
    pub fn execute(&self, op: &BackendOp) -> io::Result<Bytes> {
        self.changing(op);
        let result = self.execute_unmarked(op);
        self.changing(op);
        result
    }

    fn execute_unmarked(&self, op: &BackendOp) -> io::Result<Bytes> {
        match op {
            BackendOp::Read { offset, len } => self.read(*offset, *len),
            BackendOp::Write { offset, data, fua } => {
                self.write(*offset, data, *fua).map(|_| Bytes::new())
            }
            BackendOp::Flush => self.file.sync_data().map(|_| Bytes::new()),
            BackendOp::Trim { offset, len, fua } => self
                .zero(*offset, *len, true, *fua, false)
                .map(|_| Bytes::new()),
            BackendOp::WriteZeroes {
                offset,
                len,
                fua,
                may_unmap,
                fast_only,
            } => self
                .zero(*offset, *len, *may_unmap, *fua, *fast_only)
                .map(|_| Bytes::new()),
        }
    }
}

impl ExportFile {
    /// Holes and data in `[offset, offset + len)` from `SEEK_DATA` and
    /// `SEEK_HOLE`. Block devices and filesystems without them report all
    /// data, which is what the kernel's generic fallback answers anyway.
    pub fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return Ok(Vec::new());
        }
        if self.is_block_device {
            return Ok(vec![Extent {
                len: end - offset,
                hole: false,
            }]);
        }
        let mut extents: Vec<Extent> = Vec::new();
        let mut at = offset;
        while at < end {
            let data = match lseek(&self.file, at, libc::SEEK_DATA) {
                Ok(d) => d.min(end),
                // No data from here to EOF.
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => end,
                Err(e) if unsupported(&e) => {
                    push_extent(&mut extents, end - at, false);
                    break;
                }
                Err(e) => return Err(e),
            };
            if data > at {
                push_extent(&mut extents, data - at, true);
                at = data;
                continue;
            }
            let hole = match lseek(&self.file, at, libc::SEEK_HOLE) {
                Ok(h) => h.min(end),
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => end,
                Err(e) => return Err(e),
            };
            // SEEK_HOLE never returns `at` itself here (SEEK_DATA just said
            // `at` is data), but guard against a racing punch all the same.
            let next = hole.max(at + 1).min(end);
            push_extent(&mut extents, next - at, false);
            at = next;
        }
        Ok(extents)
    }
}

fn push_extent(extents: &mut Vec<Extent>, len: u64, hole: bool) {
    match extents.last_mut() {
        Some(last) if last.hole == hole => last.len += len,
        _ => extents.push(Extent { len, hole }),
    }
}

fn lseek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<u64> {
    // SAFETY: plain syscall on a borrowed, open fd; no memory is passed.
    let r = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

fn with_path(e: io::Error, path: &Path, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL)
    )
}

fn pwrite_dsync(file: &File, data: &[u8], offset: u64) -> io::Result<()> {
    let mut written = 0usize;
    while written < data.len() {
        let rest = &data[written..];
        let iov = libc::iovec {
            iov_base: rest.as_ptr() as *mut libc::c_void,
            iov_len: rest.len(),
        };
        // SAFETY: iov points into `data`, which outlives the call; the fd is
        // open for the duration (borrowed from `file`).
        let n = unsafe {
            libc::pwritev2(
                file.as_raw_fd(),
                &iov,
                1,
                (offset + written as u64) as libc::off_t,
                libc::RWF_DSYNC,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "pwritev2 wrote nothing",
            ));
        }
        written += n as usize;
    }
    Ok(())
}

/// `len` bytes at `offset` into a new buffer that is never zeroed first:
/// for a 1 MiB read the memset cost as much as the copy itself.
/// A read's destination: a fabric's staged buffer or the heap.
enum ReadBuf {
    Staged(Box<dyn StagedBuffer>),
    Heap(Vec<u8>),
}

impl ReadBuf {
    fn into_bytes(self) -> Bytes {
        match self {
            ReadBuf::Staged(b) => b.into_bytes(),
            ReadBuf::Heap(v) => Bytes::from(v),
        }
    }
}

/// Fills `buf` from `offset`; the error names where a short file ended.
fn read_exact(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    file.read_exact_at(buf, offset).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            io::Error::new(
                e.kind(),
                format!(
                    "read of {} bytes at offset {offset} ran past the end",
                    buf.len()
                ),
            )
        } else {
            e
        }
    })
}

fn read_fresh(file: &File, len: usize, offset: u64) -> io::Result<Vec<u8>> {
    let mut buf: Vec<u8> = Vec::with_capacity(len);
    while buf.len() < len {
        let done = buf.len();
        let spare = buf.spare_capacity_mut();
        let n = retry_eintr(|| {
            // SAFETY: pread writes at most `spare.len()` bytes into the
            // vector's unused capacity, which it owns; the fd is open.
            unsafe {
                libc::pread(
                    file.as_raw_fd(),
                    spare.as_mut_ptr() as *mut libc::c_void,
                    spare.len(),
                    (offset + done as u64) as libc::off_t,
                )
            }
        })?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("read of {len} bytes at offset {offset} ended after {done}"),
            ));
        }
        // SAFETY: pread initialised the next `n` bytes.
        unsafe { buf.set_len(done + n) };
    }
    Ok(buf)
}

/// `preadv2` with RWF_NOWAIT into `len` bytes at `dst`: EAGAIN rather
/// than wait for the disk.
///
/// # Safety
/// `dst` must be valid for writes of `len` bytes, and not read or written
/// by anything else during the call.
unsafe fn preadv2_nowait(file: &File, dst: *mut u8, len: usize, offset: u64) -> io::Result<usize> {
    let iov = libc::iovec {
        iov_base: dst as *mut libc::c_void,
        iov_len: len,
    };
    retry_eintr(|| {
        // SAFETY: iov is valid as the caller promised; the fd is open
        // (borrowed from `file`).
        unsafe {
            libc::preadv2(
                file.as_raw_fd(),
                &iov,
                1,
                offset as libc::off_t,
                libc::RWF_NOWAIT,
            )
        }
    })
}

/// [`preadv2_nowait`] into `buf`.
fn pread_nowait(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    // SAFETY: `buf` is exclusively borrowed for the call.
    unsafe { preadv2_nowait(file, buf.as_mut_ptr(), buf.len(), offset) }
}

/// [`preadv2_nowait`] into a fresh buffer of up to `len` bytes, not zeroed
/// first: the vector holds what was read.
fn pread_nowait_fresh(file: &File, len: usize, offset: u64) -> io::Result<Vec<u8>> {
    let mut buf: Vec<u8> = Vec::with_capacity(len);
    // SAFETY: the vector's unused capacity is its own, `len` bytes long.
    let n = unsafe { preadv2_nowait(file, buf.as_mut_ptr(), len, offset)? };
    // SAFETY: preadv2 initialised the first `n` (<= len) bytes.
    unsafe { buf.set_len(n) };
    Ok(buf)
}

/// The bytes `op` may change, as (offset, length).
fn changed_range(op: &BackendOp) -> Option<(u64, u64)> {
    match op {
        BackendOp::Write { offset, data, .. } => Some((*offset, data.len() as u64)),
        BackendOp::Trim { offset, len, .. } | BackendOp::WriteZeroes { offset, len, .. } => {
            Some((*offset, u64::from(*len)))
        }
        BackendOp::Read { .. } | BackendOp::Flush => None,
    }
}

/// `pwritev2` with RWF_NOWAIT: EAGAIN rather than wait for writeback.
fn pwrite_nowait(file: &File, data: &[u8], offset: u64) -> io::Result<usize> {
    // The kernel only reads through this iovec; iovec has no const form.
    let iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    retry_eintr(|| {
        // SAFETY: iov points into `data`, valid for the call; the fd is open.
        unsafe {
            libc::pwritev2(
                file.as_raw_fd(),
                &iov,
                1,
                offset as libc::off_t,
                libc::RWF_NOWAIT,
            )
        }
    })
}

fn retry_eintr(mut call: impl FnMut() -> isize) -> io::Result<usize> {
    loop {
        let n = call();
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    loop {
        // SAFETY: plain syscall on a borrowed, open fd; no memory is passed.
        let r = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Maps an OS error to the status a client sees.
fn status_of(e: &io::Error) -> Status {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => Status::NoSpace,
        Some(libc::EFBIG) => Status::NoSpace,
        Some(libc::EROFS) | Some(libc::EBADF) => Status::ReadOnly,
        Some(libc::EOPNOTSUPP) => Status::Unsupported,
        _ => Status::Io,
    }
}

/// How operations that may wait for a device are run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoEngine {
    /// On a pool of threads, one blocked per operation.
    #[default]
    Threads,
    /// On io_uring, started and collected by the driver loop (the pool
    /// where io_uring is unavailable, and for zeroing and TRIM).
    Uring,
}

/// Every export of a server.
#[derive(Debug)]
pub struct FileBackend {
    /// Shared with the io_uring queues, which keep the files open while
    /// their operations are in flight.
    exports: Arc<[ExportFile]>,
    engine: IoEngine,
    /// Set once io_uring proved unavailable, so it is reported once.
    no_uring: AtomicBool,
    /// Operations its io_uring queues started.
    ring_ops: Arc<AtomicU64>,
}

impl FileBackend {
    /// A backend over these files, in the order of the server's exports.
    pub fn new(exports: Vec<ExportFile>) -> Self {
        FileBackend {
            exports: exports.into(),
            engine: IoEngine::default(),
            no_uring: AtomicBool::new(false),
            ring_ops: Arc::default(),
        }
    }

    /// Runs operations that may wait for a device on `engine`.
    pub fn with_io_engine(mut self, engine: IoEngine) -> Self {
        self.engine = engine;
        self
    }

    /// Reads (not O_DIRECT ones, which keep their aligned heap buffers)
    /// land in `staging` while it has room: an RDMA listener's registered
    /// memory, from which their data is placed without a copy.
    pub fn with_read_staging(mut self, staging: Arc<dyn Staging>) -> Self {
        let exports = Arc::get_mut(&mut self.exports)
            .expect("read staging is set before the backend is shared");
        for e in exports {
            e.staging = ReadBuffers(Some(staging.clone()));
        }
        self
    }

    /// What runs operations that may wait for a device: "uring",
    /// "threads", or "threads (io_uring refused)" when the kernel said no.
    pub fn io_engine_in_use(&self) -> &'static str {
        match self.engine {
            IoEngine::Threads => "threads",
            IoEngine::Uring if self.no_uring.load(Ordering::Relaxed) => {
                "threads (io_uring refused)"
            }
            IoEngine::Uring => "uring",
        }
    }

    /// How many operations went to io_uring (see [`IoEngine::Uring`]).
    pub fn ops_on_io_uring(&self) -> u64 {
        self.ring_ops.load(Ordering::Relaxed)
    }

    /// Blocks of file replies whose kept checksum spared reading them, over
    /// every export.
    pub fn checksums_reused(&self) -> u64 {
        self.exports.iter().map(ExportFile::checksums_reused).sum()
    }

    /// READs sent from and WRITEs received into the exports' mappings,
    /// over every export.
    pub fn mapped_transfers(&self) -> (u64, u64) {
        self.exports
            .iter()
            .map(ExportFile::mapped_transfers)
            .fold((0, 0), |(r, w), (er, ew)| (r + er, w + ew))
    }

    /// WRITEs copied into the exports' mappings once received, over every
    /// export.
    pub fn mapped_copies(&self) -> u64 {
        self.exports.iter().map(ExportFile::mapped_copies).sum()
    }

    /// The exports.
    pub fn exports(&self) -> &[ExportFile] {
        &self.exports
    }
}

impl Backend for FileBackend {
    fn execute(&self, export: usize, op: &BackendOp) -> Result<Bytes, Status> {
        let Some(f) = self.exports.get(export) else {
            return Err(Status::Invalid);
        };
        f.execute(op).map_err(|e| failed(f, op, &e))
    }

    fn try_execute_now(&self, export: usize, op: &BackendOp) -> Option<Result<Bytes, Status>> {
        let f = self.exports.get(export)?;
        Some(f.try_execute_now(op)?.map_err(|e| failed(f, op, &e)))
    }

    fn splice_source(&self, export: usize, offset: u64, len: u32) -> Option<SpliceSource> {
        self.exports.get(export)?.splice_source(offset, len)
    }

    fn payload_crc(&self, export: usize, offset: u64, len: u32) -> Option<u32> {
        self.exports.get(export)?.payload_crc(offset, len).ok()
    }

    fn mapped_source(&self, export: usize, offset: u64, len: u32) -> Option<MappedRange> {
        self.exports.get(export)?.mapped_source(offset, len)
    }

    fn mapped_sink(&self, export: usize, offset: u64, len: u32) -> Option<MappedSink> {
        self.exports.get(export)?.mapped_sink(offset, len)
    }

    fn io_queue_takes(&self, export: usize, op: &BackendOp) -> bool {
        self.engine == IoEngine::Uring
            && !self.no_uring.load(Ordering::Relaxed)
            && self
                .exports
                .get(export)
                .is_some_and(|f| crate::queue::takes(f, op))
    }

    fn io_queue(&self) -> Option<Box<dyn IoQueue>> {
        if self.engine != IoEngine::Uring || self.no_uring.load(Ordering::Relaxed) {
            return None;
        }
        match crate::queue::FileQueue::new(self.exports.clone(), self.ring_ops.clone()) {
            Ok(q) => Some(Box::new(q)),
            Err(e) => {
                if !self.no_uring.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "io_uring unavailable: operations that may wait for a device run on threads");
                }
                None
            }
        }
    }

    fn allocation(&self, export: usize, offset: u64, len: u64) -> Result<Vec<Extent>, Status> {
        let Some(f) = self.exports.get(export) else {
            return Err(Status::Invalid);
        };
        f.allocation(offset, len).map_err(|e| {
            tracing::warn!(export = %f.path.display(), offset, len, error = %e, "allocation map failed");
            status_of(&e)
        })
    }
}

pub(crate) fn failed(f: &ExportFile, op: &BackendOp, e: &io::Error) -> Status {
    let status = status_of(e);
    tracing::warn!(export = %f.path.display(), ?op, error = %e, ?status, "backend operation failed");
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    fn export(size: u64) -> (tempfile::TempDir, ExportFile) {
        let dir = tempfile::tempdir().unwrap();
        let f = ExportFile::open(
            dir.path().join("disk"),
            &OpenOptions {
                create_size: Some(size),
                ..Default::default()
            },
        )
        .unwrap();
        (dir, f)
    }

    #[test]
    fn kept_checksums_follow_every_change_to_the_file() {
        let (_dir, f) = export(1 << 20);
        let whole = || {
            let bytes = f
                .execute(&BackendOp::Read {
                    offset: 0,
                    len: 1 << 20,
                })
                .unwrap();
            let mut crc = braid_core::wire::PayloadCrc::new();
            crc.update(&bytes);
            crc.finish()
        };
        assert_eq!(f.payload_crc(0, 1 << 20).unwrap(), whole());
        let block = Bytes::from(vec![0xA5; 8192]);
        let changes = [
            BackendOp::Write {
                offset: 4096,
                data: block.clone(),
                fua: false,
            },
            BackendOp::Write {
                offset: 65536,
                data: block.clone(),
                fua: true,
            },
            BackendOp::Trim {
                offset: 4096,
                len: 4096,
                fua: false,
            },
            BackendOp::WriteZeroes {
                offset: 65536,
                len: 4096,
                fua: false,
                may_unmap: false,
                fast_only: false,
            },
        ];
        for op in &changes {
            f.execute(op).unwrap();
            assert_eq!(f.payload_crc(0, 1 << 20).unwrap(), whole(), "after {op:?}");
        }
        // The inline path, where the kernel takes the write at once.
        let now = BackendOp::Write {
            offset: 8192,
            data: Bytes::from(vec![0x3C; 4096]),
            fua: false,
        };
        if let Some(done) = f.try_execute_now(&now) {
            done.unwrap();
            assert_eq!(f.payload_crc(0, 1 << 20).unwrap(), whole(), "inline");
        }
    }

    #[test]
    fn only_a_cached_range_inside_the_export_is_offered_to_sendfile() {
        let (dir, f) = export(4 << 20);
        f.execute(&BackendOp::Write {
            offset: 0,
            data: Bytes::from(vec![9u8; 1 << 20]),
            fua: false,
        })
        .unwrap();
        let src = f.splice_source(4096, 512 << 10);
        if f.memory_backed || crate::cache::all_cached(&f.file, 0, 4096).is_some() {
            let src = src.expect("just written, so cached");
            assert_eq!(src.offset, 4096);
            assert!(Arc::ptr_eq(&src.file, &f.file));
        } else {
            assert!(src.is_none(), "the kernel cannot tell: never offered");
        }
        assert!(
            f.splice_source((4 << 20) - 4096, 8192).is_none(),
            "past the end"
        );
        assert!(f.splice_source(u64::MAX - 10, 100).is_none(), "overflowing");
        if !f.memory_backed {
            // Sparse and never touched: reading it would wait for the disk
            // (or at least for a page to be made).
            assert!(f.splice_source(3 << 20, 64 << 10).is_none());
        }
        drop(dir);
    }

    #[test]
    fn a_fresh_buffer_read_holds_the_bytes_and_stops_at_the_end() {
        let (dir, f) = export(1 << 20);
        let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i * 7 % 251) as u8).collect();
        f.execute(&BackendOp::Write {
            offset: 0,
            data: Bytes::from(data.clone()),
            fua: false,
        })
        .unwrap();
        // Never zeroed first: every byte must come from the file.
        let read = read_fresh(&f.file, 1 << 20, 0).unwrap();
        assert_eq!(read, data);
        assert_eq!(read_fresh(&f.file, 4096, 4096).unwrap(), &data[4096..8192]);
        let past = read_fresh(&f.file, 8192, (1 << 20) - 4096).unwrap_err();
        assert_eq!(past.kind(), io::ErrorKind::UnexpectedEof);
        assert!(past.to_string().contains("ended after 4096"), "{past}");
        drop(dir);
    }

    #[test]
    fn creates_a_sparse_file_of_the_asked_size() {
        use std::os::unix::fs::MetadataExt;
        let (dir, f) = export(1 << 30);
        assert_eq!(f.size(), 1 << 30);
        let meta = std::fs::metadata(dir.path().join("disk")).unwrap();
        assert!(meta.blocks() * 512 < 1 << 20, "sparse: no blocks allocated");
    }

    #[test]
    fn allocation_reports_holes_and_data_of_a_sparse_file() {
        let (_dir, f) = export(1 << 20);
        assert_eq!(
            f.allocation(0, 1 << 20).unwrap(),
            vec![Extent {
                len: 1 << 20,
                hole: true
            }]
        );
        f.execute(&BackendOp::Write {
            offset: 256 << 10,
            data: Bytes::from(vec![1u8; 64 << 10]),
            fua: false,
        })
        .unwrap();
        let map = f.allocation(0, 1 << 20).unwrap();
        assert_eq!(map.iter().map(|e| e.len).sum::<u64>(), 1 << 20);
        let data: Vec<_> = map.iter().filter(|e| !e.hole).collect();
        assert_eq!(data.len(), 1, "one data run in {map:?}");
        // The filesystem may round the data run out to its block size.
        let start: u64 = map.iter().take_while(|e| e.hole).map(|e| e.len).sum();
        assert!(
            start <= 256 << 10 && start + data[0].len >= 320 << 10,
            "{map:?}"
        );
        // A window inside the data run is all data; past the end is nothing.
        assert_eq!(
            f.allocation(260 << 10, 4096).unwrap(),
            vec![Extent {
                len: 4096,
                hole: false
            }]
        );
        assert!(f.allocation(1 << 20, 4096).unwrap().is_empty());
        // Trim makes it a hole again.
        f.execute(&BackendOp::Trim {
            offset: 256 << 10,
            len: 64 << 10,
            fua: false,
        })
        .unwrap();
        assert!(f.allocation(0, 1 << 20).unwrap().iter().all(|e| e.hole));
    }

    #[test]
    fn on_tmpfs_every_small_operation_and_every_read_runs_inline() {
        let dir = std::path::Path::new("/dev/shm");
        let probe = tempfile::tempdir_in(dir);
        let Ok(probe) = probe else {
            eprintln!("skipping: no /dev/shm");
            return;
        };
        let path = probe.path().join("disk");
        let f = ExportFile::open(
            &path,
            &OpenOptions {
                create_size: Some(1 << 20),
                ..Default::default()
            },
        )
        .unwrap();
        if !on_memory_filesystem(&f.file) {
            eprintln!("skipping: /dev/shm is not tmpfs here");
            return;
        }
        let write = BackendOp::Write {
            offset: 4096,
            data: Bytes::from(vec![9u8; 4096]),
            fua: true,
        };
        assert!(f.try_execute_now(&write).unwrap().is_ok());
        let read = BackendOp::Read {
            offset: 4096,
            len: 4096,
        };
        assert_eq!(
            &f.try_execute_now(&read).unwrap().unwrap()[..],
            &[9u8; 4096][..]
        );
        assert!(f.try_execute_now(&BackendOp::Flush).unwrap().is_ok());
        // Large reads and writes alike are done where they arrive.
        let big_write = BackendOp::Write {
            offset: 0,
            data: Bytes::from(vec![5u8; 1 << 20]),
            fua: false,
        };
        assert!(f.try_execute_now(&big_write).unwrap().is_ok());
        let big_read = BackendOp::Read {
            offset: 0,
            len: 1 << 20,
        };
        let read = f.try_execute_now(&big_read).unwrap().unwrap();
        assert!(read.iter().all(|b| *b == 5));
    }

    /// A cached read of a whole payload on an ordinary file is done with
    /// RWF_NOWAIT into a buffer that was never zeroed: every byte must be
    /// the file's.
    #[test]
    fn a_large_cached_read_returns_the_files_bytes() {
        let (_dir, f) = export(4 << 20);
        let data: Vec<u8> = (0..(2 << 20) as u32).map(|i| (i % 251) as u8 + 1).collect();
        f.execute(&BackendOp::Write {
            offset: 1 << 20,
            data: Bytes::from(data.clone()),
            fua: false,
        })
        .unwrap();
        let read = BackendOp::Read {
            offset: 1 << 20,
            len: 2 << 20,
        };
        match f.try_execute_now(&read) {
            Some(got) => assert!(got.unwrap()[..] == data[..]),
            // Not cached, or no RWF_NOWAIT here: the pool's read must do.
            None => assert!(f.execute(&read).unwrap()[..] == data[..]),
        }
    }

    #[test]
    fn fast_only_zeroing_never_falls_back_to_writing() {
        let (_dir, f) = export(1 << 20);
        // Pretend fallocate is unsupported, as on a filesystem without it.
        f.no_fallocate.store(true, Ordering::Relaxed);
        let fast = BackendOp::WriteZeroes {
            offset: 0,
            len: 4096,
            fua: false,
            may_unmap: true,
            fast_only: true,
        };
        let e = f.execute(&fast).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EOPNOTSUPP));
        assert_eq!(status_of(&e), Status::Unsupported);
        let slow = BackendOp::WriteZeroes {
            offset: 0,
            len: 4096,
            fua: false,
            may_unmap: true,
            fast_only: false,
        };
        f.execute(&slow).unwrap();
    }

    /// Read buffers out of a fixed number of slots, counting those lent.
    struct Slots {
        free: std::sync::Mutex<usize>,
        lent: Arc<std::sync::atomic::AtomicUsize>,
    }

    struct Slot {
        data: Vec<u8>,
        lent: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Staging for Slots {
        fn buffer(&self, len: usize) -> Option<Box<dyn StagedBuffer>> {
            let mut free = self.free.lock().unwrap();
            *free = free.checked_sub(1)?;
            self.lent.fetch_add(1, Ordering::Relaxed);
            // Stale contents, as registered memory has: reads overwrite.
            Some(Box::new(Slot {
                data: vec![0xEE; len],
                lent: self.lent.clone(),
            }))
        }
    }

    impl StagedBuffer for Slot {
        fn bytes_mut(&mut self) -> &mut [u8] {
            &mut self.data
        }
        fn into_bytes(self: Box<Self>) -> Bytes {
            Bytes::from_owner(*self)
        }
    }

    impl AsRef<[u8]> for Slot {
        fn as_ref(&self) -> &[u8] {
            &self.data
        }
    }

    impl Drop for Slot {
        fn drop(&mut self) {
            self.lent.fetch_sub(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn reads_land_in_staged_buffers_while_there_are_any_then_on_the_heap() {
        let (_dir, f) = export(1 << 20);
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 253) as u8).collect();
        f.execute(&BackendOp::Write {
            offset: 0,
            data: Bytes::from(data.clone()),
            fua: false,
        })
        .unwrap();
        let lent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let staging = Arc::new(Slots {
            free: std::sync::Mutex::new(2),
            lent: lent.clone(),
        });
        let backend = FileBackend::new(vec![f]).with_read_staging(staging);
        let read = |offset: u64, len: u32| {
            let op = BackendOp::Read { offset, len };
            backend
                .try_execute_now(0, &op)
                .unwrap_or_else(|| backend.execute(0, &op))
        };
        let a = read(0, 4096).unwrap();
        let b = read(8192, 65536 - 8192).unwrap();
        assert_eq!(lent.load(Ordering::Relaxed), 2, "both reads are staged");
        assert_eq!((&a[..], &b[..]), (&data[..4096], &data[8192..]));
        // Out of slots: the heap, same bytes.
        let c = read(4096, 4096).unwrap();
        assert_eq!(&c[..], &data[4096..8192]);
        drop((a, b));
        assert_eq!(lent.load(Ordering::Relaxed), 0, "dropped data goes back");
        // A read past the end fails and returns its buffer.
        let err = read((1 << 20) - 4096, 8192).unwrap_err();
        assert_eq!(err, Status::Io);
        assert_eq!(lent.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn every_op_does_what_the_protocol_says() {
        let (_dir, f) = export(1 << 20);
        let data = Bytes::from(vec![0xCD; 8192]);
        f.execute(&BackendOp::Write {
            offset: 4096,
            data: data.clone(),
            fua: false,
        })
        .unwrap();
        f.execute(&BackendOp::Write {
            offset: 16384,
            data: data.clone(),
            fua: true,
        })
        .unwrap();
        f.execute(&BackendOp::Flush).unwrap();
        assert_eq!(
            f.execute(&BackendOp::Read {
                offset: 4096,
                len: 8192
            })
            .unwrap(),
            data
        );
        f.execute(&BackendOp::Trim {
            offset: 4096,
            len: 4096,
            fua: false,
        })
        .unwrap();
        f.execute(&BackendOp::WriteZeroes {
            offset: 16384,
            len: 512,
            fua: true,
            may_unmap: false,
            fast_only: false,
        })
        .unwrap();
        let back = f
            .execute(&BackendOp::Read {
                offset: 4096,
                len: 8192,
            })
            .unwrap();
        assert!(
            back[..4096].iter().all(|b| *b == 0),
            "trim reads back as zeroes"
        );
        assert!(back[4096..].iter().all(|b| *b == 0xCD));
        let back = f
            .execute(&BackendOp::Read {
                offset: 16384,
                len: 1024,
            })
            .unwrap();
        assert!(back[..512].iter().all(|b| *b == 0));
        assert!(back[512..].iter().all(|b| *b == 0xCD));
    }

    /// A sparse 4 MiB export on tmpfs, where the kernel can say which
    /// pages are cached (`cachestat`); `None` where it cannot.
    fn tmpfs_export() -> Option<(tempfile::TempDir, ExportFile)> {
        let dir = tempfile::tempdir_in("/dev/shm").ok()?;
        let opts = OpenOptions {
            create_size: Some(4 << 20),
            ..Default::default()
        };
        let f = ExportFile::open(dir.path().join("disk"), &opts).unwrap();
        let cachestat = crate::cache::all_cached(&f.file, 0, 1).is_some();
        (f.is_memory_backed() && cachestat).then_some((dir, f))
    }

    #[test]
    fn a_hole_on_tmpfs_is_not_mapped_so_reading_it_allocates_nothing() {
        let Some((_dir, f)) = tmpfs_export() else {
            return; // no tmpfs here, or a kernel before cachestat
        };
        f.execute(&BackendOp::Write {
            offset: 0,
            data: Bytes::from(vec![5; 1 << 20]),
            fua: false,
        })
        .unwrap();
        assert!(
            f.mapped_source(0, 1 << 20).is_some(),
            "written bytes are mapped"
        );
        // tmpfs would allocate a hole's pages on a fault through the map.
        assert!(
            f.mapped_source(2 << 20, 1 << 20).is_none(),
            "a hole is read"
        );
        assert!(
            f.mapped_source(512 << 10, 1 << 20).is_none(),
            "partly a hole"
        );
    }

    /// Has the kernel receive `data` into `sink` from a socket, as the NBD
    /// face does: there the kernel, not this process, writes the mapping.
    fn receive_into(sink: &MappedSink, data: &[u8]) {
        use std::io::Write;
        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let writer = {
            let data = data.to_vec();
            std::thread::spawn(move || a.write_all(&data).unwrap())
        };
        let mut got = 0;
        while got < sink.len() {
            // SAFETY: the rest of the sink, which stays mapped meanwhile.
            let n = unsafe {
                libc::recv(
                    b.as_raw_fd(),
                    sink.addr().add(got).cast(),
                    sink.len() - got,
                    0,
                )
            };
            assert!(n > 0, "{}", io::Error::last_os_error());
            got += n as usize;
        }
        writer.join().unwrap();
    }

    #[test]
    fn a_write_received_into_the_mapping_lands_in_the_file_and_drops_kept_checksums() {
        let Some((_dir, f)) = tmpfs_export() else {
            return; // no tmpfs here, or a kernel before cachestat
        };
        f.execute(&BackendOp::Write {
            offset: 0,
            data: Bytes::from(vec![7; 2 << 20]),
            fua: false,
        })
        .unwrap();
        // A read over braid's protocol keeps the blocks' checksums.
        let old_crc = f.payload_crc(0, 2 << 20).unwrap();
        let sink = f
            .mapped_sink(1 << 20, 1 << 20)
            .expect("cached pages take a WRITE");
        let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        receive_into(&sink, &data);
        drop(sink);
        let back = f
            .execute(&BackendOp::Read {
                offset: 1 << 20,
                len: 1 << 20,
            })
            .unwrap();
        assert!(back == data, "the bytes received are the file's");
        let mut fresh = braid_core::wire::PayloadCrc::new();
        fresh.update(&[7; 1 << 20]);
        fresh.update(&data);
        let new_crc = f.payload_crc(0, 2 << 20).unwrap();
        assert_ne!(new_crc, old_crc);
        assert_eq!(new_crc, fresh.finish(), "no checksum outlived the write");
    }

    #[test]
    fn a_large_write_on_tmpfs_is_copied_into_the_mapping_and_drops_kept_checksums() {
        let Some((_dir, f)) = tmpfs_export() else {
            return; // no tmpfs here, or a kernel before cachestat
        };
        let write = |offset: u64, data: Vec<u8>| {
            f.try_execute_now(&BackendOp::Write {
                offset,
                data: Bytes::from(data),
                fua: false,
            })
            .expect("tmpfs never waits")
            .unwrap();
        };
        // Pages not yet in memory are written, not copied: a fault on one
        // would allocate it.
        write(0, vec![7; 2 << 20]);
        assert_eq!(f.mapped_copies(), 0, "a hole is written");
        let old_crc = f.payload_crc(0, 2 << 20).unwrap();
        let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        write(1 << 20, data.clone());
        assert_eq!(f.mapped_copies(), 1, "cached pages take the copy");
        write(0, vec![9; (64 << 10) - 512]);
        assert_eq!(f.mapped_copies(), 1, "a small WRITE is written");
        let back = f
            .execute(&BackendOp::Read {
                offset: 1 << 20,
                len: 1 << 20,
            })
            .unwrap();
        assert!(back == data, "the bytes copied are the file's");
        let mut fresh = braid_core::wire::PayloadCrc::new();
        fresh.update(&[9; (64 << 10) - 512]);
        fresh.update(&[7; (1 << 20) - (64 << 10) + 512]);
        fresh.update(&data);
        let new_crc = f.payload_crc(0, 2 << 20).unwrap();
        assert_ne!(new_crc, old_crc);
        assert_eq!(new_crc, fresh.finish(), "no checksum outlived the copy");
    }

    #[test]
    fn only_cached_pages_of_a_writable_tmpfs_export_take_writes_through_the_mapping() {
        let Some((dir, f)) = tmpfs_export() else {
            return; // no tmpfs here, or a kernel before cachestat
        };
        let path = dir.path().join("disk");
        f.execute(&BackendOp::Write {
            offset: 0,
            data: Bytes::from(vec![1; 1 << 20]),
            fua: false,
        })
        .unwrap();
        assert!(f.mapped_sink(0, 1 << 20).is_some());
        // A hole's page would be allocated by the fault, and a full tmpfs
        // would show only as a failed copy.
        assert!(f.mapped_sink(2 << 20, 1 << 20).is_none(), "a hole");
        assert!(f.mapped_sink(512 << 10, 1 << 20).is_none(), "partly a hole");
        assert!(f.mapped_sink(4 << 20, 4096).is_none(), "past the end");
        drop(f);
        let read_only = OpenOptions {
            read_only: true,
            ..Default::default()
        };
        let f = ExportFile::open(&path, &read_only).unwrap();
        assert!(f.mapped_sink(0, 1 << 20).is_none(), "a read-only export");
        assert!(f.mapped_source(0, 1 << 20).is_some(), "which still sends");
        // On a disk a write fault may wait for the device.
        let disk = tempfile::tempdir_in(".").unwrap();
        let opts = OpenOptions {
            create_size: Some(4 << 20),
            ..Default::default()
        };
        let f = ExportFile::open(disk.path().join("disk"), &opts).unwrap();
        if !f.is_memory_backed() {
            f.execute(&BackendOp::Write {
                offset: 0,
                data: Bytes::from(vec![1; 1 << 20]),
                fua: false,
            })
            .unwrap();
            assert!(f.mapped_sink(0, 1 << 20).is_none(), "a file on a disk");
        }
    }

    #[test]
    fn o_direct_reads_and_writes_with_unaligned_network_buffers() {
        let dir = tempfile::tempdir_in(".").unwrap();
        let opts = OpenOptions {
            create_size: Some(1 << 20),
            direct: true,
            ..Default::default()
        };
        let f = match ExportFile::open(dir.path().join("disk"), &opts) {
            Ok(f) => f,
            // tmpfs and some overlay filesystems refuse O_DIRECT outright.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return,
            Err(e) => panic!("{e}"),
        };
        // A payload sliced out of a frame starts at an odd address.
        let frame = Bytes::from(vec![0x3C; 8192 + 20]);
        let data = frame.slice(20..20 + 8192);
        assert_ne!(data.as_ptr().align_offset(DIRECT_ALIGN), 0);
        f.execute(&BackendOp::Write {
            offset: 4096,
            data: data.clone(),
            fua: true,
        })
        .unwrap();
        assert_eq!(
            f.execute(&BackendOp::Read {
                offset: 4096,
                len: 8192
            })
            .unwrap(),
            data
        );
        f.execute(&BackendOp::WriteZeroes {
            offset: 4096,
            len: 4096,
            fua: false,
            may_unmap: false,
            fast_only: false,
        })
        .unwrap();
        assert!(f
            .execute(&BackendOp::Read {
                offset: 4096,
                len: 4096
            })
            .unwrap()
            .iter()
            .all(|b| *b == 0));
    }

    #[test]
    fn cached_data_is_served_without_blocking_and_the_rest_is_deferred() {
        let (_dir, f) = export(1 << 20);
        let data = Bytes::from(vec![0x5A; 4096]);
        f.execute(&BackendOp::Write {
            offset: 0,
            data: data.clone(),
            fua: false,
        })
        .unwrap();
        // Just written, so in the page cache: served inline (or, where the
        // kernel lacks RWF_NOWAIT, deferred; never wrong).
        if let Some(r) = f.try_execute_now(&BackendOp::Read {
            offset: 0,
            len: 4096,
        }) {
            assert_eq!(r.unwrap(), data);
        }
        // Durability needs a thread that may block: never inline.
        assert!(f.try_execute_now(&BackendOp::Flush).is_none());
        assert!(f
            .try_execute_now(&BackendOp::Write {
                offset: 0,
                data: data.clone(),
                fua: true
            })
            .is_none());
        if let Some(r) = f.try_execute_now(&BackendOp::Write {
            offset: 8192,
            data: data.clone(),
            fua: false,
        }) {
            r.unwrap();
            assert_eq!(
                f.execute(&BackendOp::Read {
                    offset: 8192,
                    len: 4096
                })
                .unwrap(),
                data
            );
        }
    }

    #[test]
    fn a_read_only_export_refuses_writes_with_read_only() {
        let (dir, f) = export(1 << 20);
        drop(f);
        let ro = ExportFile::open(
            dir.path().join("disk"),
            &OpenOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        let backend = FileBackend::new(vec![ro]);
        let op = BackendOp::Write {
            offset: 0,
            data: Bytes::from(vec![1; 512]),
            fua: false,
        };
        assert_eq!(backend.execute(0, &op), Err(Status::ReadOnly));
        assert!(backend
            .execute(
                0,
                &BackendOp::Read {
                    offset: 0,
                    len: 512
                }
            )
            .is_ok());
    }

    #[test]
    fn a_full_filesystem_fails_only_that_request_with_no_space() {
        // A tiny tmpfs is not available unprivileged everywhere; /dev/full
        // reports ENOSPC on every write, which is what a full disk does.
        let Ok(full) = ExportFile::open("/dev/full", &OpenOptions::default()) else {
            return;
        };
        let backend = FileBackend::new(vec![full]);
        let op = BackendOp::Write {
            offset: 0,
            data: Bytes::from(vec![1; 512]),
            fua: false,
        };
        assert_eq!(backend.execute(0, &op), Err(Status::NoSpace));
    }
}
