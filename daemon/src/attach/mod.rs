//! `braid attach`: a braid volume (the multi-channel client, with its
//! failover, resends and replay) exposed as a local NBD server, so a kernel
//! without ublk gets a block device (`nbd-client -unix`) and qemu can boot
//! from it. `braid detach` asks it to finish in-flight IO and leave.

mod export;
mod faces;
mod legs;
mod status;
mod target;
mod volume;

use crate::client_args::ClientArgs;
use clap::Args;
use std::path::{Path, PathBuf};

pub(crate) use legs::leg_args;
pub(crate) use status::{print_status, print_volume_status};

#[derive(Args, Debug)]
pub(crate) struct AttachArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(flatten)]
    ublk: crate::ublk::UblkArgs,
    /// Serve the volume over NBD on this unix socket path or TCP
    /// host:port; repeatable [default without --ublk:
    /// DATA_DIR/EXPORT.nbd.sock].
    #[arg(long)]
    nbd: Vec<String>,
    /// Allow --nbd on a TCP address other machines reach (NBD has no
    /// authentication: anyone who connects reads and writes the volume).
    #[arg(long)]
    nbd_allow_insecure: bool,
    /// Control socket for `braid status` and `braid detach`
    /// [default: DATA_DIR/EXPORT.attach.sock].
    #[arg(long)]
    control: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9411).
    #[arg(long)]
    metrics: Option<String>,
    /// Attach a volume over several exports (mirror, stripe, linear)
    /// described in this TOML file instead of one export.
    #[arg(long)]
    volume: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub(crate) struct DetachArgs {
    /// The attached volume's control socket.
    #[arg(long)]
    control: PathBuf,
}

impl AttachArgs {
    /// `--control`, or its default for the volume or export `name`.
    fn control_path(&self, data_dir: &Path, name: &str) -> PathBuf {
        self.control
            .clone()
            .unwrap_or_else(|| data_dir.join(format!("{name}.attach.sock")))
    }

    /// `--nbd`'s addresses; without them or `--ublk`, a unix socket in
    /// the data dir named for the volume or export `name`.
    fn nbd_addresses(&self, data_dir: &Path, name: &str) -> Result<Vec<String>, String> {
        if !self.nbd.is_empty() || self.ublk.wanted() {
            return Ok(self.nbd.clone());
        }
        std::fs::create_dir_all(data_dir)
            .map_err(|e| format!("data dir {}: {e}", data_dir.display()))?;
        Ok(vec![data_dir
            .join(format!("{name}.nbd.sock"))
            .display()
            .to_string()])
    }
}

pub(crate) async fn run(args: AttachArgs) -> Result<(), String> {
    match args.volume.clone() {
        Some(path) => volume::run(args, path).await,
        None => export::run(args).await,
    }
}

pub(crate) async fn detach(args: DetachArgs) -> Result<(), String> {
    let v = crate::control::request(&args.control, "detach").await?;
    if let Some(e) = v["error"].as_str() {
        return Err(format!("{}: {e}", args.control.display()));
    }
    println!(
        "detaching {} (in-flight IO finishes first)",
        v["detaching"].as_str().unwrap_or("?")
    );
    Ok(())
}
