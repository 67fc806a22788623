//! One NBD connection fed arbitrary bytes, for `cargo fuzz` and for the
//! property tests CI runs: negotiation from the first byte, or transmission
//! after a valid handshake. Whatever the client sends, the server must not
//! panic, must not hang once the client has hung up, and must answer only
//! with well-formed frames.

use crate::proto::*;
use crate::{NbdConfig, NbdExport, Target};
use braid_core::server::{BackendOp, Extent};
use braid_core::wire::Status;
use bytes::Bytes;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const EXPORT_SIZE: u64 = 1 << 20;

/// A 1 MiB export in memory that finishes every operation inline.
struct MemTarget(Mutex<Vec<u8>>);

impl Target for MemTarget {
    fn submit(&self, _export: usize, op: BackendOp, done: crate::Completion) {
        let mut disk = self.0.lock().unwrap();
        let range = |offset: u64, len: u64| offset as usize..(offset + len) as usize;
        let result: Result<Bytes, Status> = match op {
            BackendOp::Read { offset, len } => {
                Ok(Bytes::copy_from_slice(&disk[range(offset, u64::from(len))]))
            }
            BackendOp::Write { offset, data, .. } => {
                disk[range(offset, data.len() as u64)].copy_from_slice(&data);
                Ok(Bytes::new())
            }
            BackendOp::Trim { offset, len, .. } | BackendOp::WriteZeroes { offset, len, .. } => {
                disk[range(offset, u64::from(len))].fill(0);
                Ok(Bytes::new())
            }
            BackendOp::Flush => Ok(Bytes::new()),
        };
        drop(disk);
        done(result);
    }

    fn allocation(&self, _export: usize, _offset: u64, len: u64, done: crate::ExtentsCompletion) {
        done(Ok(vec![Extent { len, hole: false }]))
    }

    fn fast_zero(&self) -> bool {
        true
    }
}

/// The client half of a valid handshake: fixed newstyle, optionally
/// structured replies, then GO for the default export.
fn valid_handshake(structured: bool) -> Vec<u8> {
    let mut v = u32::from(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    let mut option = |opt: u32, data: &[u8]| {
        v.extend_from_slice(&IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&opt.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
    };
    if structured {
        option(OPT_STRUCTURED_REPLY, &[]);
    }
    // Empty name (the default export), no info requests.
    option(OPT_GO, &[0, 0, 0, 0, 0, 0]);
    v
}

/// Runs one connection on `data`. Bit 0 of the first byte picks the phase
/// (negotiation from scratch, or transmission after a valid handshake),
/// bit 1 structured replies; the rest is what the client sends, in pieces
/// whose sizes the next bytes choose. Panics only on a broken promise.
pub fn exercise_nbd(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut input = if mode & 1 == 1 {
        valid_handshake(mode & 2 == 2)
    } else {
        Vec::new()
    };
    input.extend_from_slice(rest);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async move {
        let (client, server) = tokio::io::duplex(64 << 10);
        let mut export = NbdExport::new("disk0", EXPORT_SIZE, 0);
        export.read_only = mode & 4 == 4;
        let config = NbdConfig::new(vec![export]);
        let target: Arc<dyn Target> =
            Arc::new(MemTarget(Mutex::new(vec![0; EXPORT_SIZE as usize])));
        let (_down_tx, down) = tokio::sync::watch::channel(false);
        let conn = tokio::spawn(async move {
            let _ = crate::run(Box::new(server), &config, target, down).await;
        });
        let (mut rd, mut wr) = tokio::io::split(client);
        let writer = tokio::spawn(async move {
            // Pieces of 1 byte to 8 KiB keep the server's reads partial.
            for piece in input.chunks(1 + (mode as usize >> 3) * 257) {
                if wr.write_all(piece).await.is_err() {
                    break;
                }
            }
            let _ = wr.shutdown().await;
        });
        let mut out = Vec::new();
        let _ = rd.read_to_end(&mut out).await;
        let _ = writer.await;
        conn.await.expect("the connection task must not panic");
        if mode & 1 == 1 {
            check_greeting(&out);
        }
    });
}

/// What the server sent first is the fixed newstyle greeting.
fn check_greeting(out: &[u8]) {
    assert!(out.len() >= 18, "no greeting");
    assert_eq!(&out[..8], &NBDMAGIC.to_be_bytes());
    assert_eq!(&out[8..16], &IHAVEOPT.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_session_and_garbage_both_end_cleanly() {
        // Transmission: a read of 4 KiB at 0, then garbage.
        let mut data = vec![1u8];
        data.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        data.extend_from_slice(&0u16.to_be_bytes()); // flags
        data.extend_from_slice(&0u16.to_be_bytes()); // read
        data.extend_from_slice(&7u64.to_be_bytes()); // cookie
        data.extend_from_slice(&0u64.to_be_bytes()); // offset
        data.extend_from_slice(&4096u32.to_be_bytes());
        data.extend_from_slice(b"this is not a request header......");
        exercise_nbd(&data);
        exercise_nbd(b"\x00garbage from the first byte");
        exercise_nbd(&[]);
    }

    #[test]
    fn arbitrary_input_never_panics_or_hangs() {
        let mut rng = braid_core::rng::SplitMix64::new(5);
        for _ in 0..300 {
            let len = rng.below(400) as usize;
            let mut data: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            if let Some(m) = data.first_mut() {
                // Mostly past the handshake, where the parser is deepest.
                *m |= u8::from(rng.chance(0.7));
            }
            exercise_nbd(&data);
        }
    }
}
