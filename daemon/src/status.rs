//! `braid status` and the control socket that answers it.

use crate::busy_poll::Polled;
use braid_backend_file::FileBackend;
use braid_fabric_tcp::Server;
use braid_frontend_nbd::Placement;
use clap::Args;
use std::path::PathBuf;
use std::sync::Arc;

/// Answers `status`, `set` and `reload` on the server's control socket.
pub(crate) fn serve_control(
    path: PathBuf,
    server: Server,
    reread: crate::reload::ServerFiles,
    exports: Vec<(String, u64)>,
    backend: Arc<Polled<FileBackend>>,
    nbd: Option<Placement>,
) {
    use crate::control::now;
    // The server leaves its control socket at exit (the next start
    // replaces a stale one).
    let _ = crate::control::serve(path, move |command| {
        if command == "status" {
            let mut doc = document(&server, &exports, &backend.0, nbd.as_ref());
            let cert = reread.cert.as_ref();
            doc["tls_cert_not_after"] = cert.and_then(|c| c.not_after()).into();
            doc["tls_client_ca_not_after"] = cert.and_then(|c| c.client_ca_not_after()).into();
            return now(doc);
        }
        if command == "reload" {
            let (server, reread) = (server.clone(), reread.clone());
            return crate::control::later(async move {
                let said = crate::reload::server(&server, &reread).await?;
                Ok(serde_json::json!({ "keys": said }))
            });
        }
        if let Some(settings) = command.strip_prefix("set ") {
            let tuning = match crate::tuning::parse_server(settings) {
                Ok(t) => t,
                Err(e) => return now(serde_json::json!({ "error": e })),
            };
            let server = server.clone();
            return crate::control::later(async move {
                server.tune(tuning).await?;
                Ok(
                    serde_json::json!({ "tuning": crate::tuning::server_json(&server.status().tuning) }),
                )
            });
        }
        now(serde_json::json!({
            "error": format!("unknown command {command:?} (a server answers: status, set KEY=VALUE..., reload)")
        }))
    });
}

fn document(
    server: &Server,
    exports: &[(String, u64)],
    backend: &FileBackend,
    nbd: Option<&Placement>,
) -> serde_json::Value {
    let s = server.status();
    let st = &s.stats;
    let (mapped_reads, mapped_writes) = backend.mapped_transfers();
    serde_json::json!({
        "role": "server",
        "listen": server.local_addr().to_string(),
        "exports": exports.iter().map(|(n, size)| serde_json::json!({"name": n, "size": size})).collect::<Vec<_>>(),
        "sessions": s.sessions,
        "session_list": s.session_list.iter().map(|x| serde_json::json!({
            "id": format!("{:#018x}", x.id),
            "export": x.export,
            "channels": x.channels,
            "cached_results": x.cached_results,
            "backend_inflight": x.backend_inflight,
            "orphaned": x.orphaned,
        })).collect::<Vec<_>>(),
        "connections": s.connections,
        "backend_inflight": s.backend_inflight,
        "requests": st.requests,
        "backend_ops": st.backend_ops,
        "fua_requests": st.fua_requests,
        "recorded_replies": st.recorded_replies,
        "joined": st.joined,
        "stale_dropped": st.stale_dropped,
        "corrupt_payloads": st.corrupt_payloads,
        "protocol_errors": st.protocol_errors,
        "auth_failures": st.auth_failures,
        "keys": s.key_ids,
        "channels_revoked": st.channels_revoked,
        "error_replies": st.error_replies,
        "handshakes": st.handshakes,
        "sessions_created": st.sessions_created,
        "sessions_freed": st.sessions_freed,
        "overload_dropped": st.overload_dropped,
        "file_replies": st.file_replies,
        "engine_busy_us": u64::try_from(s.engine_busy.as_micros()).unwrap_or(u64::MAX),
        "engine_turns": s.engine_turns,
        // Per engine (--engines), in order; the two above are their sums.
        "engines": s.engines.iter().map(|e| serde_json::json!({
            "busy_us": u64::try_from(e.busy.as_micros()).unwrap_or(u64::MAX),
            "turns": e.turns,
            "sessions": e.sessions,
        })).collect::<Vec<_>>(),
        "io_engine": backend.io_engine_in_use(),
        "io_uring_ops": backend.ops_on_io_uring(),
        "checksums_reused": backend.checksums_reused(),
        "nbd_reads_mapped": mapped_reads,
        "nbd_writes_mapped": mapped_writes,
        "writes_copied_to_mapping": backend.mapped_copies(),
        // Per NBD thread, in order; null without --nbd.
        "nbd_connections": nbd.map(Placement::connections),
        "tuning": crate::tuning::server_json(&s.tuning),
        "rdma_memory": crate::rdma::memory_json(),
    })
}

#[derive(Args, Debug)]
pub(crate) struct StatusArgs {
    /// The control socket of `braid serve` or `braid attach`
    /// [default: DATA_DIR/control.sock].
    #[arg(long)]
    control: Option<PathBuf>,
    /// Print the raw JSON document.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn run(args: StatusArgs) -> Result<(), String> {
    let path = args
        .control
        .unwrap_or_else(|| crate::config::default_data_dir().join("control.sock"));
    let v = crate::control::request(&path, "status").await?;
    if args.json {
        println!("{v}");
        return Ok(());
    }
    if v["role"] == "client" {
        crate::attach::print_status(&v);
        return Ok(());
    }
    if v["role"] == "volume" {
        crate::attach::print_volume_status(&v);
        return Ok(());
    }
    print_server(&v);
    Ok(())
}

/// The server's document as text: what it serves, its counters, its
/// tasks and settings, then each session.
fn print_server(v: &serde_json::Value) {
    print_identity(v);
    print_counters(v);
    print_tasks_and_settings(v);
    crate::rdma::print_memory(&v["rdma_memory"]);
    print_sessions(v);
}

/// Where it listens, its exports, the keys it holds and how long its
/// certificates have left.
fn print_identity(v: &serde_json::Value) {
    println!("braid server on {}", v["listen"].as_str().unwrap_or("?"));
    for e in v["exports"].as_array().into_iter().flatten() {
        println!(
            "  export {:<10} {}",
            e["name"].as_str().unwrap_or("?"),
            crate::config::human_size(e["size"].as_u64().unwrap_or(0))
        );
    }
    let keys: Vec<&str> = v["keys"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|k| k.as_str())
        .collect();
    println!("  keys held: {}", keys.join(", "));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    if let Some(not_after) = v["tls_cert_not_after"].as_i64() {
        println!("  TLS certificate: {}", expiry(not_after, now));
    }
    if let Some(not_after) = v["tls_client_ca_not_after"].as_i64() {
        println!("  TLS client CA: {}", expiry(not_after, now));
    }
}

/// The request, backend and error counters, one a line.
fn print_counters(v: &serde_json::Value) {
    let rows = [
        ("sessions", "sessions"),
        ("connections (channels)", "connections"),
        ("requests received", "requests"),
        ("backend operations", "backend_ops"),
        ("requests with FUA", "fua_requests"),
        ("read replies sent from the page cache", "file_replies"),
        ("  4 KiB blocks not read for a checksum", "checksums_reused"),
        ("backend operations on io_uring", "io_uring_ops"),
        ("NBD READs sent from the file's mapping", "nbd_reads_mapped"),
        (
            "NBD WRITEs received into the file's mapping",
            "nbd_writes_mapped",
        ),
        (
            "WRITEs copied into the file's mapping",
            "writes_copied_to_mapping",
        ),
        ("backend operations running", "backend_inflight"),
        ("resent requests answered from cache", "recorded_replies"),
        ("resent requests joined in flight", "joined"),
        ("stale duplicates dropped", "stale_dropped"),
        ("corrupt payloads refused", "corrupt_payloads"),
        ("error replies", "error_replies"),
        ("protocol errors (connections closed)", "protocol_errors"),
        ("authentication failures", "auth_failures"),
        ("channels closed: their key withdrawn", "channels_revoked"),
    ];
    for (label, key) in rows {
        println!("  {label:<38} {}", v[key].as_u64().unwrap_or(0));
    }
    println!(
        "  {:<38} {}",
        "backend IO that may wait (--io-engine)",
        v["io_engine"].as_str().unwrap_or("?")
    );
}

/// The engine tasks' busy time, the NBD threads and the settings `braid
/// set` changes.
fn print_tasks_and_settings(v: &serde_json::Value) {
    println!(
        "  {:<38} {:.1} s in {} turns",
        "protocol engine's task busy",
        v["engine_busy_us"].as_u64().unwrap_or(0) as f64 / 1e6,
        v["engine_turns"].as_u64().unwrap_or(0)
    );
    if let Some(engines) = v["engines"].as_array().filter(|e| e.len() > 1) {
        let each: Vec<String> = engines
            .iter()
            .map(|e| {
                format!(
                    "{:.1} s ({} sessions)",
                    e["busy_us"].as_u64().unwrap_or(0) as f64 / 1e6,
                    e["sessions"].as_u64().unwrap_or(0)
                )
            })
            .collect();
        println!("  {:<38} {}", "  per engine", each.join(", "));
    }
    if let Some(per_thread) = v["nbd_connections"].as_array() {
        let counts: Vec<u64> = per_thread.iter().map(|c| c.as_u64().unwrap_or(0)).collect();
        let listed: Vec<String> = counts.iter().map(u64::to_string).collect();
        println!(
            "  {:<38} {} (per thread: {})",
            "NBD connections",
            counts.iter().sum::<u64>(),
            listed.join(" ")
        );
    }
    if let Some(t) = v["tuning"].as_object() {
        let settings: Vec<String> = t.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("  settings (braid set): {}", settings.join(" "));
    }
}

/// A line per session.
fn print_sessions(v: &serde_json::Value) {
    for x in v["session_list"].as_array().into_iter().flatten() {
        println!(
            "  session {} export {} channels {} remembered results {} backend ops {}{}",
            x["id"].as_str().unwrap_or("?"),
            x["export"].as_str().unwrap_or("?"),
            x["channels"],
            x["cached_results"],
            x["backend_inflight"],
            if x["orphaned"].as_bool() == Some(true) {
                " (orphaned: waiting for its client)"
            } else {
                ""
            }
        );
    }
}

/// How far off a certificate's `not_after` is, both seconds since the
/// epoch: "expires in 12 days", or "EXPIRED 3 days ago".
fn expiry(not_after: i64, now: i64) -> String {
    const DAY: i64 = 86_400;
    if not_after <= now {
        return format!("EXPIRED {} days ago", (now - not_after) / DAY);
    }
    match (not_after - now) / DAY {
        0 => format!("expires in {} hours", (not_after - now) / 3600),
        days => format!("expires in {days} days"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_certificate_expiry_reads_as_days_or_hours() {
        let now = 1_800_000_000;
        assert_eq!(
            super::expiry(now + 30 * 86_400 + 5, now),
            "expires in 30 days"
        );
        assert_eq!(super::expiry(now + 7_200, now), "expires in 2 hours");
        assert_eq!(super::expiry(now - 3 * 86_400, now), "EXPIRED 3 days ago");
    }
}
