//! `action.yml` / `action.yaml` → [`Action`]: composite, node and docker actions.

use indexmap::IndexMap;

use super::error::Error;
use super::model::{Env, Step};
use super::parse::{parse_env, parse_steps};
use super::yaml::{Ctx, Kind, Node, from_yaml, join};

/// A parsed action manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct Action {
    pub name: Option<String>,
    pub description: Option<String>,
    pub author: Option<String>,
    pub inputs: IndexMap<String, ActionInput>,
    pub outputs: IndexMap<String, ActionOutput>,
    pub runs: Runs,
}

/// An action input.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ActionInput {
    pub description: Option<String>,
    pub required: bool,
    /// The default as a string (`true`, `1` from YAML scalars).
    pub default: Option<String>,
    /// `deprecationMessage`.
    pub deprecation_message: Option<String>,
}

/// An action output (`value` is set for composite actions).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ActionOutput {
    pub description: Option<String>,
    pub value: Option<String>,
}

/// `runs`.
#[derive(Debug, Clone, PartialEq)]
pub enum Runs {
    Composite { steps: Vec<Step> },
    Node(NodeRuns),
    Docker(DockerRuns),
}

/// `runs` of a JavaScript action.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NodeRuns {
    /// `node12`, `node16`, `node20` or `node24`.
    pub using: String,
    pub main: String,
    pub pre: Option<String>,
    pub pre_if: Option<String>,
    pub post: Option<String>,
    pub post_if: Option<String>,
}

/// `runs` of a docker action.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DockerRuns {
    /// `Dockerfile` (relative) or `docker://image`.
    pub image: String,
    pub entrypoint: Option<String>,
    pub args: Vec<String>,
    pub env: Env,
    pub pre_entrypoint: Option<String>,
    pub post_entrypoint: Option<String>,
    pub pre_if: Option<String>,
    pub post_if: Option<String>,
}

const USINGS: &[&str] = &["composite", "node12", "node16", "node20", "node24", "docker"];

/// Parses an action manifest. `file` is used in error messages only.
pub fn parse_action(text: &str, file: &str) -> Result<Action, Error> {
    let root = from_yaml(text, file)?;
    let cx = Ctx { file, unknown_keys: None };
    if root.is_null() {
        return Err(cx.err(&root, "", "the action manifest is empty; add `name` and `runs`"));
    }
    let f = cx.fields(
        &root,
        "",
        "an action",
        &["name", "description", "author", "inputs", "outputs", "runs", "branding"],
    )?;
    let mut inputs = IndexMap::new();
    if let Some(n) = f.get("inputs").filter(|n| !n.is_null()) {
        for (name, _, i) in cx.map(n, "inputs")? {
            let p = join("inputs", &name);
            let mut input = ActionInput::default();
            if !i.is_null() {
                // Lenient: real actions carry extra keys here (e.g. `type`), which GitHub ignores.
                let m = cx.map(i, &p)?;
                let get = |k: &str| m.iter().find(|(key, _, _)| key == k).map(|(_, _, v)| *v);
                input.description = cx.opt_string(get("description"), &join(&p, "description"))?;
                // Informational on GitHub: anything but a true value counts as not required.
                input.required = get("required").is_some_and(|r| match &r.kind {
                    Kind::Bool(b) => *b,
                    Kind::Str(s) => s.trim().eq_ignore_ascii_case("true"),
                    _ => false,
                });
                input.default = match get("default") {
                    Some(d) if !d.is_null() => Some(cx.string(d, &join(&p, "default"))?),
                    _ => None,
                };
                input.deprecation_message =
                    cx.opt_string(get("deprecationMessage"), &join(&p, "deprecationMessage"))?;
            }
            inputs.insert(name, input);
        }
    }
    let mut outputs = IndexMap::new();
    if let Some(n) = f.get("outputs").filter(|n| !n.is_null()) {
        for (name, _, o) in cx.map(n, "outputs")? {
            let p = join("outputs", &name);
            let mut out = ActionOutput::default();
            if !o.is_null() {
                let m = cx.map(o, &p)?;
                let get = |k: &str| m.iter().find(|(key, _, _)| key == k).map(|(_, _, v)| *v);
                out.description = cx.opt_string(get("description"), &join(&p, "description"))?;
                out.value = cx.opt_string(get("value"), &join(&p, "value"))?;
            }
            outputs.insert(name, out);
        }
    }
    let runs = match f.get("runs") {
        Some(r) => parse_runs(&cx, r)?,
        None => return Err(cx.err(&root, "", "missing `runs`; add `runs:` with `using`")),
    };
    Ok(Action {
        name: cx.opt_string(f.get("name"), "name")?,
        description: cx.opt_string(f.get("description"), "description")?,
        author: cx.opt_string(f.get("author"), "author")?,
        inputs,
        outputs,
        runs,
    })
}

fn parse_runs(cx: &Ctx<'_>, node: &Node) -> Result<Runs, Error> {
    let entries = cx.map(node, "runs")?;
    let using_node = entries.iter().find(|(k, _, _)| k == "using").map(|(_, _, v)| *v);
    let Some(using_node) = using_node else {
        return Err(cx.err(
            node,
            "runs",
            format!("missing `using`; add `using:` with one of: {}", USINGS.join(", ")),
        ));
    };
    let using = cx.string(using_node, "runs.using")?;
    match using.as_str() {
        "composite" => {
            let f = cx.fields(node, "runs", "composite `runs`", &["using", "steps"])?;
            let steps = match f.get("steps") {
                Some(s) => parse_steps(cx, s, "runs.steps", "the composite action")?,
                None => {
                    return Err(cx.err(
                        node,
                        "runs",
                        "missing `steps`; a composite action needs `steps:`",
                    ));
                }
            };
            for (i, s) in steps.iter().enumerate() {
                if s.run.is_some() && s.shell.is_none() {
                    let n = step_node(node, i).unwrap_or(node);
                    return Err(cx.err(
                        n,
                        &format!("runs.steps[{i}]"),
                        format!("step {i} of the composite action runs a script without `shell`; add `shell: bash` (or another shell)"),
                    ));
                }
            }
            Ok(Runs::Composite { steps })
        }
        "node12" | "node16" | "node20" | "node24" => {
            let f = cx.fields(
                node,
                "runs",
                "node `runs`",
                &["using", "main", "pre", "pre-if", "post", "post-if"],
            )?;
            let main = match f.get("main") {
                Some(m) => cx.string(m, "runs.main")?,
                None => {
                    return Err(cx.err(node, "runs", "missing `main`; add `main: <script.js>`"));
                }
            };
            Ok(Runs::Node(NodeRuns {
                using,
                main,
                pre: cx.opt_string(f.get("pre"), "runs.pre")?,
                pre_if: cx.opt_string(f.get("pre-if"), "runs.pre-if")?,
                post: cx.opt_string(f.get("post"), "runs.post")?,
                post_if: cx.opt_string(f.get("post-if"), "runs.post-if")?,
            }))
        }
        "docker" => {
            let f = cx.fields(
                node,
                "runs",
                "docker `runs`",
                &[
                    "using",
                    "image",
                    "entrypoint",
                    "args",
                    "env",
                    "pre-entrypoint",
                    "post-entrypoint",
                    "pre-if",
                    "post-if",
                ],
            )?;
            let image = match f.get("image") {
                Some(m) => cx.string(m, "runs.image")?,
                None => {
                    return Err(cx.err(
                        node,
                        "runs",
                        "missing `image`; add `image: Dockerfile` or `image: docker://<image>`",
                    ));
                }
            };
            Ok(Runs::Docker(DockerRuns {
                image,
                entrypoint: cx.opt_string(f.get("entrypoint"), "runs.entrypoint")?,
                args: match f.get("args") {
                    Some(a) => cx.string_list(a, "runs.args")?,
                    None => Vec::new(),
                },
                env: match f.get("env") {
                    Some(e) => parse_env(cx, e, "runs.env")?,
                    None => Env::default(),
                },
                pre_entrypoint: cx.opt_string(f.get("pre-entrypoint"), "runs.pre-entrypoint")?,
                post_entrypoint: cx.opt_string(f.get("post-entrypoint"), "runs.post-entrypoint")?,
                pre_if: cx.opt_string(f.get("pre-if"), "runs.pre-if")?,
                post_if: cx.opt_string(f.get("post-if"), "runs.post-if")?,
            }))
        }
        other => Err(cx.err(
            using_node,
            "runs.using",
            format!("unknown `using: {other}`; use one of: {}", USINGS.join(", ")),
        )),
    }
}

fn step_node(runs: &Node, index: usize) -> Option<&Node> {
    let Kind::Map(entries) = &runs.kind else { return None };
    let steps = entries.iter().find(|(k, _)| k.scalar_text().as_deref() == Some("steps"))?;
    match &steps.1.kind {
        Kind::Seq(items) => items.get(index),
        _ => None,
    }
}
