//! Keys changed while `braid serve` runs, as an operator does it: a key
//! added to the key file works after `braid reload`; one removed is
//! withdrawn on SIGHUP and its client's channels close while other
//! clients go on; given back, the client resumes and its waiting write
//! lands once; a key file that does not parse changes nothing.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::{free_port, pattern, reload, serve, status, wait_for, Killed, Nbd};

fn reloaded(control: &Path) -> String {
    let (ok, said) = reload(control);
    assert!(ok, "{said}");
    said
}

/// Polls `control`'s status until `done` holds (a daemon's state changes
/// on its own time), up to a deadline.
fn wait_status(control: &Path, what: &str, done: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = status(control);
        if done(&v) {
            return;
        }
        assert!(Instant::now() < deadline, "never {what}: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn all_up(v: &serde_json::Value) -> bool {
    let channels = v["channels"].as_array().unwrap();
    !channels.is_empty() && channels.iter().all(|c| c["state"] == "up")
}

fn attach(d: &Path, port: u16, name: &str, keys: &Path) -> (Killed, std::path::PathBuf) {
    let (child, _, control) = common::attach_export(d, port, name, keys);
    (child, control)
}

/// `braid serve` of a 16 MiB disk0 in `d` with `extra` flags, once its
/// control socket answers: the server, its port and its control socket.
fn start_server(d: &Path, extra: &[&str]) -> (Killed, u16, std::path::PathBuf) {
    let port = free_port();
    let server = serve(d, port, "16M", extra);
    let control = d.join("control.sock");
    wait_for(&control);
    (server, port, control)
}

#[test]
fn keys_are_added_withdrawn_and_given_back_while_serving() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (server, port, server_control) = start_server(d, &[]);
    let keys = d.join("keys.toml");
    let first = std::fs::read_to_string(&keys).unwrap();
    // alice has the server's first key; bob's is new.
    let alice_keys = d.join("alice.toml");
    std::fs::write(&alice_keys, &first).unwrap();
    let bob_line = format!("bob = \"{}\"\n", "b0".repeat(32));
    let bob_keys = d.join("bob.toml");
    std::fs::write(&bob_keys, &bob_line).unwrap();

    let (_alice, alice) = attach(d, port, "alice", &alice_keys);
    let (mut a, _) = Nbd::connect(&d.join("alice.sock"), "disk0");
    let one = pattern(1, 64 << 10);
    assert_eq!(a.io(1, 0, one.len() as u32, &one).0, 0);

    // bob's key added: `braid reload` says so, and bob attaches.
    std::fs::write(&keys, format!("{first}{bob_line}")).unwrap();
    let said = reloaded(&server_control);
    assert!(said.contains("2 held; added bob"), "{said}");
    assert_eq!(
        status(&server_control)["keys"],
        serde_json::json!(["bob", "default"])
    );
    let (_bob, bob) = attach(d, port, "bob", &bob_keys);
    let (mut b, _) = Nbd::connect(&d.join("bob.sock"), "disk0");
    let two = pattern(2, 64 << 10);
    assert_eq!(b.io(1, 1 << 20, two.len() as u32, &two).0, 0);

    // alice's key withdrawn by SIGHUP: her channels close and stay down,
    // refused; bob goes on.
    std::fs::write(&keys, &bob_line).unwrap();
    let hup = Command::new("kill")
        .args(["-HUP", &server.0.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    wait_status(&server_control, "closed alice's channels", |v| {
        v["channels_revoked"].as_u64() > Some(0)
    });
    wait_status(&alice, "refused alice's key", |v| {
        !all_up(v)
            && v["last_channel_error"]
                .as_str()
                .is_some_and(|e| e.contains("AuthFailed"))
    });
    let revoked = status(&server_control)["channels_revoked"]
        .as_u64()
        .unwrap();
    assert_eq!(b.io(1, 2 << 20, two.len() as u32, &two).0, 0, "bob goes on");
    assert!(all_up(&status(&bob)));
    // alice writes while refused: the write waits, journaled.
    let three = pattern(3, 64 << 10);
    let writer = {
        let three = three.clone();
        std::thread::spawn(move || a.io(1, 64 << 10, three.len() as u32, &three).0)
    };
    wait_status(&alice, "journaled alice's write", |v| {
        v["journaled"].as_u64() > Some(0)
    });

    // Given back: alice's session resumes and her write lands, once.
    std::fs::write(&keys, format!("{first}{bob_line}")).unwrap();
    let said = reloaded(&server_control);
    assert!(said.contains("added default"), "{said}");
    assert_eq!(writer.join().unwrap(), 0, "alice's waiting write");
    wait_status(&alice, "alice's channels up", all_up);
    let v = status(&alice);
    assert_eq!(v["session_resets"], 0, "the session resumed: {v}");
    let (mut a, _) = Nbd::connect(&d.join("alice.sock"), "disk0");
    let (e, back) = a.io(0, 0, 128 << 10, &[]);
    assert_eq!(e, 0);
    assert!(back[..64 << 10] == one[..] && back[64 << 10..] == three[..]);
    assert_eq!(
        status(&server_control)["channels_revoked"].as_u64(),
        Some(revoked),
        "nothing more was closed"
    );

    // A key file that does not parse is refused, naming the file, and
    // changes nothing.
    std::fs::write(&keys, "bob = \"not hex\"\n").unwrap();
    let (ok, err) = reload(&server_control);
    assert!(
        !ok && err.contains("keys.toml") && err.contains("hex"),
        "{err}"
    );
    assert_eq!(
        a.io(1, 0, one.len() as u32, &one).0,
        0,
        "alice still served"
    );
    assert_eq!(b.io(1, 0, one.len() as u32, &one).0, 0, "bob still served");
}

/// A key rotated with no outage, as an operator does it: the server
/// holds the old key and the new, the attached client rereads its key
/// file (SIGHUP), the old key is withdrawn; the client's channels come
/// back under the new key in the same session while a writer runs the
/// whole time without one error.
#[test]
fn a_key_rotates_under_io_with_no_error() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_server, port, server_control) = start_server(d, &[]);
    let keys = d.join("keys.toml");
    let old = std::fs::read_to_string(&keys).unwrap();
    let client_keys = d.join("client.toml");
    std::fs::write(&client_keys, &old).unwrap();
    let (client, control) = attach(d, port, "c", &client_keys);
    wait_status(&control, "all channels up", all_up);

    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, rounds, sock) = (stop.clone(), rounds.clone(), d.join("c.sock"));
        std::thread::spawn(move || {
            let (mut nbd, _) = Nbd::connect(&sock, "disk0");
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let data = pattern(round as u8, 16 << 10);
                let at = (round % 256) * (16 << 10);
                nbd.round_trip(at, &data, round);
                round += 1;
                rounds.store(round, Ordering::Relaxed);
            }
        })
    };
    let progressed = || {
        let since = rounds.load(Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(20);
        while rounds.load(Ordering::Relaxed) < since + 20 {
            assert!(
                Instant::now() < deadline,
                "IO stalled: {}",
                status(&control)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    progressed();

    // The server takes the new key beside the old.
    let new_line = format!("rotated = \"{}\"\n", "7e".repeat(32));
    std::fs::write(&keys, format!("{old}{new_line}")).unwrap();
    assert!(reloaded(&server_control).contains("added rotated"));
    // The client's key file now holds only the new key: SIGHUP.
    std::fs::write(&client_keys, &new_line).unwrap();
    let hup = Command::new("kill")
        .args(["-HUP", &client.0.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    wait_status(&control, "took the new key", |v| v["key_id"] == "rotated");
    // `braid reload` on the attach does what SIGHUP did, and says so; the
    // channels stay up.
    let said = reloaded(&control);
    assert!(said.contains("key rotated reread"), "{said}");
    assert!(all_up(&status(&control)));
    progressed();

    // The old key withdrawn: every channel closes, and returns under the
    // new key in the same session.
    std::fs::write(&keys, &new_line).unwrap();
    let said = reloaded(&server_control);
    assert!(said.contains("withdrawn default (4 channel"), "{said}");
    progressed();
    wait_status(&control, "all channels back up", all_up);
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let v = status(&control);
    assert_eq!(
        (v["session_resets"].as_u64(), v["failed"].as_u64()),
        (Some(0), Some(0)),
        "{v}"
    );
    let s = status(&server_control);
    assert_eq!(
        s["auth_failures"], 0,
        "no handshake used a key the server lacked: {s}"
    );
    assert_eq!(s["channels_revoked"], 4);
}

/// A TLS certificate renewed while `braid serve` runs: `braid reload`
/// serves the new one from the next handshake, channels secured under
/// the old one stay up, and a certificate file that does not parse
/// leaves the one served. A client's CA file renewed and reread is what
/// its next connections trust.
#[test]
fn a_tls_certificate_renews_while_serving() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (server, port, server_control) = start_server(d, &["--tls"]);
    let (cert, key) = (d.join("tls-cert.pem"), d.join("tls-key.pem"));
    let old_ca = d.join("old-ca.pem");
    std::fs::copy(&cert, &old_ca).unwrap();
    let tls_attach = |name: &str, ca: &Path| {
        let (sock, control) = (
            d.join(format!("{name}.sock")),
            d.join(format!("{name}.ctl")),
        );
        let server = format!("127.0.0.1:{port}");
        let keys = d.join("keys.toml");
        let child = common::attach(
            &[
                "--server",
                &server,
                "--key-file",
                keys.to_str().unwrap(),
                "--tls-ca",
                ca.to_str().unwrap(),
                "--tls-name",
                "localhost",
            ],
            &sock,
            &control,
            &[],
        );
        (child, sock, control)
    };
    let (_old, old_sock, old_control) = tls_attach("old", &old_ca);
    let (mut old_nbd, _) = Nbd::connect(&old_sock, "disk0");
    let data = pattern(4, 64 << 10);
    assert_eq!(old_nbd.io(1, 0, data.len() as u32, &data).0, 0);

    // A renewed certificate: another server's self-signed one, put in
    // this server's files.
    let other = tempfile::tempdir().unwrap();
    let other_control = other.path().join("control.sock");
    let other_server = serve(other.path(), free_port(), "1M", &["--tls"]);
    wait_for(&other_control);
    drop(other_server);
    std::fs::copy(other.path().join("tls-key.pem"), &key).unwrap();
    std::fs::copy(other.path().join("tls-cert.pem"), &cert).unwrap();
    let said = reloaded(&server_control);
    assert!(said.contains("TLS certificate reread"), "{said}");

    // A client trusting only the new certificate connects; the one
    // secured under the old keeps its channels.
    let new_ca = d.join("new-ca.pem");
    std::fs::copy(&cert, &new_ca).unwrap();
    let (_new, new_sock, _) = tls_attach("new", &new_ca);
    let (mut new_nbd, _) = Nbd::connect(&new_sock, "disk0");
    let (e, back) = new_nbd.io(0, 0, data.len() as u32, &[]);
    assert!(e == 0 && back == data);
    assert!(all_up(&status(&old_control)));
    assert_eq!(old_nbd.io(1, 1 << 20, data.len() as u32, &data).0, 0);
    // A broken certificate file: refused, and the renewed one is served.
    std::fs::write(&cert, "not a certificate\n").unwrap();
    let (ok, said) = reload(&server_control);
    assert!(
        !ok && said.contains("TLS certificate served is unchanged"),
        "{said}"
    );
    let (_again, again_sock, _) = tls_attach("again", &new_ca);
    let (mut again_nbd, _) = Nbd::connect(&again_sock, "disk0");
    let (e, back) = again_nbd.io(0, 1 << 20, data.len() as u32, &[]);
    assert!(e == 0 && back == data);

    // The old client's CA file renewed and reread, then the server
    // restarted (so no TLS session can be resumed): the old client's
    // channels come back only if they trust the renewed certificate.
    std::fs::copy(&new_ca, &cert).unwrap();
    std::fs::copy(&new_ca, &old_ca).unwrap();
    let said = reloaded(&old_control);
    assert!(said.contains("TLS CA reread"), "{said}");
    drop(server);
    let _server = serve(d, port, "16M", &["--tls"]);
    wait_status(&old_control, "channels back under the renewed CA", |v| {
        all_up(v) && v["session_resets"].as_u64() > Some(0)
    });
    let (e, back) = old_nbd.io(0, 1 << 20, data.len() as u32, &[]);
    assert!(e == 0 && back == data);
}

#[test]
fn a_client_ca_rotates_while_serving() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let client_cert = |name: &str| {
        let (c, k) = (
            d.join(format!("{name}-cert.pem")),
            d.join(format!("{name}-key.pem")),
        );
        braid_fabric_tcp::tls::generate_self_signed(&[name.into()], &c, &k).unwrap();
        (c, k)
    };
    let ((c1, k1), (c2, k2)) = (client_cert("client1"), client_cert("client2"));
    let ca = d.join("client-ca.pem");
    std::fs::copy(&c1, &ca).unwrap();
    let (_server, port, server_control) =
        start_server(d, &["--tls", "--tls-client-ca", ca.to_str().unwrap()]);
    let server = format!("127.0.0.1:{port}");
    let (keys, server_cert) = (d.join("keys.toml"), d.join("tls-cert.pem"));
    let client_args = |cert: &Path, key: &Path| {
        [
            "--server",
            &server,
            "--key-file",
            keys.to_str().unwrap(),
            "--tls-ca",
            server_cert.to_str().unwrap(),
            "--tls-name",
            "localhost",
            "--tls-client-cert",
            cert.to_str().unwrap(),
            "--tls-client-key",
            key.to_str().unwrap(),
        ]
        .map(String::from)
    };
    let tls_attach = |name: &str, cert: &Path, key: &Path| {
        let (sock, control) = (
            d.join(format!("{name}.sock")),
            d.join(format!("{name}.ctl")),
        );
        let args = client_args(cert, key);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let child = common::attach(&args, &sock, &control, &[]);
        (child, sock, control)
    };
    let (_one, one_sock, one_control) = tls_attach("one", &c1, &k1);
    let (mut one, _) = Nbd::connect(&one_sock, "disk0");
    let data = pattern(6, 64 << 10);
    assert_eq!(one.io(1, 0, data.len() as u32, &data).0, 0);

    // The CA now signs client2's certificate only.
    std::fs::copy(&c2, &ca).unwrap();
    let said = reloaded(&server_control);
    assert!(said.contains("client CA from"), "{said}");
    // client1's channels, secured before, go on ...
    assert!(all_up(&status(&one_control)));
    let (e, back) = one.io(0, 0, data.len() as u32, &[]);
    assert!(e == 0 && back == data);
    // ... but client1 gets no new session.
    let refused = Command::new(common::BRAID)
        .arg("bench")
        .args(client_args(&c1, &k1))
        .args(["--export", "disk0", "--time", "1"])
        .output()
        .unwrap();
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && why.contains("alert"),
        "client1 refused for its certificate: {why}"
    );
    // client2 attaches.
    let (_two, two_sock, _) = tls_attach("two", &c2, &k2);
    let (mut two, _) = Nbd::connect(&two_sock, "disk0");
    let (e, back) = two.io(0, 0, data.len() as u32, &[]);
    assert!(e == 0 && back == data);

    // A CA file that does not parse: refused, and client2 still gets in.
    std::fs::write(&ca, "not a certificate\n").unwrap();
    let (ok, said) = reload(&server_control);
    assert!(
        !ok && said.contains("client-ca.pem") && said.contains("unchanged"),
        "{said}"
    );
    let (_again, again_sock, _) = tls_attach("again", &c2, &k2);
    let (mut again, _) = Nbd::connect(&again_sock, "disk0");
    assert_eq!(again.io(1, 1 << 20, data.len() as u32, &data).0, 0);
}
