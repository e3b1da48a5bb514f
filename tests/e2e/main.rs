//! kiln end-to-end tests: the real `kiln`, plugin and conformance binaries over real unix
//! sockets. See `support.rs` for how the binaries are found.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod actions;
mod conformance;
mod daemon;
mod docker;
mod docker_config;
mod exec;
mod fake_forgejo;
mod lifecycle;
mod lxc;
mod node_plugin;
mod python_plugin;
mod qemu;
mod services;
mod support;
mod tls;
