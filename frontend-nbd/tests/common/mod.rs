//! A hand-driven NBD client for the tests: every byte as the spec writes it.
#![allow(dead_code)]

use braid_backend_file::{ExportFile, FileBackend, OpenOptions};
use braid_frontend_nbd::{serve, BackendTarget, NbdConfig, NbdExport, NbdListener};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

pub const SIZE: u64 = 16 << 20;

/// Two exports: "disk0" (read-write) and "ro" (read-only), of SIZE bytes.
pub fn exports(dir: &std::path::Path) -> (Arc<FileBackend>, Vec<NbdExport>) {
    let open = |name: &str, read_only: bool| {
        let path = dir.join(name);
        let _ = ExportFile::open(
            &path,
            &OpenOptions {
                create_size: Some(SIZE),
                ..Default::default()
            },
        )
        .unwrap();
        ExportFile::open(
            &path,
            &OpenOptions {
                read_only,
                ..Default::default()
            },
        )
        .unwrap()
    };
    let backend = Arc::new(FileBackend::new(vec![
        open("disk0", false),
        open("ro", true),
    ]));
    let exports = vec![
        NbdExport::new("disk0", SIZE, 0),
        NbdExport {
            read_only: true,
            ..NbdExport::new("ro", SIZE, 1)
        },
    ];
    (backend, exports)
}

/// Writes `byte_at(pos)` at every position of disk0 in `dir`.
pub fn fill_disk0(dir: &std::path::Path, byte_at: impl Fn(u64) -> u8) {
    use std::os::unix::fs::FileExt;
    let pattern: Vec<u8> = (0..SIZE).map(byte_at).collect();
    std::fs::File::options()
        .write(true)
        .open(dir.join("disk0"))
        .unwrap()
        .write_all_at(&pattern, 0)
        .unwrap();
}

/// Serves the two exports on `listener` with `config` applied.
pub fn start_with(
    dir: &std::path::Path,
    listener: NbdListener,
    tweak: impl FnOnce(NbdConfig) -> NbdConfig,
) {
    let (backend, exports) = exports(dir);
    let config = tweak(NbdConfig::new(exports));
    tokio::spawn(serve(
        listener,
        config,
        Arc::new(BackendTarget::new(backend)),
        std::future::pending(),
    ));
}

pub async fn start(dir: &std::path::Path) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    start_with(dir, NbdListener::Tcp(listener), |c| c);
    addr
}

pub async fn option(s: &mut (impl Io + ?Sized), opt: u32, data: &[u8]) {
    s.write_u64(0x4948_4156_454f_5054).await.unwrap();
    s.write_u32(opt).await.unwrap();
    s.write_u32(data.len() as u32).await.unwrap();
    s.write_all(data).await.unwrap();
}

/// (option, reply type, data)
pub async fn option_reply(s: &mut (impl Io + ?Sized)) -> (u32, u32, Vec<u8>) {
    assert_eq!(
        s.read_u64().await.unwrap(),
        0x0003_e889_0455_65a9,
        "option reply magic"
    );
    let opt = s.read_u32().await.unwrap();
    let ty = s.read_u32().await.unwrap();
    let len = s.read_u32().await.unwrap();
    let mut d = vec![0; len as usize];
    s.read_exact(&mut d).await.unwrap();
    (opt, ty, d)
}

pub fn go_data(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

/// Negotiates with GO; returns the stream in transmission and the flags.
pub async fn connect(addr: std::net::SocketAddr, name: &str) -> (tokio::net::TcpStream, u64, u16) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    greet(&mut s).await;
    let (size, flags) = go(&mut s, name).await;
    (s, size, flags)
}

/// Reads the greeting and answers with fixed newstyle and no zeroes.
pub async fn greet(s: &mut (impl Io + ?Sized)) {
    assert_eq!(
        s.read_u64().await.unwrap(),
        0x4e42_444d_4147_4943,
        "NBDMAGIC"
    );
    assert_eq!(
        s.read_u64().await.unwrap(),
        0x4948_4156_454f_5054,
        "IHAVEOPT"
    );
    let hflags = s.read_u16().await.unwrap();
    assert_eq!(hflags & 3, 3, "fixed newstyle and no zeroes");
    s.write_u32(3).await.unwrap();
}

/// GO to `name`; returns size and transmission flags.
pub async fn go(s: &mut (impl Io + ?Sized), name: &str) -> (u64, u16) {
    option(s, 7, &go_data(name)).await;
    let (mut size, mut flags) = (0, 0);
    loop {
        let (opt, ty, d) = option_reply(s).await;
        assert_eq!(opt, 7);
        match ty {
            3 if u16::from_be_bytes([d[0], d[1]]) == 0 => {
                size = u64::from_be_bytes(d[2..10].try_into().unwrap());
                flags = u16::from_be_bytes([d[10], d[11]]);
            }
            3 => {}
            1 => break,
            other => panic!("GO failed with reply {other:#x}"),
        }
    }
    (size, flags)
}

pub async fn request(
    s: &mut (impl AsyncWrite + Unpin + ?Sized),
    cmd: u16,
    flags: u16,
    handle: u64,
    offset: u64,
    len: u32,
    data: &[u8],
) {
    let mut h = Vec::with_capacity(28 + data.len());
    h.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    h.extend_from_slice(&flags.to_be_bytes());
    h.extend_from_slice(&cmd.to_be_bytes());
    h.extend_from_slice(&handle.to_be_bytes());
    h.extend_from_slice(&offset.to_be_bytes());
    h.extend_from_slice(&len.to_be_bytes());
    h.extend_from_slice(data);
    s.write_all(&h).await.unwrap();
}

/// (handle, error); reads `data_len` bytes of data on success.
pub async fn reply(
    s: &mut (impl AsyncRead + Unpin + ?Sized),
    data_len: usize,
) -> (u64, u32, Vec<u8>) {
    assert_eq!(
        s.read_u32().await.unwrap(),
        0x6744_6698,
        "simple reply magic"
    );
    let error = s.read_u32().await.unwrap();
    let handle = s.read_u64().await.unwrap();
    let mut d = vec![0; if error == 0 { data_len } else { 0 }];
    s.read_exact(&mut d).await.unwrap();
    (handle, error, d)
}

/// One reply of either kind, payload included.
#[derive(Debug)]
pub enum AnyReply {
    Simple {
        handle: u64,
        error: u32,
    },
    Chunk {
        flags: u16,
        ty: u16,
        handle: u64,
        payload: Vec<u8>,
    },
}

/// Reads a reply; a simple reply is assumed to carry no data.
pub async fn any_reply(s: &mut (impl Io + ?Sized)) -> AnyReply {
    match s.read_u32().await.unwrap() {
        0x6744_6698 => {
            let error = s.read_u32().await.unwrap();
            let handle = s.read_u64().await.unwrap();
            AnyReply::Simple { handle, error }
        }
        0x668e_33ef => {
            let flags = s.read_u16().await.unwrap();
            let ty = s.read_u16().await.unwrap();
            let handle = s.read_u64().await.unwrap();
            let len = s.read_u32().await.unwrap();
            let mut payload = vec![0; len as usize];
            s.read_exact(&mut payload).await.unwrap();
            AnyReply::Chunk {
                flags,
                ty,
                handle,
                payload,
            }
        }
        other => panic!("reply magic {other:#x}"),
    }
}

/// A structured error chunk: (errno, message).
pub fn error_chunk(r: &AnyReply) -> (u32, String) {
    match r {
        AnyReply::Chunk {
            flags, ty, payload, ..
        } => {
            assert_eq!(*ty, 0x8001, "an ERROR chunk: {r:?}");
            assert_eq!(flags & 1, 1, "final chunk");
            let error = u32::from_be_bytes(payload[0..4].try_into().unwrap());
            let n = u16::from_be_bytes([payload[4], payload[5]]) as usize;
            (
                error,
                String::from_utf8(payload[6..6 + n].to_vec()).unwrap(),
            )
        }
        other => panic!("expected an error chunk, got {other:?}"),
    }
}

/// META_CONTEXT option data.
pub fn meta_data(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = (export.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

/// Replies to one option up to its ACK (or first error): the
/// META_CONTEXT (id, name) pairs seen, or the error reply type.
pub async fn meta_replies(s: &mut (impl Io + ?Sized)) -> Result<Vec<(u32, String)>, u32> {
    let mut out = Vec::new();
    loop {
        let (_, ty, d) = option_reply(s).await;
        match ty {
            1 => return Ok(out),
            4 => out.push((
                u32::from_be_bytes(d[0..4].try_into().unwrap()),
                String::from_utf8(d[4..].to_vec()).unwrap(),
            )),
            err => return Err(err),
        }
    }
}
