//! The crate's one integration test binary.

mod common;
mod errors;
mod fixtures;
mod loops;
mod precedence;
