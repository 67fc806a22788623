//! What `braid status` shows of an attached export or volume: the
//! control socket's JSON document, and its printing.

use braid_fabric_tcp::Client;

pub(super) fn document(
    client: &Client,
    server: &str,
    export: &str,
    uris: &[String],
) -> serde_json::Value {
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

pub(super) fn volume_document(
    volume: &braid_fabric_tcp::Volume,
    name: &str,
    clients: &crate::reload::LegClients,
) -> serde_json::Value {
    let s = volume.status();
    let clients = clients.lock().unwrap().clients.clone();
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
