//! A TCP proxy that injects faults between braid clients and a server:
//! resets, stalls, black holes, flipped bits and one-way drops, each on one
//! connection or all of them. Used by `braid demo` and `braid soak`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const PASS: u8 = 0;
const DROP: u8 = 1;
const STALL: u8 = 2;

#[derive(Default)]
struct Direction {
    mode: AtomicU8,
    corrupt_next: AtomicBool,
}

struct Conn {
    to_server: Arc<Direction>,
    to_client: Arc<Direction>,
    tasks: [JoinHandle<()>; 2],
}

/// Which way bytes flow.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Way {
    ToServer,
    ToClient,
}

/// The proxy; cheap to clone.
#[derive(Clone)]
pub(crate) struct FaultProxy {
    conns: Arc<Mutex<BTreeMap<u64, Conn>>>,
}

impl FaultProxy {
    /// Listens on `listener`, forwarding each connection to `upstream`.
    pub(crate) fn start(listener: TcpListener, upstream: String) -> Self {
        let proxy = FaultProxy {
            conns: Arc::new(Mutex::new(BTreeMap::new())),
        };
        let p = proxy.clone();
        tokio::spawn(async move {
            let mut next = 0u64;
            while let Ok((client, _)) = listener.accept().await {
                next += 1;
                let (p, upstream, id) = (p.clone(), upstream.clone(), next);
                // Connect upstream off the accept loop, so one slow connect
                // never holds up the next client.
                tokio::spawn(async move {
                    let connect = TcpStream::connect(&upstream);
                    let Ok(Ok(server)) =
                        tokio::time::timeout(Duration::from_secs(1), connect).await
                    else {
                        // Server down: the client sees its connection close.
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    p.add(id, client, server);
                });
            }
        });
        proxy
    }

    fn add(&self, id: u64, client: TcpStream, server: TcpStream) {
        let (cr, cw) = client.into_split();
        let (sr, sw) = server.into_split();
        let to_server = Arc::new(Direction::default());
        let to_client = Arc::new(Direction::default());
        let conns = self.conns.clone();
        let a = tokio::spawn(pump(cr, sw, to_server.clone(), conns.clone(), id));
        let b = tokio::spawn(pump(sr, cw, to_client.clone(), conns, id));
        self.conns.lock().unwrap().insert(
            id,
            Conn {
                to_server,
                to_client,
                tasks: [a, b],
            },
        );
    }

    fn pick(&self, r: u64) -> Option<u64> {
        let c = self.conns.lock().unwrap();
        if c.is_empty() {
            return None;
        }
        c.keys().nth((r % c.len() as u64) as usize).copied()
    }

    /// Closes every connection at once.
    pub(crate) fn reset_all(&self) -> usize {
        let all: Vec<Conn> = std::mem::take(&mut *self.conns.lock().unwrap())
            .into_values()
            .collect();
        for c in &all {
            c.tasks.iter().for_each(JoinHandle::abort);
        }
        all.len()
    }

    /// Closes one connection (chosen by `r`).
    pub(crate) fn reset_one(&self, r: u64) -> bool {
        let Some(id) = self.pick(r) else { return false };
        if let Some(c) = self.conns.lock().unwrap().remove(&id) {
            c.tasks.iter().for_each(JoinHandle::abort);
        }
        true
    }

    fn with(&self, r: u64, f: impl FnOnce(&Conn)) -> bool {
        let Some(id) = self.pick(r) else { return false };
        match self.conns.lock().unwrap().get(&id) {
            Some(c) => {
                f(c);
                true
            }
            None => false,
        }
    }

    /// Silently drops everything on one connection, both ways, for good.
    pub(crate) fn blackhole_one(&self, r: u64) -> bool {
        self.with(r, |c| {
            c.to_server.mode.store(DROP, Ordering::Relaxed);
            c.to_client.mode.store(DROP, Ordering::Relaxed);
        })
    }

    /// Holds one connection's bytes for `for_how_long`, then lets them go.
    pub(crate) fn stall_one(&self, r: u64, for_how_long: Duration) -> bool {
        let mut dirs = None;
        let hit = self.with(r, |c| {
            c.to_server.mode.store(STALL, Ordering::Relaxed);
            c.to_client.mode.store(STALL, Ordering::Relaxed);
            dirs = Some((c.to_server.clone(), c.to_client.clone()));
        });
        if let Some((a, b)) = dirs {
            tokio::spawn(async move {
                tokio::time::sleep(for_how_long).await;
                let _ = a
                    .mode
                    .compare_exchange(STALL, PASS, Ordering::Relaxed, Ordering::Relaxed);
                let _ = b
                    .mode
                    .compare_exchange(STALL, PASS, Ordering::Relaxed, Ordering::Relaxed);
            });
        }
        hit
    }

    /// Flips one bit of the next chunk one way on one connection.
    pub(crate) fn corrupt_one(&self, r: u64, way: Way) -> bool {
        self.with(r, |c| match way {
            Way::ToServer => c.to_server.corrupt_next.store(true, Ordering::Relaxed),
            Way::ToClient => c.to_client.corrupt_next.store(true, Ordering::Relaxed),
        })
    }

    /// Drops one direction of one connection for good; the other flows.
    pub(crate) fn drop_one_way(&self, r: u64, way: Way) -> bool {
        self.with(r, |c| match way {
            Way::ToServer => c.to_server.mode.store(DROP, Ordering::Relaxed),
            Way::ToClient => c.to_client.mode.store(DROP, Ordering::Relaxed),
        })
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    dir: Arc<Direction>,
    conns: Arc<Mutex<BTreeMap<u64, Conn>>>,
    id: u64,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut flips = 0u64;
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        while dir.mode.load(Ordering::Relaxed) == STALL {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        if dir.mode.load(Ordering::Relaxed) == DROP {
            continue;
        }
        if dir.corrupt_next.swap(false, Ordering::Relaxed) {
            flips += 1;
            let at = (flips.wrapping_mul(0x9E37_79B9) as usize) % n;
            buf[at] ^= 1 << (flips % 8);
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    // One side ended: end the whole connection, as TCP through a dead
    // middlebox would.
    if let Some(c) = conns.lock().unwrap().remove(&id) {
        c.tasks.iter().for_each(JoinHandle::abort);
    }
}
