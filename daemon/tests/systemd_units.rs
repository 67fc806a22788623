//! The systemd units in dist/systemd pass `systemd-analyze verify` with
//! the built binary in place of /usr/local/bin/braid, and every flag they
//! give braid exists.

use std::path::Path;
use std::process::Command;

mod common;
use common::BRAID;

fn units() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/systemd")
}

#[test]
fn the_units_verify_and_name_only_real_flags() {
    let dir = tempfile::tempdir().unwrap();
    for unit in ["braid-serve.service", "braid-attach@.service"] {
        let text = std::fs::read_to_string(units().join(unit)).unwrap();
        // The flags a unit passes must be ones braid takes.
        let exec = text
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart=/usr/local/bin/braid "))
            .unwrap_or_else(|| panic!("{unit}: no ExecStart of braid"));
        let command = exec.split_whitespace().next().unwrap();
        let help = Command::new(BRAID)
            .args([command, "--help"])
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&help.stdout);
        for flag in exec.split_whitespace().filter(|w| w.starts_with("--")) {
            assert!(help.contains(flag), "{unit}: braid {command} has no {flag}");
        }
        let text = text.replace("/usr/local/bin/braid", BRAID);
        std::fs::write(dir.path().join(unit), text).unwrap();
    }
    // The template needs an instance to verify, and its environment file.
    std::fs::copy(
        dir.path().join("braid-attach@.service"),
        dir.path().join("braid-attach@0.service"),
    )
    .unwrap();
    let Ok(out) = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("braid-serve.service"))
        .arg(dir.path().join("braid-attach@0.service"))
        .env("SYSTEMD_LOG_LEVEL", "warning")
        .output()
    else {
        eprintln!("systemd-analyze not installed: only the flags were checked");
        return;
    };
    let err = String::from_utf8_lossy(&out.stderr);
    // Verify runs on the host's unit tree: lines about other units, and
    // the config and environment files this test does not install, are
    // not the units' fault.
    let ours: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("braid-"))
        .filter(|l| !l.contains("/etc/braid/"))
        .collect();
    assert!(ours.is_empty(), "systemd-analyze verify:\n{err}");
}
