//! `braid attach` of one export: its session, served locally, with a
//! control socket for status, detach, runtime tuning and reload.

use super::faces::{FaceSettings, Faces};
use super::target::{Sink, VolumeTarget};
use super::AttachArgs;
use crate::client_args::ClientArgs;
use crate::control::{later, now, Answer};
use braid_core::wire::EXPORT_READ_ONLY;
use braid_fabric_tcp::Client;
use braid_frontend_nbd::{NbdExport, Target};
use std::sync::Arc;
use tokio::sync::Notify;

pub(super) async fn run(args: AttachArgs) -> Result<(), String> {
    let export = args.client.export.clone();
    let data_dir = crate::config::default_data_dir();
    let control = args.control_path(&data_dir, &export);
    // Before connecting: a second attach of one volume must not take the
    // first one's sockets over.
    crate::control::ensure_unused(&control)?;
    crate::ublk::preflight(&args.ublk)?;
    let metrics = crate::metrics::MetricsListener::bind_if_asked(args.metrics.as_deref())?;
    let client = args.client.connect().await?;
    let nbd = args.nbd_addresses(&data_dir, &export)?;
    let faces = match start_faces(&args, &nbd, &client).await {
        Ok(f) => f,
        Err(e) => {
            client.close().await;
            return Err(e);
        }
    };
    let block_device = faces.block_device();
    announce(
        &args.client,
        &client,
        &faces.uris,
        &nbd,
        block_device.as_deref(),
        &control,
    );
    if let Some(m) = metrics {
        println!("metrics:  {}", m.url());
        m.serve_client(client.clone(), export.clone());
    }
    // Before the control socket answers and systemd hears READY: a
    // reload sent then must find the handler, not SIGHUP's default, which
    // ends the process.
    let (reloaded, client_args) = (client.clone(), args.client.clone());
    crate::reload::on_hangup_spawned(move || {
        let (client, client_args) = (reloaded.clone(), client_args.clone());
        async move { crate::reload::client_key(&client, &client_args).await }
    })?;
    let detach = Arc::new(Notify::new());
    let controls = ExportControl {
        client: client.clone(),
        detach: detach.clone(),
        uris: faces.uris.clone(),
        server: args.client.server(),
        client_args: args.client.clone(),
        export: export.clone(),
        block_device: block_device.clone(),
    };
    let answer = move |command: &str| controls.answer(command);
    // NBD clients' and the block device's in-flight requests finish
    // first, then the session ends.
    faces
        .serve_until_detached(&export, control, answer, &detach)
        .await;
    crate::client_args::print_channels(&client);
    client.close().await;
    println!("braid attach: detached");
    Ok(())
}

/// The export served over NBD at `nbd` and, if asked, as a ublk device,
/// with the size, block size and writability its server gave.
async fn start_faces(args: &AttachArgs, nbd: &[String], client: &Client) -> Result<Faces, String> {
    let info = client.info();
    let read_only = info.flags & EXPORT_READ_ONLY != 0;
    let target: Arc<dyn Target> = Arc::new(VolumeTarget {
        sink: Sink::Export(client.clone()),
        // Whole blocks, and at least one (a server that allowed less
        // would accept no request at all).
        max_part: (info.max_payload - info.max_payload % info.block_size).max(info.block_size),
    });
    let settings = FaceSettings {
        nbd,
        nbd_allow_insecure: args.nbd_allow_insecure,
        ublk: &args.ublk,
        export: NbdExport {
            read_only,
            block_min: info.block_size,
            ..NbdExport::new(args.client.export.clone(), info.size, 0)
        },
        geometry: crate::ublk::Volume {
            size: info.size,
            block_size: info.block_size,
            read_only,
            max_request: info.max_payload,
        },
    };
    Faces::start(settings, target).await
}

/// Where the attached export is reached and how to see to it, for
/// whoever started it.
fn announce(
    client_args: &ClientArgs,
    client: &Client,
    uris: &[String],
    nbd: &[String],
    block_device: Option<&str>,
    control: &std::path::Path,
) {
    let export = &client_args.export;
    println!(
        "braid volume {export:?} ({}) from {} attached",
        crate::config::human_size(client.info().size),
        client_args.server()
    );
    if let Some(path) = block_device {
        println!("device:   {path}");
    }
    for (uri, addr) in uris.iter().zip(nbd) {
        println!("nbd:      {uri}");
        if addr.contains('/') {
            println!("          nbd-client -N {export} -u {addr} /dev/nbd0   (as root)");
        }
    }
    println!("status:   braid status --control {}", control.display());
    println!("detach:   braid detach --control {}", control.display());
}

/// What the control socket of an attached export answers from.
struct ExportControl {
    client: Client,
    detach: Arc<Notify>,
    uris: Vec<String>,
    server: String,
    client_args: ClientArgs,
    export: String,
    block_device: Option<String>,
}

impl ExportControl {
    fn answer(&self, command: &str) -> Answer {
        match command {
            "status" => {
                let mut doc =
                    super::status::document(&self.client, &self.server, &self.export, &self.uris);
                doc["ublk"] = self.block_device.clone().into();
                return now(doc);
            }
            "detach" => {
                self.detach.notify_one();
                return now(serde_json::json!({"detaching": self.export}));
            }
            "reload" => {
                let (client, client_args) = (self.client.clone(), self.client_args.clone());
                return later(async move {
                    let said = crate::reload::client_key(&client, &client_args).await?;
                    Ok(serde_json::json!({ "keys": said }))
                });
            }
            _ => {}
        }
        if let Some(settings) = command.strip_prefix("set ") {
            let tuning = match crate::tuning::parse_client(settings) {
                Ok(t) => t,
                Err(e) => return now(serde_json::json!({ "error": e })),
            };
            let client = self.client.clone();
            return later(async move {
                client.tune(tuning).await?;
                Ok(
                    serde_json::json!({ "tuning": crate::tuning::client_json(&client.status().tuning) }),
                )
            });
        }
        now(serde_json::json!({
            "error": format!("unknown command {command:?} (attach answers: status, detach, set KEY=VALUE..., reload)")
        }))
    }
}
