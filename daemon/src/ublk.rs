//! `braid attach --ublk`: the volume as /dev/ublkbN. The device's queue
//! threads hand requests to the same target NBD uses, on the runtime that
//! carries braid's client.

use braid_core::server::BackendOp;
use braid_frontend_nbd::Target as NbdTarget;
use braid_frontend_ublk::{Completion, Device, DeviceConfig, Target};
use clap::Args;
use std::sync::Arc;
use tokio::runtime::Handle;

#[derive(Args, Debug, Clone)]
pub(crate) struct UblkArgs {
    /// Expose the volume as a block device, /dev/ublkbN (Linux 6.0+,
    /// `modprobe ublk_drv`, root).
    #[arg(long)]
    pub(crate) ublk: bool,
    /// ublk hardware queues [default: one per core].
    #[arg(long)]
    pub(crate) queues: Option<u16>,
    /// Requests in flight per ublk queue.
    #[arg(long, default_value_t = 128)]
    pub(crate) depth: u16,
    /// Use /dev/ublkbN: create it, or, if a braid attach that died left
    /// it, take it over (for a service that restarts). Implies --ublk.
    #[arg(long, conflicts_with = "recover")]
    pub(crate) ublk_id: Option<u32>,
    /// Take over /dev/ublkbN, left by a braid attach that died: its
    /// applications' IO has been waiting, and what was in flight is
    /// reissued here. Implies --ublk.
    #[arg(long)]
    pub(crate) recover: Option<u32>,
}

impl UblkArgs {
    pub(crate) fn wanted(&self) -> bool {
        self.ublk || self.ublk_id.is_some() || self.recover.is_some()
    }
}

/// Requests from ublk's queue threads, run on the tokio runtime.
struct OnRuntime {
    target: Arc<dyn NbdTarget>,
    runtime: Handle,
}

impl Target for OnRuntime {
    fn submit(&self, op: BackendOp, done: Completion) {
        let _entered = self.runtime.enter();
        self.target.submit(0, op, done);
    }

    fn write_staging(&self) -> Option<Arc<dyn braid_core::staging::Staging>> {
        self.target.write_staging()
    }
}

/// Before connecting to anything: can this process make the device?
pub(crate) fn preflight(args: &UblkArgs) -> Result<(), String> {
    if args.wanted() {
        braid_frontend_ublk::check_available().map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// What the device needs to know of the volume.
pub(crate) struct Volume {
    pub(crate) size: u64,
    pub(crate) block_size: u32,
    pub(crate) read_only: bool,
    /// The largest braid request: the device's requests are kept no
    /// larger, so each is one braid request.
    pub(crate) max_request: u32,
}

/// With --ublk, creates the device and returns once /dev/ublkbN exists.
pub(crate) async fn maybe_create(
    args: &UblkArgs,
    volume: Volume,
    target: Arc<dyn NbdTarget>,
) -> Result<Option<Device>, String> {
    if !args.wanted() {
        return Ok(None);
    }
    let mut config = DeviceConfig::new(volume.size, volume.block_size.max(512));
    config.id = args.ublk_id;
    if let Some(q) = args.queues {
        config.queues = q;
    }
    config.depth = args.depth;
    config.read_only = volume.read_only;
    let whole_pages = volume.max_request - volume.max_request % 4096;
    config.max_io_bytes = config.max_io_bytes.min(whole_pages.max(4096));
    let target = Arc::new(OnRuntime {
        target,
        runtime: Handle::current(),
    });
    let recover = args
        .recover
        .or(args.ublk_id.filter(|&id| Device::exists(id)));
    tokio::task::spawn_blocking(move || match recover {
        Some(id) => {
            tracing::info!(dev = id, "taking over the block device");
            Device::recover(id, &config, target)
        }
        None => Device::create(&config, target),
    })
    .await
    .map_err(|e| format!("ublk: {e}"))?
    .map(Some)
    .map_err(|e| e.to_string())
}

/// /dev/ublkbN of the device, if there is one, for output and status.
pub(crate) fn path_of(device: &Option<Device>) -> Option<String> {
    device
        .as_ref()
        .map(|d| d.block_path().display().to_string())
}

/// Removes the device, if there is one, once the kernel's requests in
/// flight are answered.
pub(crate) async fn remove(device: Option<Device>) {
    let Some(device) = device else { return };
    let path = device.block_path();
    match tokio::task::spawn_blocking(move || device.remove()).await {
        Ok(Ok(())) => tracing::info!(device = %path.display(), "block device removed"),
        Ok(Err(e)) => {
            tracing::error!(device = %path.display(), error = %e, "removing the block device")
        }
        Err(e) => {
            tracing::error!(device = %path.display(), error = %e, "removing the block device")
        }
    }
}
