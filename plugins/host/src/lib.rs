//! kiln-plugin-host.
