//! `braid set KEY=VALUE...`: runtime tuning through the control socket of
//! `braid serve` or `braid attach`. The names are the configuration's;
//! values are validated by the engines exactly as at start-up.

use braid_core::client::{ClientTuning, Policy};
use braid_core::server::ServerTuning;
use clap::Args;
use std::path::PathBuf;
use std::time::Duration;

/// What an attached volume takes.
pub(crate) const CLIENT_KEYS: &str =
    "channels, policy, keepalive_interval, channel_timeout, resend_min, resend_max";
/// What a server takes.
pub(crate) const SERVER_KEYS: &str =
    "max_sessions, max_channels_per_session, max_inflight, idle_timeout, session_linger";

#[derive(Args, Debug)]
pub(crate) struct SetArgs {
    /// The control socket of `braid serve` or `braid attach`
    /// [default: DATA_DIR/control.sock].
    #[arg(long)]
    control: Option<PathBuf>,
    /// Settings, e.g. `channels=8 keepalive_interval=100ms` for a volume or
    /// `max_inflight=64 session_linger=30s` for a server.
    #[arg(required = true, value_name = "KEY=VALUE")]
    settings: Vec<String>,
}

pub(crate) async fn run(args: SetArgs) -> Result<(), String> {
    let path = args
        .control
        .unwrap_or_else(|| crate::config::default_data_dir().join("control.sock"));
    let command = format!("set {}", args.settings.join(" "));
    let v = crate::control::request(&path, &command).await?;
    if let Some(e) = v["error"].as_str() {
        return Err(e.to_string());
    }
    println!("now in force: {}", v["tuning"]);
    Ok(())
}

fn pairs(settings: &str) -> impl Iterator<Item = Result<(String, &str), String>> {
    settings.split_whitespace().map(|kv| {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("{kv:?}: expected KEY=VALUE"))?;
        Ok((k.replace('-', "_"), v))
    })
}

/// `250ms`, `2s`, `1.5s`, `100us`.
fn duration(key: &str, v: &str) -> Result<Duration, String> {
    let bad = || format!("{key}={v}: expected a duration such as 250ms or 2s");
    let (number, scale) = if let Some(n) = v.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = v.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1.0)
    } else {
        return Err(bad());
    };
    let secs = number.parse::<f64>().map_err(|_| bad())? * scale;
    Duration::try_from_secs_f64(secs).map_err(|_| bad())
}

fn number<T: std::str::FromStr>(key: &str, v: &str) -> Result<T, String> {
    v.parse()
        .map_err(|_| format!("{key}={v}: expected a whole number"))
}

/// Parses a volume's settings.
pub(crate) fn parse_client(settings: &str) -> Result<ClientTuning, String> {
    let mut t = ClientTuning::default();
    for pair in pairs(settings) {
        let (k, v) = pair?;
        match k.as_str() {
            "channels" => t.channels = Some(number(&k, v)?),
            "policy" => {
                t.policy = Some(match v {
                    "least-inflight" => Policy::LeastInflight,
                    "round-robin" => Policy::RoundRobin,
                    "lowest-latency" => Policy::LowestLatency,
                    _ => {
                        return Err(format!(
                            "policy={v}: one of least-inflight, round-robin, lowest-latency"
                        ))
                    }
                })
            }
            "keepalive_interval" => t.keepalive_interval = Some(duration(&k, v)?),
            "channel_timeout" => t.channel_timeout = Some(duration(&k, v)?),
            "resend_min" => t.resend_min = Some(duration(&k, v)?),
            "resend_max" => t.resend_max = Some(duration(&k, v)?),
            _ => {
                return Err(format!(
                    "an attached volume has no setting {k:?} ({CLIENT_KEYS})"
                ))
            }
        }
    }
    Ok(t)
}

/// Parses a server's settings.
pub(crate) fn parse_server(settings: &str) -> Result<ServerTuning, String> {
    let mut t = ServerTuning::default();
    for pair in pairs(settings) {
        let (k, v) = pair?;
        match k.as_str() {
            "max_sessions" => t.max_sessions = Some(number(&k, v)?),
            "max_channels_per_session" => t.max_channels_per_session = Some(number(&k, v)?),
            "max_inflight" => t.max_inflight = Some(number(&k, v)?),
            "idle_timeout" => t.idle_timeout = Some(duration(&k, v)?),
            "session_linger" => t.session_linger = Some(duration(&k, v)?),
            _ => return Err(format!("a server has no setting {k:?} ({SERVER_KEYS})")),
        }
    }
    Ok(t)
}

/// Milliseconds, whole where they are.
fn ms(d: Option<Duration>) -> serde_json::Value {
    match d {
        None => serde_json::Value::Null,
        Some(d) if d.as_micros() % 1000 == 0 => (d.as_millis() as u64).into(),
        Some(d) => (d.as_micros() as f64 / 1000.0).into(),
    }
}

/// A volume's settings for `status` and `set` answers.
pub(crate) fn client_json(t: &ClientTuning) -> serde_json::Value {
    serde_json::json!({
        "channels": t.channels,
        "policy": t.policy.map(|p| match p {
            Policy::LeastInflight => "least-inflight",
            Policy::RoundRobin => "round-robin",
            Policy::LowestLatency => "lowest-latency",
        }),
        "keepalive_interval_ms": ms(t.keepalive_interval),
        "channel_timeout_ms": ms(t.channel_timeout),
        "resend_min_ms": ms(t.resend_min),
        "resend_max_ms": ms(t.resend_max),
    })
}

/// A server's settings for `status` and `set` answers.
pub(crate) fn server_json(t: &ServerTuning) -> serde_json::Value {
    serde_json::json!({
        "max_sessions": t.max_sessions,
        "max_channels_per_session": t.max_channels_per_session,
        "max_inflight": t.max_inflight,
        "idle_timeout_ms": ms(t.idle_timeout),
        "session_linger_ms": ms(t.session_linger),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_with_units_and_refuse_what_is_not_there() {
        let t =
            parse_client("channels=8 keepalive-interval=100ms resend_max=1.5s policy=round-robin")
                .unwrap();
        assert_eq!(t.channels, Some(8));
        assert_eq!(t.keepalive_interval, Some(Duration::from_millis(100)));
        assert_eq!(t.resend_max, Some(Duration::from_millis(1500)));
        assert_eq!(t.policy, Some(Policy::RoundRobin));
        assert!(parse_client("keepalive_interval=100")
            .unwrap_err()
            .contains("250ms"));
        assert!(parse_client("max_inflight=3")
            .unwrap_err()
            .contains("channels, policy"));
        assert!(parse_client("channels").unwrap_err().contains("KEY=VALUE"));
        assert!(parse_client("channels=-1").is_err());
        let s = parse_server("max_inflight=64 session_linger=30s").unwrap();
        assert_eq!(s.max_inflight, Some(64));
        assert_eq!(s.session_linger, Some(Duration::from_secs(30)));
        assert!(parse_server("channels=2")
            .unwrap_err()
            .contains("max_sessions"));
    }
}
