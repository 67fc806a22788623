//! Configuration: a TOML file, overridden by flags, over defaults that let
//! `braid serve` run with no setup at all.

use braid_core::auth::Key;
use serde::Deserialize;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Where braid listens unless told otherwise.
pub(crate) const DEFAULT_LISTEN: &str = "127.0.0.1:7410";
/// The key id used when a key file has a single key or none is named.
pub(crate) const DEFAULT_KEY_ID: &str = "default";
/// The export `braid serve` creates when none is configured.
pub(crate) const DEFAULT_EXPORT: &str = "disk0";
pub(crate) const DEFAULT_EXPORT_SIZE: u64 = 1 << 30;
/// The block size every export is served with; sizes are whole blocks.
pub(crate) const EXPORT_BLOCK_SIZE: u32 = 512;

/// `/etc/braid/braid.toml` and friends.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileConfig {
    /// Addresses to listen on.
    pub(crate) listen: Option<Vec<String>>,
    /// Where default exports, the key file and the control socket live.
    pub(crate) data_dir: Option<PathBuf>,
    /// Pre-shared keys (TOML: key id = 64 hex digits).
    pub(crate) key_file: Option<PathBuf>,
    /// Unix socket answering `braid status`.
    pub(crate) control: Option<PathBuf>,
    /// Also serve every export over NBD on these addresses (as --nbd).
    pub(crate) nbd: Option<Vec<String>>,
    /// Serve Prometheus metrics on this address (as --metrics).
    pub(crate) metrics: Option<String>,
    /// As --poll-us: microseconds of socket polling after each IO.
    pub(crate) poll_us: Option<u64>,
    /// As --nbd-threads: threads for NBD connections.
    pub(crate) nbd_threads: Option<usize>,
    /// As --engines: protocol engines, each on a thread of its own.
    pub(crate) engines: Option<usize>,
    /// As --io-engine: "threads" or "uring".
    pub(crate) io_engine: Option<IoEngineArg>,
    /// As --nbd-allow-insecure: NBD without TLS on a network address.
    #[serde(default)]
    pub(crate) nbd_allow_insecure: bool,
    /// Exports.
    #[serde(default)]
    pub(crate) export: Vec<ExportSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ExportSpec {
    pub(crate) name: String,
    pub(crate) path: PathBuf,
    /// Create a sparse file of this size if missing ("1GiB", "512M", bytes).
    pub(crate) size: Option<String>,
    #[serde(default)]
    pub(crate) read_only: bool,
    #[serde(default)]
    pub(crate) direct: bool,
    /// Skip the exclusive lock (read-only exports of files others write).
    #[serde(default)]
    pub(crate) shared: bool,
}

impl ExportSpec {
    /// `NAME=PATH[,size=SIZE][,ro][,direct][,shared]` from the command line.
    pub(crate) fn parse_flag(s: &str) -> Result<Self, String> {
        let (name, rest) = s
            .split_once('=')
            .ok_or_else(|| format!("export {s:?}: expected NAME=PATH[,size=SIZE][,ro]"))?;
        let mut parts = rest.split(',');
        let path = PathBuf::from(parts.next().unwrap_or_default());
        let mut spec = ExportSpec {
            name: name.to_string(),
            path,
            size: None,
            read_only: false,
            direct: false,
            shared: false,
        };
        for p in parts {
            match p.split_once('=') {
                Some(("size", v)) => spec.size = Some(v.to_string()),
                None if p == "ro" => spec.read_only = true,
                None if p == "direct" => spec.direct = true,
                None if p == "shared" => spec.shared = true,
                _ => return Err(format!("export {s:?}: unknown option {p:?}")),
            }
        }
        if spec.name.is_empty() || spec.path.as_os_str().is_empty() {
            return Err(format!("export {s:?}: name and path must not be empty"));
        }
        spec.check()?;
        Ok(spec)
    }

    /// What can be refused before any file is touched.
    pub(crate) fn check(&self) -> Result<(), String> {
        if self.shared && !self.read_only {
            return Err(format!(
                "export {:?}: 'shared' skips the exclusive lock, so it needs 'ro' (read_only = true): two writers corrupt a disk",
                self.name
            ));
        }
        self.create_size().map(|_| ())
    }

    /// The size to create the file with, a whole number of blocks.
    pub(crate) fn create_size(&self) -> Result<Option<u64>, String> {
        let Some(text) = self.size.as_deref() else {
            return Ok(None);
        };
        let size = parse_size(text).map_err(|e| format!("export {:?}: {e}", self.name))?;
        let block = u64::from(EXPORT_BLOCK_SIZE);
        if size == 0 || size % block != 0 {
            let down = size / block * block;
            let up = down + block;
            return Err(format!(
                "export {:?}: size {text} ({size} bytes) is not a whole number of {block}-byte blocks; use {}{up}",
                self.name,
                if down > 0 { format!("{down} or ") } else { String::new() },
            ));
        }
        Ok(Some(size))
    }
}

pub(crate) fn load(path: &Path) -> Result<FileConfig, String> {
    let text = fs::read_to_string(path).map_err(|e| format!("config {}: {e}", path.display()))?;
    parse(&text).map_err(|e| format!("config {}: {e}", path.display()))
}

/// A configuration file's text: its syntax, its fields and every export's
/// checks (sizes, `shared` only with `read_only`), before anything is
/// opened or created.
pub(crate) fn parse(text: &str) -> Result<FileConfig, String> {
    let config: FileConfig = toml::from_str(text).map_err(|e| e.to_string())?;
    for spec in &config.export {
        spec.check()?;
    }
    Ok(config)
}

/// Opens `path` (made if missing) and locks it for as long as the returned
/// file lives. `in_use` says what it means that another process holds it.
pub(crate) fn hold_lock(
    path: &Path,
    in_use: impl FnOnce(&std::io::Error) -> String,
) -> Result<fs::File, String> {
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| format!("lock {}: {e}", path.display()))?;
    braid_backend_file::lock::lock(&f, path, braid_backend_file::lock::LockMode::Exclusive)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock => in_use(&e),
            _ => e.to_string(),
        })?;
    Ok(f)
}

/// Locks `DATA_DIR/serve.lock` for as long as the returned file lives and
/// writes our pid into it for people reading the directory.
pub(crate) fn lock_data_dir(dir: &Path) -> Result<fs::File, String> {
    let mut f = hold_lock(&dir.join("serve.lock"), |e| {
        format!(
            "data dir {}: {e} (another braid serve uses it; give this one its own --data-dir)",
            dir.display()
        )
    })?;
    let _ = f.set_len(0);
    let _ = writeln!(f, "{}", std::process::id());
    Ok(f)
}

/// `$STATE_DIRECTORY` (systemd's StateDirectory=), else the XDG data dir.
pub(crate) fn default_data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("STATE_DIRECTORY") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(d).join("braid");
    }
    if let Some(home) = std::env::var_os("HOME") {
        return PathBuf::from(home).join(".local/share/braid");
    }
    PathBuf::from("braid-data")
}

/// "1GiB", "1G", "512M", "64k", "4096".
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("size {s:?}: expected a number with an optional unit"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => return Err(format!("size {s:?}: unknown unit {other:?}")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

pub(crate) fn human_size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

pub(crate) fn random_bytes<const N: usize>() -> io::Result<[u8; N]> {
    let mut b = [0u8; N];
    fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    if s.len() % 2 != 0 || s.len() < 32 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

/// Reads a key file: `key_id = "hex"` lines.
pub(crate) fn read_keys(path: &Path) -> Result<Vec<(String, Key)>, String> {
    let text = fs::read_to_string(path).map_err(|e| format!("key file {}: {e}", path.display()))?;
    let table: toml::Table =
        toml::from_str(&text).map_err(|e| format!("key file {}: {e}", path.display()))?;
    let mut keys = Vec::new();
    for (id, v) in table {
        let bytes = v.as_str().and_then(unhex).ok_or_else(|| {
            format!(
                "key file {}: key {id:?} must be at least 32 hex digits",
                path.display()
            )
        })?;
        keys.push((id, Key::new(bytes)));
    }
    if keys.is_empty() {
        return Err(format!("key file {}: no keys", path.display()));
    }
    Ok(keys)
}

/// Picks `key_id` from a key file (or its only key).
pub(crate) fn client_key(path: &Path, key_id: Option<&str>) -> Result<(String, Key), String> {
    let keys = read_keys(path)?;
    match key_id {
        Some(id) => keys
            .into_iter()
            .find(|(k, _)| k == id)
            .ok_or_else(|| format!("key file {}: no key {id:?}", path.display())),
        None if keys.len() == 1 => Ok(keys.into_iter().next().unwrap()),
        None => keys
            .into_iter()
            .find(|(k, _)| k == DEFAULT_KEY_ID)
            .ok_or_else(|| {
                format!(
                    "key file {}: several keys; name one with --key-id",
                    path.display()
                )
            }),
    }
}

/// Creates a key file with one fresh key, readable by its owner only.
pub(crate) fn create_key_file(path: &Path) -> Result<(), String> {
    let key: [u8; 32] = random_bytes().map_err(|e| format!("/dev/urandom: {e}"))?;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("key file {}: {e}", path.display()))?;
    writeln!(
        f,
        "# braid pre-shared keys: key id = 64 hex digits. Clients need a copy."
    )
    .and_then(|_| writeln!(f, "{DEFAULT_KEY_ID} = \"{}\"", hex(&key)))
    .map_err(|e| format!("key file {}: {e}", path.display()))
}

/// What the fuzz target `config_parsers` holds every input to (as a TOML
/// file, an `--export` flag and a size); CI runs it over seeded random
/// inputs in the tests below.
#[cfg(any(test, fuzzing))]
pub(crate) fn exercise_parsers(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(c) = parse(&text) {
        for e in &c.export {
            let size = e.create_size().expect("parse checked it");
            assert!(size.is_none_or(|s| s > 0 && s % u64::from(EXPORT_BLOCK_SIZE) == 0));
            assert!(!e.shared || e.read_only);
        }
    }
    if let Ok(e) = ExportSpec::parse_flag(&text) {
        assert!(!e.name.is_empty() && !e.path.as_os_str().is_empty());
        assert!(e.check().is_ok());
    }
    let _ = parse_size(&text);
}

/// How backend operations that may wait for a device run (`--io-engine`,
/// `io_engine` in the config file).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub(crate) enum IoEngineArg {
    /// A pool thread blocked on each.
    Threads,
    /// io_uring, on the protocol engine's loop.
    #[default]
    Uring,
}

impl From<IoEngineArg> for braid_backend_file::IoEngine {
    fn from(e: IoEngineArg) -> Self {
        match e {
            IoEngineArg::Threads => braid_backend_file::IoEngine::Threads,
            IoEngineArg::Uring => braid_backend_file::IoEngine::Uring,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parsers_take_arbitrary_input() {
        let mut rng = braid_core::rng::SplitMix64::new(9);
        let pieces: &[&str] = &[
            "[[export]]\n",
            "name = \"a\"\n",
            "path = \"/tmp/x\"\n",
            "size = \"",
            "12345",
            "1G",
            "\"\n",
            "read_only = true\n",
            "shared = true\n",
            "listen = [\"",
            "=",
            ",",
            "size=",
            "ro",
            "shared",
            "direct",
            "0",
            "99999999999999999999T",
            "\u{0}",
            "é",
            "nbd_allow_insecure = true\n",
            "x=/p",
        ];
        for _ in 0..3000 {
            let mut text = String::new();
            for _ in 0..rng.below(12) {
                text.push_str(pieces[rng.below(pieces.len() as u64) as usize]);
            }
            exercise_parsers(text.as_bytes());
            let raw: Vec<u8> = (0..rng.below(64)).map(|_| rng.next_u64() as u8).collect();
            exercise_parsers(&raw);
        }
    }

    #[test]
    fn sizes_parse_with_units_and_refuse_nonsense() {
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn export_flags_parse() {
        let e = ExportSpec::parse_flag("db=/dev/sdb,ro").unwrap();
        assert_eq!((e.name.as_str(), e.read_only), ("db", true));
        let e = ExportSpec::parse_flag("x=/tmp/x.img,size=2G").unwrap();
        assert_eq!(e.size.as_deref(), Some("2G"));
        assert!(ExportSpec::parse_flag("nopath").is_err());
        assert!(ExportSpec::parse_flag("a=/b,bogus").is_err());
    }

    #[test]
    fn a_created_key_file_reads_back_and_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("keys.toml");
        create_key_file(&p).unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let (id, _) = client_key(&p, None).unwrap();
        assert_eq!(id, DEFAULT_KEY_ID);
        assert!(create_key_file(&p).is_err(), "never overwrites a key");
    }

    #[test]
    fn unknown_config_keys_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("braid.toml");
        fs::write(&p, "listen = [\"127.0.0.1:1\"]\nlisten_typo = 3\n").unwrap();
        assert!(load(&p).unwrap_err().contains("listen_typo"));
        fs::write(&p, "listen = [\"127.0.0.1:1\"]\n[[export]]\nname = \"a\"\npath = \"/tmp/a\"\nsize = \"1G\"\n").unwrap();
        let c = load(&p).unwrap();
        assert_eq!(c.export[0].size.as_deref(), Some("1G"));
    }

    #[test]
    fn the_io_engine_is_one_of_two_names() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("braid.toml");
        for (text, engine) in [
            ("threads", IoEngineArg::Threads),
            ("uring", IoEngineArg::Uring),
        ] {
            fs::write(&p, format!("io_engine = \"{text}\"\n")).unwrap();
            assert_eq!(load(&p).unwrap().io_engine, Some(engine));
        }
        fs::write(&p, "io_engine = \"epoll\"\n").unwrap();
        let e = load(&p).unwrap_err();
        assert!(e.contains("epoll") && e.contains("uring"), "{e}");
        assert_eq!(IoEngineArg::default(), IoEngineArg::Uring);
    }
}
