//! The black-box conformance suite for backend plugins.
