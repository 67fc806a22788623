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
    Mirror { mirror: MirrorNode },
}

/// `mirror = [legs]`, or `mirror = { quorum = N, legs = [...] }`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum MirrorNode {
    Legs(Vec<MapNode>),
    WithQuorum(QuorumNode),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct QuorumNode {
    quorum: usize,
    legs: Vec<MapNode>,
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
                MapNode::Mirror {
                    mirror: MirrorNode::Legs(legs),
                } => VolumeSpec::Mirror {
                    quorum: None,
                    legs: legs.iter().map(node).collect::<Result<_, _>>()?,
                },
                MapNode::Mirror {
                    mirror: MirrorNode::WithQuorum(q),
                } if q.quorum == 0 || q.quorum > q.legs.len() => {
                    return Err(format!(
                        "mirror quorum {} is outside 1 to {} (its legs)",
                        q.quorum,
                        q.legs.len()
                    ))
                }
                MapNode::Mirror {
                    mirror: MirrorNode::WithQuorum(q),
                } => VolumeSpec::Mirror {
                    quorum: Some(q.quorum),
                    legs: q.legs.iter().map(node).collect::<Result<_, _>>()?,
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

/// A leg that replaces another once a migration switches over.
#[derive(Debug, Clone)]
pub(crate) struct NewLeg {
    pub(crate) name: String,
    pub(crate) server: String,
    pub(crate) export: String,
    pub(crate) key_file: Option<PathBuf>,
}

impl VolumeFile {
    /// Checks that `new` may replace leg `from`: `from` is a leg, and no
    /// other leg has `new`'s name or export.
    pub(crate) fn check_replacement(&self, from: &str, new: &NewLeg) -> Result<(), String> {
        if !self.legs.iter().any(|l| l.name == from) {
            return Err(format!("the volume file has no leg {from:?}"));
        }
        if let Some(o) = self.legs.iter().find(|l| l.name == new.name) {
            return Err(format!("the volume already has a leg named {:?}", o.name));
        }
        if let Some(o) = self
            .legs
            .iter()
            .find(|l| l.server == new.server && l.export == new.export)
        {
            return Err(format!(
                "leg {:?} is already {} on {}",
                o.name, new.export, new.server
            ));
        }
        Ok(())
    }
}

/// The default name of the leg that replaces `leg`: `a` becomes `a.1`,
/// `a.1` becomes `a.2`.
pub(crate) fn next_leg_name(leg: &str) -> String {
    match leg.rsplit_once('.') {
        Some((base, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
            format!("{base}.{}", n.parse::<u64>().unwrap_or(0) + 1)
        }
        _ => format!("{leg}.1"),
    }
}

/// Rewrites the volume file at `path` with leg `from` replaced by `new`
/// (its `[[leg]]` table and every mention in `[map]`), keeping the rest
/// of the file as the operator wrote it. Atomic: written aside, synced,
/// renamed over, directory synced. A restart then opens the new leg.
pub(crate) fn replace_leg(path: &Path, from: &str, new: &NewLeg) -> Result<(), String> {
    let at = |e: String| format!("volume {}: {e}", path.display());
    let text = std::fs::read_to_string(path).map_err(|e| at(e.to_string()))?;
    let mut doc: toml_edit::DocumentMut = text.parse().map_err(|e| at(format!("{e}")))?;
    let legs = doc
        .get_mut("leg")
        .and_then(|l| l.as_array_of_tables_mut())
        .ok_or_else(|| at("no [[leg]] tables".into()))?;
    let leg = legs
        .iter_mut()
        .find(|t| t.get("name").and_then(|n| n.as_str()) == Some(from))
        .ok_or_else(|| at(format!("no leg {from:?}")))?;
    leg["name"] = toml_edit::value(new.name.as_str());
    leg["server"] = toml_edit::value(new.server.as_str());
    leg["export"] = toml_edit::value(new.export.as_str());
    if let Some(k) = &new.key_file {
        leg["key_file"] = toml_edit::value(k.display().to_string());
    }
    fn rename(item: &mut toml_edit::Value, from: &str, to: &str) {
        match item {
            toml_edit::Value::String(s) if s.value() == from => *item = to.into(),
            toml_edit::Value::Array(a) => a.iter_mut().for_each(|v| rename(v, from, to)),
            toml_edit::Value::InlineTable(t) => t.iter_mut().for_each(|(_, v)| rename(v, from, to)),
            _ => {}
        }
    }
    let map = doc
        .get_mut("map")
        .and_then(|m| m.as_table_like_mut())
        .ok_or_else(|| at("no [map]".into()))?;
    for (_, item) in map.iter_mut() {
        if let Some(v) = item.as_value_mut() {
            rename(v, from, &new.name);
        }
    }
    let aside = path.with_extension("toml.new");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&aside)?;
        f.write_all(doc.to_string().as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&aside, path)?;
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        std::fs::File::open(dir.unwrap_or(Path::new(".")))?.sync_all()
    };
    write().map_err(|e| at(e.to_string()))?;
    // What was written must read back as a volume with the new leg.
    let back = VolumeFile::load(path)?;
    if !back.legs.iter().any(|l| l.name == new.name) {
        return Err(at(format!("leg {:?} missing after the rewrite", new.name)));
    }
    Ok(())
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

/// Locks `DIR/VOLUME.lock` for as long as the returned file lives: one
/// run of a volume per data dir. A second run would claim the next epoch
/// (fencing the first on the legs it reaches while the first goes on
/// writing to the others) and overwrite the first's dirty logs, so a
/// crash would resync too little. The lock goes with the process, kill -9
/// included.
pub(crate) fn lock_volume(dir: &Path, volume: &str) -> Result<std::fs::File, String> {
    crate::config::hold_lock(&dir.join(format!("{volume}.lock")), |e| {
        format!(
            "{e} (another `braid attach --volume` runs this volume with data dir {}; stop it \
             first)",
            dir.display()
        )
    })
    .map_err(|e| format!("volume {volume}: {e}"))
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

    /// `DIR/VOLUME.run`: which run of the volume's client this is.
    fn identity_path(&self) -> PathBuf {
        self.dir.join(format!("{}.run", self.volume))
    }
}

impl braid_fabric_tcp::LogStore for FileLogStore {
    fn load(&self, name: &str) -> std::io::Result<Option<Vec<u8>>> {
        read_if_stored(&self.path(name))
    }

    fn store(&self, logs: &[(String, Vec<u8>)]) -> std::io::Result<()> {
        for (leg, bytes) in logs {
            replace_file(&self.path(leg), bytes)?;
        }
        std::fs::File::open(&self.dir)?.sync_all()
    }

    fn load_identity(&self) -> std::io::Result<Option<Vec<u8>>> {
        read_if_stored(&self.identity_path())
    }

    fn store_identity(&self, bytes: &[u8]) -> std::io::Result<()> {
        replace_file(&self.identity_path(), bytes)?;
        std::fs::File::open(&self.dir)?.sync_all()
    }
}

/// `None` only if `path` does not exist; any other failure to read it is
/// an error naming it (a file that is there but cannot be read is not a
/// volume's first run).
fn read_if_stored(path: &Path) -> std::io::Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(std::io::Error::new(
            e.kind(),
            format!("{}: {e}", path.display()),
        )),
    }
}

/// Writes `bytes` aside, syncs, renames over `path` (the caller syncs the
/// directory).
fn replace_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let aside = path.with_extension("new");
    let mut f = std::fs::File::create(&aside)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&aside, path)
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
    fn a_log_never_stored_is_none_and_one_unreadable_is_an_error_naming_it() {
        use braid_fabric_tcp::LogStore;
        let dir = tempfile::tempdir().unwrap();
        let store = FileLogStore {
            dir: dir.path().to_path_buf(),
            volume: "v".into(),
        };
        assert!(store.load("a").unwrap().is_none());
        assert!(store.load_identity().unwrap().is_none());
        store.store(&[("a".into(), b"log".to_vec())]).unwrap();
        assert_eq!(store.load("a").unwrap().unwrap(), b"log");
        // A directory where the file should be: there, but unreadable (as
        // an EIO or EACCES would leave it; root reads through modes).
        std::fs::create_dir(dir.path().join("v.b.dirty")).unwrap();
        std::fs::create_dir(dir.path().join("v.run")).unwrap();
        let err = store.load("b").unwrap_err().to_string();
        assert!(err.contains("v.b.dirty"), "{err}");
        let err = braid_fabric_tcp::next_run(&store, 9)
            .unwrap_err()
            .to_string();
        assert!(err.contains("v.run"), "{err}");
    }

    #[test]
    fn a_volume_runs_once_per_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock_volume(dir.path(), "v").unwrap();
        let e = lock_volume(dir.path(), "v").unwrap_err();
        assert!(
            e.starts_with("volume v:")
                && e.contains("in use")
                && e.contains("braid attach --volume"),
            "{e}"
        );
        // Another volume in the same data dir is its own.
        let _other = lock_volume(dir.path(), "w").unwrap();
        drop(first);
        lock_volume(dir.path(), "v").unwrap();
    }

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
        let v = parse(&format!(
            "{LEGS}[map]\nmirror = {{ quorum = 1, legs = [\"a\", \"b\"] }}\n"
        ))
        .unwrap();
        assert!(matches!(
            v.spec().unwrap(),
            VolumeSpec::Mirror {
                quorum: Some(1),
                ..
            }
        ));
        // RAID 10: a stripe over two mirrors, written as inline tables.
        let four = format!(
            "{LEGS}{}",
            LEGS.replace("name = \"v\"\n", "")
                .replace("\"a\"", "\"c\"")
                .replace("\"b\"", "\"d\"")
                .replace("h1:", "h3:")
                .replace("h2:", "h4:")
        );
        let v = parse(&format!(
            "{four}[map]\nstripe = {{ chunk = \"64KiB\", legs = [{{ mirror = [\"a\", \"b\"] }}, \
             {{ mirror = [\"c\", \"d\"] }}] }}\n"
        ))
        .unwrap();
        let pair = |x: &str, y: &str| VolumeSpec::Mirror {
            quorum: None,
            legs: vec![VolumeSpec::Export(x.into()), VolumeSpec::Export(y.into())],
        };
        assert_eq!(
            v.spec().unwrap(),
            VolumeSpec::Stripe {
                chunk: 65536,
                legs: vec![pair("a", "b"), pair("c", "d")]
            }
        );
        let e = parse(&format!(
            "{LEGS}[map]\nmirror = {{ quorum = 3, legs = [\"a\", \"b\"] }}\n"
        ))
        .unwrap_err();
        assert!(e.contains("quorum 3"), "{e}");
        let e = parse(&format!("{LEGS}[map]\nmirror = [\"a\", \"c\"]\n")).unwrap_err();
        assert!(e.contains("\"c\""), "{e}");
        let twice = LEGS.replace("server = \"h2:7410\"", "server = \"h1:7410\"");
        let e = parse(&format!("{twice}[map]\nmirror = [\"a\", \"b\"]\n")).unwrap_err();
        assert!(e.contains("same export"), "{e}");
    }

    #[test]
    fn a_migrated_leg_replaces_the_old_one_in_the_file_and_comments_stay() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.toml");
        let text = format!(
            "# the operator's note\n{LEGS}[map]\n# stripe of one mirror\nstripe = {{ chunk = \"64KiB\", legs = [\"a\", \"b\"] }}\n"
        );
        std::fs::write(&p, &text).unwrap();
        let v = VolumeFile::load(&p).unwrap();
        let new = NewLeg {
            name: "c".into(),
            server: "h3:7410".into(),
            export: "disk9".into(),
            key_file: None,
        };
        let taken = NewLeg {
            server: "h2:7410".into(),
            export: "disk0".into(),
            ..new.clone()
        };
        assert!(v
            .check_replacement("a", &taken)
            .unwrap_err()
            .contains("already disk0 on h2"));
        assert!(v
            .check_replacement("z", &new)
            .unwrap_err()
            .contains("no leg \"z\""));
        v.check_replacement("a", &new).unwrap();
        replace_leg(&p, "a", &new).unwrap();
        let after = std::fs::read_to_string(&p).unwrap();
        assert!(
            after.contains("# the operator's note") && after.contains("# stripe of one mirror")
        );
        let v = VolumeFile::load(&p).unwrap();
        assert_eq!(
            v.spec().unwrap(),
            VolumeSpec::Stripe {
                chunk: 65536,
                legs: vec![
                    VolumeSpec::Export("c".into()),
                    VolumeSpec::Export("b".into())
                ]
            }
        );
        let c = v.legs.iter().find(|l| l.name == "c").unwrap();
        assert_eq!((c.server.as_str(), c.export.as_str()), ("h3:7410", "disk9"));
        assert!(!v.legs.iter().any(|l| l.name == "a"));
        assert_eq!(next_leg_name("a"), "a.1");
        assert_eq!(next_leg_name("a.1"), "a.2");
        assert_eq!(next_leg_name("disk.x"), "disk.x.1");
    }
}

/// `braid volume ...`: operations on an attached volume, through its
/// control socket.
#[derive(clap::Args, Debug)]
pub(crate) struct VolumeArgs {
    #[command(subcommand)]
    action: VolumeAction,
    /// The attached volume's control socket.
    #[arg(long, global = true)]
    control: Option<PathBuf>,
}

#[derive(clap::Subcommand, Debug)]
enum VolumeAction {
    /// DST's suspend: IO goes on without the leg (a mirror leg whose
    /// bytes another leg in sync holds).
    Suspend {
        /// The leg's name in the volume file.
        leg: String,
    },
    /// The suspended leg resyncs what it missed, then serves again.
    Resume {
        /// The leg's name in the volume file.
        leg: String,
    },
    /// Copies a leg to another export (a new server) while the volume is
    /// in use, then switches to it: the volume file is rewritten to name
    /// the new leg and the old one's session is closed. Shows progress
    /// until done.
    Migrate {
        /// The leg to move.
        leg: String,
        /// The new server's address (HOST:PORT).
        server: String,
        /// The export on the new server (default: the old leg's).
        #[arg(long)]
        export: Option<String>,
        /// The new leg's name in the volume file (default: LEG.N).
        #[arg(long)]
        name: Option<String>,
        /// The client key for the new server (default: the old leg's).
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// Return once the copy has started.
        #[arg(long)]
        no_wait: bool,
    },
    /// Rolls the running migration back (the old leg stays).
    Cancel,
}

pub(crate) async fn run(args: VolumeArgs) -> Result<(), String> {
    let control = args.control.ok_or(
        "--control SOCKET is needed: the attached volume's control socket (braid attach prints it)",
    )?;
    let ask = |command: String| {
        let control = control.clone();
        async move {
            let v = crate::control::request(&control, &command).await?;
            match v["error"].as_str() {
                Some(e) => Err(e.to_string()),
                None => Ok(v),
            }
        }
    };
    match args.action {
        VolumeAction::Suspend { leg } => {
            ask(format!("suspend {leg}")).await?;
            println!("leg {leg}: suspended");
        }
        VolumeAction::Resume { leg } => {
            ask(format!("resume {leg}")).await?;
            println!("leg {leg}: resuming (it resyncs what it missed)");
        }
        VolumeAction::Cancel => {
            ask("cancel-migration".into()).await?;
            println!("migration rolled back");
        }
        VolumeAction::Migrate {
            leg,
            server,
            export,
            name,
            key_file,
            no_wait,
        } => {
            let key = key_file.as_ref().map(|k| k.display().to_string());
            let words = [
                Some(&leg),
                Some(&server),
                export.as_ref(),
                name.as_ref(),
                key.as_ref(),
            ];
            if words
                .into_iter()
                .flatten()
                .any(|w| w.contains(char::is_whitespace) || w.is_empty())
            {
                return Err(
                    "leg, server, export, name and key file may not be empty or hold spaces".into(),
                );
            }
            let mut command = format!("migrate {leg} {server}");
            for (flag, v) in [("export", export), ("name", name), ("key-file", key)] {
                if let Some(v) = v {
                    command.push_str(&format!(" {flag}={v}"));
                }
            }
            let v = ask(command).await?;
            let to = v["to"].as_str().unwrap_or("?").to_string();
            println!("migrating leg {leg} to {to} ({server})");
            if !no_wait {
                follow_migration(&control, &leg, &to).await?;
            }
        }
    }
    Ok(())
}

/// Shows the new leg's copy until the migration switches over (or ends
/// otherwise).
async fn follow_migration(control: &Path, from: &str, to: &str) -> Result<(), String> {
    let mut line = crate::progress::ProgressLine::new();
    // The regions to copy: the most seen marked (a stripe leg holds only
    // some of the volume's regions).
    let mut total = 0;
    loop {
        let v = crate::control::request(control, "status").await?;
        let legs = v["legs"].as_array().cloned().unwrap_or_default();
        let leg = |name: &str| {
            legs.iter()
                .find(|l| l["name"] == name && l["state"] != "Retired")
        };
        match (&v["migration"], leg(to)) {
            (serde_json::Value::Null, Some(_)) if leg(from).is_none() => {
                line.finish();
                println!("leg {from} migrated to {to}: the volume file names {to} now");
                return Ok(());
            }
            (serde_json::Value::Null, _) => {
                line.finish();
                let why = v["migration_error"]
                    .as_str()
                    .unwrap_or("it was rolled back");
                return Err(format!(
                    "the migration of {from} to {to} did not finish: {why}"
                ));
            }
            (m, Some(l)) => {
                let left = l["dirty_regions"].as_u64().unwrap_or(0);
                total = total.max(left);
                let regions = total.max(1);
                let done = total - left;
                let phase = if m["switching"] == true {
                    "switching over"
                } else {
                    "copying"
                };
                line.show(format_args!(
                    "{phase}: {done}/{regions} regions ({:.0}%), {} resynced in all",
                    done as f64 * 100.0 / regions as f64,
                    crate::config::human_size(v["bytes_resynced"].as_u64().unwrap_or(0))
                ));
            }
            (_, None) => return Err(format!("the volume has no leg {to}")),
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}
