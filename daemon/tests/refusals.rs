//! `braid serve` refuses, before it writes anything, what would corrupt a
//! disk or expose it: a second server on one data dir or one file, a size
//! that is not whole blocks, NBD to the network without TLS; and settings
//! it cannot run with.

use std::path::Path;
use std::process::{Command, Output, Stdio};

mod common;
use common::{wait_for, Killed, BRAID};

fn serve(dir: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(BRAID);
    c.args(["serve", "--data-dir"])
        .arg(dir)
        .args(["--listen", "127.0.0.1:0"])
        .args(extra)
        .stdin(Stdio::null());
    c
}

/// Runs a serve that must refuse; returns its stderr.
fn refused(mut cmd: Command) -> String {
    let out: Output = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "it started: {err}");
    err
}

#[test]
fn a_second_server_on_one_data_dir_is_refused_and_names_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.img");
    let mut first = serve(
        dir.path(),
        &["--export", &format!("e={},size=1M", img.display())],
    );
    let first = Killed(
        first
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for(&dir.path().join("control.sock"));
    let err = refused(serve(dir.path(), &[]));
    assert!(
        err.contains("serve.lock") && err.contains("in use by"),
        "{err}"
    );
    assert!(err.contains(&format!("pid {}", first.0.id())), "{err}");

    // Another data dir, the same image: the file lock refuses it.
    let other = tempfile::tempdir().unwrap();
    let err = refused(serve(
        other.path(),
        &["--export", &format!("e={},size=1M", img.display())],
    ));
    assert!(
        err.contains("in use by") && err.contains(&format!("pid {}", first.0.id())),
        "{err}"
    );
}

#[test]
fn two_exports_on_one_file_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("x.img");
    let a = format!("a={},size=1M", img.display());
    let b = format!("b={}", img.display());
    let err = refused(serve(dir.path(), &["--export", &a, "--export", &b]));
    assert!(err.contains("another export on the same file"), "{err}");
    // Read-only and shared, both may read it.
    let (ra, rb) = (
        format!("a={},ro", img.display()),
        format!("b={},ro,shared", img.display()),
    );
    let mut both = serve(dir.path(), &["--export", &ra, "--export", &rb]);
    let _both = Killed(
        both.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for(&dir.path().join("control.sock"));
}

#[test]
fn sizes_must_be_whole_blocks_and_nothing_is_created_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("odd.img");
    let err = refused(serve(
        dir.path(),
        &["--export", &format!("foo={},size=12345", img.display())],
    ));
    assert!(
        err.contains("12345") && err.contains("12288 or 12800"),
        "{err}"
    );
    assert!(!img.exists(), "the refused export's file was created");
    let err = refused(serve(dir.path(), &["--export", "w=/tmp/w.img,shared"]));
    assert!(err.contains("needs 'ro'"), "{err}");
}

#[test]
fn nbd_needs_a_thread_to_run_on_and_nothing_is_created_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let err = refused(serve(dir.path(), &["--nbd-threads", "0"]));
    assert!(err.contains("--nbd-threads"), "{err}");
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "refused, it created {left:?}");
}

#[test]
fn nbd_on_the_network_without_tls_needs_an_explicit_opt_in() {
    let dir = tempfile::tempdir().unwrap();
    let err = refused(serve(dir.path(), &["--nbd", "0.0.0.0:0"]));
    assert!(
        err.contains("no authentication") && err.contains("--nbd-allow-insecure"),
        "{err}"
    );
    // With the opt-in it serves (and says so in its log).
    let mut ok = serve(dir.path(), &["--nbd", "0.0.0.0:0", "--nbd-allow-insecure"]);
    let _ok = Killed(
        ok.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for(&dir.path().join("control.sock"));
}
