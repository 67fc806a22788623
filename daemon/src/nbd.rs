//! Starting an NBD listener for `braid serve --nbd` and `braid attach --nbd`.

use braid_frontend_nbd::{NbdConfig, NbdListener, Placement};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Binds `addr` (TCP host:port or a unix socket path) and serves `config`
/// there, each connection where `placement` puts it, until `stop` turns
/// true, then drains. Returns the URI of `export` on it and the task, which
/// ends once the drain is done.
///
/// NBD has no authentication of its own: a TCP address other machines can
/// reach is refused unless TLS is on (and so, with a client CA, client
/// certificates) or the operator said `allow_insecure`.
pub(crate) async fn start(
    addr: &str,
    export: &str,
    config: NbdConfig,
    placement: Placement,
    allow_insecure: bool,
    mut stop: watch::Receiver<bool>,
) -> Result<(String, JoinHandle<()>), String> {
    if addr.contains('/') {
        crate::control::ensure_unused(std::path::Path::new(addr))?;
    }
    let listener = NbdListener::bind(addr)
        .await
        .map_err(|e| format!("NBD listen on {addr}: {e}"))?;
    if listener.reachable_from_network() && !config.has_tls() {
        if !allow_insecure {
            return Err(format!(
                "NBD listen on {addr}: NBD has no authentication, so without TLS every \
                 export would be readable and writable by the whole network. Use a \
                 loopback address or a unix socket, turn on --tls (with --tls-client-ca \
                 to require client certificates), or pass --nbd-allow-insecure \
                 (nbd_allow_insecure = true) if the network is yours alone"
            ));
        }
        tracing::warn!(%addr, "NBD served without TLS to the network (--nbd-allow-insecure): anyone who can connect can read and write every export");
    }
    let uri = listener.uri(export).map_err(|e| e.to_string())?;
    let task = tokio::spawn(async move {
        let until = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        if let Err(e) = braid_frontend_nbd::serve(listener, config, placement, until).await {
            tracing::error!(error = %e, "NBD listener failed");
        }
    });
    Ok((uri, task))
}
