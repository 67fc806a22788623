//! The `braid` command.

mod bench;
mod client_args;
mod config;
mod demo;
mod histogram;
mod serve;
mod status;
mod verify;

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
    /// Serve exports (with no flags: a 1 GiB sparse file on 127.0.0.1:7410).
    Serve(serve::ServeArgs),
    /// Measure throughput and latency through the whole protocol.
    Bench(bench::BenchArgs),
    /// Write and check a verifiable pattern; exits 1 on any mismatch.
    Verify(verify::VerifyArgs),
    /// Show a running server's sessions and counters.
    Status(status::StatusArgs),
    /// Run a client and a server under every fault class, verify every IO,
    /// and report what happened (in-process simulated network and disk).
    Demo(demo::DemoArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,braid=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("braid: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Cmd::Demo(args) => return demo::run(args),
        Cmd::Serve(args) => runtime.block_on(serve::run(args)),
        Cmd::Bench(args) => runtime.block_on(bench::run(args)),
        Cmd::Verify(args) => runtime.block_on(verify::run(args)),
        Cmd::Status(args) => runtime.block_on(status::run(args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("braid: {e}");
            ExitCode::FAILURE
        }
    }
}
