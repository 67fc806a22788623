//! Where each byte of a volume lives: a tree of exports joined by
//! `linear` (concatenation), `stripe` (round-robin chunks) and `mirror`
//! (every leg holds every byte). Built once every leg's session is up and
//! its size and block size are known, and refused, naming the problem,
//! before anything is written if the legs do not fit together.

use std::fmt;

/// A volume as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeSpec {
    /// One export of one server (a leg's session).
    Export(String),
    /// The children one after another.
    Linear(Vec<VolumeSpec>),
    /// Chunks of `chunk` bytes dealt round-robin over equal-sized legs.
    Stripe {
        /// Bytes per chunk (a multiple of the block size).
        chunk: u64,
        /// The legs.
        legs: Vec<VolumeSpec>,
    },
    /// Every leg holds every byte. A write is acknowledged once `quorum`
    /// legs have it (`None`: every live leg).
    Mirror {
        /// Legs that must have a write before it is acknowledged.
        quorum: Option<usize>,
        /// The legs (not themselves mirrors).
        legs: Vec<VolumeSpec>,
    },
}

impl VolumeSpec {
    /// Exports in groups that mirror each other (a group of one is the
    /// export alone), striped in `chunk`-byte chunks over the groups when
    /// there are several (one after another when `chunk` is `None`): one
    /// mirror, a stripe or concatenation of exports, or of mirrors.
    /// `name` names export `i`.
    pub fn grouped(
        groups: &[&[usize]],
        chunk: Option<u64>,
        quorum: Option<usize>,
        name: impl Fn(usize) -> String,
    ) -> VolumeSpec {
        let group = |g: &&[usize]| match g {
            [one] => VolumeSpec::Export(name(*one)),
            _ => VolumeSpec::Mirror {
                quorum,
                legs: g.iter().map(|&i| VolumeSpec::Export(name(i))).collect(),
            },
        };
        let legs = || groups.iter().map(group).collect();
        match (groups, chunk) {
            ([one], _) => group(one),
            (_, Some(chunk)) => VolumeSpec::Stripe {
                chunk,
                legs: legs(),
            },
            (_, None) => VolumeSpec::Linear(legs()),
        }
    }
}

/// What a leg's WELCOME said about its export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LegInfo {
    /// Bytes.
    pub size: u64,
    /// Offsets and lengths must be multiples of this.
    pub block_size: u32,
    /// Refuses writes.
    pub read_only: bool,
}

/// Why a spec cannot be a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapError(pub String);

impl fmt::Display for MapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "volume map: {}", self.0)
    }
}

impl std::error::Error for MapError {}

/// One copy of a segment: which leaf, and where on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Copy {
    /// Index into [`VolumeMap::leaves`].
    pub leaf: usize,
    /// Byte offset on that leaf's export.
    pub offset: u64,
}

/// A contiguous piece of an IO and every place it lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// Offset of the piece within the IO.
    pub at: u64,
    /// Its length.
    pub len: u64,
    /// Every copy: one, or one per mirror leg.
    pub copies: Vec<Copy>,
    /// For a mirrored piece, the mirror's quorum (`None`: every live leg).
    pub quorum: Option<usize>,
}

#[derive(Debug, Clone)]
enum Node {
    Leaf(usize),
    Linear(Vec<(u64, Node)>),
    Stripe {
        chunk: u64,
        legs: Vec<Node>,
    },
    Mirror {
        quorum: Option<usize>,
        legs: Vec<Node>,
    },
    /// A leaf being copied to a new export: both hold its bytes, as a
    /// mirror's legs do, until the old one is retired.
    Migrating {
        from: usize,
        to: usize,
    },
}

/// A validated volume.
#[derive(Debug, Clone)]
pub struct VolumeMap {
    root: Node,
    leaves: Vec<String>,
    /// Each leaf's size, as its WELCOME said.
    leaf_sizes: Vec<u64>,
    size: u64,
    block_size: u32,
}

impl VolumeMap {
    /// Checks `spec` against what each export's server said (`info` by
    /// export name) and builds the map.
    pub fn new(
        spec: &VolumeSpec,
        info: impl Fn(&str) -> Option<LegInfo>,
    ) -> Result<VolumeMap, MapError> {
        let mut leaves = Vec::new();
        let mut block_size = None;
        let (root, size) = build(spec, &info, &mut leaves, &mut block_size, false)?;
        if size == 0 {
            return Err(MapError("the volume has no bytes".into()));
        }
        let leaf_sizes = leaves
            .iter()
            .map(|n| info(n).map_or(0, |i| i.size))
            .collect();
        Ok(VolumeMap {
            root,
            leaves,
            leaf_sizes,
            size,
            block_size: block_size.unwrap_or(512),
        })
    }

    /// The map while leaf `from` is copied to the new export `name`
    /// (appended as the last leaf): every byte of `from` has a second
    /// copy there. The new export must match `from` in size and block
    /// size, be writable and not be in the map already.
    pub fn migrating(&self, from: usize, name: &str, info: LegInfo) -> Result<VolumeMap, MapError> {
        let err = |s: String| Err(MapError(s));
        let Some(old) = self.leaves.get(from) else {
            return err(format!("no leaf {from}"));
        };
        // A retired leaf's name (a migration rolled back) may come again.
        let in_use = |(i, l): (usize, &String)| l == name && contains_leaf(&self.root, i);
        if self.leaves.iter().enumerate().any(in_use) {
            return err(format!("export {name:?} is already in the volume"));
        }
        if !contains_leaf(&self.root, from) {
            return err(format!("export {old:?} is no longer in the volume"));
        }
        if info.read_only {
            return err(format!("export {name:?} is read-only"));
        }
        if info.block_size != self.block_size {
            return err(format!(
                "export {name:?} has {}-byte blocks, the volume {}",
                info.block_size, self.block_size
            ));
        }
        if info.size != self.leaf_sizes[from] {
            return err(format!(
                "export {name:?} holds {} bytes, {old:?} {}: a migration needs the same size",
                info.size, self.leaf_sizes[from]
            ));
        }
        let to = self.leaves.len();
        let mut next = self.clone();
        next.leaves.push(name.to_string());
        next.leaf_sizes.push(info.size);
        next.root = replace_leaf(&self.root, from, &Node::Migrating { from, to });
        Ok(next)
    }

    /// The map once the migration of `from` ended: `keep` (`from` to
    /// roll back, the new leaf to finish) holds the bytes alone. The other
    /// leaf keeps its index but no segment names it again.
    pub fn migration_ended(&self, keep: usize) -> VolumeMap {
        let mut next = self.clone();
        next.root = end_migration(&self.root, keep);
        next
    }

    /// Whether some segment names leaf `leaf`.
    pub fn holds(&self, leaf: usize) -> bool {
        contains_leaf(&self.root, leaf)
    }

    /// Bytes the volume holds.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The common block size of every leg.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// The exports, in the order segments name them.
    pub fn leaves(&self) -> &[String] {
        &self.leaves
    }

    /// Where `len` bytes at `offset` live, in order of `at`. The caller
    /// checks the range against [`VolumeMap::size`] first.
    pub fn map(&self, offset: u64, len: u64) -> Vec<Segment> {
        debug_assert!(offset.checked_add(len).is_some_and(|e| e <= self.size));
        let mut out = Vec::new();
        map_node(&self.root, offset, len, 0, &mut out);
        out
    }
}

fn build(
    spec: &VolumeSpec,
    info: &impl Fn(&str) -> Option<LegInfo>,
    leaves: &mut Vec<String>,
    block_size: &mut Option<u32>,
    in_mirror: bool,
) -> Result<(Node, u64), MapError> {
    let err = |s: String| Err(MapError(s));
    match spec {
        VolumeSpec::Export(name) => {
            if leaves.contains(name) {
                return err(format!("export {name:?} is used twice"));
            }
            let Some(leg) = info(name) else {
                return err(format!("export {name:?} is unknown"));
            };
            if leg.read_only {
                return err(format!("export {name:?} is read-only"));
            }
            match *block_size {
                Some(b) if b != leg.block_size => {
                    return err(format!(
                        "export {name:?} has {}-byte blocks, the others {b}",
                        leg.block_size
                    ))
                }
                _ => *block_size = Some(leg.block_size),
            }
            leaves.push(name.clone());
            Ok((Node::Leaf(leaves.len() - 1), leg.size))
        }
        VolumeSpec::Linear(children) => {
            if children.is_empty() {
                return err("a linear map needs at least one leg".into());
            }
            let mut parts = Vec::new();
            let mut start = 0u64;
            for c in children {
                let (node, size) = build(c, info, leaves, block_size, in_mirror)?;
                parts.push((start, node));
                start = start
                    .checked_add(size)
                    .ok_or_else(|| MapError("the volume is larger than 2^64 bytes".into()))?;
            }
            Ok((Node::Linear(parts), start))
        }
        VolumeSpec::Stripe { chunk, legs } => {
            if legs.len() < 2 {
                return err("a stripe needs at least two legs".into());
            }
            let mut nodes = Vec::new();
            let mut sizes = Vec::new();
            for l in legs {
                let (node, size) = build(l, info, leaves, block_size, in_mirror)?;
                nodes.push(node);
                sizes.push(size);
            }
            let block = u64::from(block_size.unwrap_or(512));
            if *chunk == 0 || chunk % block != 0 {
                return err(format!(
                    "stripe chunk {chunk} is not a whole number of {block}-byte blocks"
                ));
            }
            if sizes.iter().any(|s| *s != sizes[0]) {
                return err(format!("stripe legs differ in size: {sizes:?}"));
            }
            let per_leg = sizes[0] / chunk * chunk;
            let size = per_leg
                .checked_mul(legs.len() as u64)
                .ok_or_else(|| MapError("the volume is larger than 2^64 bytes".into()))?;
            Ok((
                Node::Stripe {
                    chunk: *chunk,
                    legs: nodes,
                },
                size,
            ))
        }
        VolumeSpec::Mirror { quorum, legs } => {
            if in_mirror {
                return err("a mirror's legs cannot be mirrors themselves".into());
            }
            if legs.len() < 2 {
                return err("a mirror needs at least two legs".into());
            }
            if let Some(q) = quorum {
                if *q == 0 || *q > legs.len() {
                    return err(format!("quorum {q} is outside 1 to {}", legs.len()));
                }
            }
            let mut nodes = Vec::new();
            let mut sizes = Vec::new();
            for l in legs {
                let (node, size) = build(l, info, leaves, block_size, true)?;
                nodes.push(node);
                sizes.push(size);
            }
            if sizes.iter().any(|s| *s != sizes[0]) {
                return err(format!("mirror legs differ in size: {sizes:?}"));
            }
            Ok((
                Node::Mirror {
                    quorum: *quorum,
                    legs: nodes,
                },
                sizes[0],
            ))
        }
    }
}

fn contains_leaf(node: &Node, leaf: usize) -> bool {
    match node {
        Node::Leaf(l) => *l == leaf,
        Node::Migrating { from, to } => *from == leaf || *to == leaf,
        Node::Linear(parts) => parts.iter().any(|(_, n)| contains_leaf(n, leaf)),
        Node::Stripe { legs, .. } | Node::Mirror { legs, .. } => {
            legs.iter().any(|n| contains_leaf(n, leaf))
        }
    }
}

fn replace_leaf(node: &Node, leaf: usize, with: &Node) -> Node {
    match node {
        Node::Leaf(l) if *l == leaf => with.clone(),
        Node::Leaf(_) | Node::Migrating { .. } => node.clone(),
        Node::Linear(parts) => Node::Linear(
            parts
                .iter()
                .map(|(start, n)| (*start, replace_leaf(n, leaf, with)))
                .collect(),
        ),
        Node::Stripe { chunk, legs } => Node::Stripe {
            chunk: *chunk,
            legs: legs.iter().map(|n| replace_leaf(n, leaf, with)).collect(),
        },
        Node::Mirror { quorum, legs } => Node::Mirror {
            quorum: *quorum,
            legs: legs.iter().map(|n| replace_leaf(n, leaf, with)).collect(),
        },
    }
}

fn end_migration(node: &Node, keep: usize) -> Node {
    match node {
        Node::Migrating { from, to } if *from == keep || *to == keep => Node::Leaf(keep),
        Node::Leaf(_) | Node::Migrating { .. } => node.clone(),
        Node::Linear(parts) => Node::Linear(
            parts
                .iter()
                .map(|(start, n)| (*start, end_migration(n, keep)))
                .collect(),
        ),
        Node::Stripe { chunk, legs } => Node::Stripe {
            chunk: *chunk,
            legs: legs.iter().map(|n| end_migration(n, keep)).collect(),
        },
        Node::Mirror { quorum, legs } => Node::Mirror {
            quorum: *quorum,
            legs: legs.iter().map(|n| end_migration(n, keep)).collect(),
        },
    }
}

fn map_node(node: &Node, offset: u64, len: u64, at: u64, out: &mut Vec<Segment>) {
    if len == 0 {
        return;
    }
    match node {
        Node::Leaf(leaf) => out.push(Segment {
            at,
            len,
            copies: vec![Copy {
                leaf: *leaf,
                offset,
            }],
            quorum: None,
        }),
        Node::Migrating { from, to } => out.push(Segment {
            at,
            len,
            copies: vec![
                Copy {
                    leaf: *from,
                    offset,
                },
                Copy { leaf: *to, offset },
            ],
            quorum: None,
        }),
        Node::Linear(parts) => {
            let end = offset + len;
            for (i, (start, child)) in parts.iter().enumerate() {
                let stop = parts.get(i + 1).map_or(u64::MAX, |p| p.0);
                let (lo, hi) = (offset.max(*start), end.min(stop));
                if lo < hi {
                    map_node(child, lo - start, hi - lo, at + (lo - offset), out);
                }
            }
        }
        Node::Stripe { chunk, legs } => {
            let n = legs.len() as u64;
            let mut pos = offset;
            let end = offset + len;
            while pos < end {
                let index = pos / chunk;
                let within = pos % chunk;
                let piece = (chunk - within).min(end - pos);
                let leg = (index % n) as usize;
                let leg_offset = index / n * chunk + within;
                map_node(&legs[leg], leg_offset, piece, at + (pos - offset), out);
                pos += piece;
            }
        }
        Node::Mirror { quorum, legs } => {
            // Each leg may split the range differently (a mirror of
            // stripes): cut at every leg's boundaries, so each piece has
            // exactly one copy per leg.
            let per_leg: Vec<Vec<Segment>> = legs
                .iter()
                .map(|l| {
                    let mut v = Vec::new();
                    map_node(l, offset, len, 0, &mut v);
                    v
                })
                .collect();
            let mut cuts: Vec<u64> = per_leg
                .iter()
                .flatten()
                .flat_map(|s| [s.at, s.at + s.len])
                .collect();
            cuts.sort_unstable();
            cuts.dedup();
            for w in cuts.windows(2) {
                let (lo, hi) = (w[0], w[1]);
                // A leg being migrated has two copies; every one counts.
                let copies = per_leg
                    .iter()
                    .flat_map(|segs| {
                        let s = segs
                            .iter()
                            .find(|s| s.at <= lo && lo < s.at + s.len)
                            .expect("every leg covers the whole range");
                        s.copies.iter().map(move |c| Copy {
                            leaf: c.leaf,
                            offset: c.offset + (lo - s.at),
                        })
                    })
                    .collect();
                out.push(Segment {
                    at: at + lo,
                    len: hi - lo,
                    copies,
                    quorum: *quorum,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(name: &str) -> VolumeSpec {
        VolumeSpec::Export(name.into())
    }

    #[test]
    fn grouped_exports_make_a_mirror_a_stripe_a_concatenation_or_those_of_mirrors() {
        let name = |i: usize| format!("x{i}");
        let mirror = |legs| VolumeSpec::Mirror {
            quorum: Some(1),
            legs,
        };
        assert_eq!(
            VolumeSpec::grouped(&[&[0, 1]], Some(4096), Some(1), name),
            mirror(vec![e("x0"), e("x1")])
        );
        assert_eq!(
            VolumeSpec::grouped(&[&[0], &[1]], Some(4096), Some(1), name),
            VolumeSpec::Stripe {
                chunk: 4096,
                legs: vec![e("x0"), e("x1")]
            }
        );
        assert_eq!(
            VolumeSpec::grouped(&[&[0, 1], &[2]], Some(8192), Some(1), name),
            VolumeSpec::Stripe {
                chunk: 8192,
                legs: vec![mirror(vec![e("x0"), e("x1")]), e("x2")]
            }
        );
        assert_eq!(
            VolumeSpec::grouped(&[&[0, 1], &[2]], None, Some(1), name),
            VolumeSpec::Linear(vec![mirror(vec![e("x0"), e("x1")]), e("x2")])
        );
        assert_eq!(
            VolumeSpec::grouped(&[&[0, 1]], None, Some(1), name),
            mirror(vec![e("x0"), e("x1")])
        );
    }

    /// A mirror of two stripes: a and b in 4 KiB chunks, c and d in
    /// `chunk`-byte ones.
    fn mirror_of_stripes(chunk: u64) -> VolumeSpec {
        VolumeSpec::Mirror {
            quorum: None,
            legs: vec![
                VolumeSpec::Stripe {
                    chunk: 4096,
                    legs: vec![e("a"), e("b")],
                },
                VolumeSpec::Stripe {
                    chunk,
                    legs: vec![e("c"), e("d")],
                },
            ],
        }
    }

    fn info(size: u64) -> impl Fn(&str) -> Option<LegInfo> {
        move |name: &str| {
            (!name.starts_with("missing")).then_some(LegInfo {
                size: if name.starts_with("big") {
                    size * 2
                } else {
                    size
                },
                block_size: if name.starts_with("4k") { 4096 } else { 512 },
                read_only: name.starts_with("ro"),
            })
        }
    }

    #[test]
    fn linear_concatenates_and_splits_at_the_seam() {
        let m = VolumeMap::new(&VolumeSpec::Linear(vec![e("a"), e("big")]), info(1 << 20)).unwrap();
        assert_eq!(m.size(), 3 << 20);
        let s = m.map((1 << 20) - 512, 1024);
        assert_eq!(s.len(), 2);
        assert_eq!(
            s[0].copies,
            vec![Copy {
                leaf: 0,
                offset: (1 << 20) - 512
            }]
        );
        assert_eq!(
            (s[1].at, s[1].copies[0]),
            (512, Copy { leaf: 1, offset: 0 })
        );
    }

    #[test]
    fn stripe_deals_chunks_round_robin() {
        let spec = VolumeSpec::Stripe {
            chunk: 4096,
            legs: vec![e("a"), e("b"), e("c")],
        };
        let m = VolumeMap::new(&spec, info(1 << 20)).unwrap();
        assert_eq!(m.size(), 3 << 20);
        // Chunk 4 is leg 1's second chunk.
        let s = m.map(4 * 4096 + 100 * 512 / 100, 512);
        assert_eq!(
            s[0].copies,
            vec![Copy {
                leaf: 1,
                offset: 4096 + 512
            }]
        );
        let s = m.map(4096 - 512, 1024);
        assert_eq!(
            s.iter().map(|x| x.copies[0]).collect::<Vec<_>>(),
            vec![
                Copy {
                    leaf: 0,
                    offset: 4096 - 512
                },
                Copy { leaf: 1, offset: 0 }
            ]
        );
    }

    #[test]
    fn a_mirror_of_stripes_cuts_at_every_legs_boundaries() {
        let spec = mirror_of_stripes(8192);
        let m = VolumeMap::new(&spec, info(1 << 20)).unwrap();
        let s = m.map(0, 16384);
        let cuts: Vec<(u64, u64)> = s.iter().map(|x| (x.at, x.len)).collect();
        assert_eq!(
            cuts,
            vec![(0, 4096), (4096, 4096), (8192, 4096), (12288, 4096)]
        );
        assert!(s.iter().all(|x| x.copies.len() == 2));
        assert_eq!(
            s[1].copies,
            vec![
                Copy { leaf: 1, offset: 0 },
                Copy {
                    leaf: 2,
                    offset: 4096
                }
            ]
        );
    }

    #[test]
    fn a_migrating_leaf_has_two_copies_until_the_migration_ends() {
        let spec = mirror_of_stripes(4096);
        let m = VolumeMap::new(&spec, info(1 << 20)).unwrap();
        let same = LegInfo {
            size: 1 << 20,
            block_size: 512,
            read_only: false,
        };
        let moving = m.migrating(1, "n", same).unwrap();
        assert_eq!(moving.leaves()[4], "n");
        let s = moving.map(4096, 4096);
        let leaves: Vec<usize> = s[0].copies.iter().map(|c| c.leaf).collect();
        assert_eq!(leaves, vec![1, 4, 3]);
        assert_eq!(s[0].copies[1].offset, s[0].copies[0].offset);
        let done = moving.migration_ended(4);
        assert!(!done.holds(1) && done.holds(4));
        let leaves: Vec<usize> = done.map(4096, 4096)[0]
            .copies
            .iter()
            .map(|c| c.leaf)
            .collect();
        assert_eq!(leaves, vec![4, 3]);
        let back = moving.migration_ended(1);
        assert_eq!(back.map(0, 1 << 21), m.map(0, 1 << 21));
        assert!(
            done.migrating(1, "x", same).is_err(),
            "a retired leaf cannot move"
        );
    }

    #[test]
    fn bad_maps_are_refused_by_name() {
        let refuse = |spec: VolumeSpec, needle: &str| {
            let e = VolumeMap::new(&spec, info(1 << 20)).unwrap_err();
            assert!(e.to_string().contains(needle), "{e}");
        };
        let mirror = |legs| VolumeSpec::Mirror { quorum: None, legs };
        refuse(mirror(vec![e("a"), e("big")]), "differ in size");
        refuse(mirror(vec![e("a"), e("4k")]), "512");
        refuse(mirror(vec![e("a"), e("ro")]), "read-only");
        refuse(mirror(vec![e("a"), e("a")]), "used twice");
        refuse(mirror(vec![e("a"), e("missing")]), "unknown");
        refuse(mirror(vec![e("a")]), "at least two");
        refuse(
            mirror(vec![e("a"), mirror(vec![e("b"), e("c")])]),
            "cannot be mirrors",
        );
        refuse(
            VolumeSpec::Mirror {
                quorum: Some(3),
                legs: vec![e("a"), e("b")],
            },
            "quorum 3",
        );
        refuse(
            VolumeSpec::Stripe {
                chunk: 1000,
                legs: vec![e("a"), e("b")],
            },
            "chunk 1000",
        );
    }
}
