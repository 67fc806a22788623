//! `braid status` as a Unix filter's input: `braid status | head` ends the
//! report quietly once its reader has gone, with no panic.

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};

mod common;
use common::{free_port, serve, wait_for, BRAID};

#[test]
fn a_report_whose_reader_has_gone_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let _server = serve(dir.path(), free_port(), "1MiB", &[]);
    let control = dir.path().join("control.sock");
    wait_for(&control);
    // The reader's end is closed before the report starts: its first line
    // meets a broken pipe.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(BRAID)
        .args(["status", "--control"])
        .arg(&control)
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGPIPE),
        "{:?}: {stderr}",
        out.status
    );
}
