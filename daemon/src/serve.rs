//! `braid serve`: exports files or block devices to braid clients.

use crate::config::{self, ExportSpec, FileConfig, IoEngineArg};
use crate::nbd_threads::NbdThreads;
use crate::status;
use braid_backend_file::{ExportFile, FileBackend, OpenOptions};
use braid_core::server::{ExportConfig, ServerConfig, ServerEngine};
use braid_fabric_tcp::tls::ServerCert;
use braid_fabric_tcp::{EngineSpawner, Server, ServerSecurity};
use clap::Args;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

#[derive(Args, Debug, Default)]
pub(crate) struct ServeArgs {
    /// TOML configuration file (flags override it).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:7410].
    #[arg(long)]
    listen: Option<String>,
    /// Directory for default exports, the key file and the control socket
    /// [default: $STATE_DIRECTORY, else $XDG_DATA_HOME/braid, else ~/.local/share/braid].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Pre-shared keys [default: DATA_DIR/keys.toml, created if missing].
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// Export NAME=PATH[,size=SIZE][,ro][,direct]; repeatable. With none,
    /// a 1 GiB sparse file DATA_DIR/disk0.img is served as "disk0".
    #[arg(long = "export")]
    exports: Vec<String>,
    /// Control socket for `braid status` [default: DATA_DIR/control.sock].
    #[arg(long)]
    control: Option<PathBuf>,
    /// Also serve every export over the NBD protocol (for qemu, nbd-client,
    /// libnbd's tools, fio) on this TCP address (e.g. 127.0.0.1:10809) or
    /// unix socket path; repeatable. With TLS on, NBD clients must use
    /// STARTTLS (the spec's FORCEDTLS mode).
    #[arg(long)]
    nbd: Vec<String>,
    /// Allow --nbd on an address other machines reach without TLS. NBD has
    /// no authentication: anyone who connects reads and writes every export.
    #[arg(long)]
    nbd_allow_insecure: bool,
    /// Also accept braid channels over RDMA (rdma_cm, reliable-connected
    /// queue pairs) on this address of an RDMA device, e.g. 192.168.1.5:7410;
    /// repeatable. Needs a braid built with `--features rdma`.
    #[arg(long)]
    rdma: Vec<String>,
    /// Registered memory, in MiB per RDMA device, for payloads moving
    /// one-sided (at least 33: one largest payload) [default: 64].
    #[arg(long, value_name = "MIB")]
    rdma_memory: Option<u64>,
    /// RDMA channels open at once, over all --rdma addresses: each pins a
    /// 256 KiB ring of message buffers from the moment a peer asks to
    /// connect, so past this a connection request is rejected [default:
    /// 256].
    #[arg(long, value_name = "N")]
    rdma_channels: Option<usize>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9410).
    #[arg(long)]
    metrics: Option<String>,
    /// Runtime threads for braid-protocol connections and TLS (with one
    /// protocol engine, it is one task there; NBD connections run on
    /// --nbd-threads; backend IO has its own thread pool).
    #[arg(long, default_value_t = 1)]
    pub(crate) threads: usize,
    /// Protocol engines: each holds its own sessions, and with more than
    /// one each runs on a thread of its own with its connections, so a
    /// server with many clients is not limited to what one engine's task
    /// can do (`braid status` shows each engine's busy time). One session
    /// always stays on one engine; so do all the runs of one client on one
    /// export [default: 1].
    #[arg(long, value_name = "N")]
    engines: Option<usize>,
    /// Threads for NBD connections (--nbd): each connection runs on one,
    /// the one with the fewest when it connects [default: one per CPU, at
    /// least 8].
    #[arg(long, value_name = "N")]
    nbd_threads: Option<usize>,
    /// Microseconds to keep polling the sockets after each IO instead of
    /// sleeping (saves a thread wake-up per request at low queue depth, for
    /// up to one core while IO flows); 0 turns it off [default: 200].
    #[arg(long, value_name = "US")]
    poll_us: Option<u64>,
    /// How backend operations that may wait for a device run (uncached
    /// reads, O_DIRECT, writes the kernel would not take at once, FLUSH):
    /// `uring` starts them on io_uring and collects them when done, from
    /// the protocol engine's loop (and from one task for the NBD face);
    /// where the kernel refuses io_uring, and for zeroing, TRIM and
    /// buffered FUA writes, threads run them. `threads` blocks a pool
    /// thread on each [default: uring].
    #[arg(long, value_name = "ENGINE")]
    io_engine: Option<IoEngineArg>,
    /// Serve over TLS. Without --tls-cert, a self-signed certificate for
    /// localhost and the listen address is created in DATA_DIR on first use.
    #[arg(long)]
    tls: bool,
    /// TLS certificate chain (PEM); implies --tls.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM); implies --tls.
    #[arg(long)]
    tls_client_ca: Option<PathBuf>,
}

pub(crate) async fn run(args: ServeArgs) -> Result<(), String> {
    let s = Settings::resolve(args)?;
    std::fs::create_dir_all(&s.data_dir)
        .map_err(|e| format!("data dir {}: {e}", s.data_dir.display()))?;
    // Held until exit: a second `braid serve` on this data dir would write
    // the same default export and take over the control socket.
    let _data_dir_lock = config::lock_data_dir(&s.data_dir)?;
    let keys = keys_creating(&s.key_file)?;
    let (exports, files) = open_exports(&s.exports)?;
    let boot_id = u64::from_le_bytes(config::random_bytes().map_err(|e| e.to_string())?);
    let seed = config::random_bytes().map_err(|e| e.to_string())?;
    let server_config = ServerConfig::new(boot_id, seed, keys.clone(), exports.clone());
    let bound = Bound::all(&s).await?;
    let key_arg = format!("--key-file {}{}", s.key_file.display(), bound.tls_hint);
    print_banner(
        bound.local,
        &exports,
        &files,
        &s.key_file,
        &keys[0].0,
        &key_arg,
    );
    println!("status:   braid status --control {}", s.control.display());
    if let Some(m) = &bound.metrics {
        println!("metrics:  {}", m.url());
    }
    crate::busy_poll::start(s.poll);
    let backend = open_backend(files, &s, &bound);
    let (nbd_stop, nbd_stopped) = tokio::sync::watch::channel(false);
    let (nbd_threads, nbd_tasks) = start_nbd_face(
        &s.nbd,
        &exports,
        &bound.security,
        NbdFaceSettings {
            backend: backend.clone(),
            threads: s.nbd_threads,
            poll: s.poll,
            allow_insecure: s.nbd_allow_insecure,
        },
        nbd_stopped,
    )
    .await?;
    let engines = ServerEngine::several(&server_config, s.engines).map_err(|e| e.to_string())?;
    let (engine_spawner, engine_stops) = engine_runtimes(&s)?;
    // Before the server is ready: a reload sent once systemd hears READY
    // must find the handler, not SIGHUP's default, which ends the process.
    let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|e| format!("SIGHUP handler: {e}"))?;
    let started = Started {
        rdma: bound.rdma,
        files: crate::reload::ServerFiles {
            key_file: s.key_file.clone(),
            cert: bound.served_cert,
        },
        hangups,
        metrics: bound.metrics,
        exports: exports.iter().map(|e| (e.name.clone(), e.size)).collect(),
        backend: backend.clone(),
        nbd_placement: nbd_threads.as_ref().map(|t| t.placement()),
        control: s.control.clone(),
    };
    // A task of its own rather than the future `block_on` drives: a
    // connection's reader task wakes it, and a woken task runs next,
    // where the runtime polls its IO driver once more before it comes
    // back to a woken `block_on` future (an `epoll_wait` between each
    // request's read and its handling).
    let serving = tokio::spawn(Server::run_engines(
        bound.listener,
        bound.security,
        engines,
        engine_spawner,
        backend,
        stop_requested(),
        move |server| started.announce(server),
    ));
    serving
        .await
        .map_err(|e| format!("server task: {e}"))?
        .map_err(|e| format!("server: {e}"))?;
    // NBD connections drain too: in-flight requests finish, then close.
    let _ = nbd_stop.send(true);
    for t in nbd_tasks {
        let _ = t.await;
    }
    drop(nbd_threads);
    drop(engine_stops);
    println!("braid serve: drained and stopped");
    Ok(())
}

/// What `braid serve` listens on, bound before anything is served: a
/// second server on the same address, or a control socket in use, stops
/// it here.
struct Bound {
    listener: tokio::net::TcpListener,
    local: SocketAddr,
    rdma: crate::rdma::Listeners,
    metrics: Option<crate::metrics::MetricsListener>,
    security: ServerSecurity,
    /// What a client's command line adds for TLS.
    tls_hint: String,
    served_cert: Option<Arc<ServerCert>>,
}

impl Bound {
    async fn all(s: &Settings) -> Result<Bound, String> {
        let listener = tokio::net::TcpListener::bind(&s.listen)
            .await
            .map_err(|e| format!("listen on {}: {e}", s.listen))?;
        let local = listener.local_addr().map_err(|e| e.to_string())?;
        let rdma = crate::rdma::bind(
            &s.rdma,
            crate::rdma::region_bytes(s.rdma_memory),
            s.rdma_channels,
        )?;
        crate::control::ensure_unused(&s.control)?;
        let metrics = crate::metrics::MetricsListener::bind_if_asked(s.metrics.as_deref())?;
        let (security, tls_hint, served_cert) = server_security(
            s.tls,
            s.tls_cert_and_key.clone(),
            s.tls_client_ca.as_deref(),
            &s.data_dir,
            local,
        )?;
        Ok(Bound {
            listener,
            local,
            rdma,
            metrics,
            security,
            tls_hint,
            served_cert,
        })
    }
}

/// `braid serve`'s settings: each flag, else the configuration file's
/// value, else the default; checked before anything is opened.
struct Settings {
    data_dir: PathBuf,
    listen: String,
    key_file: PathBuf,
    exports: Vec<ExportSpec>,
    control: PathBuf,
    metrics: Option<String>,
    engines: usize,
    nbd: Vec<String>,
    nbd_threads: usize,
    nbd_allow_insecure: bool,
    poll: Duration,
    io_engine: IoEngineArg,
    rdma: Vec<String>,
    rdma_memory: Option<u64>,
    rdma_channels: Option<usize>,
    tls: bool,
    tls_cert_and_key: Option<(PathBuf, PathBuf)>,
    tls_client_ca: Option<PathBuf>,
}

impl Settings {
    fn resolve(args: ServeArgs) -> Result<Settings, String> {
        let file = match &args.config {
            Some(p) => config::load(p)?,
            None => FileConfig::default(),
        };
        let engines = args.engines.or(file.engines).unwrap_or(1);
        if !(1..=64).contains(&engines) {
            return Err(format!("--engines (engines) {engines}: must be 1 to 64"));
        }
        let nbd_threads = args
            .nbd_threads
            .or(file.nbd_threads)
            .unwrap_or_else(crate::nbd_threads::default_count);
        if nbd_threads == 0 {
            return Err(
                "--nbd-threads (nbd_threads) must be at least 1: each NBD connection runs on one"
                    .into(),
            );
        }
        let data_dir = args
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(config::default_data_dir);
        let mut exports: Vec<ExportSpec> = file.export;
        for e in &args.exports {
            exports.push(ExportSpec::parse_flag(e)?);
        }
        if exports.is_empty() {
            exports.push(ExportSpec {
                name: config::DEFAULT_EXPORT.into(),
                path: data_dir.join("disk0.img"),
                size: Some(config::DEFAULT_EXPORT_SIZE.to_string()),
                read_only: false,
                direct: false,
                shared: false,
            });
        }
        let poll_us = args
            .poll_us
            .or(file.poll_us)
            .unwrap_or(crate::busy_poll::DEFAULT_WINDOW_US);
        Ok(Settings {
            listen: args
                .listen
                .or_else(|| file.listen.as_ref().and_then(|l| l.first().cloned()))
                .unwrap_or_else(|| config::DEFAULT_LISTEN.to_string()),
            key_file: args
                .key_file
                .or(file.key_file)
                .unwrap_or_else(|| data_dir.join("keys.toml")),
            control: args
                .control
                .or(file.control)
                .unwrap_or_else(|| data_dir.join("control.sock")),
            metrics: args.metrics.or(file.metrics),
            nbd: args
                .nbd
                .into_iter()
                .chain(file.nbd.into_iter().flatten())
                .collect(),
            nbd_allow_insecure: args.nbd_allow_insecure || file.nbd_allow_insecure,
            poll: Duration::from_micros(poll_us),
            io_engine: args.io_engine.or(file.io_engine).unwrap_or_default(),
            data_dir,
            exports,
            engines,
            nbd_threads,
            rdma: args.rdma,
            rdma_memory: args.rdma_memory,
            rdma_channels: args.rdma_channels,
            tls: args.tls,
            tls_cert_and_key: args.tls_cert.zip(args.tls_key),
            tls_client_ca: args.tls_client_ca,
        })
    }
}

/// The keys in `key_file`, which is created with a new key if missing.
fn keys_creating(key_file: &Path) -> Result<Vec<(String, braid_core::auth::Key)>, String> {
    if !key_file.exists() {
        config::create_key_file(key_file)?;
        tracing::info!(path = %key_file.display(), "created a new key file");
    }
    config::read_keys(key_file)
}

/// Completes on SIGTERM or Ctrl-C: the server then drains and stops.
async fn stop_requested() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted: draining"),
    }
    crate::systemd::stopping();
}

/// What starts beside the server once it runs: RDMA, the reload handler,
/// metrics and the control socket; then systemd hears it is ready.
struct Started {
    rdma: crate::rdma::Listeners,
    files: crate::reload::ServerFiles,
    hangups: tokio::signal::unix::Signal,
    metrics: Option<crate::metrics::MetricsListener>,
    exports: Vec<(String, u64)>,
    backend: Arc<crate::busy_poll::Polled<FileBackend>>,
    nbd_placement: Option<braid_frontend_nbd::Placement>,
    control: PathBuf,
}

impl Started {
    fn announce(self, server: Server) {
        self.rdma.serve(&server);
        let (reloaded, files) = (server.clone(), self.files.clone());
        tokio::spawn(crate::reload::on_hangup(self.hangups, move || {
            let (server, files) = (reloaded.clone(), files.clone());
            async move { crate::reload::server(&server, &files).await }
        }));
        if let Some(m) = self.metrics {
            m.serve_server(
                server.clone(),
                self.exports.clone(),
                self.backend.clone(),
                self.nbd_placement.clone(),
                self.files.cert.clone(),
            );
        }
        crate::systemd::ready(&format!(
            "serving {} export(s) on {}",
            self.exports.len(),
            server.local_addr()
        ));
        status::serve_control(
            self.control,
            server,
            self.files,
            self.exports,
            self.backend,
            self.nbd_placement,
        );
    }
}

/// The exports' files, on the IO engine asked for, with RDMA's read
/// staging when there is one, polled as `--poll-us` says.
fn open_backend(
    files: Vec<ExportFile>,
    s: &Settings,
    bound: &Bound,
) -> Arc<crate::busy_poll::Polled<FileBackend>> {
    let mut files = FileBackend::new(files).with_io_engine(s.io_engine.into());
    if let Some(staging) = bound.rdma.read_staging() {
        files = files.with_read_staging(staging);
    }
    Arc::new(crate::busy_poll::Polled(files))
}

/// Where the protocol engines run. One engine shares the main runtime's
/// thread with everything else, as it always has; several get a thread
/// each, whose stops end them when dropped.
fn engine_runtimes(
    s: &Settings,
) -> Result<(Option<EngineSpawner>, Vec<tokio::sync::oneshot::Sender<()>>), String> {
    if s.engines > 1 {
        let (spawner, stops) = engine_threads(s.engines, s.poll)?;
        Ok((Some(spawner), stops))
    } else {
        Ok((None, Vec::new()))
    }
}

/// A thread with a runtime of its own per protocol engine, each polling
/// for `poll` after its IO: an engine and its connections' tasks then
/// stay on one thread (no cross-thread wake-up per request, as with one
/// engine), while the engines share the machine's cores. Dropping the
/// senders stops the threads.
fn engine_threads(
    count: usize,
    poll: std::time::Duration,
) -> Result<(EngineSpawner, Vec<tokio::sync::oneshot::Sender<()>>), String> {
    let mut handles = Vec::with_capacity(count);
    let mut stops = Vec::with_capacity(count);
    for index in 0..count {
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let name = format!("braid-engine-{index}");
        let (handle, ()) = crate::runtime_thread::start(name, poll, stopped, || ())
            .map_err(|e| format!("protocol engine {e}"))?;
        handles.push(handle);
        stops.push(stop);
    }
    let spawner: EngineSpawner = Arc::new(move |index, task| handles[index].spawn(task));
    Ok((spawner, stops))
}

/// Opens every configured export (creating files given a size), each cut
/// to whole blocks.
fn open_exports(specs: &[ExportSpec]) -> Result<(Vec<ExportConfig>, Vec<ExportFile>), String> {
    let mut files = Vec::new();
    let mut exports: Vec<ExportConfig> = Vec::new();
    for spec in specs {
        if exports.iter().any(|e| e.name == spec.name) {
            return Err(format!("export {:?} is configured twice", spec.name));
        }
        let opts = OpenOptions {
            create_size: spec.create_size()?,
            read_only: spec.read_only,
            direct: spec.direct,
            shared: spec.shared,
        };
        let f = ExportFile::open(&spec.path, &opts)
            .map_err(|e| format!("export {:?}: {e}", spec.name))?;
        let block = u64::from(config::EXPORT_BLOCK_SIZE);
        let size = f.size() - f.size() % block;
        if size != f.size() {
            tracing::warn!(
                export = %spec.name,
                path = %spec.path.display(),
                "the last {} bytes are not a whole {block}-byte block and are not exported",
                f.size() - size
            );
        }
        if size == 0 {
            return Err(format!(
                "export {:?}: {} is empty (give it a size)",
                spec.name,
                spec.path.display()
            ));
        }
        let mut e = ExportConfig::new(spec.name.clone(), size);
        e.read_only = spec.read_only;
        exports.push(e);
        files.push(f);
    }
    Ok((exports, files))
}

/// TLS if asked for (a self-signed certificate made in `data_dir` when
/// none is given), else plain with a warning off loopback; and what a
/// client's command line needs to add for it.
fn server_security(
    tls: bool,
    cert_and_key: Option<(PathBuf, PathBuf)>,
    client_ca: Option<&Path>,
    data_dir: &Path,
    local: SocketAddr,
) -> Result<(ServerSecurity, String, Option<Arc<ServerCert>>), String> {
    if !(tls || cert_and_key.is_some() || client_ca.is_some()) {
        if !local.ip().is_loopback() {
            tracing::warn!(
                %local,
                "serving without TLS on an address other machines reach: the handshake is \
                 authenticated, but an on-path attacker can change data after it (use --tls)"
            );
        }
        return Ok((ServerSecurity::Plain, String::new(), None));
    }
    let (cert, key) = match cert_and_key {
        Some(given) => given,
        None => {
            let (c, k) = (data_dir.join("tls-cert.pem"), data_dir.join("tls-key.pem"));
            if !c.exists() {
                let names = vec!["localhost".to_string(), local.ip().to_string()];
                braid_fabric_tcp::tls::generate_self_signed(&names, &c, &k)?;
                tracing::info!(cert = %c.display(), "created a self-signed TLS certificate");
            }
            (c, k)
        }
    };
    let mut hint = format!(" --tls-ca {}", cert.display());
    if let Some(ca) = client_ca {
        hint.push_str(&format!(
            " --tls-client-cert CERT --tls-client-key KEY (signed by {})",
            ca.display()
        ));
    }
    let (acceptor, served) = braid_fabric_tcp::tls::reloadable_acceptor(&cert, &key, client_ca)?;
    Ok((ServerSecurity::Tls(acceptor), hint, Some(served)))
}

/// What is served, and the commands that reach it.
fn print_banner(
    local: SocketAddr,
    exports: &[ExportConfig],
    files: &[ExportFile],
    key_file: &Path,
    key_id: &str,
    key_arg: &str,
) {
    println!("braid serving {} export(s) on {local}", exports.len());
    for (e, f) in exports.iter().zip(files) {
        let kind = if f.is_block_device() {
            "block device"
        } else {
            "file"
        };
        let ro = if e.read_only { ", read-only" } else { "" };
        println!(
            "  {:<10} {:>10}  {} ({kind}{ro})",
            e.name,
            config::human_size(e.size),
            f.path().display()
        );
    }
    println!(
        "key file: {} (key id {key_id:?}; clients need a copy)",
        key_file.display(),
    );
    println!("try:      braid bench  --server {local} {key_arg}");
    println!("          braid verify --server {local} {key_arg}");
}

/// How the NBD face runs.
struct NbdFaceSettings {
    backend: Arc<dyn braid_core::server::Backend>,
    threads: usize,
    poll: std::time::Duration,
    allow_insecure: bool,
}

/// The NBD face (`--nbd`), if any address asks for it: its threads, and a
/// listener per address, each ending once `stopped` says so.
async fn start_nbd_face(
    addrs: &[String],
    exports: &[ExportConfig],
    security: &ServerSecurity,
    settings: NbdFaceSettings,
    stopped: tokio::sync::watch::Receiver<bool>,
) -> Result<(Option<NbdThreads>, Vec<tokio::task::JoinHandle<()>>), String> {
    if addrs.is_empty() {
        return Ok((None, Vec::new()));
    }
    let nbd_exports: Vec<braid_frontend_nbd::NbdExport> = exports
        .iter()
        .enumerate()
        .map(|(i, e)| braid_frontend_nbd::NbdExport {
            read_only: e.read_only,
            ..braid_frontend_nbd::NbdExport::new(e.name.clone(), e.size, i)
        })
        .collect();
    let mut config = braid_frontend_nbd::NbdConfig::new(nbd_exports);
    if let ServerSecurity::Tls(acceptor) = security {
        config = config.with_tls(acceptor.clone(), true);
    }
    let threads = NbdThreads::start(settings.threads, settings.backend, settings.poll)?;
    let mut tasks = Vec::new();
    for addr in addrs {
        let (uri, task) = crate::nbd::start(
            addr,
            &exports[0].name,
            config.clone(),
            threads.placement(),
            settings.allow_insecure,
            stopped.clone(),
        )
        .await?;
        println!("nbd:      {uri} (try: qemu-img info {uri})");
        tasks.push(task);
    }
    Ok((Some(threads), tasks))
}
