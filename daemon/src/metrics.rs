//! Prometheus metrics: `--metrics ADDR` on `serve` and `attach` answers
//! `GET /metrics` with the OpenMetrics text of everything `braid status`
//! shows, plus latency histograms per operation. The text is encoded by
//! prometheus-client from a snapshot taken at each scrape, so nothing on
//! the IO path does more than it did for `braid status`.
//!
//! Labels stay bounded: exports (fixed at start-up), operations (five) and
//! channel slots (at most `MAX_CHANNELS`); never session ids or addresses.

use braid_core::latency::{OpLatency, LATENCY_BUCKETS};
use braid_core::wire::Op;
use braid_fabric_tcp::{Client, Server};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use std::fmt::Error;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// A scrape's request head is a few hundred bytes; anything bigger is not
/// a scraper.
const REQUEST_HEAD_MAX: usize = 8 << 10;

fn op_label(op: Op) -> &'static str {
    match op {
        Op::Read => "read",
        Op::Write => "write",
        Op::Flush => "flush",
        Op::Trim => "trim",
        Op::WriteZeroes => "write_zeroes",
    }
}

type Labels = Vec<(&'static str, String)>;

/// Writes descriptors and samples; one call per metric family.
struct Out<'a>(DescriptorEncoder<'a>);

impl Out<'_> {
    fn counter(&mut self, name: &str, help: &str, v: u64) -> Result<(), Error> {
        let c = ConstCounter::new(v);
        c.encode(
            self.0
                .encode_descriptor(name, help, None, c.metric_type())?,
        )
    }

    fn seconds_counter(
        &mut self,
        name: &str,
        help: &str,
        v: std::time::Duration,
    ) -> Result<(), Error> {
        let c = ConstCounter::new(v.as_secs_f64());
        c.encode(
            self.0
                .encode_descriptor(name, help, None, c.metric_type())?,
        )
    }

    fn gauge(&mut self, name: &str, help: &str, v: i64) -> Result<(), Error> {
        let g = ConstGauge::new(v);
        g.encode(
            self.0
                .encode_descriptor(name, help, None, g.metric_type())?,
        )
    }

    fn seconds_counters(
        &mut self,
        name: &str,
        help: &str,
        rows: &[(Labels, std::time::Duration)],
    ) -> Result<(), Error> {
        let mut family =
            self.0
                .encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Counter)?;
        for (labels, v) in rows {
            ConstCounter::new(v.as_secs_f64()).encode(family.encode_family(labels)?)?;
        }
        Ok(())
    }

    fn gauges(
        &mut self,
        name: &str,
        help: &str,
        unit: Option<&Unit>,
        rows: &[(Labels, f64)],
    ) -> Result<(), Error> {
        let mut family = self
            .0
            .encode_descriptor(name, help, unit, MetricType::Gauge)?;
        for (labels, v) in rows {
            ConstGauge::new(*v).encode(family.encode_family(labels)?)?;
        }
        Ok(())
    }

    fn latencies(
        &mut self,
        name: &str,
        help: &str,
        rows: &[(Labels, &OpLatency)],
    ) -> Result<(), Error> {
        let mut family =
            self.0
                .encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?;
        for (labels, latency) in rows {
            for op in OpLatency::OPS {
                let h = latency.get(op);
                let mut with_op = labels.clone();
                with_op.push(("op", op_label(op).to_string()));
                let mut buckets: Vec<(f64, u64)> = Vec::with_capacity(LATENCY_BUCKETS + 1);
                let mut last = 0;
                for (bound, n) in h.cumulative() {
                    // prometheus-client takes per-bucket counts and sums them.
                    buckets.push((bound.as_secs_f64(), n - last));
                    last = n;
                }
                buckets.push((f64::INFINITY, h.count() - last));
                family.encode_family(&with_op)?.encode_histogram::<Labels>(
                    h.sum().as_secs_f64(),
                    h.count(),
                    &buckets,
                    None,
                )?;
            }
        }
        Ok(())
    }
}

/// What a server's scrape reads.
struct ServerMetrics {
    server: Server,
    exports: Vec<(String, u64)>,
    backend: Arc<crate::busy_poll::Polled<braid_backend_file::FileBackend>>,
    nbd: Option<braid_frontend_nbd::Placement>,
    /// The TLS certificate served, reread on reload.
    cert: Option<Arc<braid_fabric_tcp::tls::ServerCert>>,
}

impl std::fmt::Debug for ServerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ServerMetrics({})", self.server.local_addr())
    }
}

impl Collector for ServerMetrics {
    fn encode(&self, encoder: DescriptorEncoder) -> Result<(), Error> {
        let s = self.server.status();
        let st = &s.stats;
        let mut out = Out(encoder);
        for (name, help, v) in [
            ("braid_server_connections_accepted", "Connections accepted.", st.connections),
            ("braid_server_handshakes", "Handshakes completed.", st.handshakes),
            ("braid_server_auth_failures", "Handshakes refused for a bad key or proof.", st.auth_failures),
            ("braid_server_channels_revoked", "Channels closed because the key they authenticated with was withdrawn or replaced.", st.channels_revoked),
            ("braid_server_sessions_created", "Sessions created.", st.sessions_created),
            ("braid_server_sessions_freed", "Sessions whose state was freed.", st.sessions_freed),
            ("braid_server_requests", "Requests received, every copy.", st.requests),
            ("braid_server_backend_ops", "Backend operations issued.", st.backend_ops),
            ("braid_server_fua_requests", "Requests admitted with FUA.", st.fua_requests),
            ("braid_server_recorded_replies", "Resent requests answered from the result cache.", st.recorded_replies),
            ("braid_server_joined", "Resent requests joined to one still executing.", st.joined),
            ("braid_server_stale_dropped", "Stale copies dropped (id below the client's floor).", st.stale_dropped),
            ("braid_server_corrupt_payloads", "Requests whose payload failed its checksum.", st.corrupt_payloads),
            ("braid_server_protocol_errors", "Connections closed for bad frames or protocol violations.", st.protocol_errors),
            ("braid_server_error_replies", "Requests answered with an error status.", st.error_replies),
            ("braid_server_file_replies", "Read replies sent from the page cache without a copy (sendfile).", st.file_replies),
            ("braid_server_checksums_reused", "4 KiB blocks of read replies sent from the page cache whose checksum was kept, so they were not read for it.", self.backend.0.checksums_reused()),
            ("braid_server_io_uring_ops", "Backend operations started on io_uring rather than a pool thread.", self.backend.0.ops_on_io_uring()),
            ("braid_server_nbd_reads_mapped", "NBD READs sent to the socket from the export file's mapping (one copy).", self.backend.0.mapped_transfers().0),
            ("braid_server_nbd_writes_mapped", "NBD WRITEs received from the socket into the export file's mapping (one copy).", self.backend.0.mapped_transfers().1),
            ("braid_server_writes_copied_to_mapping", "WRITEs received into a buffer, then copied into the export file's mapping rather than written (tmpfs, 64 KiB or more).", self.backend.0.mapped_copies()),
            ("braid_server_overload_dropped", "Requests dropped because their session had twice max_inflight executing (the client resends them).", st.overload_dropped),
        ] {
            out.counter(name, help, v)?;
        }
        out.counter(
            "braid_server_engine_turns",
            "Times the protocol engine's task woke to work.",
            s.engine_turns,
        )?;
        out.seconds_counter(
            "braid_server_engine_busy_seconds",
            "Wall time the protocol engine's task spent working; its rate near 1 means that one task limits the server.",
            s.engine_busy,
        )?;
        let engine = |i: usize| vec![("engine", i.to_string())];
        let busy: Vec<(Labels, std::time::Duration)> = s
            .engines
            .iter()
            .enumerate()
            .map(|(i, e)| (engine(i), e.busy))
            .collect();
        out.seconds_counters(
            "braid_engine_busy",
            "Wall time each protocol engine's task spent working (--engines); one near a rate of 1 limits the sessions it holds.",
            &busy,
        )?;
        let sessions: Vec<(Labels, f64)> = s
            .engines
            .iter()
            .enumerate()
            .map(|(i, e)| (engine(i), e.sessions as f64))
            .collect();
        out.gauges(
            "braid_engine_sessions",
            "Live sessions each protocol engine holds.",
            None,
            &sessions,
        )?;
        if let Some(not_after) = self.cert.as_ref().and_then(|c| c.not_after()) {
            out.gauge(
                "braid_server_tls_cert_not_after",
                "When the TLS certificate served stops being valid, in seconds since the Unix epoch (alert well before it).",
                not_after,
            )?;
        }
        if let Some(not_after) = self.cert.as_ref().and_then(|c| c.client_ca_not_after()) {
            out.gauge(
                "braid_server_tls_client_ca_not_after",
                "When the first certificate of the client CA expires, in seconds since the Unix epoch: client certificates chained to it stop passing then.",
                not_after,
            )?;
        }
        out.gauge("braid_server_sessions", "Live sessions.", s.sessions as i64)?;
        out.gauge(
            "braid_server_connections",
            "Open connections (channels).",
            s.connections as i64,
        )?;
        out.gauge(
            "braid_server_backend_inflight",
            "Backend operations running.",
            s.backend_inflight as i64,
        )?;
        if let Some(nbd) = &self.nbd {
            let per_thread: Vec<(Labels, f64)> = nbd
                .connections()
                .into_iter()
                .enumerate()
                .map(|(thread, n)| (vec![("thread", thread.to_string())], n as f64))
                .collect();
            out.gauges(
                "braid_server_nbd_connections",
                "Open NBD connections per NBD thread (--nbd-threads).",
                None,
                &per_thread,
            )?;
        }
        let per_export =
            |f: &dyn Fn(&braid_core::server::SessionSummary) -> f64| -> Vec<(Labels, f64)> {
                self.exports
                    .iter()
                    .map(|(name, _)| {
                        let v = s
                            .session_list
                            .iter()
                            .filter(|x| &x.export == name)
                            .map(f)
                            .sum();
                        (vec![("export", name.clone())], v)
                    })
                    .collect()
            };
        let sizes: Vec<(Labels, f64)> = self
            .exports
            .iter()
            .map(|(name, size)| (vec![("export", name.clone())], *size as f64))
            .collect();
        out.gauges(
            "braid_export_size",
            "Export size.",
            Some(&Unit::Bytes),
            &sizes,
        )?;
        out.gauges(
            "braid_export_sessions",
            "Live sessions per export.",
            None,
            &per_export(&|_| 1.0),
        )?;
        out.gauges(
            "braid_export_orphaned_sessions",
            "Sessions with no channel left, kept for their client to come back.",
            None,
            &per_export(&|x| f64::from(u8::from(x.orphaned))),
        )?;
        out.gauges(
            "braid_export_channels",
            "Channels bound to the export's sessions.",
            None,
            &per_export(&|x| x.channels as f64),
        )?;
        out.gauges(
            "braid_export_backend_inflight",
            "Backend operations running for the export.",
            None,
            &per_export(&|x| x.backend_inflight as f64),
        )?;
        out.gauges(
            "braid_export_cached_results",
            "Results remembered for resent requests.",
            None,
            &per_export(&|x| x.cached_results as f64),
        )?;
        let rows: Vec<(Labels, &OpLatency)> = self
            .exports
            .iter()
            .zip(&s.latency)
            .map(|((name, _), l)| (vec![("export", name.clone())], l))
            .collect();
        out.latencies(
            "braid_server_op_latency",
            "From admitting a request to the backend's answer, per export and operation.",
            &rows,
        )
    }
}

/// What an attached volume's scrape reads.
struct ClientMetrics {
    client: Client,
    export: String,
}

impl std::fmt::Debug for ClientMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClientMetrics({})", self.export)
    }
}

impl Collector for ClientMetrics {
    fn encode(&self, encoder: DescriptorEncoder) -> Result<(), Error> {
        let s = self.client.status();
        let st = &s.stats;
        let mut out = Out(encoder);
        for (name, help, v) in [
            (
                "braid_client_submitted",
                "IOs accepted from the frontend.",
                st.submitted,
            ),
            (
                "braid_client_completed",
                "IOs completed successfully.",
                st.completed,
            ),
            (
                "braid_client_failed",
                "IOs completed with an error.",
                st.failed,
            ),
            (
                "braid_client_resends",
                "Requests resent because they aged past their deadline.",
                st.resends,
            ),
            (
                "braid_client_failovers",
                "Requests moved off a failed channel.",
                st.failovers,
            ),
            (
                "braid_client_duplicates_dropped",
                "Answers for requests already answered, dropped.",
                st.duplicates_dropped,
            ),
            (
                "braid_client_corrupt_frames",
                "Frames from the server that failed checksums.",
                st.corrupt_frames,
            ),
            (
                "braid_client_channel_failures",
                "Channels declared failed.",
                st.channel_failures,
            ),
            (
                "braid_client_handshakes",
                "Channel handshakes completed.",
                st.handshakes,
            ),
            (
                "braid_client_session_resets",
                "Server sessions lost and replaced (server restarts).",
                st.session_resets,
            ),
            (
                "braid_client_replayed_extents",
                "Unflushed extents rewritten after server restarts.",
                st.replayed_extents,
            ),
            (
                "braid_client_replay_retries",
                "Rewrites the restarted server refused, held and sent again.",
                st.replay_retries,
            ),
            ("braid_client_pings", "Keep-alive probes sent.", st.pings),
            (
                "braid_client_dirty_flushes",
                "FLUSHes issued to bound the unflushed window.",
                st.dirty_flushes,
            ),
            (
                "braid_client_busy",
                "Submissions refused because the journal was full.",
                st.busy,
            ),
        ] {
            out.counter(name, help, v)?;
        }
        out.seconds_counter(
            "braid_client_driver_busy_seconds",
            "Wall time the client driver's task spent working (IO completions handed on included); its rate near 1 means that one task limits the volume.",
            s.driver_busy,
        )?;
        let ready = s.channels.iter().filter(|c| c.1).count();
        out.gauge(
            "braid_client_channels",
            "Channels configured.",
            s.channels.len() as i64,
        )?;
        out.gauge(
            "braid_client_channels_up",
            "Channels connected and ready.",
            ready as i64,
        )?;
        out.gauge(
            "braid_client_journaled",
            "Requests in the journal (not yet answered).",
            s.journaled as i64,
        )?;
        out.gauge(
            "braid_client_dirty_bytes",
            "Acknowledged but unflushed data held for replay.",
            i64::try_from(s.dirty_bytes).unwrap_or(i64::MAX),
        )?;
        let channel = |i: usize| vec![("channel", i.to_string())];
        let up: Vec<(Labels, f64)> = s
            .channels
            .iter()
            .enumerate()
            .map(|(i, c)| (channel(i), f64::from(u8::from(c.1))))
            .collect();
        out.gauges(
            "braid_client_channel_up",
            "1 while the channel is ready.",
            None,
            &up,
        )?;
        let inflight: Vec<(Labels, f64)> = s
            .channels
            .iter()
            .enumerate()
            .map(|(i, c)| (channel(i), f64::from(c.2)))
            .collect();
        out.gauges(
            "braid_client_channel_inflight",
            "Requests on the wire through the channel.",
            None,
            &inflight,
        )?;
        let rtt: Vec<(Labels, f64)> = s
            .channels
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.3.map(|r| (channel(i), r.as_secs_f64())))
            .collect();
        out.gauges(
            "braid_client_channel_rtt",
            "Smoothed round-trip time.",
            Some(&Unit::Seconds),
            &rtt,
        )?;
        out.latencies(
            "braid_client_io_latency",
            "From the frontend's submission to its completion, per operation (failover and resends included).",
            &[(vec![("export", self.export.clone())], &s.latency)],
        )
    }
}

/// What an attached volume's scrape reads.
struct VolumeMetrics {
    volume: braid_fabric_tcp::Volume,
}

impl std::fmt::Debug for VolumeMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VolumeMetrics")
    }
}

impl Collector for VolumeMetrics {
    fn encode(&self, encoder: DescriptorEncoder) -> Result<(), Error> {
        let s = self.volume.status();
        let mut out = Out(encoder);
        out.counter(
            "braid_volume_legs_left",
            "Times a leg was left behind (failed, unreachable or suspended).",
            s.stats.legs_left,
        )?;
        out.counter(
            "braid_volume_regions_resynced",
            "Regions copied to returning legs.",
            s.stats.regions_resynced,
        )?;
        out.counter(
            "braid_volume_bytes_resynced",
            "Bytes copied to returning legs.",
            s.stats.bytes_resynced,
        )?;
        out.counter(
            "braid_volume_migrations",
            "Legs migrated to another export (braid volume migrate), switch done.",
            s.stats.migrations,
        )?;
        out.gauges(
            "braid_volume_migrating",
            "1 while a leg is being migrated.",
            None,
            &[(Vec::new(), f64::from(u8::from(s.migration.is_some())))],
        )?;
        let leg = |name: &str| vec![("leg", name.to_string())];
        // A retired leg (migrated away from) is no longer the volume's.
        let live = || {
            s.legs
                .iter()
                .filter(|l| l.1 != Some(braid_core::volume::LegState::Retired))
        };
        let in_sync: Vec<(Labels, f64)> = live()
            .map(|(n, st, _, _)| {
                let v = matches!(st, Some(braid_core::volume::LegState::InSync));
                (leg(n), f64::from(u8::from(v)))
            })
            .collect();
        out.gauges(
            "braid_volume_leg_in_sync",
            "1 while the leg holds every acknowledged write.",
            None,
            &in_sync,
        )?;
        let dirty: Vec<(Labels, f64)> = live().map(|(n, _, d, _)| (leg(n), *d as f64)).collect();
        out.gauges(
            "braid_volume_leg_dirty_regions",
            "Regions the leg may lack (still to copy to it).",
            None,
            &dirty,
        )
    }
}

fn registry(collector: impl Collector) -> Arc<Registry> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(collector));
    Arc::new(registry)
}

/// The metrics address, bound at start-up so a taken port is an error
/// before anything is served.
pub(crate) struct MetricsListener(std::net::TcpListener);

impl MetricsListener {
    /// Binds `addr` (`HOST:PORT`).
    /// The listener `--metrics` asks for, if it does.
    pub(crate) fn bind_if_asked(addr: Option<&str>) -> Result<Option<Self>, String> {
        addr.map(Self::bind).transpose()
    }

    pub(crate) fn bind(addr: &str) -> Result<Self, String> {
        let listener = std::net::TcpListener::bind(addr).map_err(|e| {
            format!("--metrics {addr}: {e} (expected HOST:PORT, e.g. 127.0.0.1:9410)")
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("--metrics {addr}: {e}"))?;
        Ok(MetricsListener(listener))
    }

    /// Where scrapers connect.
    pub(crate) fn url(&self) -> String {
        match self.0.local_addr() {
            Ok(a) => format!("http://{a}/metrics"),
            Err(_) => "?".into(),
        }
    }

    /// Serves a server's metrics (from a task on the current runtime).
    pub(crate) fn serve_server(
        self,
        server: Server,
        exports: Vec<(String, u64)>,
        backend: Arc<crate::busy_poll::Polled<braid_backend_file::FileBackend>>,
        nbd: Option<braid_frontend_nbd::Placement>,
        cert: Option<Arc<braid_fabric_tcp::tls::ServerCert>>,
    ) {
        self.spawn(registry(ServerMetrics {
            server,
            exports,
            backend,
            nbd,
            cert,
        }));
    }

    /// Serves an attached volume's metrics.
    pub(crate) fn serve_client(self, client: Client, export: String) {
        self.spawn(registry(ClientMetrics { client, export }));
    }

    /// Serves a volume's metrics.
    pub(crate) fn serve_volume(self, volume: braid_fabric_tcp::Volume) {
        self.spawn(registry(VolumeMetrics { volume }));
    }

    fn spawn(self, registry: Arc<Registry>) {
        let listener = match tokio::net::TcpListener::from_std(self.0) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "metrics: no listener; nothing will be scraped");
                return;
            }
        };
        tokio::spawn(async move {
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of descriptors, most likely: wait rather than spin.
                        tracing::warn!(error = %e, "metrics: accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let registry = registry.clone();
                tokio::spawn(async move {
                    if let Err(e) = answer(stream, &registry).await {
                        tracing::debug!(%peer, error = %e, "metrics: scrape failed");
                    }
                });
            }
        });
    }
}

/// One HTTP/1.x exchange: `GET /metrics` gets the text, anything else a
/// short error; the connection closes after it.
async fn answer(mut stream: tokio::net::TcpStream, registry: &Registry) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    let read = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < REQUEST_HEAD_MAX {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&chunk[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    if tokio::time::timeout(std::time::Duration::from_secs(10), read)
        .await
        .is_err()
    {
        return Ok(());
    }
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => {
            let mut text = String::new();
            match prometheus_client::encoding::text::encode(&mut text, registry) {
                Ok(()) => ("200 OK", CONTENT_TYPE, text),
                Err(_) => (
                    "500 Internal Server Error",
                    "text/plain",
                    "encoding the metrics failed\n".to_string(),
                ),
            }
        }
        ("GET" | "HEAD", _) => (
            "404 Not Found",
            "text/plain",
            "braid serves its metrics at /metrics\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET /metrics\n".to_string(),
        ),
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if method != "HEAD" {
        response.extend_from_slice(body.as_bytes());
    }
    stream.write_all(&response).await?;
    stream.shutdown().await
}
