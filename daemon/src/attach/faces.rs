//! How an attached export or volume is served on this machine: NBD on
//! unix sockets or TCP, and a ublk block device; and how they are
//! drained when it detaches.

use crate::control::{Answer, OwnedSocket};
use braid_frontend_nbd::{NbdConfig, NbdExport, Target};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

/// What starts the faces of one attached volume.
pub(super) struct FaceSettings<'a> {
    /// The NBD addresses (unix socket paths or TCP host:port).
    pub(super) nbd: &'a [String],
    pub(super) nbd_allow_insecure: bool,
    pub(super) ublk: &'a crate::ublk::UblkArgs,
    pub(super) export: NbdExport,
    pub(super) geometry: crate::ublk::Volume,
}

/// The faces serving one attached volume.
pub(super) struct Faces {
    /// Each NBD listener's URI, in the order of the addresses.
    pub(super) uris: Vec<String>,
    pub(super) device: Option<braid_frontend_ublk::Device>,
    listeners: Vec<JoinHandle<()>>,
    stop: watch::Sender<bool>,
    /// The NBD unix sockets and the control socket, removed once
    /// detached.
    sockets: Vec<OwnedSocket>,
    /// Installed before anything is served: SIGTERM's default would end
    /// the process with IO in flight.
    term: tokio::signal::unix::Signal,
}

impl Faces {
    /// Starts NBD on every address, then the block device if asked for.
    /// If the device cannot be made, the NBD listeners stop again.
    pub(super) async fn start(
        settings: FaceSettings<'_>,
        target: Arc<dyn Target>,
    ) -> Result<Faces, String> {
        let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| format!("SIGTERM handler: {e}"))?;
        let (stop, stopped) = watch::channel(false);
        let mut faces = Faces {
            uris: Vec::new(),
            device: None,
            listeners: Vec::new(),
            stop,
            sockets: Vec::new(),
            term,
        };
        let name = settings.export.name.clone();
        for addr in settings.nbd {
            let config = NbdConfig::new(vec![settings.export.clone()]);
            let started = crate::nbd::start(
                addr,
                &name,
                config,
                braid_frontend_nbd::Placement::here(target.clone()),
                settings.nbd_allow_insecure,
                stopped.clone(),
            )
            .await;
            let (uri, task) = match started {
                Ok(s) => s,
                Err(e) => {
                    faces.abandon();
                    return Err(e);
                }
            };
            if addr.contains('/') {
                faces.sockets.extend(OwnedSocket::claim(Path::new(addr)));
            }
            faces.uris.push(uri);
            faces.listeners.push(task);
        }
        match crate::ublk::maybe_create(settings.ublk, settings.geometry, target).await {
            Ok(device) => faces.device = device,
            Err(e) => {
                faces.abandon();
                return Err(e);
            }
        }
        Ok(faces)
    }

    /// The block device's path, if there is one.
    pub(super) fn block_device(&self) -> Option<String> {
        crate::ublk::path_of(&self.device)
    }

    /// Stops the NBD listeners of faces that will not be served.
    fn abandon(self) {
        let _ = self.stop.send(true);
        for socket in self.sockets {
            socket.remove();
        }
    }

    /// Answers the control socket at `control` with `answer`, tells
    /// systemd the volume `name` is attached, and waits for SIGTERM, ^C
    /// or `braid detach` (`detach` notified). Then the NBD listeners stop
    /// and their in-flight requests finish, the block device goes once
    /// the kernel's are done, and so do the sockets.
    pub(super) async fn serve_until_detached(
        mut self,
        name: &str,
        control: PathBuf,
        answer: impl Fn(&str) -> Answer + Send + Sync + 'static,
        detach: &Notify,
    ) {
        self.sockets.extend(crate::control::serve(control, answer));
        notify_attached(name, &self.block_device());
        tokio::select! {
            _ = self.term.recv() => tracing::info!("SIGTERM: detaching"),
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupted: detaching"),
            _ = detach.notified() => tracing::info!("detach requested"),
        }
        crate::systemd::stopping();
        let _ = self.stop.send(true);
        for t in self.listeners {
            let _ = t.await;
        }
        crate::ublk::remove(self.device).await;
        for socket in self.sockets {
            socket.remove();
        }
    }
}

/// READY=1 for systemd, naming what the volume is served as.
fn notify_attached(name: &str, block_device: &Option<String>) {
    crate::systemd::ready(&match block_device {
        Some(path) => format!("volume {name} attached as {path}"),
        None => format!("volume {name} attached over NBD"),
    });
}
