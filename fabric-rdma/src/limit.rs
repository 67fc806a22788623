//! How many RDMA channels a server holds open at once. Each channel pins
//! its own registered memory (a ring of receive and send heads) and a
//! queue pair from the moment rdma_cm asks to connect, before the client
//! has said who it is, so without a bound any peer that can reach the
//! port could make the server pin memory until it runs out. Past the
//! limit a connection request is refused, and the client is told so.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Registered memory each channel's head ring pins, on either end.
pub const HEAD_RING_BYTES: u64 = 256 * 1024;

/// Default channels a server holds open at once: 64 MiB of head rings,
/// the same as the default payload region.
pub const DEFAULT_CHANNELS: usize = 256;

/// A server's bound on open RDMA channels, shared by all its listeners.
#[derive(Debug)]
pub struct ChannelLimit {
    limit: usize,
    open: AtomicUsize,
}

/// One open channel's place under the limit, given back when dropped.
#[derive(Debug)]
pub struct ChannelSlot(Arc<ChannelLimit>);

impl ChannelLimit {
    /// At most `limit` channels open at once (at least one).
    pub fn new(limit: usize) -> Result<Arc<ChannelLimit>, String> {
        if limit == 0 {
            return Err("an RDMA channel limit of 0 would refuse every client".into());
        }
        Ok(Arc::new(ChannelLimit {
            limit,
            open: AtomicUsize::new(0),
        }))
    }

    /// A place for one more channel, or why not.
    pub fn take(self: &Arc<Self>) -> Result<ChannelSlot, String> {
        let taken = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < self.limit).then_some(open + 1)
            });
        match taken {
            Ok(_) => Ok(ChannelSlot(self.clone())),
            Err(_) => Err(format!(
                "at the server's limit of {} RDMA channels ({} of registered head rings); \
                 raise it with --rdma-channels",
                self.limit,
                human(self.limit as u64 * HEAD_RING_BYTES)
            )),
        }
    }

    /// Channels open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// The limit.
    pub fn limit(&self) -> usize {
        self.limit
    }
}

impl Drop for ChannelSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

fn human(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{} KiB", bytes >> 10)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_past_the_limit_are_refused_until_one_closes() {
        let limit = ChannelLimit::new(2).unwrap();
        let a = limit.take().unwrap();
        let _b = limit.take().unwrap();
        let refused = limit.take().unwrap_err();
        assert!(refused.contains("limit of 2 RDMA channels"), "{refused}");
        assert!(refused.contains("512 KiB"), "{refused}");
        assert_eq!(limit.open(), 2);
        drop(a);
        assert_eq!(limit.open(), 1);
        let _c = limit.take().unwrap();
        assert_eq!(limit.open(), 2);
    }

    #[test]
    fn a_limit_of_zero_is_refused() {
        assert!(ChannelLimit::new(0).is_err());
    }

    #[test]
    fn the_default_pins_as_much_in_head_rings_as_the_default_region() {
        assert_eq!(
            DEFAULT_CHANNELS as u64 * HEAD_RING_BYTES,
            crate::DEFAULT_REGION
        );
    }

    #[test]
    fn many_threads_never_hold_more_than_the_limit() {
        let limit = ChannelLimit::new(3).unwrap();
        let held: Vec<_> = (0..8)
            .map(|_| {
                let l = limit.clone();
                std::thread::spawn(move || l.take().ok())
            })
            .map(|t| t.join().unwrap())
            .collect();
        assert_eq!(held.iter().filter(|s| s.is_some()).count(), 3);
        drop(held);
        assert_eq!(limit.open(), 0);
    }
}
