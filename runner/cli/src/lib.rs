//! kiln CLI.
