//! kiln-plugin-test.
