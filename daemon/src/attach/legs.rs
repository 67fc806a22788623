//! Reaching a volume's legs: every leg's session opened at once, and a
//! mirrored leg whose server does not answer left to be resynced when it
//! does.

use crate::client_args::ClientArgs;
use braid_core::wire::EXPORT_READ_ONLY;
use braid_fabric_tcp::Client;
use std::collections::HashMap;
use std::path::Path;

/// Connects every leg of `file` at once. A mirrored leg whose server does
/// not answer is attached without (its client keeps trying, and it is
/// resynced when it answers); any other is an error naming it. Returns
/// the map (legs not reached take a reached leg's geometry until their
/// own server shows theirs), a client per leg, and the largest IO every
/// reached leg takes.
pub(super) async fn connect_legs(
    file: &crate::volume::VolumeFile,
    path: &Path,
    client_args: &ClientArgs,
) -> Result<(braid_core::volume::VolumeMap, HashMap<String, Client>, u32), String> {
    use braid_core::volume::VolumeMap;
    let mut clients = HashMap::new();
    let mut infos = HashMap::new();
    let mut max_payload = u32::MAX;
    // Legs whose server does not answer now: a mirror attaches without
    // them, and they are resynced when they return.
    let mut down = Vec::new();
    let mut reached = None;
    let answers = answers_of_legs(file, client_args).await?;
    for (leg, answer) in file.legs.iter().zip(answers) {
        let client = match answer {
            Ok(client) => client,
            Err(e) => {
                let why = format!("leg {:?} ({} on {}): {e}", leg.name, leg.export, leg.server);
                down.push((leg, why));
                continue;
            }
        };
        let i = client.info();
        reached.get_or_insert(i);
        max_payload = max_payload.min(i.max_payload - i.max_payload % i.block_size);
        infos.insert(leg.name.clone(), leg_info(&i));
        clients.insert(leg.name.clone(), client);
    }
    let Some(like) = reached else {
        let whys: Vec<String> = down.into_iter().map(|(_, why)| why).collect();
        return Err(format!(
            "no leg of the volume answers:\n  {}",
            whys.join("\n  ")
        ));
    };
    // A mirror's legs are alike: the first leg reached stands in for the
    // ones that were not, until they answer and show their own.
    for (leg, _) in &down {
        infos.insert(leg.name.clone(), leg_info(&like));
    }
    let map = VolumeMap::new(&file.spec()?, |n| infos.get(n).copied())
        .map_err(|e| format!("volume {}: {e}", path.display()))?;
    for (leg, why) in &down {
        if holds_only_copy(&map, &leg.name) {
            return Err(format!(
                "{why}\n(it holds data no other leg has: the volume cannot attach without it)"
            ));
        }
        eprintln!("braid attach: {why}\n  attaching without it: it is resynced when it answers");
        let c = leg_args(client_args, leg);
        let client = c.connect_later(like)?;
        clients.insert(leg.name.clone(), client);
    }
    Ok((map, clients, max_payload))
}

/// Every leg's connect attempt, all at once, so a leg that is down costs
/// its connect patience once, not once per leg before it. Once a leg has
/// answered, legs still silent `leg_timeout` later (at least a second)
/// are given up on if each is mirrored: the volume attaches without them
/// rather than wait out the patience for a server that may be gone, and
/// they are resynced when they answer. A leg that holds the only copy of
/// some byte is waited for to the end. The answers come in leg order.
async fn answers_of_legs(
    file: &crate::volume::VolumeFile,
    client_args: &ClientArgs,
) -> Result<Vec<Result<Client, String>>, String> {
    use tokio::time::{sleep_until, Duration, Instant};
    let grace = file.leg_timeout()?.max(Duration::from_secs(1));
    let spec = file.spec()?;
    let mut attempts = tokio::task::JoinSet::new();
    for (i, leg) in file.legs.iter().enumerate() {
        let c = leg_args(client_args, leg);
        attempts.spawn(async move { (i, c.connect().await) });
    }
    let mut answers: Vec<Option<Result<Client, String>>> = file.legs.iter().map(|_| None).collect();
    // The first leg to answer: when, which, and the map drawn with its
    // geometry for every leg (which legs are mirrored does not depend on
    // their sizes).
    let mut first: Option<(Instant, usize, Option<braid_core::volume::VolumeMap>)> = None;
    loop {
        let give_up_at = first.as_ref().and_then(|(at, _, map)| {
            let map = map.as_ref()?;
            let mut silent = file.legs.iter().zip(&answers).filter(|(_, a)| a.is_none());
            silent
                .all(|(leg, _)| !holds_only_copy(map, &leg.name))
                .then_some(*at + grace)
        });
        let next = tokio::select! {
            next = attempts.join_next() => next,
            _ = sleep_until(give_up_at.unwrap_or_else(Instant::now)), if give_up_at.is_some() => break,
        };
        let Some(joined) = next else { break };
        let (i, answer) = joined.map_err(|e| format!("connecting the legs: {e}"))?;
        if let (None, Ok(client)) = (&first, &answer) {
            let like = leg_info(&client.info());
            let map = braid_core::volume::VolumeMap::new(&spec, |_| Some(like)).ok();
            first = Some((Instant::now(), i, map));
        }
        answers[i] = Some(answer);
    }
    attempts.abort_all();
    let first_leg = first.map_or("", |(_, i, _)| file.legs[i].name.as_str());
    Ok(answers
        .into_iter()
        .map(|a| {
            a.unwrap_or_else(|| {
                Err(format!(
                    "no answer {grace:?} after leg {first_leg:?} answered"
                ))
            })
        })
        .collect())
}

/// Whether some byte of the volume lives on leg `name` alone.
fn holds_only_copy(map: &braid_core::volume::VolumeMap, name: &str) -> bool {
    let leaf = map.leaves().iter().position(|n| n.as_str() == name);
    map.map(0, map.size())
        .iter()
        .filter(|seg| seg.copies.iter().any(|c| Some(c.leaf) == leaf))
        .any(|seg| seg.copies.len() < 2)
}

/// The client flags for one leg of a volume file.
pub(crate) fn leg_args(base: &ClientArgs, leg: &crate::volume::LegFile) -> ClientArgs {
    let mut c = base.clone();
    c.servers = vec![leg.server.clone()];
    c.export = leg.export.clone();
    if leg.key_file.is_some() {
        c.key_file = leg.key_file.clone();
    }
    c
}

fn leg_info(i: &braid_core::client::ExportInfo) -> braid_core::volume::LegInfo {
    braid_core::volume::LegInfo {
        size: i.size,
        block_size: i.block_size,
        read_only: i.flags & EXPORT_READ_ONLY != 0,
    }
}
