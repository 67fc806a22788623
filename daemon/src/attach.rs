//! `braid attach`: a braid volume (the multi-channel client, with its
//! failover, resends and replay) exposed as a local NBD server, so a kernel
//! without ublk gets a block device (`nbd-client -unix`) and qemu can boot
//! from it. `braid detach` asks it to finish in-flight IO and leave.

use crate::client_args::ClientArgs;
use braid_core::client::{IoErrorKind, IoRequest};
use braid_core::server::{BackendOp, Extent};
use braid_core::wire::{Op, Status, EXPORT_READ_ONLY};
use braid_fabric_tcp::Client;
use braid_frontend_nbd::{Completion, ExtentsCompletion, NbdConfig, NbdExport, Target};
use bytes::{Bytes, BytesMut};
use clap::Args;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::Notify;

#[derive(Args, Debug)]
pub(crate) struct AttachArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(flatten)]
    ublk: crate::ublk::UblkArgs,
    /// Serve the volume over NBD on this unix socket path or TCP
    /// host:port; repeatable [default without --ublk:
    /// DATA_DIR/EXPORT.nbd.sock].
    #[arg(long)]
    nbd: Vec<String>,
    /// Allow --nbd on a TCP address other machines reach (NBD has no
    /// authentication: anyone who connects reads and writes the volume).
    #[arg(long)]
    nbd_allow_insecure: bool,
    /// Control socket for `braid status` and `braid detach`
    /// [default: DATA_DIR/EXPORT.attach.sock].
    #[arg(long)]
    control: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9411).
    #[arg(long)]
    metrics: Option<String>,
    /// Attach a volume over several exports (mirror, stripe, linear)
    /// described in this TOML file instead of one export.
    #[arg(long)]
    volume: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub(crate) struct DetachArgs {
    /// The attached volume's control socket.
    #[arg(long)]
    control: PathBuf,
}

/// Makes the braid request for `len` bytes at `offset`, `at` bytes into
/// the original request.
type PartBuilder = Box<dyn Fn(u64, u32, usize) -> IoRequest>;

/// Where an attached volume's IO goes: one export's session, or a volume
/// over several legs.
#[derive(Clone)]
enum Sink {
    Export(Client),
    Legs(braid_fabric_tcp::Volume),
}

impl Sink {
    async fn io(&self, io: IoRequest) -> Result<Bytes, IoErrorKind> {
        match self {
            Sink::Export(c) => c.io(io).await.map_err(|e| {
                tracing::warn!(error = %e, "IO failed");
                e.kind
            }),
            Sink::Legs(v) => v.io(io).await.inspect_err(|kind| {
                tracing::warn!(error = ?kind, "volume IO failed");
            }),
        }
    }
}

/// NBD requests carried by a braid [`Client`] or volume. Requests longer
/// than the largest payload are split and the parts run in parallel.
struct VolumeTarget {
    sink: Sink,
    max_part: u32,
}

impl VolumeTarget {
    /// The braid requests that together perform `op`.
    fn parts(&self, op: BackendOp) -> Vec<IoRequest> {
        let (offset, len, build): (u64, u32, PartBuilder) = match op {
            BackendOp::Flush => return vec![IoRequest::flush()],
            BackendOp::Read { offset, len } => {
                (offset, len, Box::new(|o, l, _| IoRequest::read(o, l)))
            }
            BackendOp::Write { offset, data, fua } => {
                let len = data.len() as u32;
                (
                    offset,
                    len,
                    Box::new(move |o, l, at| {
                        IoRequest::write(o, data.slice(at..at + l as usize), fua)
                    }),
                )
            }
            BackendOp::Trim { offset, len, fua } => (
                offset,
                len,
                Box::new(move |o, l, _| IoRequest {
                    fua,
                    ..IoRequest::trim(o, l)
                }),
            ),
            BackendOp::WriteZeroes {
                offset,
                len,
                fua,
                may_unmap,
                ..
            } => (
                offset,
                len,
                Box::new(move |o, l, _| IoRequest {
                    no_unmap: !may_unmap,
                    ..IoRequest::write_zeroes(o, l, fua)
                }),
            ),
        };
        let mut parts = Vec::with_capacity((len / self.max_part + 1) as usize);
        let mut at = 0u32;
        while at < len {
            let n = self.max_part.min(len - at);
            parts.push(build(offset + u64::from(at), n, at as usize));
            at += n;
        }
        parts
    }
}

fn status_of(kind: IoErrorKind) -> Status {
    match kind {
        IoErrorKind::NoSpace => Status::NoSpace,
        IoErrorKind::OutOfRange => Status::OutOfRange,
        IoErrorKind::ReadOnly => Status::ReadOnly,
        IoErrorKind::Invalid => Status::Invalid,
        IoErrorKind::Unsupported => Status::Unsupported,
        IoErrorKind::Media
        | IoErrorKind::TimedOut
        | IoErrorKind::Closed
        | IoErrorKind::Fenced
        | IoErrorKind::Unknown(_) => Status::Io,
    }
}

impl Target for VolumeTarget {
    fn submit(&self, _export: usize, op: BackendOp, done: Completion) {
        let bytes = crate::busy_poll::data_len(&op);
        let mut parts = self.parts(op);
        let client = self.sink.clone();
        if parts.len() == 1 {
            let io = parts.pop().unwrap();
            crate::busy_poll::mark_io(bytes);
            let Sink::Export(export) = &client else {
                tokio::spawn(async move {
                    let r = client.io(io).await;
                    crate::busy_poll::mark_io(bytes);
                    done(r.map_err(status_of))
                });
                return;
            };
            // The answer goes straight to the NBD reply: no task per IO.
            let answer: braid_fabric_tcp::IoCallback = Box::new(move |r| {
                crate::busy_poll::mark_io(bytes);
                done(r.map_err(|e| {
                    tracing::warn!(error = %e, "IO failed");
                    status_of(e.kind)
                }))
            });
            if let Err((io, answer)) = export.try_io_with(io, answer) {
                // The driver's queue is full: wait for room in a task.
                let export = export.clone();
                tokio::spawn(async move { answer(export.io(io).await) });
            }
            return;
        }
        tokio::spawn(async move {
            let is_read = parts.first().is_some_and(|p| p.op == Op::Read);
            let mut set = tokio::task::JoinSet::new();
            for (i, io) in parts.into_iter().enumerate() {
                let client = client.clone();
                set.spawn(async move { (i, client.io(io).await) });
            }
            let mut results = Vec::with_capacity(set.len());
            while let Some(r) = set.join_next().await {
                match r {
                    Ok(r) => results.push(r),
                    Err(_) => return done(Err(Status::Io)),
                }
            }
            results.sort_by_key(|(i, _)| *i);
            let mut data = BytesMut::new();
            for (_, r) in results {
                match r {
                    Ok(part) if is_read => data.extend_from_slice(&part),
                    Ok(_) => {}
                    Err(e) => return done(Err(status_of(e))),
                }
            }
            done(Ok(if is_read { data.freeze() } else { Bytes::new() }))
        });
    }

    fn allocation(&self, _export: usize, _offset: u64, len: u64, done: ExtentsCompletion) {
        // The braid protocol carries no allocation map: report data, which
        // the NBD spec allows for any block.
        done(Ok(vec![Extent { len, hole: false }]))
    }

    fn write_staging(&self) -> Option<Arc<dyn braid_core::staging::Staging>> {
        crate::rdma::write_staging()
    }

    fn fast_zero(&self) -> bool {
        // A braid WRITE_ZEROES cannot promise to be fast.
        false
    }

    fn client_wait(&self) {
        crate::busy_poll::transfer_wait()
    }
}

pub(crate) async fn run(args: AttachArgs) -> Result<(), String> {
    if let Some(path) = args.volume.clone() {
        return run_volume(args, path).await;
    }
    let export = args.client.export.clone();
    let data_dir = crate::config::default_data_dir();
    let control = args
        .control
        .unwrap_or_else(|| data_dir.join(format!("{export}.attach.sock")));
    // Before connecting: a second attach of one volume must not take the
    // first one's sockets over.
    crate::control::ensure_unused(&control)?;
    crate::ublk::preflight(&args.ublk)?;
    let metrics = args
        .metrics
        .as_deref()
        .map(crate::metrics::MetricsListener::bind)
        .transpose()?;
    let client = args.client.connect().await?;
    let info = client.info();
    let nbd_addrs = if args.nbd.is_empty() && !args.ublk.wanted() {
        std::fs::create_dir_all(&data_dir)
            .map_err(|e| format!("data dir {}: {e}", data_dir.display()))?;
        vec![data_dir
            .join(format!("{export}.nbd.sock"))
            .display()
            .to_string()]
    } else {
        args.nbd.clone()
    };
    let nbd_export = NbdExport {
        read_only: info.flags & EXPORT_READ_ONLY != 0,
        block_min: info.block_size,
        ..NbdExport::new(export.clone(), info.size, 0)
    };
    let target: Arc<dyn Target> = Arc::new(VolumeTarget {
        sink: Sink::Export(client.clone()),
        // Whole blocks, and at least one (a server that allowed less
        // would accept no request at all).
        max_part: (info.max_payload - info.max_payload % info.block_size).max(info.block_size),
    });
    let stop = Arc::new(Notify::new());
    let mut uris = Vec::new();
    let mut tasks = Vec::new();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut owned = Vec::new();
    for addr in &nbd_addrs {
        let config = NbdConfig::new(vec![nbd_export.clone()]);
        let (uri, task) = crate::nbd::start(
            addr,
            &export,
            config,
            braid_frontend_nbd::Placement::here(target.clone()),
            args.nbd_allow_insecure,
            stop_rx.clone(),
        )
        .await?;
        if addr.contains('/') {
            owned.extend(crate::control::OwnedSocket::claim(Path::new(addr)));
        }
        uris.push(uri);
        tasks.push(task);
    }
    let volume = crate::ublk::Volume {
        size: info.size,
        block_size: info.block_size,
        read_only: nbd_export.read_only,
        max_request: info.max_payload,
    };
    let device = match crate::ublk::maybe_create(&args.ublk, volume, target.clone()).await {
        Ok(d) => d,
        Err(e) => {
            let _ = stop_tx.send(true);
            client.close().await;
            remove_sockets(owned);
            return Err(e);
        }
    };
    let block_device = crate::ublk::path_of(&device);
    println!(
        "braid volume {export:?} ({}) from {} attached",
        crate::config::human_size(info.size),
        args.client.server()
    );
    if let Some(path) = &block_device {
        println!("device:   {path}");
    }
    for (uri, addr) in uris.iter().zip(&nbd_addrs) {
        println!("nbd:      {uri}");
        if addr.contains('/') {
            println!("          nbd-client -N {export} -u {addr} /dev/nbd0   (as root)");
        }
    }
    println!("status:   braid status --control {}", control.display());
    println!("detach:   braid detach --control {}", control.display());
    if let Some(m) = metrics {
        println!("metrics:  {}", m.url());
        m.serve_client(client.clone(), export.clone());
    }
    // Before the control socket answers and systemd hears READY: a
    // reload sent then must find the handler, not SIGHUP's default, which
    // ends the process.
    let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|e| format!("SIGHUP handler: {e}"))?;
    let (reloaded, client_args) = (client.clone(), args.client.clone());
    tokio::spawn(crate::reload::on_hangup(hangups, move || {
        let (client, client_args) = (reloaded.clone(), client_args.clone());
        async move { crate::reload::client_key(&client, &client_args).await }
    }));
    {
        let (client, stop, uris, server, client_args) = (
            client.clone(),
            stop.clone(),
            uris.clone(),
            args.client.server(),
            args.client.clone(),
        );
        let (export, block_device) = (export.clone(), block_device.clone());
        owned.extend(crate::control::serve(control.clone(), move |command| {
            use crate::control::now;
            match command {
                "status" => {
                    let mut doc = document(&client, &server, &export, &uris);
                    doc["ublk"] = block_device.clone().into();
                    return now(doc);
                }
                "detach" => {
                    stop.notify_one();
                    return now(serde_json::json!({"detaching": export}));
                }
                "reload" => {
                    let (client, client_args) = (client.clone(), client_args.clone());
                    return crate::control::later(async move {
                        let said = crate::reload::client_key(&client, &client_args).await?;
                        Ok(serde_json::json!({ "keys": said }))
                    });
                }
                _ => {}
            }
            if let Some(settings) = command.strip_prefix("set ") {
                let tuning = match crate::tuning::parse_client(settings) {
                    Ok(t) => t,
                    Err(e) => return now(serde_json::json!({ "error": e })),
                };
                let client = client.clone();
                return crate::control::later(async move {
                    client.tune(tuning).await?;
                    Ok(
                        serde_json::json!({ "tuning": crate::tuning::client_json(&client.status().tuning) }),
                    )
                });
            }
            now(serde_json::json!({
                "error": format!("unknown command {command:?} (attach answers: status, detach, set KEY=VALUE..., reload)")
            }))
        }));
    }
    notify_attached(&export, &block_device);
    // NBD clients' and the block device's in-flight requests finish
    // first, then the session ends.
    wait_then_drain(&stop, stop_tx, tasks).await?;
    crate::ublk::remove(device).await;
    crate::client_args::print_channels(&client);
    client.close().await;
    remove_sockets(owned);
    println!("braid attach: detached");
    Ok(())
}

fn document(client: &Client, server: &str, export: &str, uris: &[String]) -> serde_json::Value {
    let s = client.status();
    let st = &s.stats;
    serde_json::json!({
        "role": "client",
        "server": server,
        "export": export,
        "size": client.info().size,
        "nbd": uris,
        "session": s.session.map(|(id, boot)| serde_json::json!({
            "id": format!("{id:#018x}"),
            "server_boot": format!("{boot:#018x}"),
        })),
        "channels": s.channels.iter().map(|(id, ready, inflight, rtt)| serde_json::json!({
            "id": id.to_string(),
            "state": if *ready { "up" } else { "down" },
            "path": s.path_of(*id),
            "inflight": inflight,
            "rtt_us": rtt.map(|r| r.as_micros() as u64),
        })).collect::<Vec<_>>(),
        "key_id": s.key_id,
        "last_channel_error": client.last_error(),
        "journaled": s.journaled,
        "dirty_bytes": s.dirty_bytes,
        "rdma_memory": crate::rdma::memory_json(),
        "submitted": st.submitted,
        "completed": st.completed,
        "failed": st.failed,
        "resends": st.resends,
        "failovers": st.failovers,
        "duplicates_dropped": st.duplicates_dropped,
        "corrupt_frames": st.corrupt_frames,
        "channel_failures": st.channel_failures,
        "session_resets": st.session_resets,
        "replayed_extents": st.replayed_extents,
        "replay_retries": st.replay_retries,
        "busy": st.busy,
        "driver_busy_us": u64::try_from(s.driver_busy.as_micros()).unwrap_or(u64::MAX),
        "tuning": crate::tuning::client_json(&s.tuning),
    })
}

/// `braid status` for an attached volume.
pub(crate) fn print_status(v: &serde_json::Value) {
    println!(
        "braid volume {} ({}) from {}",
        v["export"].as_str().unwrap_or("?"),
        crate::config::human_size(v["size"].as_u64().unwrap_or(0)),
        v["server"].as_str().unwrap_or("?")
    );
    for uri in v["nbd"].as_array().into_iter().flatten() {
        println!("  nbd {}", uri.as_str().unwrap_or("?"));
    }
    if let Some(s) = v["session"].as_object() {
        println!(
            "  session {} (server boot {})",
            s["id"].as_str().unwrap_or("?"),
            s["server_boot"].as_str().unwrap_or("?")
        );
    }
    println!("  key {}", v["key_id"].as_str().unwrap_or("?"));
    crate::rdma::print_memory(&v["rdma_memory"]);
    println!("  channels:");
    for c in v["channels"].as_array().into_iter().flatten() {
        let rtt = c["rtt_us"]
            .as_u64()
            .map_or("-".to_string(), |r| format!("{r} µs"));
        println!(
            "    {:<10} {:<5} {:<24} in flight {:<4} rtt {rtt}",
            c["id"].as_str().unwrap_or("?"),
            c["state"].as_str().unwrap_or("?"),
            c["path"].as_str().unwrap_or("?"),
            c["inflight"]
        );
    }
    if v["channels"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["state"] != "up")
    {
        println!(
            "  last channel error: {}",
            v["last_channel_error"].as_str().unwrap_or("?")
        );
    }
    let rows = [
        ("requests journaled (in flight)", "journaled"),
        ("unflushed bytes held for replay", "dirty_bytes"),
        ("IOs submitted", "submitted"),
        ("IOs completed", "completed"),
        ("IOs failed", "failed"),
        ("requests resent", "resends"),
        ("requests failed over", "failovers"),
        ("duplicate answers dropped", "duplicates_dropped"),
        ("corrupt frames refused", "corrupt_frames"),
        ("channel failures", "channel_failures"),
        ("server sessions replaced", "session_resets"),
        ("extents replayed", "replayed_extents"),
        ("replays refused and retried", "replay_retries"),
    ];
    for (label, key) in rows {
        println!("  {label:<34} {}", v[key].as_u64().unwrap_or(0));
    }
    println!(
        "  {:<34} {:.1} s",
        "driver task busy",
        v["driver_busy_us"].as_u64().unwrap_or(0) as f64 / 1e6
    );
    if let Some(t) = v["tuning"].as_object() {
        let settings: Vec<String> = t.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("  settings (braid set): {}", settings.join(" "));
    }
}

pub(crate) async fn detach(args: DetachArgs) -> Result<(), String> {
    let v = crate::control::request(&args.control, "detach").await?;
    if let Some(e) = v["error"].as_str() {
        return Err(format!("{}: {e}", args.control.display()));
    }
    println!(
        "detaching {} (in-flight IO finishes first)",
        v["detaching"].as_str().unwrap_or("?")
    );
    Ok(())
}

/// `braid attach --volume FILE`: every leg's session, the volume driver
/// over them, and the NBD face.
async fn run_volume(mut args: AttachArgs, path: PathBuf) -> Result<(), String> {
    let file = crate::volume::VolumeFile::load(&path)?;
    let data_dir = crate::config::default_data_dir();
    std::fs::create_dir_all(&data_dir)
        .map_err(|e| format!("data dir {}: {e}", data_dir.display()))?;
    let control = args
        .control
        .clone()
        .unwrap_or_else(|| data_dir.join(format!("{}.attach.sock", file.name)));
    crate::control::ensure_unused(&control)?;
    // Before the run is claimed: a refused second run changes nothing.
    let _volume_lock = crate::volume::lock_volume(&data_dir, &file.name)?;
    let store = Arc::new(crate::volume::FileLogStore {
        dir: data_dir.clone(),
        volume: file.name.clone(),
    });
    // Before any leg connects: the legs' servers then end every session
    // an earlier run of this volume left (docs/PROTOCOL.md §7.3).
    let run = claim_run(&*store, &file.name, &data_dir)?;
    args.client.identity = Some(run);
    crate::ublk::preflight(&args.ublk)?;
    let metrics = args
        .metrics
        .as_deref()
        .map(crate::metrics::MetricsListener::bind)
        .transpose()?;
    let (map, clients, max_payload) = connect_legs(&file, &path, &args.client).await?;
    let leg_clients: crate::reload::LegClients = Arc::new(std::sync::Mutex::new(clients.clone()));
    let mut config = file.config()?;
    config.max_leg_io = u64::from(max_payload);
    let volume = braid_fabric_tcp::Volume::start(map, clients, config, store, file.leg_timeout()?)?;
    let nbd_addrs = if args.nbd.is_empty() && !args.ublk.wanted() {
        vec![data_dir
            .join(format!("{}.nbd.sock", file.name))
            .display()
            .to_string()]
    } else {
        args.nbd.clone()
    };
    let nbd_export = NbdExport {
        block_min: volume.block_size(),
        ..NbdExport::new(file.name.clone(), volume.size(), 0)
    };
    let target: Arc<dyn Target> = Arc::new(VolumeTarget {
        sink: Sink::Legs(volume.clone()),
        max_part: max_payload,
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    let mut owned = Vec::new();
    for addr in &nbd_addrs {
        let config = NbdConfig::new(vec![nbd_export.clone()]);
        let (uri, task) = crate::nbd::start(
            addr,
            &file.name,
            config,
            braid_frontend_nbd::Placement::here(target.clone()),
            args.nbd_allow_insecure,
            stop_rx.clone(),
        )
        .await?;
        if addr.contains('/') {
            owned.extend(crate::control::OwnedSocket::claim(Path::new(addr)));
        }
        println!("nbd:      {uri}");
        tasks.push(task);
    }
    let geometry = crate::ublk::Volume {
        size: volume.size(),
        block_size: volume.block_size(),
        read_only: false,
        max_request: max_payload,
    };
    let device = match crate::ublk::maybe_create(&args.ublk, geometry, target.clone()).await {
        Ok(d) => d,
        Err(e) => {
            let _ = stop_tx.send(true);
            volume.close().await;
            remove_sockets(owned);
            return Err(e);
        }
    };
    let block_device = crate::ublk::path_of(&device);
    println!(
        "braid volume {:?} ({}) over {} legs attached",
        file.name,
        crate::config::human_size(volume.size()),
        file.legs.len()
    );
    if let Some(path) = &block_device {
        println!("device:   {path}");
    }
    println!("status:   braid status --control {}", control.display());
    if let Some(m) = metrics {
        println!("metrics:  {}", m.url());
        m.serve_volume(volume.clone());
    }
    // Before the control socket answers and systemd hears READY (see
    // `run`).
    let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|e| format!("SIGHUP handler: {e}"))?;
    let (legs, client_args, volume_path) = (leg_clients.clone(), args.client.clone(), path.clone());
    tokio::spawn(crate::reload::on_hangup(hangups, move || {
        let (legs, client_args, path) = (legs.clone(), client_args.clone(), volume_path.clone());
        async move { crate::reload::leg_keys(&legs, &client_args, &path).await }
    }));
    let stop = Arc::new(Notify::new());
    {
        let (volume, stop, name) = (volume.clone(), stop.clone(), file.name.clone());
        let block_device = block_device.clone();
        let (client_args, volume_path) = (args.client.clone(), path.clone());
        owned.extend(crate::control::serve(control.clone(), move |command| {
            use crate::control::now;
            let words: Vec<&str> = command.split_whitespace().collect();
            match words.as_slice() {
                ["status"] => {
                    let mut doc = volume_document(&volume, &name, &leg_clients);
                    doc["ublk"] = block_device.clone().into();
                    now(doc)
                }
                ["detach"] => {
                    stop.notify_one();
                    now(serde_json::json!({ "detaching": name }))
                }
                ["suspend", leg] | ["resume", leg] => {
                    let (volume, leg, suspend) =
                        (volume.clone(), leg.to_string(), words[0] == "suspend");
                    crate::control::later(async move {
                        if suspend {
                            volume.suspend(&leg).await?;
                        } else {
                            volume.resume(&leg).await?;
                        }
                        Ok(serde_json::json!({ "leg": leg, "done": words_done(suspend) }))
                    })
                }
                ["migrate", leg, server, options @ ..] => {
                    let request = MigrateRequest::parse(leg, server, options);
                    let (volume, client_args, path, legs) = (
                        volume.clone(),
                        client_args.clone(),
                        volume_path.clone(),
                        leg_clients.clone(),
                    );
                    crate::control::later(async move {
                        let (from, new) = request?;
                        let at = Migration {
                            volume: &volume,
                            base: &client_args,
                            path: &path,
                            legs: &legs,
                        };
                        start_migration(at, &from, new).await
                    })
                }
                ["reload"] => {
                    let (legs, client_args, path) =
                        (leg_clients.clone(), client_args.clone(), volume_path.clone());
                    crate::control::later(async move {
                        let said = crate::reload::leg_keys(&legs, &client_args, &path).await?;
                        Ok(serde_json::json!({ "keys": said }))
                    })
                }
                ["cancel-migration"] => {
                    let volume = volume.clone();
                    crate::control::later(async move {
                        volume.cancel_migration().await?;
                        Ok(serde_json::json!({ "done": "rolled back" }))
                    })
                }
                _ => now(serde_json::json!({
                    "error": format!("unknown command {command:?} (a volume answers: status, detach, suspend LEG, resume LEG, migrate LEG SERVER [export=E] [name=N] [key-file=F], cancel-migration, reload)")
                })),
            }
        }));
    }
    notify_attached(&file.name, &block_device);
    wait_then_drain(&stop, stop_tx, tasks).await?;
    crate::ublk::remove(device).await;
    volume.close().await;
    remove_sockets(owned);
    println!("braid attach: volume detached");
    Ok(())
}

/// `migrate LEG SERVER [export=E] [name=N] [key-file=F]` as the control
/// socket receives it.
struct MigrateRequest;

impl MigrateRequest {
    fn parse(
        leg: &str,
        server: &str,
        options: &[&str],
    ) -> Result<(String, crate::volume::NewLeg), String> {
        let mut new = crate::volume::NewLeg {
            name: crate::volume::next_leg_name(leg),
            server: server.to_string(),
            export: String::new(),
            key_file: None,
        };
        for o in options {
            match o.split_once('=') {
                Some(("export", v)) => new.export = v.to_string(),
                Some(("name", v)) => new.name = v.to_string(),
                Some(("key-file", v)) => new.key_file = Some(v.into()),
                _ => return Err(format!("migrate: unknown option {o:?}")),
            }
        }
        Ok((leg.to_string(), new))
    }
}

/// What a migration started from the control socket works on.
struct Migration<'a> {
    volume: &'a braid_fabric_tcp::Volume,
    /// The client flags every leg starts from.
    base: &'a ClientArgs,
    /// The volume file.
    path: &'a Path,
    /// Every leg's client, for `reload`; the new leg's joins them.
    legs: &'a crate::reload::LegClients,
}

/// Connects the new leg (as the volume's other legs connect) and hands it
/// to the volume, which copies and switches; the switch rewrites the
/// volume file.
async fn start_migration(
    at: Migration<'_>,
    from: &str,
    mut new: crate::volume::NewLeg,
) -> Result<serde_json::Value, String> {
    let Migration {
        volume,
        base,
        path,
        legs,
    } = at;
    let file = crate::volume::VolumeFile::load(path)?;
    let old = file
        .legs
        .iter()
        .find(|l| l.name == from)
        .ok_or_else(|| format!("the volume file has no leg {from:?}"))?;
    if new.export.is_empty() {
        new.export = old.export.clone();
    }
    if new.key_file.is_none() {
        new.key_file = old.key_file.clone();
    }
    file.check_replacement(from, &new)?;
    let leg = crate::volume::LegFile {
        name: new.name.clone(),
        server: new.server.clone(),
        export: new.export.clone(),
        key_file: new.key_file.clone(),
    };
    let client = leg_args(base, &leg).connect().await.map_err(|e| {
        format!(
            "new leg {:?} ({} on {}): {e}",
            new.name, new.export, new.server
        )
    })?;
    let (path, from_name, to) = (path.to_path_buf(), from.to_string(), new.name.clone());
    let store: braid_fabric_tcp::StoreMap =
        Arc::new(move || crate::volume::replace_leg(&path, &from_name, &new));
    legs.lock().unwrap().insert(to.clone(), client.clone());
    volume.migrate(from, &to, client, store).await?;
    Ok(serde_json::json!({ "from": from, "to": to }))
}

/// READY=1 for systemd, naming what the volume is served as.
fn notify_attached(name: &str, block_device: &Option<String>) {
    crate::systemd::ready(&match block_device {
        Some(path) => format!("volume {name} attached as {path}"),
        None => format!("volume {name} attached over NBD"),
    });
}

/// The client flags for one leg of a volume file.
pub(crate) fn leg_args(base: &ClientArgs, leg: &crate::volume::LegFile) -> ClientArgs {
    let mut c = base.clone();
    c.servers = vec![leg.server.clone()];
    c.export = leg.export.clone();
    if leg.key_file.is_some() {
        c.key_file = leg.key_file.clone();
    }
    c
}

fn leg_info(i: &braid_core::client::ExportInfo) -> braid_core::volume::LegInfo {
    braid_core::volume::LegInfo {
        size: i.size,
        block_size: i.block_size,
        read_only: i.flags & EXPORT_READ_ONLY != 0,
    }
}

fn words_done(suspend: bool) -> &'static str {
    if suspend {
        "suspended"
    } else {
        "resuming"
    }
}

fn volume_document(
    volume: &braid_fabric_tcp::Volume,
    name: &str,
    clients: &crate::reload::LegClients,
) -> serde_json::Value {
    let s = volume.status();
    let clients = clients.lock().unwrap().clone();
    serde_json::json!({
        "role": "volume",
        "name": name,
        "size": volume.size(),
        "migration": s.migration.as_ref().map(|(from, to, switching)| serde_json::json!({
            "from": from, "to": to, "switching": switching,
        })),
        "migration_error": s.migration_error,
        "fenced_by": s.fenced_by,
        "legs_left": s.stats.legs_left,
        "regions_resynced": s.stats.regions_resynced,
        "bytes_resynced": s.stats.bytes_resynced,
        "migrations": s.stats.migrations,
        "legs": s.legs.iter().map(|(leg, state, dirty, regions)| serde_json::json!({
            "name": leg,
            "state": state.map(|st| format!("{st:?}")),
            "dirty_regions": dirty,
            "regions": regions,
            "key_id": clients.get(leg).map(|c| c.status().key_id),
            "last_channel_error": clients.get(leg).map(Client::last_error),
        })).collect::<Vec<_>>(),
    })
}

/// `braid status` for a volume.
pub(crate) fn print_volume_status(v: &serde_json::Value) {
    println!(
        "braid volume {} ({})",
        v["name"].as_str().unwrap_or("?"),
        crate::config::human_size(v["size"].as_u64().unwrap_or(0))
    );
    if let Some(leg) = v["fenced_by"].as_str() {
        println!("  stopped: a newer run of this volume holds leg {leg}; every IO fails here");
    }
    for l in v["legs"].as_array().into_iter().flatten() {
        println!(
            "  leg {:<10} {:<28} {} of {} regions to copy",
            l["name"].as_str().unwrap_or("?"),
            l["state"].as_str().unwrap_or("?"),
            l["dirty_regions"],
            l["regions"]
        );
        // Why a leg is away, when its channels said.
        if !l["state"].as_str().is_some_and(|s| s.starts_with("InSync")) {
            if let Some(e) = l["last_channel_error"].as_str() {
                println!("             last channel error: {e}");
            }
        }
    }
    if let Some(m) = v["migration"].as_object() {
        println!(
            "  migrating {} to {}{}",
            m["from"].as_str().unwrap_or("?"),
            m["to"].as_str().unwrap_or("?"),
            if m["switching"] == true {
                ": switching over"
            } else {
                ""
            }
        );
    }
    println!(
        "  legs left behind {}, regions resynced {} ({}), migrations {}",
        v["legs_left"],
        v["regions_resynced"],
        crate::config::human_size(v["bytes_resynced"].as_u64().unwrap_or(0)),
        v["migrations"]
    );
}

/// Waits for SIGTERM, ^C or `braid detach`, then stops the NBD listeners
/// and waits for their in-flight requests.
async fn wait_then_drain(
    stop: &Notify,
    stop_tx: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
) -> Result<(), String> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("SIGTERM handler: {e}"))?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: detaching"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted: detaching"),
        _ = stop.notified() => tracing::info!("detach requested"),
    }
    crate::systemd::stopping();
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}

/// The NBD unix sockets and the control socket, gone after a detach.
fn remove_sockets(owned: Vec<crate::control::OwnedSocket>) {
    for socket in owned {
        socket.remove();
    }
}

/// Connects every leg of `file` at once. A mirrored leg whose server does
/// not answer is attached without (its client keeps trying, and it is
/// resynced when it answers); any other is an error naming it. Returns
/// the map (legs not reached take a reached leg's geometry until their
/// own server shows theirs), a client per leg, and the largest IO every
/// reached leg takes.
async fn connect_legs(
    file: &crate::volume::VolumeFile,
    path: &Path,
    client_args: &ClientArgs,
) -> Result<(braid_core::volume::VolumeMap, HashMap<String, Client>, u32), String> {
    use braid_core::volume::VolumeMap;
    let mut clients = HashMap::new();
    let mut infos = HashMap::new();
    let mut max_payload = u32::MAX;
    // Legs whose server does not answer now: a mirror attaches without
    // them, and they are resynced when they return.
    let mut down = Vec::new();
    let mut reached = None;
    let answers = answers_of_legs(file, client_args).await?;
    for (leg, answer) in file.legs.iter().zip(answers) {
        let client = match answer {
            Ok(client) => client,
            Err(e) => {
                let why = format!("leg {:?} ({} on {}): {e}", leg.name, leg.export, leg.server);
                down.push((leg, why));
                continue;
            }
        };
        let i = client.info();
        reached.get_or_insert(i);
        max_payload = max_payload.min(i.max_payload - i.max_payload % i.block_size);
        infos.insert(leg.name.clone(), leg_info(&i));
        clients.insert(leg.name.clone(), client);
    }
    let Some(like) = reached else {
        let whys: Vec<String> = down.into_iter().map(|(_, why)| why).collect();
        return Err(format!(
            "no leg of the volume answers:\n  {}",
            whys.join("\n  ")
        ));
    };
    // A mirror's legs are alike: the first leg reached stands in for the
    // ones that were not, until they answer and show their own.
    for (leg, _) in &down {
        infos.insert(leg.name.clone(), leg_info(&like));
    }
    let map = VolumeMap::new(&file.spec()?, |n| infos.get(n).copied())
        .map_err(|e| format!("volume {}: {e}", path.display()))?;
    for (leg, why) in &down {
        if holds_only_copy(&map, &leg.name) {
            return Err(format!(
                "{why}\n(it holds data no other leg has: the volume cannot attach without it)"
            ));
        }
        eprintln!("braid attach: {why}\n  attaching without it: it is resynced when it answers");
        let c = leg_args(client_args, leg);
        let client = c.connect_later(like)?;
        clients.insert(leg.name.clone(), client);
    }
    Ok((map, clients, max_payload))
}

/// Every leg's connect attempt, all at once, so a leg that is down costs
/// its connect patience once, not once per leg before it. Once a leg has
/// answered, legs still silent `leg_timeout` later (at least a second)
/// are given up on if each is mirrored: the volume attaches without them
/// rather than wait out the patience for a server that may be gone, and
/// they are resynced when they answer. A leg that holds the only copy of
/// some byte is waited for to the end. The answers come in leg order.
async fn answers_of_legs(
    file: &crate::volume::VolumeFile,
    client_args: &ClientArgs,
) -> Result<Vec<Result<Client, String>>, String> {
    use tokio::time::{sleep_until, Duration, Instant};
    let grace = file.leg_timeout()?.max(Duration::from_secs(1));
    let spec = file.spec()?;
    let mut attempts = tokio::task::JoinSet::new();
    for (i, leg) in file.legs.iter().enumerate() {
        let c = leg_args(client_args, leg);
        attempts.spawn(async move { (i, c.connect().await) });
    }
    let mut answers: Vec<Option<Result<Client, String>>> = file.legs.iter().map(|_| None).collect();
    // The first leg to answer: when, which, and the map drawn with its
    // geometry for every leg (which legs are mirrored does not depend on
    // their sizes).
    let mut first: Option<(Instant, usize, Option<braid_core::volume::VolumeMap>)> = None;
    loop {
        let give_up_at = first.as_ref().and_then(|(at, _, map)| {
            let map = map.as_ref()?;
            let mut silent = file.legs.iter().zip(&answers).filter(|(_, a)| a.is_none());
            silent
                .all(|(leg, _)| !holds_only_copy(map, &leg.name))
                .then_some(*at + grace)
        });
        let next = tokio::select! {
            next = attempts.join_next() => next,
            _ = sleep_until(give_up_at.unwrap_or_else(Instant::now)), if give_up_at.is_some() => break,
        };
        let Some(joined) = next else { break };
        let (i, answer) = joined.map_err(|e| format!("connecting the legs: {e}"))?;
        if let (None, Ok(client)) = (&first, &answer) {
            let like = leg_info(&client.info());
            let map = braid_core::volume::VolumeMap::new(&spec, |_| Some(like)).ok();
            first = Some((Instant::now(), i, map));
        }
        answers[i] = Some(answer);
    }
    attempts.abort_all();
    let first_leg = first.map_or("", |(_, i, _)| file.legs[i].name.as_str());
    Ok(answers
        .into_iter()
        .map(|a| {
            a.unwrap_or_else(|| {
                Err(format!(
                    "no answer {grace:?} after leg {first_leg:?} answered"
                ))
            })
        })
        .collect())
}

/// Whether some byte of the volume lives on leg `name` alone.
fn holds_only_copy(map: &braid_core::volume::VolumeMap, name: &str) -> bool {
    let leaf = map.leaves().iter().position(|n| n.as_str() == name);
    map.map(0, map.size())
        .iter()
        .filter(|seg| seg.copies.iter().any(|c| Some(c.leaf) == leaf))
        .any(|seg| seg.copies.len() < 2)
}

/// Claims this run of volume `name`: the next epoch after the one stored
/// in `data_dir`, stored durably.
fn claim_run(
    store: &dyn braid_fabric_tcp::LogStore,
    name: &str,
    data_dir: &Path,
) -> Result<braid_core::client::Identity, String> {
    let fresh_owner = u64::from_le_bytes(crate::config::random_bytes().map_err(|e| e.to_string())?);
    let run = braid_fabric_tcp::next_run(store, fresh_owner).map_err(|e| {
        format!(
            "volume {name}: storing its run in {}: {e}",
            data_dir.display()
        )
    })?;
    tracing::info!(
        volume = name,
        owner = format_args!("{:#x}", run.owner),
        epoch = run.epoch,
        "volume run claimed"
    );
    Ok(run)
}
