//! How the volume scenarios lay their volume over the server nodes
//! ([`Layout`]), and where on it the workers work ([`Zones`]).

use braid_core::testkit::{Scenario, SECTOR};
use braid_core::volume::VolumeSpec;

/// A plain export's size, and each leg's where the layout gives none.
const SIZE: u64 = 1 << 20;
/// The stripe's chunk (small, so IO often spans two groups), and the
/// size of a group's own zone.
const CHUNK: u64 = 4096;

/// Which server nodes hold which bytes: the volume's legs in groups,
/// each group's legs mirrors of one another (a group of one is a plain
/// export); several groups are striped (chunk `c` on group `c mod
/// groups`) or, when `linear`, one after another. Leg `i` is server node
/// `i`; a leg that moves goes to node `legs()`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Layout {
    pub(crate) groups: &'static [&'static [usize]],
    pub(crate) linear: bool,
    /// Each leg's size in sectors, where not [`SIZE`].
    sectors: Option<&'static [u64]>,
}

impl Layout {
    pub(crate) fn of(scenario: Scenario) -> Layout {
        let layout = |groups| Layout {
            groups,
            linear: false,
            sectors: None,
        };
        match scenario {
            Scenario::Stripe | Scenario::StripeRestart => layout(&[&[0], &[1], &[2]]),
            Scenario::StripedMirrors => layout(&[&[0, 1], &[2, 3]]),
            // A mirror grown by a plain export of another size. Neither
            // size is a whole number of chunks or dirty-log regions, so
            // the seam and the copies' edges fall mid-region.
            // The move from the plain export leaves the old map no other
            // copy of its bytes whenever it is away mid-switch; the move
            // from a mirror leg, only when its partner is away too.
            Scenario::Linear | Scenario::MigrateRestart => Layout {
                groups: &[&[0, 1], &[2]],
                linear: true,
                sectors: Some(&[321, 321, 200]),
            },
            _ => layout(&[&[0, 1, 2]]),
        }
    }

    pub(crate) fn legs(self) -> usize {
        self.groups.iter().map(|g| g.len()).sum()
    }

    /// Several groups, rather than one mirror.
    pub(crate) fn grouped(self) -> bool {
        self.groups.len() > 1
    }

    /// Leg `leg`'s bytes.
    pub(crate) fn leg_size(self, leg: usize) -> u64 {
        self.sectors.map_or(SIZE, |s| s[leg] * SECTOR as u64)
    }

    /// The bytes each of group `group`'s legs holds.
    pub(crate) fn group_size(self, group: usize) -> u64 {
        self.leg_size(self.groups[group][0])
    }

    fn volume_size(self) -> u64 {
        let sizes = (0..self.groups.len()).map(|g| self.group_size(g));
        if self.linear {
            sizes.sum()
        } else {
            sizes.min().unwrap_or(0) * self.groups.len() as u64
        }
    }

    /// The volume's sector that sector `sector` of group `group`'s legs
    /// holds.
    pub(crate) fn volume_sector(self, group: usize, sector: u64) -> u64 {
        if self.linear {
            let before: u64 = (0..group).map(|g| self.group_size(g)).sum();
            return before / SECTOR as u64 + sector;
        }
        let per_chunk = CHUNK / SECTOR as u64;
        let (chunk, within) = (sector / per_chunk, sector % per_chunk);
        (chunk * self.groups.len() as u64 + group as u64) * per_chunk + within
    }

    /// The groups holding the volume's bytes `offset..offset + len`.
    pub(crate) fn groups_under(self, offset: u64, len: u64) -> Vec<usize> {
        let mut groups: Vec<usize> = self
            .sectors_under(offset, len)
            .map(|s| self.on_group(s).0)
            .collect();
        groups.sort_unstable();
        groups.dedup();
        groups
    }

    /// The sectors of group `group`'s legs that hold the volume's bytes
    /// `offset..offset + len`.
    pub(crate) fn group_sectors_under(
        self,
        group: usize,
        offset: u64,
        len: u64,
    ) -> impl Iterator<Item = u64> {
        self.sectors_under(offset, len)
            .map(move |s| self.on_group(s))
            .filter(move |&(g, _)| g == group)
            .map(|(_, s)| s)
    }

    fn sectors_under(self, offset: u64, len: u64) -> std::ops::Range<u64> {
        let sector = SECTOR as u64;
        offset / sector..(offset + len).div_ceil(sector)
    }

    /// The group holding the volume's sector `sector`, and which sector
    /// of its legs does: the inverse of [`Layout::volume_sector`].
    pub(crate) fn on_group(self, sector: u64) -> (usize, u64) {
        if self.linear {
            let group = (0..self.groups.len())
                .rev()
                .find(|&g| self.volume_sector(g, 0) <= sector)
                .unwrap_or(0);
            return (group, sector - self.volume_sector(group, 0));
        }
        let per_chunk = CHUNK / SECTOR as u64;
        let (chunk, within) = (sector / per_chunk, sector % per_chunk);
        let groups = self.groups.len() as u64;
        (
            (chunk % groups) as usize,
            chunk / groups * per_chunk + within,
        )
    }

    /// Group `group`'s legs, for messages: `leg0` or `leg0+leg1`.
    pub(crate) fn name(self, group: usize) -> String {
        let legs: Vec<String> = self.groups[group]
            .iter()
            .map(|i| format!("leg{i}"))
            .collect();
        legs.join("+")
    }

    pub(crate) fn group_of(self, leg: usize) -> usize {
        self.groups
            .iter()
            .position(|g| g.contains(&leg))
            .expect("every leg is in a group")
    }

    /// The volume: a mirror acknowledging writes once `quorum` legs have
    /// them (every leg in sync when `None`), or the groups striped or
    /// concatenated; leg `i` on server node `node_of(i)`, named for it.
    pub(crate) fn spec(
        self,
        quorum: Option<usize>,
        node_of: impl Fn(usize) -> usize,
    ) -> VolumeSpec {
        let chunk = (!self.linear).then_some(CHUNK);
        VolumeSpec::grouped(self.groups, chunk, quorum, |i| format!("leg{}", node_of(i)))
    }
}

/// Where the workers work: the zone they share (first byte, sectors), and
/// when the volume has several groups of legs, a zone (a chunk) on one
/// group for a worker of its own, which the shared workers leave alone so
/// that nothing orders one group's IO behind another's. A striped volume
/// gives every group its first chunk (chunk `i` lies on group `i`); a
/// linear one gives the first group and the last their ends, the shared
/// zone spanning the seams between.
pub(crate) struct Zones {
    pub(crate) shared: (u64, u64),
    /// Each with the group it lies on.
    pub(crate) own: Vec<(usize, (u64, u64))>,
    /// Where in the shared zone (sectors from its start) a linear volume
    /// passes from one group to the next. A stripe's chunks are as small
    /// as its IOs, so they cross its seams often without being aimed.
    pub(crate) seams: Vec<u64>,
}

impl Zones {
    pub(crate) fn of(layout: Layout) -> Self {
        let sectors = |bytes: u64| bytes / SECTOR as u64;
        let size = layout.volume_size();
        if !layout.grouped() {
            return Zones {
                shared: (0, sectors(size)),
                own: Vec::new(),
                seams: Vec::new(),
            };
        }
        let groups = layout.groups.len();
        let own: Vec<(usize, (u64, u64))> = if layout.linear {
            vec![
                (0, (0, sectors(CHUNK))),
                (groups - 1, (size - CHUNK, sectors(CHUNK))),
            ]
        } else {
            (0..groups)
                .map(|g| (g, (g as u64 * CHUNK, sectors(CHUNK))))
                .collect()
        };
        let (first, last) = if layout.linear {
            (CHUNK, size - CHUNK)
        } else {
            (groups as u64 * CHUNK, size)
        };
        let seams = if layout.linear {
            (1..groups)
                .map(|g| layout.volume_sector(g, 0) - sectors(first))
                .collect()
        } else {
            Vec::new()
        };
        Zones {
            shared: (first, sectors(last - first)),
            own,
            seams,
        }
    }

    /// The sector number a worker stamps in the volume's sector `sector`:
    /// its own, counted from the start of its zone.
    pub(crate) fn stamped_at(&self, sector: u64) -> u64 {
        let from = |(start, sectors): (u64, u64)| {
            let first = start / SECTOR as u64;
            (first..first + sectors)
                .contains(&sector)
                .then(|| sector - first)
        };
        self.own
            .iter()
            .map(|(_, zone)| zone)
            .chain([&self.shared])
            .find_map(|&zone| from(zone))
            .unwrap_or(sector)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The group and sector a volume sector is found on are the ones
    /// [`Layout::volume_sector`] puts there, in every volume scenario.
    #[test]
    fn every_sector_is_on_the_group_that_holds_it() {
        for scenario in Scenario::ALL.into_iter().filter(|s| s.runs_a_volume()) {
            let layout = Layout::of(scenario);
            for g in 0..layout.groups.len() {
                let sectors = layout.group_size(g) / SECTOR as u64;
                let per_chunk = CHUNK / SECTOR as u64;
                // A striped volume holds whole rounds of chunks only.
                let held = if layout.linear {
                    sectors
                } else {
                    layout.volume_size() / layout.groups.len() as u64 / SECTOR as u64 / per_chunk
                        * per_chunk
                };
                for s in 0..held {
                    let at = layout.volume_sector(g, s);
                    assert_eq!(
                        layout.on_group(at),
                        (g, s),
                        "{scenario} group {g} sector {s}"
                    );
                    assert_eq!(
                        layout.groups_under(at * SECTOR as u64, 512),
                        [g],
                        "{scenario} group {g} sector {s}"
                    );
                }
            }
            let seam_or_chunk = layout.volume_sector(0, layout.group_size(0) / SECTOR as u64 - 1);
            let across = layout.groups_under(seam_or_chunk * SECTOR as u64, 1024);
            assert_eq!(across.len(), layout.groups.len().min(2), "{scenario}");
        }
    }

    /// Each volume scenario's zones lie inside its volume, apart from one
    /// another, the shared one over every seam between groups (where IO
    /// splits), and a linear volume's own zones each on its group alone.
    #[test]
    fn the_zones_cover_the_seams_and_never_overlap() {
        for scenario in Scenario::ALL.into_iter().filter(|s| s.runs_a_volume()) {
            let layout = Layout::of(scenario);
            let zones = Zones::of(layout);
            let bytes = |(start, sectors): (u64, u64)| start..start + sectors * SECTOR as u64;
            let mut all: Vec<_> = zones.own.iter().map(|&(_, z)| bytes(z)).collect();
            all.push(bytes(zones.shared));
            all.sort_by_key(|r| r.start);
            for pair in all.windows(2) {
                assert!(pair[0].end <= pair[1].start, "{scenario}: {all:?}");
            }
            assert!(
                all.last().unwrap().end <= layout.volume_size(),
                "{scenario}"
            );
            if layout.linear {
                let seam = layout.group_size(0);
                assert!(bytes(zones.shared).contains(&seam), "{scenario}");
                let into_zone = (seam - zones.shared.0) / SECTOR as u64;
                assert_eq!(zones.seams, [into_zone], "{scenario}");
                for &(group, (start, sectors)) in &zones.own {
                    let first = layout.volume_sector(group, 0) * SECTOR as u64;
                    let end = first + layout.group_size(group);
                    assert!(first <= start && start + sectors * SECTOR as u64 <= end);
                }
            }
        }
    }
}
