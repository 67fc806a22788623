//! Replies to a deep pipeline of READs of many sizes, some failing, are
//! gathered into vectored writes on plain sockets. However the socket
//! splits those writes (the client reads while the server is still
//! sending, and the replies add up to many socket buffers), every reply
//! arrives whole, framed, with its own handle and its own bytes.

mod common;

use common::*;
use std::collections::HashSet;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, UnixStream};

/// READ sizes the pipeline cycles through: under and over a page, up to
/// just under where a reply would go from a pool thread.
const SIZES: [u32; 6] = [512, 4096, 12_288, 65_536, 131_072, 200_704];
const READS: u64 = 600;
const EINVAL: u32 = 22;

fn byte_at(pos: u64) -> u8 {
    (pos.wrapping_mul(0x9E37_79B9) >> 11) as u8
}

/// What READ `n` asks for: its offset and length, and whether it must
/// fail (every 37th runs past the export's end).
fn asked(n: u64) -> (u64, u32, bool) {
    let len = SIZES[(n % SIZES.len() as u64) as usize];
    if n % 37 == 36 {
        return (SIZE - 512, len.max(4096), true);
    }
    let room = (SIZE - u64::from(len)) / 512;
    ((n * 7919 % room) * 512, len, false)
}

async fn pipeline(s: impl Io + 'static) {
    let mut s = s;
    greet(&mut s).await;
    go(&mut s, "disk0").await;
    let (mut rd, mut wr) = tokio::io::split(s);
    let sender = tokio::spawn(async move {
        for n in 0..READS {
            let (offset, len, _) = asked(n);
            request(&mut wr, 0, 0, n, offset, len, &[]).await;
        }
        wr
    });
    let mut answered = HashSet::new();
    for _ in 0..READS {
        assert_eq!(rd.read_u32().await.unwrap(), 0x6744_6698, "reply magic");
        let error = rd.read_u32().await.unwrap();
        let handle = rd.read_u64().await.unwrap();
        assert!(handle < READS, "a handle asked for: {handle}");
        assert!(answered.insert(handle), "{handle} answered once");
        let (offset, len, fails) = asked(handle);
        if fails {
            assert_eq!(error, EINVAL, "READ {handle} past the end fails");
            continue;
        }
        assert_eq!(error, 0, "READ {handle} succeeded");
        let mut data = vec![0; len as usize];
        rd.read_exact(&mut data).await.unwrap();
        let expected: Vec<u8> = (offset..offset + u64::from(len)).map(byte_at).collect();
        assert!(data == expected, "READ {handle}'s {len} bytes at {offset}");
    }
    let _still_open = sender.await.unwrap();
}

#[tokio::test]
async fn pipelined_replies_over_a_unix_socket_arrive_whole() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let path = dir.path().join("nbd.sock");
    let listener = braid_frontend_nbd::NbdListener::bind(path.to_str().unwrap())
        .await
        .unwrap();
    start_with(dir.path(), listener, |c| c);
    fill_disk0(dir.path(), byte_at);
    let s = UnixStream::connect(&path).await.unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(60), pipeline(s))
        .await
        .expect("every reply sent");
}

#[tokio::test]
async fn pipelined_replies_over_tcp_arrive_whole() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    start_with(
        dir.path(),
        braid_frontend_nbd::NbdListener::Tcp(listener),
        |c| c,
    );
    fill_disk0(dir.path(), byte_at);
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(60), pipeline(s))
        .await
        .expect("every reply sent");
}
