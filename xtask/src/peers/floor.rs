//! The floor under braid's QD1 latency: a bare TCP ping-pong between two
//! processes on this machine, with the sizes of a 4 KiB read (a small
//! request, a 4 KiB reply) and of a 4 KiB write (the reverse), measured
//! twice: with blocking sockets (each side sleeps until the other's bytes
//! arrive, as the NBD peers do) and with both sides spinning on
//! non-blocking sockets (what braid's polling window approaches). Nothing
//! answers a request over loopback TCP faster than the second.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Bytes of a request's or reply's head, about braid's frame head.
const REQUEST_HEAD: usize = 64;
const REPLY_HEAD: usize = 32;
const BLOCK: usize = 4096;

/// The echo side, run as `xtask __pingpong-echo [poll]` in its own
/// process: prints its port, then answers each request (8 bytes: request
/// payload length, reply length; then the payload) with the asked number
/// of bytes.
pub(crate) fn echo(args: &[String]) -> Result<(), String> {
    let poll = args.iter().any(|a| a == "poll");
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    println!("{port}");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    let (mut conn, _) = listener.accept().map_err(|e| e.to_string())?;
    conn.set_nodelay(true).map_err(|e| e.to_string())?;
    conn.set_nonblocking(poll).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; BLOCK + REQUEST_HEAD];
    let reply = vec![0u8; BLOCK + REPLY_HEAD];
    loop {
        let mut head = [0u8; 8];
        if read_exact(&mut conn, &mut head).is_err() {
            return Ok(()); // the measuring side is done
        }
        let ask = u32::from_le_bytes(head[..4].try_into().unwrap()) as usize;
        let answer = u32::from_le_bytes(head[4..].try_into().unwrap()) as usize;
        if ask > buf.len() || answer > reply.len() {
            return Err(format!("ping-pong: request for {ask}/{answer} bytes"));
        }
        read_exact(&mut conn, &mut buf[..ask])?;
        write_all(&mut conn, &reply[..answer])?;
    }
}

/// `read_exact` that spins through `WouldBlock` on a non-blocking socket.
fn read_exact(conn: &mut TcpStream, mut buf: &mut [u8]) -> Result<(), String> {
    while !buf.is_empty() {
        match conn.read(buf) {
            Ok(0) => return Err("ping-pong: closed".into()),
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::hint::spin_loop(),
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(())
}

/// `write_all` that spins through `WouldBlock` on a non-blocking socket.
fn write_all(conn: &mut TcpStream, mut buf: &[u8]) -> Result<(), String> {
    while !buf.is_empty() {
        match conn.write(buf) {
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::hint::spin_loop(),
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(())
}

/// Median round trip (µs) of read-shaped and write-shaped exchanges,
/// sleeping and polling.
pub(crate) struct Floor {
    pub(crate) read_p50: f64,
    pub(crate) write_p50: f64,
    pub(crate) read_p50_polling: f64,
    pub(crate) write_p50_polling: f64,
}

pub(crate) fn measure(runtime: Duration) -> Result<Floor, String> {
    let (read_p50, write_p50) = measure_one(runtime, false)?;
    let (read_p50_polling, write_p50_polling) = measure_one(runtime, true)?;
    Ok(Floor {
        read_p50,
        write_p50,
        read_p50_polling,
        write_p50_polling,
    })
}

/// Read-shaped and write-shaped medians, `runtime` each.
fn measure_one(runtime: Duration, poll: bool) -> Result<(f64, f64), String> {
    with_echo(poll, |conn| {
        let read = exchange(conn, REQUEST_HEAD, BLOCK + REPLY_HEAD, runtime)?;
        let write = exchange(conn, BLOCK + REQUEST_HEAD, REPLY_HEAD, runtime)?;
        Ok((read, write))
    })
}

/// Runs `exchanges` against a fresh echo process, then ends it.
fn with_echo<T>(
    poll: bool,
    exchanges: impl FnOnce(&mut TcpStream) -> Result<T, String>,
) -> Result<T, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .arg("__pingpong-echo")
        .args(poll.then_some("poll"))
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("ping-pong echo: {e}"))?;
    let mut port = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut port)
        .map_err(|e| e.to_string())?;
    let result = (|| {
        let port: u16 = port.trim().parse().map_err(|_| "ping-pong: no port")?;
        let mut conn = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
        conn.set_nodelay(true).map_err(|e| e.to_string())?;
        conn.set_nonblocking(poll).map_err(|e| e.to_string())?;
        exchanges(&mut conn)
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// braid's QD1 p50 beside the polling floor measured just before it,
/// (floor, braid) in µs per pair. On these shared vCPUs the machine
/// changes speed between runs seconds apart (the same ping-pong measures
/// 9 or 15 µs), so a ratio is only fair within a pair; the floor measured
/// once per round, minutes from the braid row, mixed the two speeds.
#[derive(Debug, Clone, Default)]
pub(crate) struct Pairs {
    pub(crate) read: Vec<(f64, f64)>,
    pub(crate) write: Vec<(f64, f64)>,
}

impl Pairs {
    /// Every pair of `other` after these.
    pub(crate) fn extend(&mut self, other: &Pairs) {
        self.read.extend_from_slice(&other.read);
        self.write.extend_from_slice(&other.write);
    }
}

/// `count` pairs of each shape, each a polling floor of `runtime` and then
/// `braid_p50(write)`, braid's QD1 p50 of that shape.
pub(crate) fn pairs(
    count: usize,
    runtime: Duration,
    mut braid_p50: impl FnMut(bool) -> Result<f64, String>,
) -> Result<Pairs, String> {
    let mut out = Pairs::default();
    for _ in 0..count {
        for write in [false, true] {
            let (ask, answer) = if write {
                (BLOCK + REQUEST_HEAD, REPLY_HEAD)
            } else {
                (REQUEST_HEAD, BLOCK + REPLY_HEAD)
            };
            let floor = with_echo(true, |conn| exchange(conn, ask, answer, runtime))?;
            let braid = braid_p50(write)?;
            let shape = if write { &mut out.write } else { &mut out.read };
            shape.push((floor, braid));
        }
    }
    Ok(out)
}

/// The median of braid / floor over `pairs`.
pub(crate) fn median_ratio(pairs: &[(f64, f64)]) -> Option<f64> {
    let ratios: Vec<f64> = pairs
        .iter()
        .filter(|(floor, _)| *floor > 0.0)
        .map(|(floor, braid)| braid / floor)
        .collect();
    super::table::median(&ratios)
}

/// QD1 round trips for `runtime`; returns the median in µs.
fn exchange(
    conn: &mut TcpStream,
    ask: usize,
    answer: usize,
    runtime: Duration,
) -> Result<f64, String> {
    let mut request = vec![0u8; 8 + ask];
    request[..4].copy_from_slice(&(ask as u32).to_le_bytes());
    request[4..8].copy_from_slice(&(answer as u32).to_le_bytes());
    let mut reply = vec![0u8; answer];
    let mut samples = Vec::new();
    let end = Instant::now() + runtime;
    while Instant::now() < end {
        let t = Instant::now();
        write_all(conn, &request)?;
        read_exact(conn, &mut reply)?;
        samples.push(t.elapsed());
    }
    samples.sort();
    let mid = samples
        .get(samples.len() / 2)
        .ok_or("ping-pong: no samples")?;
    Ok(mid.as_secs_f64() * 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pairs_ratio_is_braid_over_the_floor_beside_it() {
        // Slow machine, fast machine, slow: each braid run is judged
        // against its own floor, not against the other speed's.
        let pairs = [(15.0, 24.0), (9.0, 16.2), (15.0, 22.5)];
        let median = median_ratio(&pairs).unwrap();
        assert!((median - 1.6).abs() < 1e-9, "{median}");
        assert_eq!(median_ratio(&[]), None);
        assert_eq!(median_ratio(&[(0.0, 10.0)]), None, "no floor, no ratio");
        let mut all = Pairs {
            read: pairs.to_vec(),
            write: vec![],
        };
        all.extend(&Pairs {
            read: vec![(10.0, 30.0)],
            write: vec![(12.0, 18.0)],
        });
        assert_eq!((all.read.len(), all.write.len()), (4, 1));
    }
}
