//! e2e support crate.
