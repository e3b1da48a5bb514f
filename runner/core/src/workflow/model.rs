//! Typed workflow and step model, mirroring the workflow YAML; expressions are kept as strings.

use indexmap::IndexMap;
use serde_json::Value;

/// A parsed workflow file.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Workflow {
    /// The file name given to the parser, for messages.
    pub file: String,
    pub name: Option<String>,
    /// `description` (Forgejo): shown nowhere by kiln, kept for tools.
    pub description: Option<String>,
    /// `enable-email-notifications` (Forgejo): a server-side setting; the runner ignores it.
    pub enable_email_notifications: Option<bool>,
    /// `run-name`.
    pub run_name: Option<String>,
    /// `on`; `None` when the key is missing (validation reports it).
    pub on: Option<Triggers>,
    pub env: Env,
    pub defaults: Option<Defaults>,
    pub concurrency: Option<Concurrency>,
    pub permissions: Option<Permissions>,
    /// Jobs in source order.
    pub jobs: IndexMap<String, Job>,
    /// Line of the `on` key (0 when missing).
    pub on_line: u32,
}

/// The events that trigger a workflow, in source order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Triggers {
    pub events: IndexMap<String, Event>,
}

/// One event under `on`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Event {
    /// The event's configuration verbatim (`null` when none): filters such as `branches`,
    /// `types`, `paths`, or the `schedule` list.
    pub config: Value,
    /// `workflow_dispatch.inputs` / `workflow_call.inputs`.
    pub inputs: IndexMap<String, Input>,
    /// `workflow_call.outputs`.
    pub outputs: IndexMap<String, CallOutput>,
    /// `workflow_call.secrets`.
    pub secrets: IndexMap<String, CallSecret>,
}

/// Type of a `workflow_dispatch` / `workflow_call` input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InputType {
    #[default]
    String,
    Boolean,
    Number,
    Choice,
    Environment,
}

/// A `workflow_dispatch` / `workflow_call` input.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Input {
    pub description: Option<String>,
    /// `type` (defaults to `string`).
    pub type_: InputType,
    pub required: bool,
    /// The default, typed as written (may be an expression string).
    pub default: Option<Value>,
    /// `options` of a `choice` input.
    pub options: Vec<String>,
}

/// A `workflow_call` output.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CallOutput {
    pub description: Option<String>,
    pub value: String,
}

/// A `workflow_call` secret.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CallSecret {
    pub description: Option<String>,
    pub required: bool,
}

/// An `env` block: a map (scalars turned to strings) or one expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Env {
    Map(IndexMap<String, String>),
    Expr(String),
}

impl Default for Env {
    fn default() -> Self {
        Env::Map(IndexMap::new())
    }
}

impl Env {
    /// The literal map, or `None` for an expression.
    pub fn as_map(&self) -> Option<&IndexMap<String, String>> {
        match self {
            Env::Map(m) => Some(m),
            Env::Expr(_) => None,
        }
    }

    /// Whether this is an empty map.
    pub fn is_empty(&self) -> bool {
        matches!(self, Env::Map(m) if m.is_empty())
    }
}

/// A literal boolean or an expression string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BoolOrExpr {
    Bool(bool),
    Expr(String),
}

/// A literal number or an expression string.
#[derive(Debug, Clone, PartialEq)]
pub enum NumberOrExpr {
    Number(f64),
    Expr(String),
}

/// `defaults`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Defaults {
    pub run: Option<RunDefaults>,
}

/// `defaults.run`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RunDefaults {
    pub shell: Option<String>,
    pub working_directory: Option<String>,
}

/// `concurrency`: a group name, or `{group, cancel-in-progress}`.
#[derive(Debug, Clone, PartialEq)]
pub struct Concurrency {
    pub group: String,
    pub cancel_in_progress: Option<BoolOrExpr>,
}

/// `permissions`: `read-all` / `write-all` (or an expression), or a map scope → level.
#[derive(Debug, Clone, PartialEq)]
pub enum Permissions {
    All(String),
    Map(IndexMap<String, String>),
}

/// `runs-on`: labels (a string is one label), or `{group, labels}`.
#[derive(Debug, Clone, PartialEq)]
pub enum RunsOn {
    Labels(Vec<String>),
    Group { group: Option<String>, labels: Vec<String> },
}

/// `environment`: a name, or `{name, url}`.
#[derive(Debug, Clone, PartialEq)]
pub struct Environment {
    pub name: String,
    pub url: Option<String>,
}

/// `strategy`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Strategy {
    /// The matrix as written: a map (may contain expressions) or an expression string.
    pub matrix: Option<Value>,
    pub fail_fast: Option<BoolOrExpr>,
    pub max_parallel: Option<NumberOrExpr>,
}

/// `container.credentials`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Credentials {
    pub username: Option<String>,
    pub password: Option<String>,
}

/// A job container or a service container.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Container {
    pub image: String,
    pub credentials: Option<Credentials>,
    pub env: Env,
    pub ports: Vec<String>,
    pub volumes: Vec<String>,
    pub options: Option<String>,
    /// `cmd` (Forgejo/Gitea): the command of a service container. A job container keeps
    /// running `tail -f /dev/null` for the job's steps, as in Forgejo Runner.
    pub cmd: Vec<String>,
}

/// A job's `secrets` when it calls a reusable workflow.
#[derive(Debug, Clone, PartialEq)]
pub enum JobSecrets {
    Inherit,
    Map(IndexMap<String, String>),
}

/// A job.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Job {
    pub name: Option<String>,
    pub needs: Vec<String>,
    /// `if` (a YAML boolean becomes `"true"` / `"false"`).
    pub if_: Option<String>,
    pub runs_on: Option<RunsOn>,
    pub environment: Option<Environment>,
    pub concurrency: Option<Concurrency>,
    pub outputs: IndexMap<String, String>,
    pub env: Env,
    pub defaults: Option<Defaults>,
    pub steps: Option<Vec<Step>>,
    pub timeout_minutes: Option<NumberOrExpr>,
    /// `cancel-timeout-minutes` (in Forgejo's and GitHub's schema; kiln gives a cancelled job's
    /// cleanup its own fixed grace period).
    pub cancel_timeout_minutes: Option<NumberOrExpr>,
    pub strategy: Option<Strategy>,
    pub continue_on_error: Option<BoolOrExpr>,
    pub container: Option<Container>,
    pub services: IndexMap<String, Container>,
    /// A reusable workflow (`./.github/workflows/x.yml` or `owner/repo/path@ref`).
    pub uses: Option<String>,
    /// Inputs of a reusable workflow, typed as written.
    pub with: IndexMap<String, Value>,
    pub secrets: Option<JobSecrets>,
    pub permissions: Option<Permissions>,
    /// 1-based line of the job's key.
    pub line: u32,
    /// Line and column of each `needs` entry, in order (for messages).
    pub needs_pos: Vec<(u32, u32)>,
    /// Line and column of the `uses` value (for messages; `(0, 0)` when absent).
    pub uses_pos: (u32, u32),
}

/// A step (in a job, or in a composite action).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Step {
    pub id: Option<String>,
    pub if_: Option<String>,
    pub name: Option<String>,
    /// Exactly one of `uses` and `run` is set.
    pub uses: Option<String>,
    pub run: Option<String>,
    pub shell: Option<String>,
    pub working_directory: Option<String>,
    pub env: Env,
    /// Action inputs; scalars turned to strings.
    pub with: IndexMap<String, String>,
    pub continue_on_error: Option<BoolOrExpr>,
    pub timeout_minutes: Option<NumberOrExpr>,
    /// 1-based line where the step starts.
    pub line: u32,
    /// Line and column of the `uses` value (for messages; `(0, 0)` when absent).
    pub uses_pos: (u32, u32),
}
