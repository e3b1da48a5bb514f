//! kiln core runner: workflows, expressions, scheduling and the backend client. It knows nothing
//! about Docker or VMs: every backend is a plugin reached through `kiln-plugin-sdk`.
//!
//! Flow of `kiln exec`: parse and validate the workflow ([`workflow`]), start the plugins
//! ([`backends`]), then [`run::run_workflow`] schedules the jobs as a DAG; each job creates an
//! environment on its backend, copies the [`workspace`] in, runs its steps as one Exec each,
//! and removes the environment. Progress goes to an [`output::EventSink`].

pub mod actions;
pub mod backends;
pub mod config;
pub mod expr;
pub mod forgejo;
pub mod identity;
pub mod labels;
pub mod mask;
pub mod metrics;
pub mod output;
pub mod run;
pub mod workflow;
pub mod workspace;
