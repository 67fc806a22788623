//! Rereading key and TLS files while serving: on SIGHUP (systemd's
//! `ExecReload`) or `braid reload`, which prints what changed. `braid
//! serve` rereads its key table and its TLS certificate, key and client
//! CA; `braid
//! attach` rereads its key and TLS files (a volume, each leg's), used from
//! the next connection, so a key rotates with no outage. A file that does
//! not parse changes nothing.

use crate::client_args::ClientArgs;
use braid_core::server::KeyChange;
use braid_fabric_tcp::tls::ServerCert;
use braid_fabric_tcp::{Client, ClientSecurity, Server};
use clap::Args;
use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

#[derive(Args)]
pub(crate) struct ReloadArgs {
    /// The control socket of `braid serve` [default: DATA_DIR/control.sock]
    /// or of `braid attach` (an export or a volume).
    #[arg(long)]
    control: Option<PathBuf>,
}

/// `braid reload`: the daemon rereads its key and TLS files; prints what
/// changed.
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

/// What `braid serve` rereads: its key file, and its TLS certificate, key
/// and client CA when it serves TLS.
#[derive(Clone)]
pub(crate) struct ServerFiles {
    pub(crate) key_file: PathBuf,
    pub(crate) cert: Option<Arc<ServerCert>>,
}

/// Rereads the server's key file, then its TLS certificate, and says
/// what changed in one line (logged, and what `braid reload` prints).
/// A key file that does not parse changes nothing; a certificate that
/// does not (or a key that does not match it, or a client CA that does
/// not parse) leaves the TLS files in use unchanged.
pub(crate) async fn server(server: &Server, files: &ServerFiles) -> Result<String, String> {
    let said = keys(server, &files.key_file).await?;
    let Some(cert) = &files.cert else {
        return Ok(said);
    };
    match cert.reload() {
        Ok(()) => {
            let client_ca = cert
                .client_ca_path()
                .map(|ca| format!(" and client CA from {}", ca.display()))
                .unwrap_or_default();
            let said = format!(
                "{said}; TLS certificate reread from {}{client_ca}, used from the next handshake",
                cert.cert_path().display()
            );
            tracing::info!("{said}");
            Ok(said)
        }
        Err(e) => Err(format!(
            "{said}; the TLS certificate served is unchanged: {e}"
        )),
    }
}

/// Rereads `key_file` into every engine of `server`, and says what
/// changed in one line (logged, and what `braid reload` prints).
async fn keys(server: &Server, key_file: &Path) -> Result<String, String> {
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

/// Rereads an attached export's key file (and TLS CA, client certificate
/// and key) into its client, and says so in one line: they are used from
/// the client's next connection (channels up stay up on what they
/// proved).
pub(crate) async fn client_key(client: &Client, args: &ClientArgs) -> Result<String, String> {
    let (key_id, key) = args.key()?;
    // Read before anything is used: TLS files that do not parse change
    // nothing either.
    let security = args.security()?;
    client.set_key(key_id.clone(), key).await?;
    let mut said = format!(
        "key {key_id} reread from {}: used from the next handshake",
        args.key_file().display()
    );
    if let (ClientSecurity::Tls(..), Some(ca)) = (&security, &args.tls_ca) {
        said += &format!("; TLS CA reread from {}", ca.display());
    }
    client.set_security(security).await?;
    tracing::info!("{said}");
    Ok(said)
}

/// Every leg client of an attached volume by leg name, a migration's new
/// leg included once it starts, and that new leg's flags: the volume file
/// names it only once the migration switches over.
#[derive(Default)]
pub(crate) struct Legs {
    pub(crate) clients: HashMap<String, Client>,
    pub(crate) joining: Option<(String, ClientArgs)>,
}

pub(crate) type LegClients = Arc<Mutex<Legs>>;

/// Rereads the key file (and TLS CA) of every leg into that leg's client
/// (used from its next handshake), and says so in one line: the legs the
/// volume file at `path` names, and a new leg `volume` is migrating to.
/// Every file is read before any is used: a leg's file that does not
/// parse changes no leg.
pub(crate) async fn leg_keys(
    legs: &LegClients,
    base: &ClientArgs,
    path: &Path,
    volume: &braid_fabric_tcp::Volume,
) -> Result<String, String> {
    let file = crate::volume::VolumeFile::load(path)?;
    let mut named: Vec<(String, ClientArgs)> = file
        .legs
        .iter()
        .map(|leg| (leg.name.clone(), crate::attach::leg_args(base, leg)))
        .collect();
    let migrating_to = volume.status().migration.map(|(_, to, _)| to);
    let joining = legs.lock().unwrap().joining.clone();
    if let Some((name, args)) = joining {
        let unnamed = named.iter().all(|(n, _)| *n != name);
        if unnamed && migrating_to.as_deref() == Some(name.as_str()) {
            named.push((name, args));
        }
    }
    let mut keys = Vec::new();
    for (name, args) in named {
        let key = args.key().map_err(|e| format!("leg {name:?}: {e}"))?;
        let security = args.security().map_err(|e| format!("leg {name:?}: {e}"))?;
        keys.push((name, key, security, args.key_file()));
    }
    let mut said = Vec::new();
    for (name, (key_id, key), security, key_file) in keys {
        let client = legs.lock().unwrap().clients.get(&name).cloned();
        let Some(client) = client else {
            return Err(format!(
                "leg {name:?} has no client (is the volume file newer than this run?)"
            ));
        };
        client
            .set_key(key_id.clone(), key)
            .await
            .map_err(|e| format!("leg {name:?}: {e}"))?;
        client
            .set_security(security)
            .await
            .map_err(|e| format!("leg {name:?}: {e}"))?;
        let joining = if migrating_to.as_deref() == Some(name.as_str()) {
            " (migrating to it)"
        } else {
            ""
        };
        said.push(format!(
            "leg {name}{joining}: key {key_id} from {}",
            key_file.display()
        ));
    }
    let said = format!("{}; used from each leg's next handshake", said.join("; "));
    tracing::info!("{said}");
    Ok(said)
}

/// Installs SIGHUP's handler now (its default ends the process), and
/// runs `reload` at each one from then on: see [`on_hangup`].
pub(crate) fn on_hangup_spawned<F, R>(reload: R) -> Result<(), String>
where
    R: Fn() -> F + Send + 'static,
    F: Future<Output = Result<String, String>> + Send + 'static,
{
    let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|e| format!("SIGHUP handler: {e}"))?;
    tokio::spawn(on_hangup(hangups, reload));
    Ok(())
}

/// Runs `reload` at every SIGHUP for as long as the daemon runs.
/// `hangups` is made before the daemon says it is ready, so a reload sent
/// right after can never kill it (SIGHUP's default).
pub(crate) async fn on_hangup<F, R>(mut hangups: tokio::signal::unix::Signal, reload: R)
where
    R: Fn() -> F,
    F: Future<Output = Result<String, String>>,
{
    while hangups.recv().await.is_some() {
        crate::systemd::reloading();
        match reload().await {
            Ok(said) => crate::systemd::ready(&said),
            Err(e) => {
                tracing::error!("SIGHUP: {e}; nothing changed");
                crate::systemd::ready(&format!("reload failed, nothing changed: {e}"));
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
