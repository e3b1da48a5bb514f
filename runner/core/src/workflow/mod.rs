//! The workflow model: workflow and action YAML → typed structs with located errors,
//! validation, the `needs` graph, matrix expansion, and the small parsers the executor needs
//! (shell templates, environment files, workflow commands).

mod action;
mod commands;
mod envfile;
mod error;
mod lint;
mod matrix;
mod model;
mod parse;
mod shell;
mod validate;
mod yaml;

#[cfg(test)]
mod tests;

pub use action::{Action, ActionInput, ActionOutput, DockerRuns, NodeRuns, Runs, parse_action};
pub use commands::{
    Annotation, AnnotationLevel, Command, CommandProcessor, LineKind, parse_command,
};
pub use envfile::{parse_env_file, parse_path_file};
pub use error::{Error, Errors};
pub use lint::{check_workflow, lint_workflow};
pub use matrix::{Combination, expand as expand_matrix};
pub use model::{
    BoolOrExpr, CallOutput, CallSecret, Concurrency, Container, Credentials, Defaults, Env,
    Environment, Event, Input, InputType, Job, JobSecrets, NumberOrExpr, Permissions, RunDefaults,
    RunsOn, Step, Strategy, Triggers, Workflow,
};
pub use parse::parse_workflow;
pub use shell::{ShellSpec, shell_command};
pub use validate::{
    JobGraph, check_job_uses, check_uses, job_graph, needs_order, valid_job_id, validate,
};
