//! The map against a model: writes laid through it onto byte arrays per
//! leaf read back through it, whichever copy a read picks, for random
//! trees and random IO.

use super::{LegInfo, VolumeMap, VolumeSpec};
use proptest::prelude::*;

const LEAF: u64 = 64 << 10;
const BLOCK: u64 = 512;

#[derive(Debug, Clone)]
enum Shape {
    Leaf,
    Linear(Vec<Shape>),
    Stripe(u64, Vec<Shape>),
    Mirror(Vec<Shape>),
}

fn shape(depth: u32, in_mirror: bool) -> BoxedStrategy<Shape> {
    if depth == 0 {
        return Just(Shape::Leaf).boxed();
    }
    let child = move |m| shape(depth - 1, m);
    let mut options = vec![
        Just(Shape::Leaf).boxed(),
        prop::collection::vec(child(in_mirror), 1..4)
            .prop_map(Shape::Linear)
            .boxed(),
    ];
    // Stripe legs must be equal in size: use leaves only there.
    options.push(
        (1u64..5, 2usize..4)
            .prop_map(|(c, n)| Shape::Stripe(c * BLOCK * 4, vec![Shape::Leaf; n]))
            .boxed(),
    );
    if !in_mirror {
        // Equal-sized legs: copies of one drawn leg shape.
        options.push(
            (shape(depth - 1, true), 2usize..4)
                .prop_map(|(s, n)| Shape::Mirror(vec![s; n]))
                .boxed(),
        );
    }
    prop::strategy::Union::new(options).boxed()
}

fn spec(s: &Shape, next: &mut usize) -> VolumeSpec {
    match s {
        Shape::Leaf => {
            *next += 1;
            VolumeSpec::Export(format!("leg{next}"))
        }
        Shape::Linear(v) => VolumeSpec::Linear(v.iter().map(|c| spec(c, next)).collect()),
        Shape::Stripe(chunk, v) => VolumeSpec::Stripe {
            chunk: *chunk,
            legs: v.iter().map(|c| spec(c, next)).collect(),
        },
        Shape::Mirror(v) => VolumeSpec::Mirror {
            quorum: None,
            legs: v.iter().map(|c| spec(c, next)).collect(),
        },
    }
}

fn info(_: &str) -> Option<LegInfo> {
    Some(LegInfo {
        size: LEAF,
        block_size: BLOCK as u32,
        read_only: false,
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn every_byte_has_one_home_per_copy(
        s in shape(3, false),
        cuts in prop::collection::vec(1u64..64, 1..40),
        pick in any::<u64>(),
    ) {
        let spec = spec(&s, &mut 0);
        let m = VolumeMap::new(&spec, info).unwrap();
        let mut legs = vec![vec![0u32; (LEAF / 4) as usize]; m.leaves().len()];
        // Fill the whole volume in pieces of drawn sizes; each 4-byte word
        // holds its own volume index, so a byte with two homes is caught.
        let words = m.size() / 4;
        let mut pos = 0u64;
        let mut i = 0;
        while pos < m.size() {
            let len = (cuts[i % cuts.len()] * BLOCK).min(m.size() - pos);
            i += 1;
            let segs = m.map(pos, len);
            let mut expect_at = 0;
            for seg in &segs {
                prop_assert_eq!(seg.at, expect_at, "segments tile the IO in order");
                expect_at += seg.len;
                for c in &seg.copies {
                    prop_assert!(c.offset + seg.len <= LEAF);
                    for w in 0..seg.len / 4 {
                        legs[c.leaf][((c.offset / 4) + w) as usize] =
                            ((pos + seg.at) / 4 + w) as u32;
                    }
                }
            }
            prop_assert_eq!(expect_at, len);
            pos += len;
        }
        // Read it all back, one drawn copy per segment.
        let mut pos = 0u64;
        let mut k = pick;
        while pos < m.size() {
            let len = (cuts[(k % cuts.len() as u64) as usize] * BLOCK).min(m.size() - pos);
            for seg in m.map(pos, len) {
                k = k.wrapping_mul(6364136223846793005).wrapping_add(1);
                let c = seg.copies[(k >> 33) as usize % seg.copies.len()];
                for w in 0..seg.len / 4 {
                    let got = legs[c.leaf][((c.offset / 4) + w) as usize];
                    prop_assert_eq!(u64::from(got), (pos + seg.at) / 4 + w);
                }
            }
            pos += len;
        }
        prop_assert!(words > 0);
    }
}
