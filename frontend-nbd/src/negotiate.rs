//! The handshake phase: fixed newstyle option haggling, including STARTTLS,
//! structured replies and metadata contexts. Each choice names its clause
//! of the spec (NetworkBlockDevice/nbd doc/proto.md).

use crate::proto::*;
use crate::{BoxStream, NbdConfig, NbdExport};
use bytes::{BufMut, BytesMut};
use std::io;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub(crate) fn protocol_error(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// What the client chose, ready for transmission.
pub(crate) struct Negotiated {
    pub stream: BoxStream,
    pub export: NbdExport,
    pub structured: bool,
    /// `base:allocation` was selected for this export.
    pub block_status: bool,
}

/// Per-connection option state. STARTTLS resets all of it: nothing agreed
/// in plain text may carry over into the encrypted session.
#[derive(Default)]
struct State {
    tls: bool,
    structured: bool,
    /// Export name the metadata contexts were selected for, if any were.
    meta_for: Option<String>,
}

async fn reply(s: &mut BoxStream, option: u32, reply: u32, data: &[u8]) -> io::Result<()> {
    let mut b = BytesMut::with_capacity(20 + data.len());
    b.put_u64(OPT_REPLY_MAGIC);
    b.put_u32(option);
    b.put_u32(reply);
    b.put_u32(data.len() as u32);
    b.put_slice(data);
    s.write_all(&b).await
}

pub(crate) fn transmission_flags(e: &NbdExport, structured: bool, fast_zero: bool) -> u16 {
    let mut f = TFLAG_HAS_FLAGS
        | TFLAG_SEND_FLUSH
        | TFLAG_SEND_FUA
        | TFLAG_SEND_TRIM
        | TFLAG_SEND_WRITE_ZEROES
        | TFLAG_SEND_CACHE
        // FLUSH is fdatasync of the whole export (or a braid FLUSH, which
        // covers every completed write of the session), so a flush on one
        // connection covers writes completed on every other: the spec's
        // condition for CAN_MULTI_CONN.
        | TFLAG_CAN_MULTI_CONN;
    if e.read_only {
        // Nothing that writes is offered (and all of it is refused with
        // EPERM if sent anyway).
        f = (f | TFLAG_READ_ONLY) & !(TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES);
    }
    // "The server MUST set SEND_DF if READ supports DF, and MUST leave it
    // clear if structured replies have not been negotiated." Every read is
    // answered with one content chunk, so DF is always honoured.
    if structured {
        f |= TFLAG_SEND_DF;
    }
    if fast_zero && !e.read_only {
        f |= TFLAG_SEND_FAST_ZERO;
    }
    f
}

fn find<'a>(exports: &'a [NbdExport], name: &str) -> Option<&'a NbdExport> {
    // "An empty name is reserved for a default export": the first one.
    if name.is_empty() {
        return exports.first();
    }
    exports.iter().find(|e| e.name == name)
}

/// Fixed newstyle negotiation. Returns `None` if the client aborted or the
/// server is shutting down.
pub(crate) async fn negotiate(
    mut s: BoxStream,
    config: &NbdConfig,
    fast_zero: bool,
    shutting_down: &(dyn Fn() -> bool + Sync),
) -> io::Result<Option<Negotiated>> {
    let client = greet(&mut s).await?;
    let mut st = State::default();
    loop {
        let (option, data) = read_option(&mut s).await?;
        let tls_required = config.tls_required && !st.tls;
        match option {
            OPT_EXPORT_NAME => {
                // No way to report an error: "the server MUST terminate
                // the session" (unknown export, or TLS required but not
                // started).
                if tls_required {
                    return Err(protocol_error(
                        "EXPORT_NAME before STARTTLS on a TLS-only server",
                    ));
                }
                let name = String::from_utf8_lossy(&data).into_owned();
                let Some(e) = find(&config.exports, &name) else {
                    return Err(protocol_error(format!(
                        "EXPORT_NAME for unknown export {name:?}"
                    )));
                };
                let mut b = BytesMut::new();
                b.put_u64(e.size);
                b.put_u16(transmission_flags(e, st.structured, fast_zero));
                if !client.no_zeroes {
                    b.put_bytes(0, 124);
                }
                s.write_all(&b).await?;
                return Ok(Some(st.chosen(s, e)));
            }
            OPT_ABORT => {
                // "The server MUST reply with NBD_REP_ACK"; the client may
                // already be gone, which is fine.
                let _ = reply(&mut s, option, REP_ACK, &[]).await;
                let _ = s.shutdown().await;
                return Ok(None);
            }
            // "SHOULD error further options (other than ABORT) with
            // NBD_REP_ERR_SHUTDOWN".
            _ if shutting_down() => {
                reply(&mut s, option, REP_ERR_SHUTDOWN, b"server shutting down").await?;
            }
            OPT_STARTTLS => {
                s = match starttls(s, option, &data, config, client.fixed, &mut st).await? {
                    Some(upgraded) => upgraded,
                    None => return Ok(None),
                };
            }
            // FORCEDTLS: "it MUST reply with NBD_REP_ERR_TLS_REQD".
            _ if tls_required => {
                reply(&mut s, option, REP_ERR_TLS_REQD, b"start TLS first").await?;
            }
            OPT_LIST => list(&mut s, &data, config).await?,
            OPT_INFO | OPT_GO => {
                let Some(e) = info(&mut s, option, &data, config, &st, fast_zero).await? else {
                    continue;
                };
                if option == OPT_GO {
                    return Ok(Some(st.chosen(s, e)));
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    let why = b"STRUCTURED_REPLY takes no data";
                    reply(&mut s, option, REP_ERR_INVALID, why).await?;
                    continue;
                }
                st.structured = true;
                reply(&mut s, option, REP_ACK, &[]).await?;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                meta_context(&mut s, option, &data, config, &mut st).await?;
            }
            // "the server MUST reply with NBD_REP_ERR_UNSUP" and haggling
            // goes on.
            _ => reply(&mut s, option, REP_ERR_UNSUP, b"option not supported").await?,
        }
    }
}

/// What the client's flags asked for.
struct ClientFlags {
    fixed: bool,
    no_zeroes: bool,
}

/// The server's greeting, and the client's flags back.
async fn greet(s: &mut BoxStream) -> io::Result<ClientFlags> {
    let mut hello = BytesMut::with_capacity(18);
    hello.put_u64(NBDMAGIC);
    hello.put_u64(IHAVEOPT);
    hello.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    s.write_all(&hello).await?;
    let client_flags = s.read_u32().await?;
    if client_flags & !CLIENT_FLAGS_KNOWN != 0 {
        // "The server MUST drop the TCP connection if the client sets an
        // unknown flag."
        return Err(protocol_error(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    Ok(ClientFlags {
        fixed: client_flags & u32::from(FLAG_FIXED_NEWSTYLE) != 0,
        no_zeroes: client_flags & u32::from(FLAG_NO_ZEROES) != 0,
    })
}

/// The next option: its number and data.
async fn read_option(s: &mut BoxStream) -> io::Result<(u32, Vec<u8>)> {
    if s.read_u64().await? != IHAVEOPT {
        return Err(protocol_error("option without IHAVEOPT"));
    }
    let option = s.read_u32().await?;
    let len = s.read_u32().await?;
    if len > OPT_LEN_MAX {
        // A denial-of-service attempt: the spec allows a hard disconnect.
        return Err(protocol_error(format!("option {option} of {len} bytes")));
    }
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data).await?;
    Ok((option, data))
}

/// LIST: every export's name.
async fn list(s: &mut BoxStream, data: &[u8], config: &NbdConfig) -> io::Result<()> {
    if !data.is_empty() {
        return reply(s, OPT_LIST, REP_ERR_INVALID, b"LIST takes no data").await;
    }
    for e in &config.exports {
        let mut d = BytesMut::new();
        d.put_u32(e.name.len() as u32);
        d.put_slice(e.name.as_bytes());
        reply(s, OPT_LIST, REP_SERVER, &d).await?;
    }
    reply(s, OPT_LIST, REP_ACK, &[]).await
}

/// INFO or GO: the export's size, flags, name if asked, and block sizes;
/// the export, if the request named one.
async fn info<'a>(
    s: &mut BoxStream,
    option: u32,
    data: &[u8],
    config: &'a NbdConfig,
    st: &State,
    fast_zero: bool,
) -> io::Result<Option<&'a NbdExport>> {
    let Some((name, requests)) = parse_info_request(data) else {
        reply(s, option, REP_ERR_INVALID, b"malformed INFO/GO request").await?;
        return Ok(None);
    };
    let Some(e) = find(&config.exports, &name) else {
        let msg = format!("no export named {name:?}");
        reply(s, option, REP_ERR_UNKNOWN, msg.as_bytes()).await?;
        return Ok(None);
    };
    let mut info = BytesMut::new();
    info.put_u16(INFO_EXPORT);
    info.put_u64(e.size);
    info.put_u16(transmission_flags(e, st.structured, fast_zero));
    reply(s, option, REP_INFO, &info).await?;
    if requests.contains(&INFO_NAME) {
        let mut d = BytesMut::new();
        d.put_u16(INFO_NAME);
        d.put_slice(e.name.as_bytes());
        reply(s, option, REP_INFO, &d).await?;
    }
    // Sent whether asked for or not (the spec allows it); a client that
    // ignores it gets EINVAL for what breaks it.
    let mut bs = BytesMut::new();
    bs.put_u16(INFO_BLOCK_SIZE);
    bs.put_u32(e.block_min);
    bs.put_u32(BLOCK_PREFERRED.max(e.block_min));
    bs.put_u32(e.block_max);
    reply(s, option, REP_INFO, &bs).await?;
    reply(s, option, REP_ACK, &[]).await?;
    Ok(Some(e))
}

impl State {
    /// Transmission on export `e` with what was agreed: metadata contexts
    /// chosen for another export do not apply.
    fn chosen(&self, stream: BoxStream, e: &NbdExport) -> Negotiated {
        Negotiated {
            stream,
            export: e.clone(),
            structured: self.structured,
            block_status: self.structured && self.meta_for.as_ref() == Some(&e.name),
        }
    }
}

#[cfg(feature = "tls")]
async fn starttls(
    mut s: BoxStream,
    option: u32,
    data: &[u8],
    config: &NbdConfig,
    fixed: bool,
    st: &mut State,
) -> io::Result<Option<BoxStream>> {
    let Some(acceptor) = config.tls.clone() else {
        // NOTLS mode: "MUST respond with NBD_REP_ERR_POLICY or UNSUP".
        reply(
            &mut s,
            option,
            REP_ERR_POLICY,
            b"TLS is not configured on this server",
        )
        .await?;
        return Ok(Some(s));
    };
    if !data.is_empty() || !fixed {
        // TLS "requires fixed newstyle negotiation to have completed".
        reply(
            &mut s,
            option,
            REP_ERR_INVALID,
            b"STARTTLS takes no data and needs fixed newstyle",
        )
        .await?;
        return Ok(Some(s));
    }
    if st.tls {
        // "If the server receives NBD_OPT_STARTTLS when TLS has already
        // been negotiated, it MUST reply with NBD_REP_ERR_INVALID."
        reply(&mut s, option, REP_ERR_INVALID, b"TLS is already running").await?;
        return Ok(Some(s));
    }
    reply(&mut s, option, REP_ACK, &[]).await?;
    // "If the handshake is unsuccessful the server MUST terminate the
    // session": an error here drops the connection.
    let tls = acceptor
        .accept(s)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("NBD STARTTLS handshake: {e}")))?;
    *st = State {
        tls: true,
        ..State::default()
    };
    Ok(Some(Box::new(tls)))
}

#[cfg(not(feature = "tls"))]
async fn starttls(
    mut s: BoxStream,
    option: u32,
    _data: &[u8],
    _config: &NbdConfig,
    _fixed: bool,
    _st: &mut State,
) -> io::Result<Option<BoxStream>> {
    reply(&mut s, option, REP_ERR_UNSUP, b"built without TLS").await?;
    Ok(Some(s))
}

/// LIST_META_CONTEXT and SET_META_CONTEXT. Only `base:allocation` exists.
async fn meta_context(
    s: &mut BoxStream,
    option: u32,
    data: &[u8],
    config: &NbdConfig,
    st: &mut State,
) -> io::Result<()> {
    if !st.structured {
        // "MUST NOT be requested unless structured replies have been
        // negotiated first ... a server SHOULD send NBD_REP_ERR_INVALID."
        return reply(
            s,
            option,
            REP_ERR_INVALID,
            b"negotiate structured replies first",
        )
        .await;
    }
    let Some((name, queries)) = parse_meta_request(data) else {
        return reply(
            s,
            option,
            REP_ERR_INVALID,
            b"malformed metadata context request",
        )
        .await;
    };
    let Some(export) = find(&config.exports, &name) else {
        let msg = format!("no export named {name:?}");
        return reply(s, option, REP_ERR_UNKNOWN, msg.as_bytes()).await;
    };
    let set = option == OPT_SET_META_CONTEXT;
    // LIST with no queries lists everything; "base:" lists the namespace.
    // SET selects only exact names.
    let wanted = if set {
        queries.iter().any(|q| q == BASE_ALLOCATION)
    } else {
        queries.is_empty() || queries.iter().any(|q| q == BASE_ALLOCATION || q == "base:")
    };
    if set {
        // "Issuing this command replaces all previously-set contexts."
        st.meta_for = wanted.then(|| export.name.clone());
    }
    if wanted {
        let mut d = BytesMut::new();
        // LIST: "the metadata context ID ... SHOULD be set to zero".
        d.put_u32(if set { BASE_ALLOCATION_ID } else { 0 });
        d.put_slice(BASE_ALLOCATION.as_bytes());
        reply(s, option, REP_META_CONTEXT, &d).await?;
    }
    reply(s, option, REP_ACK, &[]).await
}

fn string_at(d: &[u8], at: usize) -> Option<(String, usize)> {
    let n = u32::from_be_bytes(d.get(at..at + 4)?.try_into().ok()?) as usize;
    if n > STRING_MAX {
        return None;
    }
    let s = std::str::from_utf8(d.get(at + 4..at + 4 + n)?).ok()?;
    if s.contains('\0') {
        return None;
    }
    Some((s.to_string(), at + 4 + n))
}

/// INFO/GO data: u32 name length, name, u16 count, count × u16.
fn parse_info_request(d: &[u8]) -> Option<(String, Vec<u16>)> {
    let (name, at) = string_at(d, 0)?;
    let rest = d.get(at..)?;
    let count = u16::from_be_bytes(rest.get(0..2)?.try_into().ok()?) as usize;
    if rest.len() != 2 + 2 * count {
        return None;
    }
    let reqs = rest[2..]
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Some((name, reqs))
}

/// META_CONTEXT data: export name, u32 count, count × string.
fn parse_meta_request(d: &[u8]) -> Option<(String, Vec<String>)> {
    let (name, mut at) = string_at(d, 0)?;
    let count = u32::from_be_bytes(d.get(at..at + 4)?.try_into().ok()?);
    at += 4;
    let mut queries = Vec::new();
    for _ in 0..count {
        let (q, next) = string_at(d, at)?;
        queries.push(q);
        at = next;
    }
    (at == d.len()).then_some((name, queries))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string(s: &str) -> Vec<u8> {
        let mut d = (s.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(s.as_bytes());
        d
    }

    #[test]
    fn meta_requests_parse_exactly_and_reject_trailing_or_short_data() {
        let mut d = string("disk0");
        d.extend_from_slice(&2u32.to_be_bytes());
        d.extend(string("base:allocation"));
        d.extend(string("qemu:dirty-bitmap:x"));
        assert_eq!(
            parse_meta_request(&d),
            Some((
                "disk0".into(),
                vec!["base:allocation".into(), "qemu:dirty-bitmap:x".into()]
            ))
        );
        let mut long = d.clone();
        long.push(0);
        assert_eq!(parse_meta_request(&long), None);
        assert_eq!(parse_meta_request(&d[..d.len() - 1]), None);
        // A count far larger than the data must not allocate or panic.
        let mut huge = string("disk0");
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(parse_meta_request(&huge), None);
    }

    #[test]
    fn info_requests_reject_bad_counts_and_nul_in_names() {
        let mut d = string("disk0");
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&3u16.to_be_bytes());
        assert_eq!(parse_info_request(&d), Some(("disk0".into(), vec![3])));
        assert_eq!(parse_info_request(&d[..d.len() - 1]), None);
        let mut nul = string("a\0b");
        nul.extend_from_slice(&0u16.to_be_bytes());
        assert_eq!(parse_info_request(&nul), None);
    }
}
