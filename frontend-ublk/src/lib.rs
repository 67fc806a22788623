//! A braid volume as a Linux block device through ublk (Linux 6.0+).
//!
//! The ublk UAPI is small, so braid speaks it directly on the `io-uring`
//! crate rather than through libublk: no bindgen or libclang in the
//! default build, and each queue thread owns a plain ring that an eventfd
//! wakes the moment braid's client (on tokio) answers a request, instead
//! of a single-threaded executor that a foreign waker may reach late.

mod ctrl;
mod queue;
mod sys;

use braid_core::server::BackendOp;
use braid_core::staging::Staging;
use braid_core::wire::Status;
use bytes::Bytes;
use std::fmt;
use std::fs::OpenOptions;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Called once with a request's result, from any thread.
pub type Completion = Box<dyn FnOnce(Result<Bytes, Status>) + Send>;

/// Where the device's requests go. `submit` must not block: it is called
/// on a queue's own thread, which serves every other request of that
/// queue too.
pub trait Target: Send + Sync + 'static {
    /// Runs `op`; `done` gets the data of a read, or an empty buffer.
    fn submit(&self, op: BackendOp, done: Completion);

    /// Where WRITE data should be copied out of the kernel's buffer, if
    /// not the heap (RDMA's registered memory: the server then fetches it
    /// from there, with no second copy).
    fn write_staging(&self) -> Option<Arc<dyn Staging>> {
        None
    }
}

/// The device as the kernel should see it.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    /// Size in bytes (a multiple of `logical_block`).
    pub size: u64,
    /// 512 or 4096: the smallest unit the kernel sends.
    pub logical_block: u32,
    /// Hardware queues (one thread each).
    pub queues: u16,
    /// Requests in flight per queue.
    pub depth: u16,
    /// The largest request the kernel sends (it splits longer ones).
    pub max_io_bytes: u32,
    /// Refuse writes.
    pub read_only: bool,
    /// The volume can deallocate (discard).
    pub discard: bool,
    /// The volume can write zeroes without a payload.
    pub write_zeroes: bool,
    /// If this process dies, the device stays and its IO waits (the
    /// kernel reissues what was in flight) until [`Device::recover`] in a
    /// new process takes it over.
    pub recoverable: bool,
    /// The device number N to create (`None`: any free one).
    pub id: Option<u32>,
}

impl DeviceConfig {
    /// Defaults for a volume of `size` bytes: a queue per core, depth 128,
    /// 512 KiB requests.
    pub fn new(size: u64, logical_block: u32) -> DeviceConfig {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        DeviceConfig {
            size,
            logical_block,
            queues: cores.clamp(1, 64) as u16,
            depth: 128,
            max_io_bytes: 512 << 10,
            read_only: false,
            discard: true,
            write_zeroes: true,
            recoverable: true,
            id: None,
        }
    }

    /// Refuses what the kernel would refuse, with the reason.
    pub fn validate(&self) -> Result<(), UblkError> {
        let bad = |why: String| Err(UblkError::Config(why));
        if !matches!(self.logical_block, 512 | 1024 | 2048 | 4096) {
            return bad(format!(
                "block size {} (ublk takes 512 to 4096, a power of two)",
                self.logical_block
            ));
        }
        if self.size == 0 || self.size % u64::from(self.logical_block) != 0 {
            return bad(format!(
                "size {} is not a positive multiple of the block size {}",
                self.size, self.logical_block
            ));
        }
        if self.queues == 0 || self.depth == 0 || self.depth as usize > sys::MAX_QUEUE_DEPTH {
            return bad(format!(
                "{} queues of depth {} (at least 1 queue, depth 1 to {})",
                self.queues,
                self.depth,
                sys::MAX_QUEUE_DEPTH
            ));
        }
        if self.max_io_bytes < self.logical_block || self.max_io_bytes % 4096 != 0 {
            return bad(format!(
                "max IO size {} (a multiple of 4096, at least one block)",
                self.max_io_bytes
            ));
        }
        Ok(())
    }

    fn params(&self) -> sys::Params {
        let shift = self.logical_block.trailing_zeros() as u8;
        let mut attrs = sys::ATTR_VOLATILE_CACHE | sys::ATTR_FUA;
        if self.read_only {
            attrs |= sys::ATTR_READ_ONLY;
        }
        let max_sectors = self.max_io_bytes >> 9;
        let mut params = sys::Params {
            len: std::mem::size_of::<sys::Params>() as u32,
            types: sys::PARAM_TYPE_BASIC,
            basic: sys::ParamBasic {
                attrs,
                logical_bs_shift: shift,
                physical_bs_shift: shift.max(12),
                io_opt_shift: shift.max(12),
                io_min_shift: shift,
                max_sectors,
                dev_sectors: self.size >> 9,
                ..Default::default()
            },
            discard: Default::default(),
        };
        if (self.discard || self.write_zeroes) && !self.read_only {
            params.types |= sys::PARAM_TYPE_DISCARD;
            params.discard = sys::ParamDiscard {
                discard_granularity: self.logical_block,
                max_discard_sectors: if self.discard { max_sectors } else { 0 },
                max_write_zeroes_sectors: if self.write_zeroes { max_sectors } else { 0 },
                max_discard_segments: 1,
                ..Default::default()
            };
        }
        params
    }
}

/// Why a device could not be made, run or removed.
#[derive(Debug)]
pub enum UblkError {
    /// The configuration is one the kernel would refuse.
    Config(String),
    /// A step failed; says which, on which device.
    Io { what: String, source: io::Error },
}

impl fmt::Display for UblkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UblkError::Config(why) => write!(f, "ublk device: {why}"),
            UblkError::Io { what, source } => write!(f, "ublk: {what}: {source}"),
        }
    }
}

impl std::error::Error for UblkError {}

fn step<T>(what: impl Into<String>, r: io::Result<T>) -> Result<T, UblkError> {
    r.map_err(|source| UblkError::Io {
        what: what.into(),
        source,
    })
}

/// Whether this process can make ublk devices here (the driver is loaded
/// and the control device opens); the error names the fix.
pub fn check_available() -> Result<(), UblkError> {
    step("open the control device", ctrl::Control::open()).map(drop)
}

/// A running /dev/ublkbN.
pub struct Device {
    id: u32,
    control: ctrl::Control,
    queues: Vec<JoinHandle<io::Result<()>>>,
}

impl Device {
    /// Creates the device, starts its queues and returns once
    /// /dev/ublkbN exists. Blocks: call it off an async runtime's threads.
    pub fn create(config: &DeviceConfig, target: Arc<dyn Target>) -> Result<Device, UblkError> {
        config.validate()?;
        let mut control = step("open the control device", ctrl::Control::open())?;
        let mut info = sys::DevInfo {
            nr_hw_queues: config.queues,
            queue_depth: config.depth,
            max_io_buf_bytes: config.max_io_bytes,
            dev_id: config.id.unwrap_or(u32::MAX),
            flags: if config.recoverable {
                sys::F_USER_RECOVERY | sys::F_USER_RECOVERY_REISSUE
            } else {
                0
            },
            ..Default::default()
        };
        let what = match config.id {
            Some(id) => format!("add device ublk{id}"),
            None => "add a device".to_string(),
        };
        step(what, control.add(&mut info))?;
        let id = info.dev_id;
        let mut device = Device {
            id,
            control,
            queues: Vec::new(),
        };
        let undo = |mut d: Device, e: UblkError| {
            // Never started: deleting the device releases the queues.
            let _ = d.control.delete(d.id);
            d.queues.clear();
            Err(e)
        };
        let params = config.params();
        if let Err(e) = step(
            format!("set the parameters of ublk{id}"),
            device.control.set_params(id, &params),
        ) {
            return undo(device, e);
        }
        if let Err(e) = device.spawn_queues(&info, target) {
            return undo(device, e);
        }
        if let Err(e) = step(format!("start ublk{id}"), device.control.start(id)) {
            return undo(device, e);
        }
        tracing::info!(
            dev = id,
            queues = info.nr_hw_queues,
            depth = info.queue_depth,
            "ublk device started"
        );
        Ok(device)
    }

    /// Takes over device N, left by a braid process that died: its IO has
    /// been waiting since, and the kernel reissues what that process had
    /// not completed once this one's queues are up. `config` must describe
    /// the same volume (size and block size are checked). Blocks.
    pub fn recover(
        id: u32,
        config: &DeviceConfig,
        target: Arc<dyn Target>,
    ) -> Result<Device, UblkError> {
        let mut control = step("open the control device", ctrl::Control::open())?;
        // The kernel quiesces the device once the old process's rings are
        // torn down, a moment after it died.
        let deadline = Instant::now() + Duration::from_secs(10);
        let info = loop {
            let info = step(format!("read ublk{id}"), control.info(id))?;
            if info.state == sys::S_DEV_QUIESCED || Instant::now() >= deadline {
                break info;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        if info.flags & sys::F_USER_RECOVERY == 0 {
            return Err(UblkError::Config(format!(
                "ublk{id} was not created for recovery (it cannot be taken over)"
            )));
        }
        if info.state != sys::S_DEV_QUIESCED {
            let why = match info.state {
                sys::S_DEV_LIVE => format!("is live, served by pid {}", info.ublksrv_pid),
                sys::S_DEV_DEAD => "was never started".to_string(),
                s => format!("is in state {s}"),
            };
            return Err(UblkError::Config(format!(
                "ublk{id} {why}: nothing to recover"
            )));
        }
        let params = step(
            format!("read the parameters of ublk{id}"),
            control.params(id),
        )?;
        let (size, block) = (
            params.basic.dev_sectors << 9,
            1u32 << params.basic.logical_bs_shift,
        );
        if size != config.size || block != config.logical_block {
            return Err(UblkError::Config(format!(
                "ublk{id} is {size} bytes in {block}-byte blocks; this volume is {} bytes in {}-byte blocks",
                config.size, config.logical_block
            )));
        }
        step(
            format!("start recovering ublk{id}"),
            control.start_recovery(id),
        )?;
        let mut device = Device {
            id,
            control,
            queues: Vec::new(),
        };
        device.spawn_queues(&info, target)?;
        step(
            format!("end recovery of ublk{id}"),
            device.control.end_recovery(id),
        )?;
        tracing::info!(
            dev = id,
            queues = info.nr_hw_queues,
            "ublk device recovered"
        );
        Ok(device)
    }

    /// Whether device N exists (made by some earlier process, live or
    /// waiting to be recovered).
    pub fn exists(id: u32) -> bool {
        ctrl::Control::open().is_ok_and(|mut c| c.info(id).is_ok())
    }

    fn spawn_queues(
        &mut self,
        info: &sys::DevInfo,
        target: Arc<dyn Target>,
    ) -> Result<(), UblkError> {
        let id = self.id;
        let cdev = Arc::new(open_char_device(id)?);
        for q_id in 0..info.nr_hw_queues {
            let queue = queue::Queue {
                dev_id: id,
                q_id,
                depth: info.queue_depth,
                buf_bytes: info.max_io_buf_bytes,
                cdev: cdev.clone(),
                staging: target.write_staging(),
                target: target.clone(),
            };
            let spawned = std::thread::Builder::new()
                .name(format!("ublk{id}q{q_id}"))
                .spawn(move || queue::serve(queue));
            let handle = step(format!("start queue {q_id} of ublk{id}"), spawned)?;
            self.queues.push(handle);
        }
        Ok(())
    }

    /// The device number N.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// /dev/ublkbN.
    pub fn block_path(&self) -> PathBuf {
        PathBuf::from(format!("/dev/ublkb{}", self.id))
    }

    /// Removes the device: the kernel finishes the requests in flight
    /// (their answers still come from the target), then the queues end.
    /// Blocks.
    pub fn remove(mut self) -> Result<(), UblkError> {
        let id = self.id;
        step(format!("stop ublk{id}"), self.control.stop(id))?;
        for (q, h) in self.queues.drain(..).enumerate() {
            match h.join() {
                Ok(r) => step(format!("queue {q} of ublk{id}"), r)?,
                Err(_) => {
                    return Err(UblkError::Io {
                        what: format!("queue {q} of ublk{id}"),
                        source: io::Error::other("the queue thread panicked"),
                    })
                }
            }
        }
        step(format!("delete ublk{id}"), self.control.delete(id))
    }
}

/// /dev/ublkcN, once devtmpfs or udev has made it.
fn open_char_device(id: u32) -> Result<std::fs::File, UblkError> {
    let path = format!("/dev/ublkc{id}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => return Ok(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return step(format!("open {path}"), Err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configurations_the_kernel_would_refuse_are_refused_with_the_reason() {
        let ok = DeviceConfig::new(64 << 20, 512);
        ok.validate().unwrap();
        for (change, word) in [
            (
                Box::new(|c: &mut DeviceConfig| c.logical_block = 520)
                    as Box<dyn Fn(&mut DeviceConfig)>,
                "block size",
            ),
            (
                Box::new(|c: &mut DeviceConfig| c.logical_block = 8192),
                "block size",
            ),
            (Box::new(|c: &mut DeviceConfig| c.size = 1000), "multiple"),
            (Box::new(|c: &mut DeviceConfig| c.size = 0), "multiple"),
            (Box::new(|c: &mut DeviceConfig| c.depth = 0), "depth"),
            (Box::new(|c: &mut DeviceConfig| c.depth = 5000), "depth"),
            (
                Box::new(|c: &mut DeviceConfig| c.max_io_bytes = 1000),
                "max IO",
            ),
        ] {
            let mut c = ok.clone();
            change(&mut c);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(word), "{e}");
        }
    }

    #[test]
    fn parameters_describe_the_volume() {
        let mut c = DeviceConfig::new(1 << 30, 4096);
        let p = c.params();
        assert_eq!(p.basic.dev_sectors, 1 << 21);
        assert_eq!(
            (p.basic.logical_bs_shift, p.basic.physical_bs_shift),
            (12, 12)
        );
        assert_eq!(p.basic.max_sectors, 1024);
        assert_ne!(
            p.basic.attrs & sys::ATTR_VOLATILE_CACHE,
            0,
            "the kernel sends FLUSH"
        );
        assert_ne!(p.basic.attrs & sys::ATTR_FUA, 0, "and FUA");
        assert_eq!(p.discard.max_discard_segments, 1);
        c.read_only = true;
        let p = c.params();
        assert_ne!(p.basic.attrs & sys::ATTR_READ_ONLY, 0);
        assert_eq!(p.types & sys::PARAM_TYPE_DISCARD, 0);
    }
}
