//! The crate's one integration test binary.

mod common;
mod fixtures;
