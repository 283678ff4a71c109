//! zae-limiter's token-bucket core (`docs/design.md` section 1).
//!
//! The math lives in [`bucket`] as plain Rust; the optional `python` feature adds the PyO3
//! module `zae_limiter._native` on top of it.

pub mod block;
pub mod bucket;

pub use block::{take_all, Block};
pub use bucket::{
    available, decide, full_at_of, time_until_available, BucketInput, CoreError, CoreResult,
    Outcome, WriteMode, FULL_AT_MAX,
};

#[cfg(feature = "python")]
mod python;
