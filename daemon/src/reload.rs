//! Rereading the server's key file while it serves: on SIGHUP (systemd's
//! `ExecReload`) or `braid reload`, which prints what changed. A key file
//! that does not parse, or leaves no key, changes nothing.

use braid_core::server::KeyChange;
use braid_fabric_tcp::Server;
use clap::Args;
use std::path::{Path, PathBuf};

#[derive(Args)]
pub(crate) struct ReloadArgs {
    /// The control socket of `braid serve` [default: DATA_DIR/control.sock].
    #[arg(long)]
    control: Option<PathBuf>,
}

/// `braid reload`: the server rereads its key file; prints the change.
pub(crate) async fn run(args: ReloadArgs) -> Result<(), String> {
    let path = args
        .control
        .unwrap_or_else(|| crate::config::default_data_dir().join("control.sock"));
    let v = crate::control::request(&path, "reload").await?;
    if let Some(e) = v["error"].as_str() {
        return Err(e.to_string());
    }
    println!("{}", v["keys"].as_str().unwrap_or("?"));
    Ok(())
}

/// Rereads `key_file` into every engine of `server`, and says what
/// changed in one line (logged, and what `braid reload` prints).
pub(crate) async fn keys(server: &Server, key_file: &Path) -> Result<String, String> {
    let keys = crate::config::read_keys(key_file)?;
    let held = keys.len();
    let change = server
        .set_keys(keys)
        .await
        .map_err(|e| format!("key file {}: {e}", key_file.display()))?;
    let said = describe(key_file, held, &change);
    tracing::info!("{said}");
    Ok(said)
}

fn describe(key_file: &Path, held: usize, change: &KeyChange) -> String {
    let mut said = format!("keys reread from {}: {held} held", key_file.display());
    if !change.added.is_empty() {
        said += &format!("; added {}", change.added.join(", "));
    }
    if !change.withdrawn.is_empty() {
        said += &format!(
            "; withdrawn {} ({} channel(s) that used them closed)",
            change.withdrawn.join(", "),
            change.channels_closed
        );
    }
    if change.added.is_empty() && change.withdrawn.is_empty() {
        said += "; nothing changed";
    }
    said
}

/// Rereads the key file at every SIGHUP for as long as the server runs.
/// `hangups` is made before the server says it is ready, so a reload sent
/// right after can never kill it (SIGHUP's default).
pub(crate) async fn keys_on_hangup(
    mut hangups: tokio::signal::unix::Signal,
    server: Server,
    key_file: PathBuf,
) {
    while hangups.recv().await.is_some() {
        crate::systemd::reloading();
        match keys(&server, &key_file).await {
            Ok(said) => crate::systemd::ready(&said),
            Err(e) => {
                tracing::error!("SIGHUP: {e}; the keys in force are unchanged");
                crate::systemd::ready(&format!("reload failed, keys unchanged: {e}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_change_is_said_in_one_line() {
        let path = Path::new("/etc/braid/keys.toml");
        let change = KeyChange {
            added: vec!["k2".into()],
            withdrawn: vec!["k1".into()],
            channels_closed: 3,
        };
        assert_eq!(
            describe(path, 1, &change),
            "keys reread from /etc/braid/keys.toml: 1 held; added k2; \
             withdrawn k1 (3 channel(s) that used them closed)"
        );
        assert_eq!(
            describe(path, 2, &KeyChange::default()),
            "keys reread from /etc/braid/keys.toml: 2 held; nothing changed"
        );
    }
}
