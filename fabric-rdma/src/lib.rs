//! braid over RDMA: each channel is one reliable-connected queue pair.
//! Frames travel as SEND messages of their head only; payloads move
//! one-sided, the server RDMA-READing a WRITE's data from the client's
//! registered buffer and RDMA-WRITing a READ's data into it, so an IO
//! costs two messages (docs/PROTOCOL.md §9.2), as in RNBD.
//!
//! [`link`] and [`arena`] hold the channel's logic and its registered
//! memory accounting, sans-IO and tested on any host. The verbs driver
//! (feature `verbs`, which needs cmake and clang to build and rdma-core at
//! run time) executes what they ask for.

#![deny(missing_docs)]

/// Registered memory for payloads: the least that holds one largest
/// payload and its head room.
pub const MIN_REGION: u64 = braid_core::wire::MAX_PAYLOAD_LEN as u64 + arena::ALIGN;
/// Default registered memory per device, for a client process or a server.
pub const DEFAULT_REGION: u64 = 64 << 20;

/// Staging smaller than this is not worth splitting the region for.
const MIN_STAGING: u64 = 1 << 20;

/// Of a client's `region` bytes, those set apart for the frontends to
/// receive WRITE data into (the rest is the arena the channels name
/// buffers from). The arena keeps at least one largest payload, so every
/// request can still be sent; staging takes at most half.
pub fn staging_share(region: u64) -> u64 {
    let share = (region / 2).min(region.saturating_sub(MIN_REGION)) / arena::ALIGN * arena::ALIGN;
    if share < MIN_STAGING {
        0
    } else {
        share
    }
}

pub mod arena;
pub mod limit;
pub mod link;
pub mod mark;
pub mod queue;
pub mod seal;
#[cfg(feature = "verbs")]
pub mod verbs;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_never_leaves_the_arena_less_than_one_largest_payload() {
        assert_eq!(staging_share(MIN_REGION), 0, "nothing to spare");
        assert_eq!(
            staging_share(MIN_REGION + (512 << 10)),
            0,
            "too little to use"
        );
        let default = staging_share(DEFAULT_REGION);
        assert!(default >= 16 << 20, "{default}");
        for mib in [33u64, 34, 40, 64, 65, 100, 256, 4096] {
            let region = mib << 20;
            let share = staging_share(region);
            assert!(region - share >= MIN_REGION, "{mib} MiB");
            assert!(share <= region / 2, "{mib} MiB");
            assert_eq!(share % arena::ALIGN, 0);
        }
    }
}
