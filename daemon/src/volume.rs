//! `braid attach --volume FILE`: a volume over several exports (and
//! servers), described in TOML, with its dirty-region logs in files next to
//! the attach's data dir.
//!
//! ```toml
//! name = "vol0"                 # NBD export name; names the log files
//! region = "1MiB"               # dirty-log granularity (optional)
//! resync_rate = "64MiB"         # per second (optional)
//! leg_timeout = "3s"            # a leg down this long is left behind
//!
//! [[leg]]
//! name = "a"
//! server = "10.0.0.1:7410"
//! export = "disk0"
//! key_file = "/etc/braid/a.keys" # optional: --key-file otherwise
//!
//! [[leg]]
//! name = "b"
//! server = "10.0.0.2:7410"
//! export = "disk0"
//!
//! [map]
//! mirror = ["a", "b"]           # or linear = [...], or
//!                               # stripe = { chunk = "64KiB", legs = [...] }
//! ```

use braid_core::volume::{VolumeConfig, VolumeSpec};
use serde::Deserialize;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct VolumeFile {
    pub(crate) name: String,
    region: Option<String>,
    resync_rate: Option<String>,
    leg_timeout: Option<String>,
    #[serde(rename = "leg")]
    pub(crate) legs: Vec<LegFile>,
    map: MapNode,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LegFile {
    pub(crate) name: String,
    pub(crate) server: String,
    pub(crate) export: String,
    pub(crate) key_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum MapNode {
    Leg(String),
    Linear { linear: Vec<MapNode> },
    Stripe { stripe: StripeNode },
    Mirror { mirror: Vec<MapNode> },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StripeNode {
    chunk: String,
    legs: Vec<MapNode>,
}

impl VolumeFile {
    /// Reads and checks `path`.
    pub(crate) fn load(path: &Path) -> Result<VolumeFile, String> {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("volume {}: {e}", path.display()))?;
        let v: VolumeFile =
            toml::from_str(&text).map_err(|e| format!("volume {}: {e}", path.display()))?;
        if v.name.is_empty() || v.name.contains('/') {
            return Err(format!(
                "volume {}: name {:?} must be a plain word",
                path.display(),
                v.name
            ));
        }
        for (i, l) in v.legs.iter().enumerate() {
            if v.legs[..i].iter().any(|o| o.name == l.name) {
                return Err(format!(
                    "volume {}: leg {:?} is defined twice",
                    path.display(),
                    l.name
                ));
            }
            if v.legs[..i]
                .iter()
                .any(|o| o.server == l.server && o.export == l.export)
            {
                return Err(format!(
                    "volume {}: legs {:?} and {:?} are the same export ({} on {})",
                    path.display(),
                    v.legs[..i]
                        .iter()
                        .find(|o| o.server == l.server && o.export == l.export)
                        .unwrap()
                        .name,
                    l.name,
                    l.export,
                    l.server
                ));
            }
        }
        let spec = v.spec()?;
        check_legs_named(&spec, &v.legs)?;
        Ok(v)
    }

    /// The map as the core takes it.
    pub(crate) fn spec(&self) -> Result<VolumeSpec, String> {
        fn node(n: &MapNode) -> Result<VolumeSpec, String> {
            Ok(match n {
                MapNode::Leg(name) => VolumeSpec::Export(name.clone()),
                MapNode::Linear { linear } => {
                    VolumeSpec::Linear(linear.iter().map(node).collect::<Result<_, _>>()?)
                }
                MapNode::Mirror { mirror } => VolumeSpec::Mirror {
                    quorum: None,
                    legs: mirror.iter().map(node).collect::<Result<_, _>>()?,
                },
                MapNode::Stripe { stripe } => VolumeSpec::Stripe {
                    chunk: crate::config::parse_size(&stripe.chunk)?,
                    legs: stripe.legs.iter().map(node).collect::<Result<_, _>>()?,
                },
            })
        }
        node(&self.map)
    }

    /// The engine's tunables.
    pub(crate) fn config(&self) -> Result<VolumeConfig, String> {
        let mut c = VolumeConfig::default();
        if let Some(r) = &self.region {
            c.region = crate::config::parse_size(r)?;
        }
        if let Some(r) = &self.resync_rate {
            c.resync_rate = crate::config::parse_size(r)?;
        }
        Ok(c)
    }

    /// How long a leg may be unreachable before IO goes on without it.
    pub(crate) fn leg_timeout(&self) -> Result<std::time::Duration, String> {
        match &self.leg_timeout {
            None => Ok(std::time::Duration::from_secs(3)),
            Some(t) => {
                let secs = t
                    .strip_suffix("ms")
                    .map(|n| n.parse::<f64>().map(|v| v / 1000.0))
                    .or_else(|| t.strip_suffix('s').map(|n| n.parse::<f64>()))
                    .ok_or_else(|| format!("leg_timeout {t:?}: a duration such as 3s or 500ms"))?
                    .map_err(|_| format!("leg_timeout {t:?}: a duration such as 3s or 500ms"))?;
                std::time::Duration::try_from_secs_f64(secs)
                    .map_err(|e| format!("leg_timeout {t:?}: {e}"))
            }
        }
    }
}

fn check_legs_named(spec: &VolumeSpec, legs: &[LegFile]) -> Result<(), String> {
    match spec {
        VolumeSpec::Export(name) => {
            if legs.iter().any(|l| &l.name == name) {
                Ok(())
            } else {
                Err(format!(
                    "the map names leg {name:?}, which no [[leg]] defines"
                ))
            }
        }
        VolumeSpec::Linear(v)
        | VolumeSpec::Mirror { legs: v, .. }
        | VolumeSpec::Stripe { legs: v, .. } => {
            v.iter().try_for_each(|s| check_legs_named(s, legs))
        }
    }
}

/// Dirty logs as files: `DIR/VOLUME.LEG.dirty`, replaced atomically
/// (written aside, synced, renamed, directory synced).
pub(crate) struct FileLogStore {
    pub(crate) dir: PathBuf,
    pub(crate) volume: String,
}

impl FileLogStore {
    fn path(&self, leg: &str) -> PathBuf {
        self.dir.join(format!("{}.{leg}.dirty", self.volume))
    }
}

impl braid_fabric_tcp::LogStore for FileLogStore {
    fn load(&self, name: &str) -> Option<Vec<u8>> {
        std::fs::read(self.path(name)).ok()
    }

    fn store(&self, logs: &[(String, Vec<u8>)]) -> std::io::Result<()> {
        for (leg, bytes) in logs {
            let path = self.path(leg);
            let aside = path.with_extension("dirty.new");
            let mut f = std::fs::File::create(&aside)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            std::fs::rename(&aside, &path)?;
        }
        std::fs::File::open(&self.dir)?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<VolumeFile, String> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.toml");
        std::fs::write(&p, text).unwrap();
        VolumeFile::load(&p)
    }

    const LEGS: &str = r#"
name = "v"
[[leg]]
name = "a"
server = "h1:7410"
export = "disk0"
[[leg]]
name = "b"
server = "h2:7410"
export = "disk0"
"#;

    #[test]
    fn maps_parse_and_bad_ones_are_named() {
        let v = parse(&format!("{LEGS}[map]\nmirror = [\"a\", \"b\"]\n")).unwrap();
        assert_eq!(
            v.spec().unwrap(),
            VolumeSpec::Mirror {
                quorum: None,
                legs: vec![
                    VolumeSpec::Export("a".into()),
                    VolumeSpec::Export("b".into())
                ]
            }
        );
        let v = parse(&format!(
            "{LEGS}[map]\nstripe = {{ chunk = \"64KiB\", legs = [\"a\", \"b\"] }}\n"
        ))
        .unwrap();
        assert!(matches!(
            v.spec().unwrap(),
            VolumeSpec::Stripe { chunk: 65536, .. }
        ));
        let e = parse(&format!("{LEGS}[map]\nmirror = [\"a\", \"c\"]\n")).unwrap_err();
        assert!(e.contains("\"c\""), "{e}");
        let twice = LEGS.replace("server = \"h2:7410\"", "server = \"h1:7410\"");
        let e = parse(&format!("{twice}[map]\nmirror = [\"a\", \"b\"]\n")).unwrap_err();
        assert!(e.contains("same export"), "{e}");
    }
}

/// `braid volume suspend|resume LEG`: DST's suspend, on an attached
/// volume's control socket.
#[derive(clap::Args, Debug)]
pub(crate) struct VolumeArgs {
    /// `suspend` (IO goes on without the leg) or `resume` (the leg
    /// resyncs what it missed, then serves again).
    #[arg(value_parser = ["suspend", "resume"])]
    action: String,
    /// The leg's name in the volume file.
    leg: String,
    /// The attached volume's control socket.
    #[arg(long)]
    control: PathBuf,
}

pub(crate) async fn run(args: VolumeArgs) -> Result<(), String> {
    let v =
        crate::control::request(&args.control, &format!("{} {}", args.action, args.leg)).await?;
    if let Some(e) = v["error"].as_str() {
        return Err(e.to_string());
    }
    println!("leg {}: {}", args.leg, v["done"].as_str().unwrap_or("done"));
    Ok(())
}
