//! Flags shared by every command that talks to a server as a client.

use crate::config;
use braid_core::client::{ClientConfig, Policy};
use braid_fabric_tcp::Client;
use clap::{Args, ValueEnum};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum PolicyArg {
    /// Fewest requests outstanding (default).
    LeastInflight,
    /// Rotate.
    RoundRobin,
    /// Lowest smoothed RTT.
    LowestLatency,
}

#[derive(Args, Debug, Clone)]
pub(crate) struct ClientArgs {
    /// Server address host:port.
    #[arg(long, default_value = config::DEFAULT_LISTEN)]
    pub(crate) server: String,
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
}

impl ClientArgs {
    pub(crate) async fn connect(&self) -> Result<Client, String> {
        let key_file = self
            .key_file
            .clone()
            .unwrap_or_else(|| config::default_data_dir().join("keys.toml"));
        let (key_id, key) = config::client_key(&key_file, self.key_id.as_deref())?;
        let seed = config::random_bytes().map_err(|e| e.to_string())?;
        let mut c = ClientConfig::new(self.export.clone(), key_id, key, seed);
        c.channels = self.channels.clamp(1, 64);
        c.policy = match self.policy {
            PolicyArg::LeastInflight => Policy::LeastInflight,
            PolicyArg::RoundRobin => Policy::RoundRobin,
            PolicyArg::LowestLatency => Policy::LowestLatency,
        };
        c.io_timeout = self.io_timeout.map(Duration::from_secs_f64);
        Client::connect(self.server.clone(), c, Duration::from_secs(10))
            .await
            .map_err(|e| e.to_string())
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
            "  {ch:<8} {:<6} in flight {inflight:<4} rtt {rtt}",
            if *ready { "up" } else { "down" }
        );
    }
    let st = &s.stats;
    println!(
        "protocol: {} resent, {} failed over, {} duplicates dropped, {} channel failures, {} session resets, {} extents replayed",
        st.resends, st.failovers, st.duplicates_dropped, st.channel_failures, st.session_resets, st.replayed_extents
    );
}
