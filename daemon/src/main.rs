//! The `braid` command.

mod demo;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// braid: a network block device that survives the network, servers and
/// daemons misbehaving.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a client and a server under every fault class, verify every IO,
    /// and report what happened (in-process simulated network and disk).
    Demo(demo::DemoArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Demo(args) => demo::run(args),
    }
}
