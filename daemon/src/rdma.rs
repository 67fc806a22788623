//! The RDMA fabric, when this braid was built with it (`--features rdma`):
//! `braid serve --rdma ADDR` listeners and `rdma://` server addresses.
//! Without it, both are refused with a clear error.

#[cfg(feature = "rdma")]
use braid_fabric_rdma::verbs::{RdmaDialer, RdmaListener, DEFAULT_REGION};
use braid_fabric_tcp::Server;

/// Listeners bound before the server starts.
pub(crate) struct Listeners {
    #[cfg(feature = "rdma")]
    bound: Vec<RdmaListener>,
}

/// Binds every `--rdma` address, or says why not.
pub(crate) fn bind(addrs: &[String]) -> Result<Listeners, String> {
    #[cfg(feature = "rdma")]
    {
        let mut bound = Vec::new();
        for a in addrs {
            let addr = braid_fabric_rdma::verbs::resolve(a).map_err(|e| format!("--rdma {e}"))?;
            bound.push(RdmaListener::bind(addr, DEFAULT_REGION)?);
            tracing::info!(%addr, "accepting braid channels over RDMA");
        }
        Ok(Listeners { bound })
    }
    #[cfg(not(feature = "rdma"))]
    match addrs.first() {
        Some(a) => Err(format!(
            "--rdma {a}: this braid was built without RDMA (cargo build --features rdma)"
        )),
        None => Ok(Listeners {}),
    }
}

impl Listeners {
    /// Starts accepting for `server`.
    pub(crate) fn serve(self, server: &Server) {
        #[cfg(feature = "rdma")]
        for l in self.bound {
            l.serve(server.clone());
        }
        #[cfg(not(feature = "rdma"))]
        let _ = server;
    }
}

/// Lets `rdma://` server addresses open channels (a no-op without RDMA:
/// such an address is then refused when it is read).
pub(crate) fn register_dialer() {
    #[cfg(feature = "rdma")]
    {
        // The conformance check's hostile client (xtask/conformance/rdma.sh):
        // it names buffers outside its registration.
        let dialer = if std::env::var_os("BRAID_TEST_RDMA_FORGE").is_some() {
            tracing::warn!("BRAID_TEST_RDMA_FORGE: naming forged remote buffers");
            RdmaDialer::forging(DEFAULT_REGION)
        } else {
            RdmaDialer::new(DEFAULT_REGION)
        };
        braid_fabric_tcp::fabric::register("rdma", std::sync::Arc::new(dialer));
    }
}
