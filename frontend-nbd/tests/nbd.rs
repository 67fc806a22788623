//! The NBD face against a hand-driven client (spec clauses) and against
//! qemu-img / qemu-io (interoperability).

use braid_backend_file::{ExportFile, FileBackend, OpenOptions};
use braid_frontend_nbd::{serve, NbdExport};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SIZE: u64 = 16 << 20;

async fn start(dir: &std::path::Path) -> SocketAddr {
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
        NbdExport {
            name: "disk0".into(),
            size: SIZE,
            read_only: false,
            backend_index: 0,
        },
        NbdExport {
            name: "ro".into(),
            size: SIZE,
            read_only: true,
            backend_index: 1,
        },
    ];
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, exports, backend, std::future::pending()));
    addr
}

async fn option(s: &mut TcpStream, opt: u32, data: &[u8]) {
    s.write_u64(0x4948_4156_454f_5054).await.unwrap();
    s.write_u32(opt).await.unwrap();
    s.write_u32(data.len() as u32).await.unwrap();
    s.write_all(data).await.unwrap();
}

/// (option, reply type, data)
async fn option_reply(s: &mut TcpStream) -> (u32, u32, Vec<u8>) {
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

fn go_data(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

/// Negotiates with GO; returns the stream in transmission and the flags.
async fn connect(addr: SocketAddr, name: &str) -> (TcpStream, u64, u16) {
    let mut s = TcpStream::connect(addr).await.unwrap();
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
    option(&mut s, 7, &go_data(name)).await;
    let (mut size, mut flags) = (0, 0);
    loop {
        let (opt, ty, d) = option_reply(&mut s).await;
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
    (s, size, flags)
}

async fn request(
    s: &mut TcpStream,
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
async fn reply(s: &mut TcpStream, data_len: usize) -> (u64, u32, Vec<u8>) {
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

#[tokio::test]
async fn negotiation_follows_the_spec() {
    let dir = tempfile::tempdir().unwrap();
    let addr = start(dir.path()).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).await.unwrap();
    s.write_u32(3).await.unwrap();
    // An unknown option: ERR_UNSUP, and negotiation goes on (MUST).
    option(&mut s, 99, b"whatever").await;
    assert_eq!(option_reply(&mut s).await.1, (1 << 31) + 1);
    // LIST names every export, then ACK.
    option(&mut s, 3, &[]).await;
    let mut names = Vec::new();
    loop {
        let (_, ty, d) = option_reply(&mut s).await;
        if ty == 1 {
            break;
        }
        assert_eq!(ty, 2);
        names.push(String::from_utf8(d[4..].to_vec()).unwrap());
    }
    assert_eq!(names, ["disk0", "ro"]);
    // INFO on an unknown export: ERR_UNKNOWN; on a real one: INFO_EXPORT
    // with its size, and BLOCK_SIZE.
    option(&mut s, 6, &go_data("nope")).await;
    assert_eq!(option_reply(&mut s).await.1, (1 << 31) + 6);
    option(&mut s, 6, &go_data("ro")).await;
    let (_, ty, d) = option_reply(&mut s).await;
    assert_eq!(
        (ty, u64::from_be_bytes(d[2..10].try_into().unwrap())),
        (3, SIZE)
    );
    assert_ne!(u16::from_be_bytes([d[10], d[11]]) & 2, 0, "read-only flag");
    let (_, ty, d) = option_reply(&mut s).await;
    assert_eq!(
        (ty, u16::from_be_bytes([d[0], d[1]])),
        (3, 3),
        "block size info"
    );
    assert_eq!(option_reply(&mut s).await.1, 1);
    // ABORT is acknowledged and the server closes.
    option(&mut s, 2, &[]).await;
    assert_eq!(option_reply(&mut s).await.1, 1);
    assert_eq!(s.read(&mut [0u8; 1]).await.unwrap(), 0);
}

#[tokio::test]
async fn commands_and_their_errors() {
    let dir = tempfile::tempdir().unwrap();
    let addr = start(dir.path()).await;
    let (mut s, size, flags) = connect(addr, "disk0").await;
    assert_eq!(size, SIZE);
    assert_ne!(flags & (1 << 8), 0, "CAN_MULTI_CONN");
    let data = vec![0xAB; 8192];
    request(&mut s, 1, 1, 1, 4096, 8192, &data).await; // WRITE with FUA
    assert_eq!(reply(&mut s, 0).await.1, 0);
    request(&mut s, 0, 0, 2, 4096, 8192, &[]).await;
    assert_eq!(reply(&mut s, 8192).await.2, data);
    request(&mut s, 4, 0, 3, 4096, 4096, &[]).await; // TRIM
    assert_eq!(reply(&mut s, 0).await.1, 0);
    request(&mut s, 6, 0, 4, 8192, 512, &[]).await; // WRITE_ZEROES
    assert_eq!(reply(&mut s, 0).await.1, 0);
    request(&mut s, 3, 0, 5, 0, 0, &[]).await; // FLUSH
    assert_eq!(reply(&mut s, 0).await.1, 0);
    request(&mut s, 0, 0, 6, 4096, 8192, &[]).await;
    let back = reply(&mut s, 8192).await.2;
    assert!(back[..4608].iter().all(|b| *b == 0) && back[4608..].iter().all(|b| *b == 0xAB));
    // Errors the spec names, and the connection survives them.
    request(&mut s, 0, 0, 7, SIZE, 512, &[]).await;
    assert_eq!(reply(&mut s, 512).await.1, 22, "read past the end: EINVAL");
    request(&mut s, 1, 0, 8, SIZE - 256, 512, &[0; 512]).await;
    assert_eq!(reply(&mut s, 0).await.1, 28, "write past the end: ENOSPC");
    request(&mut s, 42, 0, 9, 0, 512, &[]).await;
    assert_eq!(reply(&mut s, 0).await.1, 22, "unknown command: EINVAL");
    // Many requests in flight come back, each with its own handle.
    for h in 100..164u64 {
        request(&mut s, 0, 0, h, h * 4096, 4096, &[]).await;
    }
    let mut seen: Vec<u64> = Vec::new();
    for _ in 100..164 {
        seen.push(reply(&mut s, 4096).await.0);
    }
    seen.sort();
    assert_eq!(seen, (100..164).collect::<Vec<_>>());
    request(&mut s, 2, 0, 10, 0, 0, &[]).await; // DISC
    assert_eq!(s.read(&mut [0u8; 1]).await.unwrap(), 0, "closed after DISC");

    let (mut ro, _, _) = connect(addr, "ro").await;
    request(&mut ro, 1, 0, 1, 0, 512, &[1; 512]).await;
    assert_eq!(
        reply(&mut ro, 0).await.1,
        1,
        "write to a read-only export: EPERM"
    );
}

fn tool(name: &str) -> bool {
    let found = std::process::Command::new(name)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "{name} is required in CI (.ci/run installs qemu-utils)"
        );
        eprintln!("skipping: {name} not installed");
    }
    found
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_tools_read_write_and_copy_through_braid() {
    if !tool("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let addr = start(dir.path()).await;
    let uri = format!("nbd://{addr}/disk0");
    let (uri2, dir2) = (uri.clone(), dir.path().to_path_buf());
    tokio::task::spawn_blocking(move || {
        let info = run("qemu-img", &["info", "--output=json", &uri2]);
        assert!(
            info.contains(&format!("\"virtual-size\": {SIZE}")),
            "{info}"
        );
        let io = run(
            "qemu-io",
            &[
                "-f",
                "raw",
                &uri2,
                "-c",
                "write -P 0x5c 1M 256k",
                "-c",
                "read -P 0x5c 1M 256k",
                "-c",
                "flush",
                "-c",
                "discard 1M 64k",
                "-c",
                "read -P 0 1M 64k",
            ],
        );
        assert!(!io.contains("Pattern verification failed"), "{io}");
        // A whole image in and back out, byte for byte.
        let src = dir2.join("src.img");
        std::fs::write(
            &src,
            (0..SIZE).map(|i| (i * 7 % 251) as u8).collect::<Vec<u8>>(),
        )
        .unwrap();
        run(
            "qemu-img",
            &[
                "convert",
                "-n",
                "-f",
                "raw",
                "-O",
                "raw",
                src.to_str().unwrap(),
                &uri2,
            ],
        );
        run(
            "qemu-img",
            &[
                "compare",
                "-f",
                "raw",
                "-F",
                "raw",
                src.to_str().unwrap(),
                &uri2,
            ],
        );
    })
    .await
    .unwrap();
}
