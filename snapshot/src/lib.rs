//! Everything in snapsync that touches a volume: opening and sizing files
//! and block devices, reading, writing and zeroing them, and (in later
//! modules) LVM and reflink snapshots and changed-block maps.
//!
//! All `unsafe` code of the workspace lives in [`sys`].

pub mod direct;
pub mod identity;
pub mod lock;
pub mod mapped;
pub mod reflink;
pub mod sys;
pub mod volume;

pub use identity::VolumeIdentity;
pub use mapped::MappedVolume;
pub use volume::{
    locate, Access, Fault, FileVolume, Located, MemVolume, Missing, Resolved, Volume, VolumeError,
    VolumeKind,
};
pub mod lvm;
pub mod thin_delta;
