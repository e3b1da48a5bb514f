//! kiln end-to-end tests.
