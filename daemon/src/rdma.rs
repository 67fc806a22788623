//! The RDMA fabric, when this braid was built with it (`--features rdma`):
//! `braid serve --rdma ADDR` listeners and `rdma://` server addresses.
//! Without it, both are refused with a clear error.

#[cfg(feature = "rdma")]
use braid_fabric_rdma::verbs::{RdmaDialer, RdmaListener};
use braid_fabric_tcp::Server;

/// Listeners bound before the server starts.
pub(crate) struct Listeners {
    #[cfg(feature = "rdma")]
    bound: Vec<RdmaListener>,
}

/// Registered memory, in MiB, from `--rdma-memory`.
pub(crate) fn region_bytes(mib: Option<u64>) -> u64 {
    mib.map_or(braid_fabric_rdma::DEFAULT_REGION, |m| m << 20)
}

/// Binds every `--rdma` address, or says why not; `channels` bounds the
/// channels open over all of them (`--rdma-channels`).
pub(crate) fn bind(
    addrs: &[String],
    region: u64,
    channels: Option<usize>,
) -> Result<Listeners, String> {
    let channels = channels.unwrap_or(braid_fabric_rdma::limit::DEFAULT_CHANNELS);
    #[cfg(feature = "rdma")]
    {
        let limit = braid_fabric_rdma::limit::ChannelLimit::new(channels)
            .map_err(|e| format!("--rdma-channels: {e}"))?;
        let mut bound = Vec::new();
        for a in addrs {
            let addr = braid_fabric_rdma::verbs::resolve(a).map_err(|e| format!("--rdma {e}"))?;
            bound.push(
                RdmaListener::bind(addr, region, limit.clone())
                    .map_err(|e| format!("--rdma {a}: {e}"))?,
            );
            tracing::info!(%addr, "accepting braid channels over RDMA");
        }
        Ok(Listeners { bound })
    }
    #[cfg(not(feature = "rdma"))]
    let _ = (region, channels);
    #[cfg(not(feature = "rdma"))]
    match addrs.first() {
        Some(a) => Err(format!(
            "--rdma {a}: this braid was built without RDMA (cargo build --features rdma)"
        )),
        None => Ok(Listeners {}),
    }
}

impl Listeners {
    /// The first listener's registered memory, for the backend to read
    /// into (docs/PERFORMANCE.md counts the copy it saves).
    pub(crate) fn read_staging(&self) -> Option<std::sync::Arc<dyn braid_core::staging::Staging>> {
        #[cfg(feature = "rdma")]
        return self.bound.first().map(|l| l.read_staging());
        #[cfg(not(feature = "rdma"))]
        None
    }

    /// Starts accepting for `server`.
    pub(crate) fn serve(self, server: &Server) {
        #[cfg(feature = "rdma")]
        for l in self.bound {
            l.serve(server.clone());
        }
        #[cfg(not(feature = "rdma"))]
        let _ = server;
    }
}

/// Lets `rdma://` server addresses open channels with `region` bytes of
/// registered memory per device (a no-op without RDMA: such an address is
/// then refused when it is read).
pub(crate) fn register_dialer(region: u64) -> Result<(), String> {
    // One dialer, and so one registered region per device, for the whole
    // process: every session of a volume's legs shares it.
    static REGISTERED: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let mut registered = REGISTERED.lock().unwrap();
    if *registered {
        return Ok(());
    }
    #[cfg(feature = "rdma")]
    {
        // The conformance check's hostile client (xtask/conformance/rdma.sh):
        // it names buffers outside its registration.
        let dialer = if std::env::var_os("BRAID_TEST_RDMA_FORGE").is_some() {
            tracing::warn!("BRAID_TEST_RDMA_FORGE: naming forged remote buffers");
            RdmaDialer::forging(region)
        } else {
            RdmaDialer::new(region)
        }
        .map_err(|e| format!("--rdma-memory: {e}"))?;
        let _ = WRITE_STAGING.set(dialer.write_staging());
        braid_fabric_tcp::fabric::register("rdma", std::sync::Arc::new(dialer));
    }
    #[cfg(not(feature = "rdma"))]
    let _ = region;
    *registered = true;
    Ok(())
}

#[cfg(feature = "rdma")]
static WRITE_STAGING: std::sync::OnceLock<std::sync::Arc<dyn braid_core::staging::Staging>> =
    std::sync::OnceLock::new();

/// The client's registered memory for the frontends to receive WRITE data
/// into, once `rdma://` addresses can be dialed (it lends nothing until a
/// channel opened on a device).
pub(crate) fn write_staging() -> Option<std::sync::Arc<dyn braid_core::staging::Staging>> {
    #[cfg(feature = "rdma")]
    return WRITE_STAGING.get().cloned();
    #[cfg(not(feature = "rdma"))]
    None
}

/// A payload of `len` bytes filled by `fill`, in the client's registered
/// memory when there is room (an `rdma://` channel then names it where it
/// is, with no copy), else on the heap.
pub(crate) fn payload(len: usize, fill: impl FnOnce(&mut [u8])) -> bytes::Bytes {
    if let Some(mut staged) = write_staging().and_then(|s| s.buffer(len)) {
        fill(staged.bytes_mut());
        return staged.into_bytes();
    }
    let mut heap = vec![0u8; len];
    fill(&mut heap);
    bytes::Bytes::from(heap)
}

/// Registered RDMA memory of this process, for status documents.
pub(crate) fn memory_json() -> serde_json::Value {
    #[cfg(feature = "rdma")]
    let list: Vec<serde_json::Value> = braid_fabric_rdma::verbs::registered_memory()
        .iter()
        .map(|m| {
            serde_json::json!({
                "side": m.side,
                "devices": m.devices,
                "per_device": m.per_device,
                "in_use": m.in_use,
                "reads_placed_in_place": m.reads_placed_in_place,
                "reads_copied": m.reads_copied,
                "staging_per_device": m.staging_per_device,
                "writes_in_place": m.writes_in_place,
                "writes_copied": m.writes_copied,
                "channels_open": m.channels_open,
                "channel_limit": m.channel_limit,
                "head_ring_bytes": braid_fabric_rdma::limit::HEAD_RING_BYTES,
            })
        })
        .collect();
    #[cfg(not(feature = "rdma"))]
    let list: Vec<serde_json::Value> = Vec::new();
    serde_json::Value::Array(list)
}

/// Prints what [`memory_json`] gave, if anything.
pub(crate) fn print_memory(v: &serde_json::Value) {
    for m in v.as_array().into_iter().flatten() {
        println!(
            "  RDMA registered memory ({}): {} in use of {} per device, {} device(s)",
            m["side"].as_str().unwrap_or("?"),
            crate::config::human_size(m["in_use"].as_u64().unwrap_or(0)),
            crate::config::human_size(m["per_device"].as_u64().unwrap_or(0)),
            m["devices"]
        );
        if m["side"] == "server" {
            let (open, limit) = (
                m["channels_open"].as_u64().unwrap_or(0),
                m["channel_limit"].as_u64().unwrap_or(0),
            );
            let ring = m["head_ring_bytes"].as_u64().unwrap_or(0);
            println!(
                "  RDMA channels: {open} open of at most {limit} (their message rings: {} of {})",
                crate::config::human_size(open * ring),
                crate::config::human_size(limit * ring),
            );
            println!(
                "  RDMA reads placed from the backend's buffer: {}, copied into registered memory first: {}",
                m["reads_placed_in_place"], m["reads_copied"]
            );
        } else {
            println!(
                "  RDMA WRITE data fetched where it was put (no copy): {}, copied into registered memory first: {} ({} per device set apart for it)",
                m["writes_in_place"],
                m["writes_copied"],
                crate::config::human_size(m["staging_per_device"].as_u64().unwrap_or(0)),
            );
        }
    }
}
