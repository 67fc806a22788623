//! Where an NBD listener's connections run. A connection stays on one
//! runtime for its whole life, so its reads, backend operations and
//! replies never cross threads; a server with several runtimes gives each
//! new connection to the one running the fewest.

use crate::target::Target;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::runtime::Handle;

/// The runtimes (each with the target it serves from) that connections
/// are placed on.
#[derive(Clone)]
pub struct Placement {
    places: Arc<[Place]>,
}

struct Place {
    /// `None`: the runtime that accepted the connection.
    runtime: Option<Handle>,
    target: Arc<dyn Target>,
    connections: Arc<AtomicUsize>,
}

impl Placement {
    /// Every connection runs on the runtime that accepts it.
    pub fn here(target: Arc<dyn Target>) -> Placement {
        Placement {
            places: Arc::new([Place {
                runtime: None,
                target,
                connections: Arc::default(),
            }]),
        }
    }

    /// Each connection runs on the one of these runtimes that has the
    /// fewest connections when it arrives (the first of them on a tie),
    /// served by the target given with it. A target that owns tasks (an
    /// io_uring's, [`crate::BackendTarget::with_io_queue`]) should own
    /// them on its own runtime.
    ///
    /// # Panics
    /// If `places` is empty.
    pub fn spread(places: Vec<(Handle, Arc<dyn Target>)>) -> Placement {
        assert!(!places.is_empty(), "connections need a runtime to run on");
        Placement {
            places: places
                .into_iter()
                .map(|(runtime, target)| Place {
                    runtime: Some(runtime),
                    target,
                    connections: Arc::default(),
                })
                .collect(),
        }
    }

    /// The place for a new connection, counted as running there until the
    /// returned [`Placed`] is dropped.
    pub(crate) fn place(&self) -> Placed {
        let place = self
            .places
            .iter()
            .min_by_key(|p| p.connections.load(Ordering::Relaxed))
            .expect("at least one place");
        place.connections.fetch_add(1, Ordering::Relaxed);
        Placed {
            runtime: place.runtime.clone(),
            target: place.target.clone(),
            connections: place.connections.clone(),
        }
    }

    /// Connections running on each place, in the order given.
    pub fn connections(&self) -> Vec<usize> {
        self.places
            .iter()
            .map(|p| p.connections.load(Ordering::Relaxed))
            .collect()
    }
}

impl From<Arc<dyn Target>> for Placement {
    fn from(target: Arc<dyn Target>) -> Placement {
        Placement::here(target)
    }
}

impl<T: Target + 'static> From<Arc<T>> for Placement {
    fn from(target: Arc<T>) -> Placement {
        Placement::here(target)
    }
}

/// One connection's place; dropping it ends the connection's count there.
pub(crate) struct Placed {
    pub(crate) runtime: Option<Handle>,
    pub(crate) target: Arc<dyn Target>,
    connections: Arc<AtomicUsize>,
}

impl Drop for Placed {
    fn drop(&mut self) {
        self.connections.fetch_sub(1, Ordering::Relaxed);
    }
}
