//! Volumes over several exports (and servers): the map from volume bytes
//! to legs. Sans-IO like the engines: each leg is an ordinary client
//! session; this layer only says where bytes go.

mod engine;
mod map;
mod regions;

pub use engine::{
    LegState, Migration, VolumeAction, VolumeConfig, VolumeEngine, VolumeSabotage, VolumeStats,
};
pub use map::{Copy, LegInfo, MapError, Segment, VolumeMap, VolumeSpec};
pub use regions::{logs_as_stored, DirtyRegions};

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
