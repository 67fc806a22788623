//! Starting an NBD listener for `braid serve --nbd` and `braid attach --nbd`.

use braid_frontend_nbd::{NbdConfig, NbdListener, Target};
use std::sync::Arc;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Binds `addr` (TCP host:port or a unix socket path) and serves `config`
/// there until `stop` turns true, then drains. Returns the URI of `export`
/// on it and the task, which ends once the drain is done.
pub(crate) async fn start(
    addr: &str,
    export: &str,
    config: NbdConfig,
    target: Arc<dyn Target>,
    mut stop: watch::Receiver<bool>,
) -> Result<(String, JoinHandle<()>), String> {
    let listener = NbdListener::bind(addr)
        .await
        .map_err(|e| format!("NBD listen on {addr}: {e}"))?;
    let uri = listener.uri(export).map_err(|e| e.to_string())?;
    let task = tokio::spawn(async move {
        let until = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        if let Err(e) = braid_frontend_nbd::serve(listener, config, target, until).await {
            tracing::error!(error = %e, "NBD listener failed");
        }
    });
    Ok((uri, task))
}
