//! The verbs driver: rdma_cm connects reliable-connected queue pairs, and
//! one task per channel executes what its [`link`](crate::link) asks for.
//! Registered memory is one region per protection domain, registered when
//! the first channel on that device opens; head messages use a small ring
//! of their own per channel.

use crate::arena::{Arena, Extent, ALIGN};
use crate::limit::{ChannelLimit, ChannelSlot, HEAD_RING_BYTES};
use crate::link::{ClientLink, LinkError, Region, ServerLink, Work};
use crate::mark;
use crate::queue::{recv_id, recv_slot, Completed, SendQueue, Step};
use crate::seal::Seal;
use crate::MIN_REGION;
use braid_core::client::ChannelId;
use braid_core::server::ConnId;
use braid_core::staging::{StagedBuffer, Staging};
use braid_core::wire::{RemoteBuf, MAX_BODY_LEN, PREFIX_LEN};
use braid_fabric_tcp::conn::{ConnEvent, Outbox, Outgoing, Writer};
use braid_fabric_tcp::fabric::{Dialer, Dialing};
use braid_fabric_tcp::Server;
use bytes::Bytes;
use sideway::ibverbs::completion::{
    BasicCompletionQueue, CompletionChannel, CompletionQueue, GenericCompletionQueue,
    WorkCompletionStatus,
};
use sideway::ibverbs::device_context::DeviceContext;
use sideway::ibverbs::memory_region::MemoryRegion;
use sideway::ibverbs::protection_domain::ProtectionDomain;
use sideway::ibverbs::queue_pair::{
    BasicQueuePair, PostSendGuard, QueuePair, QueuePairState, SetScatterGatherEntry,
    WorkRequestFlags,
};
use sideway::ibverbs::AccessFlags;
use sideway::rdmacm::communication_manager::{
    ConnectionParameter, Event, EventChannel, EventType, GetEventErrorKind, Identifier, PortSpace,
};
use std::alloc::Layout;
use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, Notify};

/// Bytes of one head slot: the longest prefix and body fit.
const HEAD_SLOT: usize = 1024;
const _: () = assert!(PREFIX_LEN + MAX_BODY_LEN <= HEAD_SLOT);
const _: () = assert!(((RECV_DEPTH + SEND_SLOTS) * HEAD_SLOT) as u64 == HEAD_RING_BYTES);
/// Receives kept posted per channel; a peer sending faster waits (RNR
/// retries are unlimited), it is never refused.
const RECV_DEPTH: usize = 128;
/// Head messages in flight per channel.
const SEND_SLOTS: usize = 128;
/// Work requests in flight on a send queue (sends, fetches, placements).
const SEND_QUEUE: usize = 256;
/// One-sided reads a queue pair may have outstanding, at most.
const READ_DEPTH: u8 = 16;
/// How long address and route resolution may take.
const RESOLVE: Duration = Duration::from_secs(2);

/// Page-aligned memory registered with the NIC.
struct Registered {
    ptr: *mut u8,
    layout: Layout,
    mr: Option<Arc<MemoryRegion>>,
}

// The memory is only touched through raw copies the channel tasks
// serialise with the arena (an extent belongs to one task at a time).
unsafe impl Send for Registered {}
unsafe impl Sync for Registered {}

impl Registered {
    fn new(
        pd: &Arc<ProtectionDomain>,
        len: usize,
        access: AccessFlags,
    ) -> Result<Registered, String> {
        let layout = Layout::from_size_align(len, ALIGN as usize).map_err(|e| e.to_string())?;
        // SAFETY: len > 0 (callers ask for at least one slot).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(format!("cannot allocate {len} bytes to register"));
        }
        // SAFETY: ptr is valid for len bytes until Drop, which deregisters first.
        let mr = unsafe { pd.reg_mr(ptr as usize, len, access) };
        match mr {
            Ok(mr) => Ok(Registered {
                ptr,
                layout,
                mr: Some(mr),
            }),
            Err(e) => {
                unsafe { std::alloc::dealloc(ptr, layout) };
                Err(format!("registering {len} bytes: {e}"))
            }
        }
    }

    fn mr(&self) -> &MemoryRegion {
        self.mr.as_ref().unwrap()
    }

    fn addr(&self, offset: usize) -> u64 {
        self.ptr as u64 + offset as u64
    }

    fn write(&self, offset: usize, data: &[u8]) {
        assert!(offset + data.len() <= self.layout.size());
        // SAFETY: in bounds; the extent is this task's alone.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(offset), data.len()) }
    }

    fn read(&self, offset: usize, len: usize) -> &[u8] {
        assert!(offset + len <= self.layout.size());
        // SAFETY: in bounds; the extent is this task's alone.
        unsafe { std::slice::from_raw_parts(self.ptr.add(offset), len) }
    }

    /// Where `bytes` sit in the region, if they lie wholly inside it.
    fn offset_of(&self, bytes: &[u8]) -> Option<u64> {
        let start = (bytes.as_ptr() as usize).checked_sub(self.ptr as usize)?;
        (start + bytes.len() <= self.layout.size()).then_some(start as u64)
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.mr.take();
        // SAFETY: allocated with this layout in new, deregistered above.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

/// One device's protection domain and its payload region.
struct Domain {
    pd: Arc<ProtectionDomain>,
    region: Registered,
    arena: Mutex<Arena>,
    /// A client's frontends receive WRITE data here, past the arena's
    /// part of the region, so the server fetches it where it landed. Kept
    /// apart from the arena so payloads that wait to be sent can never
    /// take the memory the requests ahead of them need.
    staging: Mutex<Arena>,
    /// Where the staging part starts in the region.
    staging_base: u64,
    /// Woken whenever memory returns to the arena.
    freed: Notify,
    /// READ data placed straight from the backend's buffer, and copied
    /// into registered memory first (server side).
    placed_in_place: AtomicU64,
    placed_copied: AtomicU64,
    /// WRITE data fetched from where the frontend received it, and copied
    /// into registered memory first (client side).
    writes_in_place: AtomicU64,
    writes_copied: AtomicU64,
}

impl Domain {
    fn free(&self, extent: Extent) {
        self.arena.lock().unwrap().free(extent);
        self.freed.notify_waiters();
    }

    /// A frame received into `extent` (its head written in the room
    /// before it from `start`), lent to the engine as it lies.
    fn delivered(self: &Arc<Self>, extent: Extent, start: usize, len: usize) -> Bytes {
        Bytes::from_owner(
            Lent {
                domain: self.clone(),
                extent,
                staged: false,
                start,
                len,
                sealed: None,
            }
            .seal(),
        )
    }

    /// A buffer of `len` bytes from the arena or from the staging part.
    fn lend(self: &Arc<Self>, len: usize, staged: bool) -> Option<Lent> {
        let n = u32::try_from(len).ok()?;
        let (extent, start) = if staged {
            let e = self.staging.lock().unwrap().alloc(n)?;
            (e, self.staging_base + e.offset)
        } else {
            let e = self.arena.lock().unwrap().alloc(n)?;
            (e, e.offset)
        };
        Some(Lent {
            domain: self.clone(),
            extent,
            staged,
            start: start as usize,
            len,
            sealed: None,
        })
    }
}

/// A frame lent straight out of registered memory; its extent returns to
/// the arena (or the staging part) when the last user of the frame drops
/// it.
struct Lent {
    domain: Arc<Domain>,
    extent: Extent,
    staged: bool,
    start: usize,
    len: usize,
    /// Taken once the bytes are handed on as a frame or payload (builds
    /// with debug assertions), checked when the last user drops them.
    sealed: Option<Seal>,
}

impl Lent {
    fn seal(mut self) -> Lent {
        self.sealed = Seal::over(self.as_ref());
        self
    }
}

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        self.domain.region.read(self.start, self.len)
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        if let Some(seal) = &self.sealed {
            seal.check(self.as_ref(), || {
                format!("at {}+{} (staged: {})", self.start, self.len, self.staged)
            });
        }
        if self.staged {
            self.domain.staging.lock().unwrap().free(self.extent);
        } else {
            self.domain.free(self.extent);
        }
    }
}

impl StagedBuffer for Lent {
    fn bytes_mut(&mut self) -> &mut [u8] {
        let region = &self.domain.region;
        assert!(self.start + self.len <= region.layout.size());
        // SAFETY: in bounds, initialised (the region is allocated zeroed),
        // and the extent is this buffer's alone until it is dropped.
        unsafe { std::slice::from_raw_parts_mut(region.ptr.add(self.start), self.len) }
    }

    fn into_bytes(self: Box<Self>) -> Bytes {
        Bytes::from_owner(self.seal())
    }
}

/// Registered memory lent as payload buffers, so a one-sided move takes
/// the payload from where it was made, with no copy: on a server the
/// arena itself, for the backend's READ data; on a client the staging
/// part, for the frontends' WRITE data. Until an RDMA channel opened a
/// domain (or if a client's region is too small to split), there is none
/// to offer.
struct DomainStaging {
    domains: Arc<Domains>,
    /// From the client's staging part, not the arena.
    staged: bool,
}

impl Staging for DomainStaging {
    fn buffer(&self, len: usize) -> Option<Box<dyn StagedBuffer>> {
        let lent = self.domains.first()?.lend(len, self.staged)?;
        Some(Box::new(lent))
    }
}

/// Domains by device, created on first use.
struct Domains {
    bytes: u64,
    /// Clients let the server reach their region; a server's is its own.
    remote_access: bool,
    by_device: Mutex<HashMap<usize, Arc<Domain>>>,
    /// A server's bound on open channels (each pins a head ring).
    channels: Option<Arc<ChannelLimit>>,
}

/// Every process-wide set of domains, for [`registered_memory`].
static ALL_DOMAINS: Mutex<Vec<std::sync::Weak<Domains>>> = Mutex::new(Vec::new());

/// Registered memory of this process, for status output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegisteredMemory {
    /// "server" (staging for one-sided moves) or "client" (named buffers).
    pub side: &'static str,
    /// Devices with a region.
    pub devices: usize,
    /// Bytes registered per device (the configured limit).
    pub per_device: u64,
    /// Bytes held by payloads in flight, over all devices.
    pub in_use: u64,
    /// READ replies whose data was placed from the backend's own buffer
    /// (no copy), and those copied into registered memory first.
    pub reads_placed_in_place: u64,
    /// See `reads_placed_in_place`.
    pub reads_copied: u64,
    /// Bytes of each device's region set apart for the frontends' WRITE
    /// data (client side).
    pub staging_per_device: u64,
    /// WRITE data the server fetched from where the frontend received it
    /// (no copy), and that copied into registered memory first.
    pub writes_in_place: u64,
    /// See `writes_in_place`.
    pub writes_copied: u64,
    /// Channels open now and the most allowed at once (server side; each
    /// pins a head ring of [`HEAD_RING_BYTES`]).
    pub channels_open: usize,
    /// See `channels_open`; 0 on a client.
    pub channel_limit: usize,
}

/// What every listener and dialer of this process has registered.
pub fn registered_memory() -> Vec<RegisteredMemory> {
    let mut all = ALL_DOMAINS.lock().unwrap();
    all.retain(|d| d.strong_count() > 0);
    all.iter()
        .filter_map(|d| d.upgrade())
        .map(|d| {
            let devices = d.by_device.lock().unwrap();
            let total = |counter: fn(&Domain) -> &AtomicU64| -> u64 {
                devices
                    .values()
                    .map(|x| counter(x).load(Ordering::Relaxed))
                    .sum()
            };
            RegisteredMemory {
                side: if d.remote_access { "client" } else { "server" },
                devices: devices.len(),
                per_device: d.bytes,
                in_use: devices
                    .values()
                    .map(|x| x.arena.lock().unwrap().in_use() + x.staging.lock().unwrap().in_use())
                    .sum(),
                staging_per_device: devices
                    .values()
                    .next()
                    .map_or(0, |x| x.staging.lock().unwrap().capacity()),
                writes_in_place: total(|x| &x.writes_in_place),
                writes_copied: total(|x| &x.writes_copied),
                reads_placed_in_place: total(|x| &x.placed_in_place),
                reads_copied: total(|x| &x.placed_copied),
                channels_open: d.channels.as_ref().map_or(0, |l| l.open()),
                channel_limit: d.channels.as_ref().map_or(0, |l| l.limit()),
            }
        })
        .collect()
}

/// Refuses a registered-memory limit that cannot hold one largest payload.
pub fn check_region(bytes: u64) -> Result<u64, String> {
    if bytes < MIN_REGION {
        return Err(format!(
            "registered memory of {} MiB cannot hold one largest payload: at least {} MiB",
            bytes >> 20,
            MIN_REGION.div_ceil(1 << 20)
        ));
    }
    Ok(bytes)
}

impl Domains {
    /// The domain staging lends from. One device serves nearly every
    /// process; with several, payloads land in the first one's memory,
    /// and the others' channels copy them.
    fn first(&self) -> Option<Arc<Domain>> {
        self.by_device.lock().unwrap().values().next().cloned()
    }

    fn new(
        bytes: u64,
        remote_access: bool,
        channels: Option<Arc<ChannelLimit>>,
    ) -> Result<Arc<Domains>, String> {
        let d = Arc::new(Domains {
            bytes: check_region(bytes)?,
            remote_access,
            by_device: Mutex::new(HashMap::new()),
            channels,
        });
        ALL_DOMAINS.lock().unwrap().push(Arc::downgrade(&d));
        Ok(d)
    }

    fn for_device(&self, ctx: &Arc<DeviceContext>) -> Result<Arc<Domain>, String> {
        let key = Arc::as_ptr(ctx) as usize;
        let mut all = self.by_device.lock().unwrap();
        if let Some(d) = all.get(&key) {
            return Ok(d.clone());
        }
        let pd = ctx
            .alloc_pd()
            .map_err(|e| format!("allocating a protection domain: {e}"))?;
        let access = if self.remote_access {
            AccessFlags::LocalWrite | AccessFlags::RemoteWrite | AccessFlags::RemoteRead
        } else {
            AccessFlags::LocalWrite
        };
        let region = Registered::new(&pd, self.bytes as usize, access)?;
        let staging_bytes = if self.remote_access {
            crate::staging_share(self.bytes)
        } else {
            0
        };
        let arena_bytes = self.bytes - staging_bytes;
        let d = Arc::new(Domain {
            pd,
            region,
            arena: Mutex::new(Arena::with_head_room(arena_bytes, HEAD_SLOT as u64)),
            staging: Mutex::new(Arena::new(staging_bytes)),
            staging_base: arena_bytes,
            freed: Notify::new(),
            placed_in_place: AtomicU64::new(0),
            placed_copied: AtomicU64::new(0),
            writes_in_place: AtomicU64::new(0),
            writes_copied: AtomicU64::new(0),
        });
        all.insert(key, d.clone());
        Ok(d)
    }
}

/// A queue pair with its completion queue and head ring.
struct Channel {
    /// First, so it is deregistered before its descriptor closes.
    cq_fd: AsyncFd<RawFd>,
    qp: BasicQueuePair,
    cq: Arc<BasicCompletionQueue>,
    comp: Arc<CompletionChannel>,
    heads: Registered,
}

impl Channel {
    fn new(ctx: &Arc<DeviceContext>, domain: &Domain) -> Result<Channel, String> {
        let comp = CompletionChannel::new(ctx).map_err(|e| format!("completion channel: {e}"))?;
        comp.set_nonblocking(true)
            .map_err(|e| format!("completion channel: {e}"))?;
        let cq = ctx
            .create_cq_builder()
            .setup_cqe((RECV_DEPTH + SEND_QUEUE) as u32)
            .setup_comp_channel(&comp, 0)
            .build()
            .map_err(|e| format!("completion queue: {e}"))?;
        let qp = domain
            .pd
            .create_qp_builder()
            .setup_max_send_wr(SEND_QUEUE as u32)
            .setup_max_recv_wr(RECV_DEPTH as u32)
            .setup_max_send_sge(1)
            .setup_max_recv_sge(1)
            .setup_send_cq(GenericCompletionQueue::from(cq.clone()))
            .setup_recv_cq(GenericCompletionQueue::from(cq.clone()))
            .build()
            .map_err(|e| format!("queue pair: {e}"))?;
        let heads = Registered::new(
            &domain.pd,
            (RECV_DEPTH + SEND_SLOTS) * HEAD_SLOT,
            AccessFlags::LocalWrite,
        )?;
        // SAFETY: `comp` owns the descriptor and outlives `cq_fd` (field order).
        let cq_fd = unsafe { AsyncFd::register(comp.as_raw_fd()) }
            .map_err(|e| format!("completion fd: {e}"))?;
        // SAFETY: the CQ lives as long as this Channel.
        let rc = unsafe { rdma_mummy_sys::ibv_req_notify_cq(cq.cq().as_ptr(), 0) };
        if rc != 0 {
            return Err(format!("arming completions: error {rc}"));
        }
        Ok(Channel {
            qp,
            cq,
            comp,
            cq_fd,
            heads,
        })
    }

    /// INIT, then receives posted, then RTR and RTS as rdma_cm computed
    /// them, with room for several one-sided reads at once.
    fn init(&mut self, id: &Identifier, remote_access: bool) -> Result<(), String> {
        let mut attr = id
            .get_qp_attr(QueuePairState::Init)
            .map_err(|e| format!("queue pair INIT: {e}"))?;
        attr.setup_access_flags(if remote_access {
            AccessFlags::LocalWrite | AccessFlags::RemoteWrite | AccessFlags::RemoteRead
        } else {
            AccessFlags::LocalWrite
        });
        self.qp
            .modify(&attr)
            .map_err(|e| format!("queue pair INIT: {e}"))?;
        for slot in 0..RECV_DEPTH {
            self.post_recv(slot)?;
        }
        Ok(())
    }

    fn ready(&mut self, id: &Identifier) -> Result<(), String> {
        let mut attr = id
            .get_qp_attr(QueuePairState::ReadyToReceive)
            .map_err(|e| format!("queue pair RTR: {e}"))?;
        attr.setup_max_dest_read_atomic(READ_DEPTH);
        self.qp
            .modify(&attr)
            .map_err(|e| format!("queue pair RTR: {e}"))?;
        let mut attr = id
            .get_qp_attr(QueuePairState::ReadyToSend)
            .map_err(|e| format!("queue pair RTS: {e}"))?;
        attr.setup_max_read_atomic(READ_DEPTH);
        self.qp
            .modify(&attr)
            .map_err(|e| format!("queue pair RTS: {e}"))
    }

    fn post_recv(&mut self, slot: usize) -> Result<(), String> {
        let mut guard = self.qp.start_post_recv();
        let wr = guard.construct_wr(recv_id(slot));
        // SAFETY: the slot lies in the registered head ring.
        unsafe {
            wr.setup_sge(
                self.heads.mr().lkey(),
                self.heads.addr(slot * HEAD_SLOT),
                HEAD_SLOT as u32,
            )
        };
        guard.post().map_err(|e| format!("posting a receive: {e}"))
    }
}

/// Either end's channel logic.
enum End {
    Client(ClientLink),
    Server(ServerLink),
}

impl End {
    /// Lets what waited for registered memory go, if it fits now.
    fn retry(&mut self, arena: &mut Arena, out: &mut Vec<Work>) {
        match self {
            End::Client(l) if l.waiting() > 0 => l.retry(arena, out),
            End::Server(l) if l.waiting() > 0 => l.progress(arena, out),
            _ => {}
        }
    }
}

/// The next rdma_cm event's type and status, acknowledged.
async fn next_kind(
    ec: &Arc<EventChannel>,
    fd: &AsyncFd<RawFd>,
) -> Result<(EventType, i32), String> {
    let event = next_event(ec, fd).await?;
    let kind = (event.event_type(), event.status());
    let _ = event.ack();
    Ok(kind)
}

/// Waits for `want` on an rdma_cm event channel; any other event is the
/// reason it failed.
async fn expect(
    ec: &Arc<EventChannel>,
    fd: &AsyncFd<RawFd>,
    want: EventType,
) -> Result<(), String> {
    let (got, status) = next_kind(ec, fd).await?;
    if got == want {
        Ok(())
    } else {
        Err(format!(
            "{got:?} (status {status}) while waiting for {want:?}"
        ))
    }
}

async fn next_event(ec: &Arc<EventChannel>, fd: &AsyncFd<RawFd>) -> Result<Event, String> {
    loop {
        let mut ready = fd.readable().await.map_err(|e| format!("rdma_cm: {e}"))?;
        match ec.get_cm_event() {
            Ok(event) => return Ok(event),
            Err(e) if matches!(e.0, GetEventErrorKind::NoEvent) => ready.clear_ready(),
            Err(e) => return Err(format!("rdma_cm: {e}")),
        }
    }
}

fn event_channel() -> Result<(Arc<EventChannel>, AsyncFd<RawFd>), String> {
    let ec = EventChannel::new().map_err(|e| {
        format!("rdma_cm: {e} (is rdma-core installed and an RDMA device present?)")
    })?;
    ec.set_nonblocking(true)
        .map_err(|e| format!("rdma_cm: {e}"))?;
    // SAFETY: every holder of `fd` also holds `ec` (or an id holding it),
    // which owns the descriptor, and drops `fd` first.
    let fd = unsafe { AsyncFd::register(ec.as_raw_fd()) }.map_err(|e| format!("rdma_cm: {e}"))?;
    Ok((ec, fd))
}

/// Reads `host:port`, also an IPv6 link-local address scoped by interface
/// name (`[fe80::1%eth0]:7410`), which pins the path to that interface.
pub fn resolve(addr: &str) -> Result<SocketAddr, String> {
    if let Some((scoped, port)) = addr
        .strip_prefix('[')
        .and_then(|rest| rest.split_once("]:"))
    {
        if let Some((ip, scope)) = scoped.split_once('%') {
            let ip: std::net::Ipv6Addr = ip.parse().map_err(|e| format!("{addr}: {e}"))?;
            let port: u16 = port.parse().map_err(|e| format!("{addr}: port: {e}"))?;
            let scope_id = match scope.parse::<u32>() {
                Ok(n) => n,
                Err(_) => {
                    let name = std::ffi::CString::new(scope).map_err(|e| format!("{addr}: {e}"))?;
                    // SAFETY: a NUL-terminated name; the call only reads it.
                    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
                        0 => return Err(format!("{addr}: no interface {scope:?}")),
                        n => n,
                    }
                }
            };
            return Ok(SocketAddr::V6(std::net::SocketAddrV6::new(
                ip, port, 0, scope_id,
            )));
        }
    }
    addr.to_socket_addrs()
        .map_err(|e| format!("{addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr}: no address"))
}

/// Opens client channels over RDMA (`rdma://host:port`).
pub struct RdmaDialer {
    domains: Arc<Domains>,
    forge: bool,
}

impl RdmaDialer {
    /// A dialer whose sessions share `region_bytes` of registered memory
    /// per device (at least [`MIN_REGION`], else the error says so).
    pub fn new(region_bytes: u64) -> Result<RdmaDialer, String> {
        Ok(RdmaDialer {
            domains: Domains::new(region_bytes, true, None)?,
            forge: false,
        })
    }

    /// A hostile client for tests: every second buffer it names lies past
    /// the end of its registration, as a forged REMOTE_BUF would. Only
    /// those requests may fail, and nothing else on the server.
    pub fn forging(region_bytes: u64) -> Result<RdmaDialer, String> {
        Ok(RdmaDialer {
            forge: true,
            ..RdmaDialer::new(region_bytes)?
        })
    }
}

impl RdmaDialer {
    /// Registered memory for the frontends to receive WRITE data into
    /// (see [`Staging`]): the server then fetches it with no copy.
    pub fn write_staging(&self) -> Arc<dyn Staging> {
        Arc::new(DomainStaging {
            domains: self.domains.clone(),
            staged: true,
        })
    }
}

impl Dialer for RdmaDialer {
    fn dial(
        &self,
        addr: &str,
        ch: ChannelId,
        queue_limit: usize,
        events: mpsc::UnboundedSender<ConnEvent<ChannelId>>,
    ) -> Dialing {
        let domains = self.domains.clone();
        let addr = addr.to_string();
        let forge = self.forge;
        Box::pin(async move {
            let dst = resolve(&addr)?;
            let (ec, fd) = event_channel()?;
            let id = ec
                .create_id(PortSpace::Tcp)
                .map_err(|e| format!("rdma_cm id: {e}"))?;
            id.resolve_addr(None, dst, RESOLVE)
                .map_err(|e| format!("no RDMA route to {dst}: {e}"))?;
            expect(&ec, &fd, EventType::AddressResolved)
                .await
                .map_err(|e| format!("no RDMA route to {dst}: {e}"))?;
            id.resolve_route(RESOLVE)
                .map_err(|e| format!("no RDMA route to {dst}: {e}"))?;
            expect(&ec, &fd, EventType::RouteResolved)
                .await
                .map_err(|e| format!("no RDMA route to {dst}: {e}"))?;
            let ctx = id
                .get_device_context()
                .ok_or_else(|| format!("no RDMA device reaches {dst}"))?;
            let domain = domains.for_device(&ctx)?;
            let mut channel = Channel::new(&ctx, &domain)?;
            channel.init(&id, true)?;
            {
                let mut param = ConnectionParameter::default();
                param.setup_qp_number(channel.qp.qp_number());
                id.connect(param).map_err(|e| format!("connect: {e}"))?;
            }
            {
                match next_kind(&ec, &fd).await? {
                    (EventType::ConnectResponse, _) => {}
                    (EventType::Rejected, status) => {
                        return Err(format!(
                            "the server at {dst} refused the RDMA channel (rejected, status \
                             {status}): it is at its limit of RDMA channels (its log says so) \
                             or cannot serve RDMA now"
                        ))
                    }
                    (other, status) => {
                        return Err(format!(
                            "{other:?} (status {status}) while waiting for ConnectResponse"
                        ))
                    }
                }
            }
            channel.ready(&id)?;
            id.establish().map_err(|e| format!("establish: {e}"))?;
            let region = Region {
                base: domain.region.addr(0),
                len: domains.bytes,
                rkey: domain.region.mr().rkey(),
            };
            let link = if forge {
                ClientLink::forging(region)
            } else {
                ClientLink::new(region)
            };
            let (writer, outbox) = Writer::new(queue_limit);
            // The client's own event channel says when the server leaves.
            let (gone_tx, gone_rx) = mpsc::unbounded_channel();
            tokio::spawn(async move {
                let why = loop {
                    let ev = tokio::select! {
                        ev = next_event(&ec, &fd) => ev,
                        // The channel ended first: nothing left to watch.
                        _ = gone_tx.closed() => break String::new(),
                    };
                    match ev {
                        Ok(ev) => {
                            let t = ev.event_type();
                            let _ = ev.ack();
                            if matches!(t, EventType::Disconnected | EventType::DeviceRemoval) {
                                break format!("rdma_cm: {t:?}");
                            }
                        }
                        Err(e) => break e,
                    }
                };
                let _ = gone_tx.send(why);
                drop(fd);
                drop(ec);
            });
            tokio::spawn(run(
                End::Client(link),
                channel,
                domain,
                id,
                outbox,
                gone_rx,
                move |ev| events.send(ev.map_key(ch)).is_ok(),
            ));
            Ok(writer)
        })
    }
}

/// A connection event before the engine's key is attached.
enum Heard {
    Frame(Bytes),
    Closed(String),
}

impl Heard {
    fn map_key<K>(self, key: K) -> ConnEvent<K> {
        match self {
            Heard::Frame(f) => ConnEvent::Frame(key, f.into()),
            Heard::Closed(why) => ConnEvent::Closed(key, why),
        }
    }
}

/// An rdma_cm listener, bound before the server starts so a bad address
/// stops `braid serve` at once.
pub struct RdmaListener {
    addr: SocketAddr,
    ec: Arc<EventChannel>,
    fd: AsyncFd<RawFd>,
    id: Arc<Identifier>,
    domains: Arc<Domains>,
}

impl RdmaListener {
    /// Listens on `addr`; the server's payload staging is `region_bytes`
    /// of registered memory per device (at least [`MIN_REGION`]), and its
    /// channels count against `channels`, which its other listeners share.
    pub fn bind(
        addr: SocketAddr,
        region_bytes: u64,
        channels: Arc<ChannelLimit>,
    ) -> Result<RdmaListener, String> {
        check_region(region_bytes)?;
        let (ec, fd) = event_channel()?;
        let id = ec
            .create_id(PortSpace::Tcp)
            .map_err(|e| format!("rdma_cm id: {e}"))?;
        id.bind_addr(addr).map_err(|e| {
            format!("RDMA listen on {addr}: {e} (no RDMA device has this address?)")
        })?;
        id.listen(64)
            .map_err(|e| format!("RDMA listen on {addr}: {e}"))?;
        Ok(RdmaListener {
            addr,
            ec,
            fd,
            id,
            domains: Domains::new(region_bytes, false, Some(channels))?,
        })
    }

    /// The listener's registered memory as read buffers for the backend
    /// (`FileBackend::with_read_staging`), so READ data is placed without
    /// a copy.
    pub fn read_staging(&self) -> Arc<dyn Staging> {
        Arc::new(DomainStaging {
            domains: self.domains.clone(),
            staged: false,
        })
    }

    /// Accepts channels for `server` until it stops.
    pub fn serve(self, server: Server) {
        let RdmaListener {
            addr,
            ec,
            fd,
            id,
            domains,
        } = self;
        tokio::spawn(serve(addr, ec, fd, id, domains, server));
    }
}

async fn serve(
    addr: SocketAddr,
    ec: Arc<EventChannel>,
    fd: AsyncFd<RawFd>,
    id: Arc<Identifier>,
    domains: Arc<Domains>,
    server: Server,
) {
    {
        // Keep the listening id alive as long as the task.
        let _listener = id;
        type Accepting = (Arc<Identifier>, Channel, Arc<Domain>, Option<ChannelSlot>);
        let mut accepting: HashMap<usize, Accepting> = HashMap::new();
        let mut live: HashMap<usize, mpsc::UnboundedSender<String>> = HashMap::new();
        // Connection requests refused at the channel limit so far.
        let mut at_limit = 0u64;
        loop {
            let event = match next_event(&ec, &fd).await {
                Ok(e) => e,
                Err(e) => {
                    tracing::error!(%addr, error = e, "RDMA listener stopped");
                    return;
                }
            };
            let kind = event.event_type();
            tracing::debug!(?kind, status = event.status(), "rdma_cm event");
            let Some(cm) = event.cm_id() else {
                let _ = event.ack();
                continue;
            };
            let key = Arc::as_ptr(&cm) as usize;
            let _ = event.ack();
            match kind {
                EventType::ConnectRequest => {
                    // Taken before anything is registered for the channel.
                    let slot = match domains.channels.as_ref().map(|l| l.take()).transpose() {
                        Ok(slot) => slot,
                        Err(e) => {
                            // Dropping the request's id rejects it. Warned
                            // at every power of two, so a peer that keeps
                            // asking cannot flood the log.
                            at_limit += 1;
                            if at_limit.is_power_of_two() {
                                tracing::warn!(%addr, refused = at_limit, error = e, "RDMA connection refused");
                            }
                            continue;
                        }
                    };
                    match accept(&cm, &domains) {
                        Ok((channel, domain)) => {
                            accepting.insert(key, (cm, channel, domain, slot));
                        }
                        Err(e) => tracing::warn!(%addr, error = e, "RDMA connection refused"),
                    }
                }
                EventType::Established => {
                    let Some((cm, channel, domain, slot)) = accepting.remove(&key) else {
                        continue;
                    };
                    let (gone_tx, gone_rx) = mpsc::unbounded_channel();
                    live.insert(key, gone_tx);
                    let started = server.adopt(Box::new(move |conn: ConnId, events| {
                        let (writer, outbox) = Writer::new(64 << 20);
                        let channel_run = run(
                            End::Server(ServerLink::new()),
                            channel,
                            domain,
                            cm,
                            outbox,
                            gone_rx,
                            move |ev| events.send(ev.map_key(conn)).is_ok(),
                        );
                        tokio::spawn(async move {
                            channel_run.await;
                            // Its head ring is deregistered by now.
                            drop(slot);
                        });
                        writer
                    }));
                    if !started {
                        return;
                    }
                }
                EventType::Disconnected | EventType::DeviceRemoval | EventType::TimewaitExit => {
                    accepting.remove(&key);
                    if let Some(gone) = live.remove(&key) {
                        let _ = gone.send(format!("{kind:?}"));
                    }
                }
                other => {
                    accepting.remove(&key);
                    tracing::debug!(?other, "rdma_cm event");
                }
            }
            live.retain(|_, gone| !gone.is_closed());
        }
    }
}

fn accept(cm: &Arc<Identifier>, domains: &Domains) -> Result<(Channel, Arc<Domain>), String> {
    let ctx = cm
        .get_device_context()
        .ok_or("connection request without a device")?;
    let domain = domains.for_device(&ctx)?;
    let mut channel = Channel::new(&ctx, &domain)?;
    channel.init(cm, false)?;
    channel.ready(cm)?;
    let mut param = ConnectionParameter::default();
    param.setup_qp_number(channel.qp.qp_number());
    cm.accept(param).map_err(|e| format!("accept: {e}"))?;
    Ok((channel, domain))
}

/// One channel's life: frames from the engine out, messages and
/// completions in, until the peer leaves, a work request fails, or the
/// engine closes it.
async fn run(
    mut end: End,
    mut ch: Channel,
    domain: Arc<Domain>,
    id: Arc<Identifier>,
    mut outbox: Outbox,
    mut gone: mpsc::UnboundedReceiver<String>,
    emit: impl Fn(Heard) -> bool,
) {
    let mut queue = SendQueue::new(SEND_SLOTS, SEND_QUEUE);
    let why = loop {
        // Armed before looking, so memory another channel frees from now
        // on wakes this one even while it is busy below.
        let freed = domain.freed.notified();
        tokio::pin!(freed);
        freed.as_mut().enable();
        let mut out = Vec::new();
        end.retry(&mut domain.arena.lock().unwrap(), &mut out);
        if let Err(e) = execute(&mut ch, &domain, &mut queue, out, &emit) {
            break e;
        }
        let closing;
        tokio::select! {
            biased;
            ready = ch.cq_fd.readable() => {
                let Ok(mut ready) = ready else { break "completion channel failed".to_string() };
                ready.clear_ready();
                if let Err(e) = completions(&mut ch, &mut end, &domain, &mut queue, &emit) {
                    break e;
                }
                continue;
            }
            why = gone.recv() => break why.unwrap_or_else(|| "listener gone".into()),
            _ = &mut freed => continue,
            msg = outbox.recv(), if !queue.is_backed_up() => {
                closing = !matches!(msg, Some(Outgoing::Frame(_)));
                if let Some(Outgoing::Frame(frame)) = msg {
                    outbox.sent(frame.len());
                    let mut out = Vec::new();
                    // A staged payload frees itself into the arena when its
                    // last owner drops it: never let that be the link,
                    // under the arena's lock (say, refusing the frame).
                    let payload = frame.payload.clone();
                    let sent = {
                        let mut arena = domain.arena.lock().unwrap();
                        match &mut end {
                            End::Client(l) => {
                                let staged = domain.region.offset_of(&frame.payload);
                                let before = l.writes_named();
                                l.send_staged(frame, staged, &mut arena, &mut out);
                                let after = l.writes_named();
                                domain
                                    .writes_in_place
                                    .fetch_add(after.0 - before.0, Ordering::Relaxed);
                                domain
                                    .writes_copied
                                    .fetch_add(after.1 - before.1, Ordering::Relaxed);
                                Ok(())
                            }
                            End::Server(l) => {
                                let staged = domain.region.offset_of(&frame.payload);
                                if !frame.payload.is_empty() {
                                    let count = match staged {
                                        Some(_) => &domain.placed_in_place,
                                        None => &domain.placed_copied,
                                    };
                                    count.fetch_add(1, Ordering::Relaxed);
                                }
                                l.send_staged(frame, staged, &mut arena, &mut out)
                            }
                        }
                    };
                    drop(payload);
                    if let Err(LinkError(e)) = sent {
                        break e;
                    }
                    if let Err(e) = execute(&mut ch, &domain, &mut queue, out, &emit) {
                        break e;
                    }
                }
            }
        }
        if closing {
            break "closed".to_string();
        }
    };
    tracing::debug!(why, "RDMA channel ends");
    let _ = id.disconnect();
    // The queue pair goes with `ch`: nothing can touch our memory after.
    drop(ch);
    // Frames and payloads are dropped after the arena is let go: a staged
    // payload frees its memory into it.
    let (placing, backlog, held) = queue.close();
    let unsent = {
        let mut arena = domain.arena.lock().unwrap();
        for e in placing {
            arena.free(e);
        }
        match &mut end {
            End::Client(l) => l.close(&mut arena),
            End::Server(l) => l.close(&mut arena).into_iter().map(|f| f.payload).collect(),
        }
    };
    drop((unsent, backlog, held));
    domain.freed.notify_waiters();
    emit(Heard::Closed(why));
}

fn completions(
    ch: &mut Channel,
    end: &mut End,
    domain: &Arc<Domain>,
    queue: &mut SendQueue,
    emit: &impl Fn(Heard) -> bool,
) -> Result<(), String> {
    // Take every event the (non-blocking) channel holds, so none is left
    // behind the edge the reactor saw; re-arm, then poll, so a completion
    // arriving in between is not missed.
    // SAFETY: the CQ and its channel live as long as `ch`.
    unsafe {
        let mut cq = std::ptr::null_mut();
        let mut ctx = std::ptr::null_mut();
        while rdma_mummy_sys::ibv_get_cq_event(ch.comp.comp_channel().as_ptr(), &mut cq, &mut ctx)
            == 0
        {
            rdma_mummy_sys::ibv_ack_cq_events(cq, 1);
        }
        rdma_mummy_sys::ibv_req_notify_cq(ch.cq.cq().as_ptr(), 0);
    }
    loop {
        let mut done = Vec::new();
        if let Ok(poller) = ch.cq.start_poll() {
            for wc in poller {
                done.push((wc.wr_id(), wc.status(), wc.byte_len(), wc.opcode()));
            }
        }
        if done.is_empty() {
            return Ok(());
        }
        for (wr, status, len, opcode) in done {
            if status != WorkCompletionStatus::Success as u32 {
                let status: WorkCompletionStatus = status.into();
                return Err(format!("work request failed: {status:?}"));
            }
            let mut out = Vec::new();
            if let Some(slot) = recv_slot(wr) {
                let message = ch.heads.read(slot * HEAD_SLOT, len as usize).to_vec();
                ch.post_recv(slot)?;
                let mut arena = domain.arena.lock().unwrap();
                match end {
                    End::Client(l) => l.received(&message, &mut out).map_err(|e| e.0)?,
                    End::Server(l) => {
                        let refused = l.refused();
                        l.received(&message, &mut arena, &mut out)
                            .map_err(|e| e.0)?;
                        // Warned at every power of two, so a hostile client
                        // cannot flood the log.
                        if l.refused() > refused && l.refused().is_power_of_two() {
                            tracing::warn!(
                                refused = l.refused(),
                                "a request named client memory outside the window the client \
                                 registered: answered INVALID, the channel stays up"
                            );
                        }
                    }
                }
            } else {
                match queue.completed(wr)? {
                    Completed::Sent => {}
                    Completed::Fetched { token, extent } => {
                        if cfg!(debug_assertions) {
                            check_landed(domain, wr, extent, len, opcode);
                        }
                        if let End::Server(l) = end {
                            l.fetched(token, &mut domain.arena.lock().unwrap(), &mut out);
                        }
                    }
                    Completed::Placed(extent) => domain.free(extent),
                    Completed::Released(payload) => drop(payload),
                }
            }
            execute(ch, domain, queue, out, emit)?;
            if cfg!(debug_assertions) {
                queue
                    .check(SEND_SLOTS)
                    .map_err(|e| format!("send queue inconsistent: {e}"))?;
                domain
                    .arena
                    .lock()
                    .unwrap()
                    .check()
                    .map_err(|e| format!("arena inconsistent: {e}"))?;
            }
        }
    }
}

fn execute(
    ch: &mut Channel,
    domain: &Arc<Domain>,
    queue: &mut SendQueue,
    work: Vec<Work>,
    emit: &impl Fn(Heard) -> bool,
) -> Result<(), String> {
    queue.push(work);
    while let Some(step) = queue.next_step() {
        match step {
            Step::Local(Work::Fill { extent, data }) => {
                domain.region.write(extent.offset as usize, &data)
            }
            Step::Local(Work::Deliver {
                head,
                payload,
                owned,
            }) => {
                if let Some((extent, len)) = payload {
                    damage_for_test(domain, extent, len);
                }
                let frame = match payload {
                    None => Bytes::from(head),
                    // Zero-copy: the head goes into the room before the
                    // data, and the engine (and the backend or frontend
                    // behind it) reads the registered memory itself.
                    Some((extent, len)) if owned => {
                        let start = extent.offset as usize - head.len();
                        domain.region.write(start, &head);
                        domain.delivered(extent, start, head.len() + len as usize)
                    }
                    Some((extent, len)) => {
                        let mut frame = head;
                        frame.extend_from_slice(
                            domain.region.read(extent.offset as usize, len as usize),
                        );
                        Bytes::from(frame)
                    }
                };
                if !emit(Heard::Frame(frame)) {
                    return Err("engine gone".into());
                }
            }
            Step::Local(Work::Free(extent)) => domain.free(extent),
            Step::Local(Work::Release(payload)) => drop(payload),
            Step::Local(other) => unreachable!("the send queue posts {other:?} itself"),
            Step::Send { wr, slot, message } => {
                let at = (RECV_DEPTH + slot) * HEAD_SLOT;
                ch.heads.write(at, &message);
                let mut guard = ch.qp.start_post_send();
                let h = guard
                    .construct_wr(wr, WorkRequestFlags::Signaled)
                    .setup_send();
                // SAFETY: the slot lies in the registered head ring.
                unsafe {
                    h.setup_sge(
                        ch.heads.mr().lkey(),
                        ch.heads.addr(at),
                        message.len() as u32,
                    )
                };
                guard.post().map_err(|e| format!("posting a send: {e}"))?;
            }
            Step::Fetch { wr, extent, remote } => {
                if cfg!(debug_assertions) {
                    for (at, m) in mark::marks(extent.len as usize, wr) {
                        domain.region.write(extent.offset as usize + at, &m);
                    }
                }
                post_one_sided(ch, domain, wr, extent, remote, true)?
            }
            Step::Place { wr, extent, remote } => {
                post_one_sided(ch, domain, wr, extent, remote, false)?
            }
        }
    }
    Ok(())
}

/// A fetch reported success: its destination must hold none of the marks
/// put there before it was posted.
fn check_landed(domain: &Domain, wr: u64, extent: Extent, byte_len: u32, opcode: u32) {
    let dest = domain
        .region
        .read(extent.offset as usize, extent.len as usize);
    let left = mark::marks_left(dest, wr);
    if left > 0 {
        tracing::error!(
            wr = format_args!("{wr:#x}"),
            extent = extent.offset,
            len = extent.len,
            byte_len,
            opcode,
            marks_left = left,
            marks = mark::marks(dest.len(), wr).count(),
            "an RDMA READ reported success but its data did not land: the fabric lost it \
             (braid's payload CRC refuses what is there)"
        );
    }
}

/// `BRAID_TEST_RDMA_CORRUPT=N` (the conformance check's): every Nth
/// payload moved one-sided has a byte flipped before the engine sees it,
/// as a memory or PCIe error on this host would, so braid's CRC must
/// catch it and the request be asked again.
fn damage_for_test(domain: &Domain, extent: Extent, len: u32) {
    static EVERY: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static SEEN: AtomicU64 = AtomicU64::new(0);
    let every = *EVERY.get_or_init(|| {
        let n = std::env::var("BRAID_TEST_RDMA_CORRUPT")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if n > 0 {
            tracing::warn!(
                every = n,
                "BRAID_TEST_RDMA_CORRUPT: damaging one-sided payloads"
            );
        }
        n
    });
    if every == 0 || len == 0 || (SEEN.fetch_add(1, Ordering::Relaxed) + 1) % every != 0 {
        return;
    }
    let at = extent.offset as usize + (len as usize - 1) / 2;
    let byte = domain.region.read(at, 1)[0];
    domain.region.write(at, &[!byte]);
}

/// Posts an RDMA READ of the peer's `remote` into `extent` (`fetch`), or
/// an RDMA WRITE of `extent` to it.
fn post_one_sided(
    ch: &mut Channel,
    domain: &Domain,
    wr: u64,
    extent: Extent,
    remote: RemoteBuf,
    fetch: bool,
) -> Result<(), String> {
    let mut guard = ch.qp.start_post_send();
    let h = guard.construct_wr(wr, WorkRequestFlags::Signaled);
    let h = if fetch {
        h.setup_read(remote.rkey, remote.addr)
    } else {
        h.setup_write(remote.rkey, remote.addr)
    };
    // SAFETY: the extent lies in the registered region.
    unsafe {
        h.setup_sge(
            domain.region.mr().lkey(),
            domain.region.addr(extent.offset as usize),
            extent.len,
        )
    };
    let what = if fetch { "fetch" } else { "placement" };
    guard.post().map_err(|e| format!("posting a {what}: {e}"))
}
