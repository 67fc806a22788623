//! Flags shared by every command that talks to a server as a client.

use crate::config;
use braid_core::client::{ClientConfig, Policy};
use braid_fabric_tcp::{Client, ClientSecurity};
use clap::{Args, ValueEnum};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum PolicyArg {
    /// Fewest requests outstanding (default); small requests stay on one
    /// channel while it is within 16 of the least loaded, so a burst
    /// leaves in one send.
    LeastInflight,
    /// Rotate.
    RoundRobin,
    /// Lowest smoothed RTT.
    LowestLatency,
}

#[derive(Args, Debug, Clone)]
pub(crate) struct ClientArgs {
    /// Server address host:port; `rdma://host:port` for RDMA. Repeatable
    /// (or comma-separated): paths to one server, whose channels share one
    /// session (PROTOCOL.md §9.2).
    #[arg(long = "server", value_name = "ADDR", default_value = config::DEFAULT_LISTEN, action = clap::ArgAction::Append)]
    pub(crate) servers: Vec<String>,
    /// Key file (the server's, or a copy) [default: DATA_DIR/keys.toml].
    #[arg(long)]
    pub(crate) key_file: Option<PathBuf>,
    /// Which key of the file [default: its only key, or "default"].
    #[arg(long)]
    pub(crate) key_id: Option<String>,
    /// Export to open.
    #[arg(long, default_value = config::DEFAULT_EXPORT)]
    pub(crate) export: String,
    /// Channels (connections) in the session.
    #[arg(long, default_value_t = 4)]
    pub(crate) channels: usize,
    /// How requests are spread over channels.
    #[arg(long, value_enum, default_value_t = PolicyArg::LeastInflight)]
    pub(crate) policy: PolicyArg,
    /// Fail IO not completed within this many seconds (default: never, as
    /// a disk).
    #[arg(long)]
    pub(crate) io_timeout: Option<f64>,
    /// Acknowledged writes kept until a FLUSH makes them durable, to
    /// replay after a server power loss (e.g. 64M): the memory the client
    /// may hold for them. When it is full, writes wait for a FLUSH.
    #[arg(long, default_value = "64M")]
    pub(crate) dirty_window: String,
    /// Use TLS, trusting this CA or the server's self-signed certificate.
    #[arg(long)]
    pub(crate) tls_ca: Option<PathBuf>,
    /// Name expected on the server's certificate [default: host of --server].
    #[arg(long)]
    pub(crate) tls_name: Option<String>,
    /// Client certificate (PEM), for servers that require one.
    #[arg(long, requires = "tls_client_key")]
    pub(crate) tls_client_cert: Option<PathBuf>,
    /// Client certificate's private key (PEM).
    #[arg(long, requires = "tls_client_cert")]
    pub(crate) tls_client_key: Option<PathBuf>,
    /// Registered memory, in MiB per RDMA device, for buffers named to
    /// servers over `rdma://` paths (at least 33: one largest payload)
    /// [default: 64].
    #[arg(long, value_name = "MIB")]
    pub(crate) rdma_memory: Option<u64>,
    /// Microseconds to keep polling the sockets after each IO instead of
    /// sleeping (saves a thread wake-up per IO at low queue depth, for up
    /// to one core while IO flows); 0 turns it off.
    #[arg(long, value_name = "US", default_value_t = crate::busy_poll::DEFAULT_WINDOW_US)]
    pub(crate) poll_us: u64,
    /// Which run of a client with state across runs this is (a volume's):
    /// servers fence the earlier runs' sessions.
    #[arg(skip)]
    pub(crate) identity: Option<braid_core::client::Identity>,
}

impl ClientArgs {
    /// Every path given, as the one address list the client reads.
    pub(crate) fn server(&self) -> String {
        self.servers.join(",")
    }

    /// A client that returns at once, taking `expected` as its export,
    /// and connects in the background (a mirror leg that is down now).
    pub(crate) fn connect_later(
        &self,
        expected: braid_core::client::ExportInfo,
    ) -> Result<Client, String> {
        let config = self.config()?;
        Client::connect_later(self.server(), self.security()?, config, expected)
            .map_err(|e| e.to_string())
    }

    pub(crate) async fn connect(&self) -> Result<Client, String> {
        crate::busy_poll::start(Duration::from_micros(self.poll_us));
        Client::connect(
            self.server(),
            self.security()?,
            self.config()?,
            Duration::from_secs(10),
        )
        .await
        .map_err(|e| e.to_string())
    }

    /// The key file this client reads its key from.
    pub(crate) fn key_file(&self) -> std::path::PathBuf {
        self.key_file
            .clone()
            .unwrap_or_else(|| config::default_data_dir().join("keys.toml"))
    }

    /// The key id and key this client authenticates with, as its key
    /// file holds them now.
    pub(crate) fn key(&self) -> Result<(String, braid_core::auth::Key), String> {
        config::client_key(&self.key_file(), self.key_id.as_deref())
    }

    fn config(&self) -> Result<ClientConfig, String> {
        crate::rdma::register_dialer(crate::rdma::region_bytes(self.rdma_memory))?;
        let (key_id, key) = self.key()?;
        let seed = config::random_bytes().map_err(|e| e.to_string())?;
        let mut c = ClientConfig::new(self.export.clone(), key_id, key, seed);
        c.channels = self.channels.clamp(1, 64);
        c.policy = match self.policy {
            PolicyArg::LeastInflight => Policy::LeastInflight,
            PolicyArg::RoundRobin => Policy::RoundRobin,
            PolicyArg::LowestLatency => Policy::LowestLatency,
        };
        c.io_timeout = self.io_timeout.map(Duration::from_secs_f64);
        c.identity = self.identity;
        c.max_dirty_bytes =
            config::parse_size(&self.dirty_window).map_err(|e| format!("--dirty-window: {e}"))?;
        Ok(c)
    }

    /// What `braid conformance` needs to reach the server.
    pub(crate) fn target(
        &self,
        read_only_export: Option<String>,
    ) -> Result<crate::conformance::Target, String> {
        let key_file = self
            .key_file
            .clone()
            .unwrap_or_else(|| config::default_data_dir().join("keys.toml"));
        let (key_id, key) = config::client_key(&key_file, self.key_id.as_deref())?;
        Ok(crate::conformance::Target {
            addr: self.server(),
            security: self.security()?,
            key_id,
            key,
            export: self.export.clone(),
            read_only_export,
        })
    }

    /// How this client protects its channels, from its TLS files as they
    /// are now.
    pub(crate) fn security(&self) -> Result<ClientSecurity, String> {
        let Some(ca) = &self.tls_ca else {
            return Ok(ClientSecurity::Plain);
        };
        // The name on the certificate: the first path's host.
        let server = self.server();
        let first = server.split(',').next().unwrap_or_default();
        let first = first.split_once("://").map_or(first, |(_, a)| a);
        let host = first.rsplit_once(':').map_or(first, |(h, _)| h);
        let name = self
            .tls_name
            .clone()
            .unwrap_or_else(|| host.trim_matches(|c| c == '[' || c == ']').to_string());
        let client = match (&self.tls_client_cert, &self.tls_client_key) {
            (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
            _ => None,
        };
        let (connector, name) = braid_fabric_tcp::tls::connector(ca, &name, client)?;
        Ok(ClientSecurity::Tls(connector, name))
    }
}

/// A channel table for the end of a run.
pub(crate) fn print_channels(client: &Client) {
    let s = client.status();
    println!("channels:");
    for (ch, ready, inflight, rtt) in &s.channels {
        let rtt = rtt.map_or("-".to_string(), |r| {
            format!("{:.0} µs", r.as_secs_f64() * 1e6)
        });
        println!(
            "  {ch:<8} {:<6} {:<24} in flight {inflight:<4} rtt {rtt}",
            if *ready { "up" } else { "down" },
            s.path_of(*ch)
        );
    }
    let st = &s.stats;
    println!(
        "protocol: {} resent, {} failed over, {} duplicates dropped, {} channel failures, {} session resets, {} extents replayed, {} corrupt frames",
        st.resends, st.failovers, st.duplicates_dropped, st.channel_failures, st.session_resets, st.replayed_extents, st.corrupt_frames
    );
    crate::rdma::print_memory(&crate::rdma::memory_json());
}
