//! Both engines refuse configurations they cannot run with, naming the
//! field, instead of spinning, dividing by zero or dropping every request.

use braid_core::auth::Key;
use braid_core::client::{ClientConfig, ClientEngine};
use braid_core::server::{ExportConfig, ServerConfig, ServerEngine};
use std::time::Duration;

fn client() -> ClientConfig {
    ClientConfig::new("disk0", "k", Key::new(*b"key"), [1; 32])
}

fn server() -> ServerConfig {
    ServerConfig::new(
        1,
        [2; 32],
        vec![("k".into(), Key::new(*b"key"))],
        vec![ExportConfig::new("disk0", 1 << 20)],
    )
}

fn client_refuses(change: impl FnOnce(&mut ClientConfig), field: &str) {
    let mut c = client();
    change(&mut c);
    let e = ClientEngine::new(c).expect_err("refused");
    assert_eq!(e.field, field, "{e}");
    assert!(
        e.to_string()
            .starts_with(&format!("client config: {field}: ")),
        "{e}"
    );
}

fn server_refuses(change: impl FnOnce(&mut ServerConfig), field: &str) {
    let mut c = server();
    change(&mut c);
    let e = ServerEngine::new(c).expect_err("refused");
    assert_eq!(e.field, field, "{e}");
}

#[test]
fn defaults_are_valid() {
    ClientEngine::new(client()).unwrap();
    ServerEngine::new(server()).unwrap();
}

#[test]
fn the_client_names_the_field_it_refuses() {
    client_refuses(|c| c.resend_min = Duration::ZERO, "resend_min");
    client_refuses(|c| c.resend_max = Duration::from_millis(1), "resend_max");
    client_refuses(|c| c.max_inflight = 0, "max_inflight");
    client_refuses(|c| c.channels = 0, "channels");
    client_refuses(|c| c.channels = 65, "channels");
    client_refuses(|c| c.max_queued = 0, "max_queued");
    client_refuses(|c| c.max_journal_bytes = 100, "max_journal_bytes");
    client_refuses(|c| c.max_dirty_bytes = 0, "max_dirty_bytes");
    client_refuses(
        |c| c.channel_timeout = c.keepalive_interval,
        "channel_timeout",
    );
    client_refuses(|c| c.io_timeout = Some(Duration::ZERO), "io_timeout");
    client_refuses(|c| c.export.clear(), "export");
    client_refuses(|c| c.key_id = "x".repeat(256), "key_id");
}

#[test]
fn the_server_names_the_field_it_refuses() {
    server_refuses(|c| c.exports[0].block_size = 0, "exports.block_size");
    server_refuses(|c| c.exports[0].block_size = 1000, "exports.block_size");
    server_refuses(|c| c.exports[0].size = 12345, "exports.size");
    server_refuses(|c| c.max_inflight = 0, "max_inflight");
    server_refuses(|c| c.id_window = c.max_inflight - 1, "id_window");
    server_refuses(|c| c.max_payload = 256, "max_payload");
    server_refuses(|c| c.max_payload = u32::MAX, "max_payload");
    server_refuses(|c| c.keys.clear(), "keys");
    server_refuses(|c| c.exports.clear(), "exports");
    server_refuses(
        |c| c.exports.push(ExportConfig::new("disk0", 1 << 20)),
        "exports.name",
    );
    server_refuses(|c| c.idle_timeout = Duration::ZERO, "idle_timeout");
}
