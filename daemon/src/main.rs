//! The `braid` command.

mod attach;
mod bench;
mod busy_poll;
mod client_args;
mod config;
mod conformance;
mod control;
mod demo;
mod faultproxy;
mod histogram;
mod metrics;
mod nbd;
mod nbd_threads;
mod progress;
mod rdma;
mod reload;
mod runtime_thread;
mod serve;
mod soak;
mod soak_volume;
mod status;
mod systemd;
mod tuning;
mod ublk;
mod verify;
mod volume;

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
    /// Expose a braid volume as a local NBD server (for nbd-client, qemu),
    /// with braid's failover underneath.
    Attach(attach::AttachArgs),
    /// Ask a running `braid attach` to finish in-flight IO and leave.
    Detach(attach::DetachArgs),
    /// Show a running server's sessions or an attached volume's channels.
    Status(status::StatusArgs),
    /// Suspend or resume one leg of an attached volume.
    Volume(volume::VolumeArgs),
    /// Check any braid server against every numbered clause of the
    /// protocol (docs/PROTOCOL.md); exits 1 on any failure.
    Conformance(conformance::ConformanceArgs),
    /// Change a running server's or attached volume's settings (channels,
    /// timers, limits) without a restart.
    Set(tuning::SetArgs),
    /// Make a running server or attach reread its key file (as SIGHUP
    /// does): a server's new keys work at once and channels of withdrawn
    /// ones close; an attach uses its new key from the next handshake.
    Reload(reload::ReloadArgs),
    /// Start a server, a fault proxy and a verifying client; reset, black-hole
    /// and corrupt channels and kill -9 the server under live IO; report.
    Demo(demo::DemoArgs),
    /// Long fault-injection run against real processes (see `braid demo`).
    Soak(soak::SoakArgs),
}

fn main() -> ExitCode {
    keep_payload_buffers_mapped();
    let cli = Cli::parse();
    // The demo and the soak narrate for themselves; the server logs its
    // lifecycle.
    let default_filter = match cli.command {
        Cmd::Demo(_) | Cmd::Soak(_) => "error",
        _ => "warn,braid=info,braid_fabric_tcp=info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    raise_descriptor_limit();
    if matches!(cli.command, Cmd::Status(_) | Cmd::Set(_) | Cmd::Reload(_)) {
        end_quietly_on_a_closed_stdout();
    }
    // One engine runs in one task either way; a single-threaded runtime
    // saves a cross-thread wake-up per hop (measured: QD32 randread 31k ->
    // 39k IOPS here). Only `serve --threads N` asks for more, for TLS-heavy
    // servers (`serve --engines N` gives each engine a thread of its own).
    let threads = match &cli.command {
        Cmd::Serve(args) => args.threads.max(1),
        _ => 1,
    };
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("braid: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Cmd::Demo(args) if args.simulated => return demo::run(args),
        Cmd::Demo(_) => runtime.block_on(soak::demo()),
        Cmd::Soak(args) => runtime.block_on(soak::run(args)),
        Cmd::Serve(args) => runtime.block_on(serve::run(args)),
        Cmd::Bench(args) => runtime.block_on(bench::run(args)),
        Cmd::Verify(args) => runtime.block_on(verify::run(args)),
        Cmd::Status(args) => runtime.block_on(status::run(args)),
        Cmd::Set(args) => runtime.block_on(tuning::run(args)),
        Cmd::Reload(args) => runtime.block_on(reload::run(args)),
        Cmd::Conformance(args) => runtime.block_on(conformance::run(args)),
        Cmd::Volume(args) => runtime.block_on(volume::run(args)),
        Cmd::Attach(args) => runtime.block_on(attach::run(args)),
        Cmd::Detach(args) => runtime.block_on(attach::detach(args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("braid: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `braid status | head`: the report ends quietly when its reader stops
/// reading, as any Unix filter's does, where Rust's default (SIGPIPE
/// ignored) made the next `println!` panic. Only for the commands that just
/// print a report: the others write to sockets, where a peer that has gone
/// must be an error to handle, not a signal that kills the process.
fn end_quietly_on_a_closed_stdout() {
    // SAFETY: restores the default disposition of one signal, before any
    // other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// A TCP connection holds two descriptors (the socket, and the duplicate
/// its engine loop sends on), so the usual soft limit of 1024 would cap a
/// server near 500 connections. Nothing here uses `select(2)`, so the soft
/// limit goes up to the hard one (524288 under systemd), as a daemon's
/// should.
fn raise_descriptor_limit() {
    // SAFETY: getrlimit and setrlimit only read and write the struct given.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 || limit.rlim_cur >= limit.rlim_max
        {
            return;
        }
        let was = limit.rlim_cur;
        limit.rlim_cur = limit.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
            tracing::debug!(
                from = was,
                to = limit.rlim_max,
                "raised the open-file limit"
            );
        } else {
            tracing::warn!(limit = was, "cannot raise the open-file limit");
        }
    }
}

/// Payload buffers up to a few MiB come and go with every large IO. glibc's
/// defaults hand each back to the kernel (an mmap'd chunk, or a trimmed heap
/// top) and fault fresh zeroed pages in for the next: 256 page faults and a
/// page clear per MiB (perf: 5% of a 1 MiB sequential write). Serving them
/// from the heap, and trimming it only past 64 MiB free, keeps the pages;
/// memory stays bounded by the IO in flight plus that slack.
fn keep_payload_buffers_mapped() {
    // SAFETY: mallopt only sets allocator parameters; called before any
    // thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
}

#[cfg(test)]
mod tests {
    fn descriptor_limit() -> libc::rlimit {
        // SAFETY: getrlimit only writes into the struct given.
        unsafe {
            let mut limit: libc::rlimit = std::mem::zeroed();
            assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
            limit
        }
    }

    #[test]
    fn the_open_file_limit_goes_up_to_the_hard_one() {
        let hard = descriptor_limit().rlim_max;
        // From a low soft limit, as a login shell's 1024 would be.
        let low = libc::rlimit {
            rlim_cur: hard.min(256),
            rlim_max: hard,
        };
        // SAFETY: setrlimit only reads the struct given.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &low) }, 0);
        super::raise_descriptor_limit();
        assert_eq!(descriptor_limit().rlim_cur, hard);
    }
}
