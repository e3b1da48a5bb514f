//! kiln core runner: workflows, expressions, scheduling and the backend client.
pub mod expr;
pub mod workflow;
