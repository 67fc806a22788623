//! Which fabric each channel of a client takes. A server address list
//! such as `rdma://10.0.0.1:7000,10.0.0.1:7001` names several paths to one
//! server: once a session exists, channel `k` always dials path `k mod n`,
//! so when one path dies its channels keep failing to connect while the
//! others carry the IO, and they come back by themselves when it returns
//! (before the first session, attempts rotate over the paths, so a dead
//! first path cannot keep the session from starting). TCP (and TLS) is
//! built in; other fabrics register a [`Dialer`] for their scheme.

use crate::conn::{ConnEvent, Writer};
use braid_core::client::ChannelId;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// One path to the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `None` for TCP, else the scheme of a registered fabric (`rdma`).
    pub scheme: Option<String>,
    /// host:port.
    pub addr: String,
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.scheme {
            Some(s) => write!(f, "{s}://{}", self.addr),
            None => f.write_str(&self.addr),
        }
    }
}

/// Reads a comma-separated list of paths (`host:port`, `tcp://host:port`,
/// `rdma://host:port`).
pub fn parse_endpoints(list: &str) -> Result<Vec<Endpoint>, String> {
    let mut out = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (scheme, addr) = match part.split_once("://") {
            Some(("tcp", addr)) => (None, addr),
            Some((scheme, addr)) => (Some(scheme.to_string()), addr),
            None => (None, part),
        };
        if !addr.contains(':') {
            return Err(format!("server address {part:?} has no port"));
        }
        if let Some(s) = &scheme {
            if dialer(s).is_none() {
                return Err(format!(
                    "server address {part:?}: this braid has no {s} fabric (build it with the \
                     feature that provides it, e.g. `--features rdma`)"
                ));
            }
        }
        out.push(Endpoint {
            scheme,
            addr: addr.to_string(),
        });
    }
    if out.is_empty() {
        return Err("no server address given".into());
    }
    Ok(out)
}

/// A channel being opened: its writer once it is up, or why not.
pub type Dialing = Pin<Box<dyn Future<Output = Result<Writer, String>> + Send>>;

/// Opens client channels over one fabric.
pub trait Dialer: Send + Sync {
    /// Opens channel `ch` to `addr`; once up, its frames go to `events`
    /// and the returned writer takes frames for it, refusing them past
    /// `queue_limit` unsent bytes.
    fn dial(
        &self,
        addr: &str,
        ch: ChannelId,
        queue_limit: usize,
        events: mpsc::UnboundedSender<ConnEvent<ChannelId>>,
    ) -> Dialing;
}

type Registry = Vec<(String, Arc<dyn Dialer>)>;
static DIALERS: Mutex<Registry> = Mutex::new(Vec::new());

/// Makes `scheme://` addresses open channels with `dialer`.
pub fn register(scheme: &str, dialer: Arc<dyn Dialer>) {
    let mut all = DIALERS.lock().unwrap();
    all.retain(|(s, _)| s != scheme);
    all.push((scheme.to_string(), dialer));
}

pub(crate) fn dialer(scheme: &str) -> Option<Arc<dyn Dialer>> {
    let all = DIALERS.lock().unwrap();
    all.iter()
        .find(|(s, _)| s == scheme)
        .map(|(_, d)| d.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_names_each_path_and_refuses_fabrics_not_built_in() {
        let got = parse_endpoints("a:1, tcp://b:2").unwrap();
        assert_eq!(
            got[0],
            Endpoint {
                scheme: None,
                addr: "a:1".into()
            }
        );
        assert_eq!(got[1].to_string(), "b:2");
        let err = parse_endpoints("a:1,nowhere://c:3").unwrap_err();
        assert!(err.contains("no nowhere fabric"), "{err}");
        assert!(parse_endpoints("a").unwrap_err().contains("no port"));
        assert!(parse_endpoints(" , ").is_err());
    }
}
