//! braid against the round's best peer, run back to back: on these shared
//! cores a slow spell of ten seconds or more catches whichever servers run
//! in it, so a round's braid/best ratio compares runs up to a minute
//! apart. A pair is two runs seconds apart, the order alternating from
//! pair to pair, so neither side always runs second.

use super::table::{lead, listed, median, PEERS};
use super::{Results, WORKLOADS};
use std::collections::BTreeMap;

/// One pair's outcome: braid's throughput over the peer's, both measured
/// back to back.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Pair {
    pub(crate) unix: bool,
    pub(crate) workload: String,
    pub(crate) peer: String,
    pub(crate) ratio: f64,
}

/// The peer with the most throughput on `workload` over this transport in
/// this round's runs: the one braid must at least match.
pub(crate) fn best_peer(results: &Results, unix: bool, workload: &str) -> Option<&'static str> {
    PEERS
        .iter()
        .filter_map(|&p| {
            let row = results.rows.get(&(unix, p.to_string()))?.get(workload)?;
            Some((p, row.iops))
        })
        .filter(|(_, iops)| *iops > 0.0)
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(p, _)| p)
}

/// Whether a pair's first side (braid against a peer; attach on the
/// client path) runs first in pair `index`: every other pair.
pub(crate) fn first_side_first(index: usize) -> bool {
    index.is_multiple_of(2)
}

type PeersAndRatios<'a> = (Vec<&'a str>, Vec<f64>);

/// The pairs of one transport and workload.
#[derive(Debug)]
pub(crate) struct Paired {
    pub(crate) unix: bool,
    pub(crate) workload: &'static str,
    /// The peers braid met, in the order first met ("nbdkit/nbd-server").
    pub(crate) peers: String,
    pub(crate) ratios: Vec<f64>,
    pub(crate) median: f64,
}

/// Per transport and workload, in table order: the peers braid was paired
/// with, every pair's ratio and their median.
pub(crate) fn summary(pairs: &[Pair]) -> Vec<Paired> {
    // (unix, workload's index) -> (peers met, ratios)
    let mut grouped: BTreeMap<(bool, usize), PeersAndRatios<'_>> = BTreeMap::new();
    for p in pairs {
        let Some(i) = WORKLOADS.iter().position(|w| *w == p.workload) else {
            continue;
        };
        let entry = grouped.entry((p.unix, i)).or_default();
        if !entry.0.contains(&p.peer.as_str()) {
            entry.0.push(&p.peer);
        }
        entry.1.push(p.ratio);
    }
    grouped
        .into_iter()
        .filter_map(|((unix, i), (peers, ratios))| {
            Some(Paired {
                unix,
                workload: WORKLOADS[i],
                peers: peers.join("/"),
                median: median(&ratios)?,
                ratios,
            })
        })
        .collect()
}

pub(crate) fn print(pairs: &[Pair]) {
    let rows = summary(pairs);
    if rows.is_empty() {
        return;
    }
    println!();
    println!("braid / the round's best peer, run back to back (seconds apart, order alternating)");
    println!(
        "{:<6} {:<22} {:<22} {:>30} {:>8}",
        "", "workload", "peer", "per pair", "median"
    );
    for row in rows {
        println!(
            "{} {:<22} {:>30} {:>7.2}x",
            lead(row.unix, row.workload),
            row.peers,
            listed(&row.ratios),
            row.median
        );
    }
}

/// The client path's pairs: attach over unix / braid's NBD face over TCP,
/// per workload.
pub(crate) fn print_client(pairs: &[Pair]) {
    let rows = summary(pairs);
    if rows.is_empty() {
        return;
    }
    println!();
    println!(
        "client path, back to back: attach over unix / braid's NBD face over TCP (order alternating)"
    );
    println!("{:<29} {:>30} {:>8}", "workload", "per pair", "median");
    for row in rows {
        println!(
            "{:<29} {:>30} {:>7.2}x",
            row.workload,
            listed(&row.ratios),
            row.median
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peers::Row;

    fn with(rows: &[(bool, &str, &str, f64)]) -> Results {
        let mut r = Results::default();
        for &(unix, server, workload, iops) in rows {
            r.rows
                .entry((unix, server.to_string()))
                .or_default()
                .insert(
                    workload.to_string(),
                    Row {
                        iops,
                        ..Row::default()
                    },
                );
        }
        r
    }

    #[test]
    fn the_best_peer_is_the_fastest_peer_of_that_transport_and_workload() {
        let r = with(&[
            (false, "nbdkit", "randread-4k-qd1", 10.0),
            (false, "nbd-server", "randread-4k-qd1", 30.0),
            (false, "braid", "randread-4k-qd1", 99.0),
            (true, "nbdkit", "randread-4k-qd1", 50.0),
            (false, "qemu-nbd", "seqread-1m-qd8", 5.0),
        ]);
        assert_eq!(best_peer(&r, false, "randread-4k-qd1"), Some("nbd-server"));
        assert_eq!(best_peer(&r, true, "randread-4k-qd1"), Some("nbdkit"));
        assert_eq!(best_peer(&r, false, "seqread-1m-qd8"), Some("qemu-nbd"));
        assert_eq!(best_peer(&r, true, "seqread-1m-qd8"), None);
        let failed = with(&[(false, "nbdkit", "randread-4k-qd1", 0.0)]);
        assert_eq!(best_peer(&failed, false, "randread-4k-qd1"), None);
    }

    #[test]
    fn the_order_alternates_from_pair_to_pair() {
        let firsts: Vec<bool> = (0..4).map(first_side_first).collect();
        assert_eq!(firsts, [true, false, true, false]);
    }

    #[test]
    fn pairs_group_by_transport_and_workload_in_table_order_with_their_median() {
        let pair = |unix, workload: &str, peer: &str, ratio| Pair {
            unix,
            workload: workload.into(),
            peer: peer.into(),
            ratio,
        };
        let rows = summary(&[
            pair(false, "seqwrite-1m-qd8", "nbdkit", 0.9),
            pair(false, "randread-4k-qd1", "nbdkit", 1.5),
            pair(false, "seqwrite-1m-qd8", "nbd-server", 1.3),
            pair(false, "seqwrite-1m-qd8", "nbdkit", 1.1),
            pair(true, "randread-4k-qd1", "qemu-nbd", 2.0),
        ]);
        assert_eq!(rows.len(), 3);
        assert_eq!(
            (rows[0].unix, rows[0].workload, rows[0].median),
            (false, "randread-4k-qd1", 1.5)
        );
        assert_eq!(rows[1].workload, "seqwrite-1m-qd8");
        assert_eq!(rows[1].peers, "nbdkit/nbd-server");
        assert_eq!(rows[1].ratios, vec![0.9, 1.3, 1.1]);
        assert!((rows[1].median - 1.1).abs() < 1e-9);
        assert_eq!((rows[2].unix, rows[2].median), (true, 2.0));
    }
}
