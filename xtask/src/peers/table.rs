//! The peer table: throughput, CPU per IO and latency per workload and
//! column, then the QD1 floor and the braid processes' memory.

use super::{Results, Row, WORKLOADS};

pub(crate) const PEERS: [&str; 3] = ["nbdkit", "qemu-nbd", "nbd-server"];

pub(crate) fn print(results: &Results, columns: &[&str], transports: &[bool]) {
    let numeric: Vec<&str> = columns.iter().copied().filter(|c| *c != "floor").collect();
    let get = |unix: bool, column: &str, w: &str| -> Option<&Row> {
        results.rows.get(&(unix, column.to_string()))?.get(w)
    };
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "-".into(),
    };

    println!();
    println!(
        "throughput: IOPS (MiB/s for seq); limit = fio io_uring on the file, proto = braid bench,"
    );
    println!("attach = fio over NBD into braid attach, which carries the IO to braid serve,");
    println!(
        "ublk = fio (io_uring, O_DIRECT) on /dev/ublkbN of braid attach --ublk (TCP pass only)"
    );
    header(&numeric, &["braid/best", "attach/braid"]);
    for &unix in transports {
        for w in WORKLOADS {
            let seq = w.starts_with("seq");
            let value = |r: &Row| if seq { r.mib } else { r.iops };
            let mut line = lead(unix, w);
            for c in &numeric {
                line += &cell(get(unix, c, w).map(value), 0);
            }
            let (over_best, attach_over_braid) = round_ratios(results, unix, w);
            let shown = |r: Option<f64>| r.map_or("-".into(), |r| format!("{r:.2}x"));
            line += &format!(" {:>12}", shown(over_best));
            line += &format!(" {:>12}", shown(attach_over_braid));
            println!("{line}");
        }
    }

    println!();
    println!("CPU per IO, client + server (µs; fio is the client of every NBD row,");
    println!("attach's server side is braid attach and braid serve together)");
    header(&numeric, &["braid/best"]);
    for &unix in transports {
        for w in WORKLOADS {
            let mut line = lead(unix, w);
            for c in &numeric {
                line += &cell(get(unix, c, w).map(Row::cpu_per_io), 1);
            }
            // Less CPU is better: the best peer is the least.
            let least = PEERS
                .iter()
                .filter_map(|p| get(unix, p, w).map(Row::cpu_per_io))
                .reduce(f64::min);
            line += &format!(
                " {:>12}",
                ratio(get(unix, "braid", w).map(Row::cpu_per_io), least)
            );
            println!("{line}");
        }
    }

    println!();
    println!("latency: mean / p99 (µs)");
    header(&numeric, &[]);
    for &unix in transports {
        for w in WORKLOADS {
            let mut line = lead(unix, w);
            for c in &numeric {
                let v = get(unix, c, w).map(|r| format!("{:.0}/{:.0}", r.lat, r.p99));
                line += &format!(" {:>11}", v.unwrap_or_else(|| "-".into()));
            }
            println!("{line}");
        }
    }

    println!();
    println!(
        "steal: the machine's CPU the hypervisor took during each kept run (%; a run over {:.0}% was taken again, up to {} runs, and the least stolen kept)",
        super::steal::LIMIT_PERCENT,
        super::steal::ATTEMPTS
    );
    header(&numeric, &[]);
    for &unix in transports {
        for w in WORKLOADS {
            let mut line = lead(unix, w);
            for c in &numeric {
                line += &cell(get(unix, c, w).map(|r| r.steal), 0);
            }
            println!("{line}");
        }
    }

    if let Some(f) = &results.floor {
        println!();
        println!(
            "QD1 floor, bare TCP ping-pong between two processes, p50 (µs): sleeping read-shaped {:.1}, write-shaped {:.1}; polling {:.1}, {:.1}",
            f.read_p50, f.write_p50, f.read_p50_polling, f.write_p50_polling
        );
        for (w, sleeping, polling) in [
            ("randread-4k-qd1", f.read_p50, f.read_p50_polling),
            ("randwrite-4k-qd1", f.write_p50, f.write_p50_polling),
        ] {
            if let Some(p50) = get(false, "proto", w).and_then(|r| r.p50) {
                println!(
                    "  braid protocol {w} p50 {p50:.0} µs: {:.2}x the sleeping floor, {:.2}x the polling floor",
                    p50 / sleeping,
                    p50 / polling
                );
            }
        }
    }

    if let Some(pairs) = &results.floor_pairs {
        println!(
            "  paired (the polling floor measured just before each 1 s braid run, so both see the machine at one speed):"
        );
        for (w, shape) in [
            ("randread-4k-qd1", &pairs.read),
            ("randwrite-4k-qd1", &pairs.write),
        ] {
            let each: Vec<String> = shape
                .iter()
                .map(|(floor, braid)| format!("{braid:.0}/{floor:.1}"))
                .collect();
            if let Some(m) = super::floor::median_ratio(shape) {
                println!(
                    "  braid protocol {w}: median {m:.2}x the polling floor over {} pairs (braid/floor µs: {})",
                    shape.len(),
                    each.join(" ")
                );
            }
        }
    }

    if !results.memory.is_empty() {
        println!();
        println!(
            "resident memory of braid processes (MiB, idle -> peak over the run; \
             not counting the export files they map to send from and receive into):"
        );
        for m in &results.memory {
            println!(
                "  {:<7} {:<4} braid {:<7} {:>7.1} -> {:>7.1}",
                m.column,
                m.transport,
                m.process,
                m.idle_kib as f64 / 1024.0,
                m.peak_kib as f64 / 1024.0
            );
        }
    }
}

fn header(columns: &[&str], ratios: &[&str]) {
    let mut line = format!("{:<6} {:<22}", "", "workload");
    for c in columns {
        line += &format!(" {c:>11}");
    }
    for r in ratios {
        line += &format!(" {r:>12}");
    }
    println!("{line}");
}

pub(crate) fn lead(unix: bool, workload: &str) -> String {
    format!("{:<6} {workload:<22}", if unix { "unix" } else { "tcp" })
}

fn cell(v: Option<f64>, decimals: usize) -> String {
    match v {
        Some(v) => format!(" {v:>11.decimals$}"),
        None => format!(" {:>11}", "-"),
    }
}

/// braid's NBD face over the best peer, and attach over braid, in each
/// round and their median: on shared cores a round's columns share its
/// noise, so a ratio within a round is steadier than a ratio of medians.
pub(crate) fn print_round_ratios(rounds: &[Results], transports: &[bool]) {
    if rounds.len() < 2 {
        return;
    }
    println!();
    println!("throughput ratios in each round, then their median");
    println!(
        "{:<6} {:<22} {:>24} {:>8} {:>24} {:>8}",
        "", "workload", "braid/best per round", "median", "attach/braid per round", "median"
    );
    for &unix in transports {
        for w in WORKLOADS {
            let (best, attach): (Vec<f64>, Vec<f64>) = rounds
                .iter()
                .map(|r| round_ratios(r, unix, w))
                .fold((Vec::new(), Vec::new()), |(mut b, mut a), (rb, ra)| {
                    b.extend(rb);
                    a.extend(ra);
                    (b, a)
                });
            println!(
                "{} {:>24} {:>8} {:>24} {:>8}",
                lead(unix, w),
                listed(&best),
                median(&best).map_or("-".into(), |m| format!("{m:.2}x")),
                listed(&attach),
                median(&attach).map_or("-".into(), |m| format!("{m:.2}x")),
            );
        }
    }
}

/// What a client machine pays for braid's failover: fio through `braid
/// attach` (NBD over a local unix socket, then braid's protocol over TCP),
/// and fio on the block device of `braid attach --ublk`, each over fio
/// over NBD straight to the server across TCP, the network a client would
/// otherwise cross. Per round and median, for what ran.
pub(crate) fn print_client_path(rounds: &[Results]) {
    let ways: [(&str, ClientPath); 2] = [
        (
            "client path: attach over unix (then braid's protocol over TCP) / braid's NBD face over TCP",
            client_path,
        ),
        (
            "client path as a block device: ublk (then braid's protocol over TCP) / braid's NBD face over TCP",
            ublk_path,
        ),
    ];
    for (title, way) in ways {
        let shown: Vec<(&str, Vec<f64>)> = WORKLOADS
            .iter()
            .map(|&w| (w, rounds.iter().filter_map(|r| way(r, w)).collect()))
            .collect();
        if shown.iter().all(|(_, ratios)| ratios.is_empty()) {
            continue;
        }
        println!();
        println!("{title}");
        println!("{:<29} {:>24} {:>8}", "workload", "per round", "median");
        for (w, ratios) in shown {
            println!(
                "{:<29} {:>24} {:>8}",
                w,
                listed(&ratios),
                median(&ratios).map_or("-".into(), |m| format!("{m:.2}x")),
            );
        }
    }
}

type ClientPath = fn(&Results, &str) -> Option<f64>;

/// What a 2-way mirror costs over one export: fio through `braid attach
/// --volume` (writes to both servers, reads from one) over fio through
/// `braid attach`, on the same transport. Per round and median.
pub(crate) fn print_mirror_cost(rounds: &[Results], transports: &[bool]) {
    if !rounds
        .iter()
        .any(|r| r.rows.keys().any(|(_, c)| c == "mirror"))
    {
        return;
    }
    println!();
    println!("a 2-way mirror: mirror / attach (each through braid attach; a mirror writes to both servers)");
    println!(
        "{:<6} {:<22} {:>24} {:>8}",
        "", "workload", "per round", "median"
    );
    for &unix in transports {
        for w in WORKLOADS {
            let ratios: Vec<f64> = rounds
                .iter()
                .filter_map(|r| mirror_cost(r, unix, w))
                .collect();
            println!(
                "{} {:>24} {:>8}",
                lead(unix, w),
                listed(&ratios),
                median(&ratios).map_or("-".into(), |m| format!("{m:.2}x")),
            );
        }
    }
}

/// One round's mirror / attach on one transport for `w`.
fn mirror_cost(r: &Results, unix: bool, w: &str) -> Option<f64> {
    over(
        throughput(r, unix, "mirror", w),
        throughput(r, unix, "attach", w),
    )
}

/// One round's attach over unix / braid's NBD face over TCP for `w`.
fn client_path(r: &Results, w: &str) -> Option<f64> {
    over(
        throughput(r, true, "attach", w),
        throughput(r, false, "braid", w),
    )
}

/// One round's ublk device / braid's NBD face over TCP for `w`.
fn ublk_path(r: &Results, w: &str) -> Option<f64> {
    over(
        throughput(r, false, "ublk", w),
        throughput(r, false, "braid", w),
    )
}

/// One round's braid/best and attach/braid throughput for workload `w`.
fn round_ratios(r: &Results, unix: bool, w: &str) -> (Option<f64>, Option<f64>) {
    let value = |column: &str| throughput(r, unix, column, w);
    let best = PEERS.iter().filter_map(|p| value(p)).reduce(f64::max);
    let braid = value("braid");
    (over(braid, best), over(value("attach"), braid))
}

/// A cell's throughput in one round: IOPS, or MiB/s for sequential work.
fn throughput(r: &Results, unix: bool, column: &str, w: &str) -> Option<f64> {
    let row = r.rows.get(&(unix, column.to_string()))?.get(w)?;
    Some(if w.starts_with("seq") {
        row.mib
    } else {
        row.iops
    })
}

fn over(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

pub(crate) fn listed(ratios: &[f64]) -> String {
    if ratios.is_empty() {
        return "-".into();
    }
    let parts: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
    parts.join(" ")
}

/// The middle value; of an even count, the mean of the two middle ones.
pub(crate) fn median(values: &[f64]) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// One round's cells of a column: a QD1 read at `iops`.
    fn qd1_read(iops: f64) -> BTreeMap<String, Row> {
        BTreeMap::from([(
            "randread-4k-qd1".to_string(),
            Row {
                iops,
                ..Row::default()
            },
        )])
    }

    #[test]
    fn a_rounds_ratios_are_braid_over_its_best_peer_and_attach_over_braid() {
        let mut r = Results::default();
        for (column, iops) in [
            ("braid", 90.0),
            ("nbdkit", 100.0),
            ("qemu-nbd", 60.0),
            ("attach", 45.0),
        ] {
            r.rows.insert((true, column.into()), qd1_read(iops));
        }
        assert_eq!(
            round_ratios(&r, true, "randread-4k-qd1"),
            (Some(0.9), Some(0.5))
        );
        assert_eq!(round_ratios(&r, false, "randread-4k-qd1"), (None, None));
        assert_eq!(client_path(&r, "randread-4k-qd1"), None, "no TCP row");
        r.rows.insert((false, "braid".into()), qd1_read(60.0));
        assert_eq!(
            client_path(&r, "randread-4k-qd1"),
            Some(0.75),
            "attach over unix against braid's NBD face over TCP"
        );
        assert_eq!(
            mirror_cost(&r, true, "randread-4k-qd1"),
            None,
            "no mirror row"
        );
        assert_eq!(ublk_path(&r, "randread-4k-qd1"), None, "no ublk row");
        r.rows.insert((false, "ublk".into()), qd1_read(48.0));
        assert_eq!(
            ublk_path(&r, "randread-4k-qd1"),
            Some(0.8),
            "the ublk device against braid's NBD face over TCP"
        );
        r.rows.insert((true, "mirror".into()), qd1_read(36.0));
        assert_eq!(
            mirror_cost(&r, true, "randread-4k-qd1"),
            Some(0.8),
            "mirror over attach on the same transport"
        );
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(
            median(&[0.5, 1.5]),
            Some(1.0),
            "not the larger of two rounds"
        );
        assert_eq!(median(&[]), None);
    }
}
