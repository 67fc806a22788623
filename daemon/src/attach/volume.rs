//! `braid attach --volume FILE`: a session on every leg, the volume driver
//! over them, served locally, with a control socket that also suspends,
//! resumes and migrates legs.

use super::faces::{FaceSettings, Faces};
use super::legs::{connect_legs, leg_args};
use super::target::{Sink, VolumeTarget};
use super::AttachArgs;
use crate::client_args::ClientArgs;
use crate::control::{later, now, Answer};
use braid_fabric_tcp::Volume;
use braid_frontend_nbd::{NbdExport, Target};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::Notify;

pub(super) async fn run(mut args: AttachArgs, path: PathBuf) -> Result<(), String> {
    let file = crate::volume::VolumeFile::load(&path)?;
    let data_dir = crate::config::default_data_dir();
    std::fs::create_dir_all(&data_dir)
        .map_err(|e| format!("data dir {}: {e}", data_dir.display()))?;
    let control = args.control_path(&data_dir, &file.name);
    crate::control::ensure_unused(&control)?;
    // Before the run is claimed: a refused second run changes nothing.
    let _volume_lock = crate::volume::lock_volume(&data_dir, &file.name)?;
    let store = Arc::new(crate::volume::FileLogStore {
        dir: data_dir.clone(),
        volume: file.name.clone(),
    });
    // Before any leg connects: the legs' servers then end every session
    // an earlier run of this volume left (docs/PROTOCOL.md §7.3).
    let run = claim_run(&*store, &file.name, &data_dir)?;
    args.client.identity = Some(run);
    crate::ublk::preflight(&args.ublk)?;
    let metrics = crate::metrics::MetricsListener::bind_if_asked(args.metrics.as_deref())?;
    let (volume, legs, max_payload) = start_volume(&file, &path, &args.client, store).await?;
    let nbd = args.nbd_addresses(&data_dir, &file.name)?;
    let faces = match start_faces(&args, &nbd, &file.name, &volume, max_payload).await {
        Ok(f) => f,
        Err(e) => {
            volume.close().await;
            return Err(e);
        }
    };
    let block_device = faces.block_device();
    announce(
        &file,
        &volume,
        &faces.uris,
        block_device.as_deref(),
        &control,
    );
    if let Some(m) = metrics {
        println!("metrics:  {}", m.url());
        m.serve_volume(volume.clone());
    }
    // Before the control socket answers and systemd hears READY (see
    // the export's attach).
    let (reloaded, client_args, volume_path) = (
        (legs.clone(), volume.clone()),
        args.client.clone(),
        path.clone(),
    );
    crate::reload::on_hangup_spawned(move || {
        let ((legs, volume), client_args, path) =
            (reloaded.clone(), client_args.clone(), volume_path.clone());
        async move { crate::reload::leg_keys(&legs, &client_args, &path, &volume).await }
    })?;
    let detach = Arc::new(Notify::new());
    let controls = VolumeControl {
        volume: volume.clone(),
        detach: detach.clone(),
        name: file.name.clone(),
        block_device: block_device.clone(),
        client_args: args.client.clone(),
        path: path.clone(),
        legs,
    };
    let answer = move |command: &str| controls.answer(command);
    faces
        .serve_until_detached(&file.name, control, answer, &detach)
        .await;
    volume.close().await;
    println!("braid attach: volume detached");
    Ok(())
}

/// A session on every leg and the volume driver over them; also the
/// legs' clients, as reloads and migrations change them, and the largest
/// IO every leg takes.
async fn start_volume(
    file: &crate::volume::VolumeFile,
    path: &Path,
    client_args: &ClientArgs,
    store: Arc<crate::volume::FileLogStore>,
) -> Result<(Volume, crate::reload::LegClients, u32), String> {
    let (map, clients, max_payload) = connect_legs(file, path, client_args).await?;
    let legs: crate::reload::LegClients = Arc::new(std::sync::Mutex::new(crate::reload::Legs {
        clients: clients.clone(),
        joining: None,
    }));
    let mut config = file.config()?;
    config.max_leg_io = u64::from(max_payload);
    let volume = Volume::start(map, clients, config, store, file.leg_timeout()?)
        .map_err(|e| format!("volume {}: {e}", file.name))?;
    Ok((volume, legs, max_payload))
}

/// The volume served over NBD at `nbd` and, if asked, as a ublk device.
async fn start_faces(
    args: &AttachArgs,
    nbd: &[String],
    name: &str,
    volume: &Volume,
    max_payload: u32,
) -> Result<Faces, String> {
    let target: Arc<dyn Target> = Arc::new(VolumeTarget {
        sink: Sink::Legs(volume.clone()),
        max_part: max_payload,
    });
    let settings = FaceSettings {
        nbd,
        nbd_allow_insecure: args.nbd_allow_insecure,
        ublk: &args.ublk,
        export: NbdExport {
            block_min: volume.block_size(),
            ..NbdExport::new(name.to_string(), volume.size(), 0)
        },
        geometry: crate::ublk::Volume {
            size: volume.size(),
            block_size: volume.block_size(),
            read_only: false,
            max_request: max_payload,
        },
    };
    Faces::start(settings, target).await
}

/// Where the attached volume is reached, for whoever started it.
fn announce(
    file: &crate::volume::VolumeFile,
    volume: &Volume,
    uris: &[String],
    block_device: Option<&str>,
    control: &Path,
) {
    for uri in uris {
        println!("nbd:      {uri}");
    }
    println!(
        "braid volume {:?} ({}) over {} legs attached",
        file.name,
        crate::config::human_size(volume.size()),
        file.legs.len()
    );
    if let Some(path) = block_device {
        println!("device:   {path}");
    }
    println!("status:   braid status --control {}", control.display());
}

/// What the control socket of an attached volume answers from.
struct VolumeControl {
    volume: Volume,
    detach: Arc<Notify>,
    name: String,
    block_device: Option<String>,
    /// The client flags every leg starts from.
    client_args: ClientArgs,
    /// The volume file.
    path: PathBuf,
    legs: crate::reload::LegClients,
}

impl VolumeControl {
    fn answer(&self, command: &str) -> Answer {
        let words: Vec<&str> = command.split_whitespace().collect();
        match words.as_slice() {
            ["status"] => {
                let mut doc = super::status::volume_document(&self.volume, &self.name, &self.legs);
                doc["ublk"] = self.block_device.clone().into();
                now(doc)
            }
            ["detach"] => {
                self.detach.notify_one();
                now(serde_json::json!({ "detaching": self.name }))
            }
            ["suspend", leg] | ["resume", leg] => {
                let (volume, leg, suspend) =
                    (self.volume.clone(), leg.to_string(), words[0] == "suspend");
                later(async move {
                    if suspend {
                        volume.suspend(&leg).await?;
                    } else {
                        volume.resume(&leg).await?;
                    }
                    Ok(serde_json::json!({ "leg": leg, "done": words_done(suspend) }))
                })
            }
            ["migrate", leg, server, options @ ..] => {
                let request = MigrateRequest::parse(leg, server, options);
                let (volume, client_args, path, legs) = (
                    self.volume.clone(),
                    self.client_args.clone(),
                    self.path.clone(),
                    self.legs.clone(),
                );
                later(async move {
                    let (from, new) = request?;
                    let at = Migration {
                        volume: &volume,
                        base: &client_args,
                        path: &path,
                        legs: &legs,
                    };
                    start_migration(at, &from, new).await
                })
            }
            ["reload"] => {
                let (legs, client_args, path, volume) = (
                    self.legs.clone(),
                    self.client_args.clone(),
                    self.path.clone(),
                    self.volume.clone(),
                );
                later(async move {
                    let said = crate::reload::leg_keys(&legs, &client_args, &path, &volume).await?;
                    Ok(serde_json::json!({ "keys": said }))
                })
            }
            ["cancel-migration"] => {
                let volume = self.volume.clone();
                later(async move {
                    volume.cancel_migration().await?;
                    Ok(serde_json::json!({ "done": "rolled back" }))
                })
            }
            _ => now(serde_json::json!({
                "error": format!("unknown command {command:?} (a volume answers: status, detach, suspend LEG, resume LEG, migrate LEG SERVER [export=E] [name=N] [key-file=F], cancel-migration, reload)")
            })),
        }
    }
}

/// `migrate LEG SERVER [export=E] [name=N] [key-file=F]` as the control
/// socket receives it.
struct MigrateRequest;

impl MigrateRequest {
    fn parse(
        leg: &str,
        server: &str,
        options: &[&str],
    ) -> Result<(String, crate::volume::NewLeg), String> {
        let mut new = crate::volume::NewLeg {
            name: crate::volume::next_leg_name(leg),
            server: server.to_string(),
            export: String::new(),
            key_file: None,
        };
        for o in options {
            match o.split_once('=') {
                Some(("export", v)) => new.export = v.to_string(),
                Some(("name", v)) => new.name = v.to_string(),
                Some(("key-file", v)) => new.key_file = Some(v.into()),
                _ => return Err(format!("migrate: unknown option {o:?}")),
            }
        }
        Ok((leg.to_string(), new))
    }
}

/// What a migration started from the control socket works on.
struct Migration<'a> {
    volume: &'a Volume,
    /// The client flags every leg starts from.
    base: &'a ClientArgs,
    /// The volume file.
    path: &'a Path,
    /// Every leg's client, for `reload`; the new leg's joins them.
    legs: &'a crate::reload::LegClients,
}

/// Connects the new leg (as the volume's other legs connect) and hands it
/// to the volume, which copies and switches; the switch rewrites the
/// volume file.
async fn start_migration(
    at: Migration<'_>,
    from: &str,
    mut new: crate::volume::NewLeg,
) -> Result<serde_json::Value, String> {
    let Migration {
        volume,
        base,
        path,
        legs,
    } = at;
    let file = crate::volume::VolumeFile::load(path)?;
    let old = file
        .legs
        .iter()
        .find(|l| l.name == from)
        .ok_or_else(|| format!("the volume file has no leg {from:?}"))?;
    if new.export.is_empty() {
        new.export = old.export.clone();
    }
    if new.key_file.is_none() {
        new.key_file = old.key_file.clone();
    }
    file.check_replacement(from, &new)?;
    let leg = crate::volume::LegFile {
        name: new.name.clone(),
        server: new.server.clone(),
        export: new.export.clone(),
        key_file: new.key_file.clone(),
    };
    let args = leg_args(base, &leg);
    let client = args.connect().await.map_err(|e| {
        format!(
            "new leg {:?} ({} on {}): {e}",
            new.name, new.export, new.server
        )
    })?;
    let (path, from_name, to) = (path.to_path_buf(), from.to_string(), new.name.clone());
    let store: braid_fabric_tcp::StoreMap =
        Arc::new(move || crate::volume::replace_leg(&path, &from_name, &new));
    {
        let mut legs = legs.lock().unwrap();
        legs.clients.insert(to.clone(), client.clone());
        legs.joining = Some((to.clone(), args));
    }
    volume.migrate(from, &to, client, store).await?;
    Ok(serde_json::json!({ "from": from, "to": to }))
}

fn words_done(suspend: bool) -> &'static str {
    if suspend {
        "suspended"
    } else {
        "resuming"
    }
}

/// Claims this run of volume `name`: the next epoch after the one stored
/// in `data_dir`, stored durably.
fn claim_run(
    store: &dyn braid_fabric_tcp::LogStore,
    name: &str,
    data_dir: &Path,
) -> Result<braid_core::client::Identity, String> {
    let fresh_owner = u64::from_le_bytes(crate::config::random_bytes().map_err(|e| e.to_string())?);
    let run = braid_fabric_tcp::next_run(store, fresh_owner).map_err(|e| {
        format!(
            "volume {name}: claiming its run in {}: {e}",
            data_dir.display()
        )
    })?;
    tracing::info!(
        volume = name,
        owner = format_args!("{:#x}", run.owner),
        epoch = run.epoch,
        "volume run claimed"
    );
    Ok(run)
}
