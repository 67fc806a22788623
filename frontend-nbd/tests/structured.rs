//! Structured replies, metadata contexts, BLOCK_STATUS and FAST_ZERO, each
//! held to its clause of the NBD spec.

mod common;

use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const ERR_INVALID: u32 = (1 << 31) + 3;
const ERR_UNKNOWN: u32 = (1 << 31) + 6;
const SEND_DF: u16 = 1 << 7;
const SEND_FAST_ZERO: u16 = 1 << 11;

/// Negotiates structured replies and base:allocation, then GO.
async fn structured(addr: std::net::SocketAddr, export: &str) -> (TcpStream, u16) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    greet(&mut s).await;
    option(&mut s, 8, &[]).await;
    assert_eq!(option_reply(&mut s).await.1, 1, "STRUCTURED_REPLY acked");
    option(&mut s, 10, &meta_data(export, &["base:allocation"])).await;
    let set = meta_replies(&mut s).await.unwrap();
    assert_eq!(set.len(), 1);
    assert_ne!(set[0].0, 0, "a selected context has a nonzero id");
    let (_, flags) = go(&mut s, export).await;
    (s, flags)
}

/// BLOCK_STATUS descriptors (length, flags) from a reply.
fn descriptors(r: &AnyReply) -> Vec<(u32, u32)> {
    let AnyReply::Chunk {
        flags, ty, payload, ..
    } = r
    else {
        panic!("BLOCK_STATUS needs a structured reply: {r:?}");
    };
    assert_eq!((*ty, flags & 1), (5, 1), "one final BLOCK_STATUS chunk");
    assert_eq!((payload.len() - 4) % 8, 0);
    assert_eq!(u32::from_be_bytes(payload[0..4].try_into().unwrap()), 1);
    payload[4..]
        .chunks(8)
        .map(|c| {
            (
                u32::from_be_bytes(c[0..4].try_into().unwrap()),
                u32::from_be_bytes(c[4..8].try_into().unwrap()),
            )
        })
        .collect()
}

#[tokio::test]
async fn metadata_contexts_negotiate_as_the_spec_says() {
    let dir = tempfile::tempdir().unwrap();
    let addr = start(dir.path()).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    greet(&mut s).await;
    // "MUST NOT be requested unless structured replies have been
    // negotiated first ... a server SHOULD send NBD_REP_ERR_INVALID."
    option(&mut s, 9, &meta_data("disk0", &[])).await;
    assert_eq!(meta_replies(&mut s).await, Err(ERR_INVALID));
    option(&mut s, 8, b"x").await;
    assert_eq!(
        option_reply(&mut s).await.1,
        ERR_INVALID,
        "STRUCTURED_REPLY with data"
    );
    option(&mut s, 8, &[]).await;
    assert_eq!(option_reply(&mut s).await.1, 1);
    // LIST with no queries: every context, with id 0 ("SHOULD be zero").
    option(&mut s, 9, &meta_data("disk0", &[])).await;
    assert_eq!(
        meta_replies(&mut s).await,
        Ok(vec![(0, "base:allocation".into())])
    );
    option(&mut s, 9, &meta_data("disk0", &["base:"])).await;
    assert_eq!(
        meta_replies(&mut s).await.unwrap().len(),
        1,
        "namespace query"
    );
    // A valid query that finds nothing: a single ACK.
    option(&mut s, 9, &meta_data("disk0", &["qemu:dirty-bitmap:x"])).await;
    assert_eq!(meta_replies(&mut s).await, Ok(vec![]));
    option(&mut s, 10, &meta_data("nope", &["base:allocation"])).await;
    assert_eq!(meta_replies(&mut s).await, Err(ERR_UNKNOWN));
    let mut truncated = meta_data("disk0", &["base:allocation"]);
    truncated.pop();
    option(&mut s, 10, &truncated).await;
    assert_eq!(meta_replies(&mut s).await, Err(ERR_INVALID));
    // SET for one export, then GO to another: no context applies there,
    // so BLOCK_STATUS is EINVAL.
    option(&mut s, 10, &meta_data("disk0", &["base:allocation"])).await;
    assert_eq!(meta_replies(&mut s).await.unwrap().len(), 1);
    let (_, flags) = go(&mut s, "ro").await;
    assert_ne!(flags & SEND_DF, 0, "DF with structured replies");
    request(&mut s, 7, 0, 1, 0, 4096, &[]).await;
    let (errno, msg) = error_chunk(&any_reply(&mut s).await);
    assert_eq!(errno, 22);
    assert!(msg.contains("metadata context"), "{msg}");
}

#[tokio::test]
async fn block_status_reports_holes_and_data_from_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let addr = start(dir.path()).await;
    let (mut s, flags) = structured(addr, "disk0").await;
    assert_ne!(flags & SEND_FAST_ZERO, 0);
    // A fresh sparse export is one hole that reads as zeroes.
    request(&mut s, 7, 0, 1, 0, 2 << 20, &[]).await;
    assert_eq!(descriptors(&any_reply(&mut s).await), vec![(2 << 20, 3)]);
    request(&mut s, 1, 0, 2, 1 << 20, 64 << 10, &vec![7u8; 64 << 10]).await;
    assert!(matches!(
        any_reply(&mut s).await,
        AnyReply::Simple { error: 0, .. }
    ));
    request(&mut s, 7, 0, 3, 0, 2 << 20, &[]).await;
    let d = descriptors(&any_reply(&mut s).await);
    assert_eq!(
        d.iter().map(|x| u64::from(x.0)).sum::<u64>(),
        2 << 20,
        "{d:?}"
    );
    assert!(d.iter().all(|x| x.0 > 0), "no zero-length descriptor");
    let data: Vec<_> = d.iter().filter(|x| x.1 == 0).collect();
    assert_eq!(data.len(), 1, "exactly one allocated run: {d:?}");
    for w in d.windows(2) {
        assert_ne!(w[0].1, w[1].1, "SHOULD differ between neighbours: {d:?}");
    }
    // REQ_ONE: "SHOULD NOT send metadata on more than one extent".
    request(&mut s, 7, 1 << 3, 4, 0, 2 << 20, &[]).await;
    assert_eq!(descriptors(&any_reply(&mut s).await).len(), 1);
    // Past the end: "SHOULD return EINVAL"; zero length: EINVAL.
    request(&mut s, 7, 0, 5, SIZE - 512, 4096, &[]).await;
    assert_eq!(error_chunk(&any_reply(&mut s).await).0, 22);
    request(&mut s, 7, 0, 6, 0, 0, &[]).await;
    assert_eq!(error_chunk(&any_reply(&mut s).await).0, 22);
    // FAST_ZERO on a filesystem that can punch holes: done, and the
    // range is a hole again.
    request(&mut s, 6, 1 << 4, 7, 1 << 20, 64 << 10, &[]).await;
    assert!(matches!(
        any_reply(&mut s).await,
        AnyReply::Simple { error: 0, .. }
    ));
    request(&mut s, 7, 0, 8, 1 << 20, 64 << 10, &[]).await;
    assert_eq!(descriptors(&any_reply(&mut s).await), vec![(64 << 10, 3)]);
}

#[tokio::test]
async fn structured_reads_and_errors_carry_offsets_and_context() {
    let dir = tempfile::tempdir().unwrap();
    let addr = start(dir.path()).await;
    let (mut s, _) = structured(addr, "disk0").await;
    let data: Vec<u8> = (0..8192u32).map(|i| (i % 253) as u8).collect();
    request(&mut s, 1, 1, 1, 12288, 8192, &data).await;
    assert!(matches!(
        any_reply(&mut s).await,
        AnyReply::Simple { error: 0, .. }
    ));
    // DF is allowed once SEND_DF is advertised.
    request(&mut s, 0, 1 << 2, 2, 12288, 8192, &[]).await;
    match any_reply(&mut s).await {
        AnyReply::Chunk {
            flags,
            ty,
            handle,
            payload,
        } => {
            assert_eq!(
                (flags, ty, handle),
                (1, 1, 2),
                "one final OFFSET_DATA chunk"
            );
            assert_eq!(u64::from_be_bytes(payload[0..8].try_into().unwrap()), 12288);
            assert_eq!(&payload[8..], &data[..]);
        }
        other => panic!("READ MUST get a structured reply: {other:?}"),
    }
    // "MUST NOT use a simple reply for NBD_CMD_READ (even for an early
    // EINVAL)": the error chunk names the export and offset.
    request(&mut s, 0, 0, 3, SIZE, 512, &[]).await;
    let (errno, msg) = error_chunk(&any_reply(&mut s).await);
    assert_eq!(errno, 22);
    assert!(
        msg.contains("disk0") && msg.contains(&SIZE.to_string()),
        "{msg}"
    );
    // A flag not valid for the command: EINVAL (REQ_ONE on READ).
    request(&mut s, 0, 1 << 3, 4, 0, 512, &[]).await;
    assert_eq!(error_chunk(&any_reply(&mut s).await).0, 22);
    // A zero-length read is answered with a final NONE chunk.
    request(&mut s, 0, 0, 5, 0, 0, &[]).await;
    assert!(matches!(
        any_reply(&mut s).await,
        AnyReply::Chunk {
            flags: 1,
            ty: 0,
            handle: 5,
            ..
        }
    ));
    // A write over the maximum block size is refused, its data skipped,
    // and the connection goes on.
    let big = 32 << 20 | 512;
    request(&mut s, 1, 0, 6, 0, big, &[]).await;
    s.write_all(&vec![0u8; big as usize]).await.unwrap();
    assert_eq!(error_chunk(&any_reply(&mut s).await).0, 22);
    request(&mut s, 0, 0, 7, 12288, 512, &[]).await;
    assert!(matches!(
        any_reply(&mut s).await,
        AnyReply::Chunk { ty: 1, .. }
    ));
}

#[tokio::test]
async fn without_structured_replies_fast_zero_and_df_are_not_offered() {
    let dir = tempfile::tempdir().unwrap();
    let addr = start(dir.path()).await;
    let (mut s, _, flags) = connect(addr, "disk0").await;
    assert_eq!(
        flags & SEND_DF,
        0,
        "DF MUST be clear without structured replies"
    );
    assert_ne!(flags & SEND_FAST_ZERO, 0);
    // DF without SEND_DF is a flag not valid here: EINVAL in a simple reply.
    request(&mut s, 0, 1 << 2, 1, 0, 512, &[]).await;
    assert!(matches!(
        any_reply(&mut s).await,
        AnyReply::Simple { error: 22, .. }
    ));
    // BLOCK_STATUS without a context: EINVAL, and the connection survives.
    request(&mut s, 7, 0, 2, 0, 512, &[]).await;
    assert!(matches!(
        any_reply(&mut s).await,
        AnyReply::Simple { error: 22, .. }
    ));
    // FLUSH with a nonzero length violates a MUST: EINVAL.
    request(&mut s, 3, 0, 3, 0, 512, &[]).await;
    assert!(matches!(
        any_reply(&mut s).await,
        AnyReply::Simple { error: 22, .. }
    ));
    request(&mut s, 3, 0, 4, 0, 0, &[]).await;
    assert!(matches!(
        any_reply(&mut s).await,
        AnyReply::Simple { error: 0, .. }
    ));
}
