//! Images: OCI images pulled from registries or imported from archives,
//! stored once per host and unpacked once per image.

pub mod unpack;
