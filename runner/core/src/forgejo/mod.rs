//! Daemon mode: the Forgejo / Gitea runner protocol (`runner.v1` over Connect JSON), the
//! reporter that turns a run's events into log rows and step states, the translation of a task
//! into a run, and the poller that fetches and runs tasks up to the runner's capacity.
//!
//! The wire protocol is described field by field in `shared/design/forgejo-protocol.md`.

pub mod client;
pub mod poller;
pub mod registration;
pub mod reporter;
pub mod task;
pub mod types;
