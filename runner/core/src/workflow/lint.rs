//! The workflow linter: every `${{ }}` and `if:` of a workflow parsed at load time, and the
//! contexts and functions it uses checked against where GitHub makes them available (its
//! "context availability" table), each error located at the offending expression.
//!
//! [`check_workflow`] is what `kiln validate` and `kiln exec` run: the YAML, the model, the
//! expressions and the semantic checks, with every error of the file reported in one pass.

use super::error::Error;
use super::model::Workflow;
use super::parse::parse_root;
use super::validate::validate;
use super::yaml::{Ctx, Kind, Node, from_yaml, join};
use crate::expr::{self, Reference};

/// Every context the expression language knows.
const ALL_CONTEXTS: &[&str] = &[
    "github", "env", "vars", "job", "jobs", "steps", "runner", "secrets", "strategy", "matrix",
    "needs", "inputs",
];

/// What an expression may use at one place of a workflow.
struct Place {
    /// The place as GitHub's documentation names it, for messages.
    name: &'static str,
    contexts: &'static [&'static str],
    /// `success()`, `failure()`, `cancelled()`, `always()`.
    status: bool,
    hash_files: bool,
    /// An `if:` condition: the value is an expression even without `${{ }}`.
    condition: bool,
}

const fn place(name: &'static str, contexts: &'static [&'static str]) -> Place {
    Place { name, contexts, status: false, hash_files: false, condition: false }
}

const BASIC: &[&str] = &["github", "inputs", "vars"];
const WORKFLOW_ENV: &[&str] = &["github", "inputs", "vars", "secrets"];
const CALL_OUTPUT: &[&str] = &["github", "inputs", "vars", "jobs"];
const JOB_IF: &[&str] = &["github", "inputs", "vars", "needs"];
const STRATEGY: &[&str] = &["github", "inputs", "vars", "needs"];
const JOB: &[&str] = &["github", "inputs", "vars", "needs", "strategy", "matrix"];
const JOB_ENV: &[&str] = &["github", "inputs", "vars", "needs", "strategy", "matrix", "secrets"];
const JOB_SECRETS: &[&str] = JOB_ENV;
const JOB_DEFAULTS: &[&str] = &["github", "inputs", "vars", "needs", "strategy", "matrix", "env"];
const CREDENTIALS: &[&str] =
    &["github", "inputs", "vars", "needs", "strategy", "matrix", "env", "secrets"];
const CONTAINER_ENV: &[&str] =
    &["github", "inputs", "vars", "needs", "strategy", "matrix", "job", "runner", "env", "secrets"];
const ENVIRONMENT_URL: &[&str] =
    &["github", "inputs", "vars", "needs", "strategy", "matrix", "job", "runner", "env", "steps"];
const STEP: &[&str] = &[
    "github", "inputs", "vars", "needs", "strategy", "matrix", "job", "runner", "env", "secrets",
    "steps",
];

/// Where a key path of a workflow is evaluated; `None` for text that is never evaluated.
fn place_of(path: &[&str]) -> Option<Place> {
    let step = |name| Place { hash_files: true, ..place(name, STEP) };
    Some(match path {
        ["run-name"] => place("run-name", BASIC),
        ["env", ..] => place("env", WORKFLOW_ENV),
        ["concurrency", ..] => place("concurrency", BASIC),
        ["defaults", ..] => place("defaults", BASIC),
        ["on", "workflow_call", "inputs", _, "default"] => {
            place("on.workflow_call.inputs.<inputs_id>.default", BASIC)
        }
        ["on", "workflow_call", "outputs", _, "value"] => {
            place("on.workflow_call.outputs.<output_id>.value", CALL_OUTPUT)
        }
        ["jobs", _, rest @ ..] => match rest {
            ["name"] => place("jobs.<job_id>.name", JOB),
            ["if"] => Place { status: true, condition: true, ..place("jobs.<job_id>.if", JOB_IF) },
            ["runs-on", ..] => place("jobs.<job_id>.runs-on", JOB),
            ["env", ..] => place("jobs.<job_id>.env", JOB_ENV),
            ["environment", "url"] => place("jobs.<job_id>.environment.url", ENVIRONMENT_URL),
            ["environment", ..] => place("jobs.<job_id>.environment", JOB),
            ["concurrency", ..] => place("jobs.<job_id>.concurrency", JOB),
            ["outputs", ..] => place("jobs.<job_id>.outputs", STEP),
            ["timeout-minutes"] => place("jobs.<job_id>.timeout-minutes", JOB),
            ["cancel-timeout-minutes"] => place("jobs.<job_id>.cancel-timeout-minutes", JOB),
            ["continue-on-error"] => place("jobs.<job_id>.continue-on-error", JOB),
            ["defaults", ..] => place("jobs.<job_id>.defaults.run", JOB_DEFAULTS),
            ["strategy", ..] => place("jobs.<job_id>.strategy", STRATEGY),
            ["container", "credentials", ..] => {
                place("jobs.<job_id>.container.credentials", CREDENTIALS)
            }
            ["container", "env", ..] => place("jobs.<job_id>.container.env", CONTAINER_ENV),
            ["container", ..] => place("jobs.<job_id>.container", JOB),
            ["services", _, "credentials", ..] => {
                place("jobs.<job_id>.services.<service_id>.credentials", CREDENTIALS)
            }
            ["services", _, "env", ..] => {
                place("jobs.<job_id>.services.<service_id>.env", CONTAINER_ENV)
            }
            ["services", ..] => place("jobs.<job_id>.services", JOB),
            ["with", ..] => place("jobs.<job_id>.with", JOB),
            ["secrets", ..] => place("jobs.<job_id>.secrets", JOB_SECRETS),
            ["steps", _, "if"] => {
                Place { status: true, condition: true, ..step("jobs.<job_id>.steps.if") }
            }
            ["steps", _, "id" | "uses"] => return None,
            ["steps", _, ..] => step("jobs.<job_id>.steps"),
            _ => return None,
        },
        _ => return None,
    })
}

/// Parses, checks and validates a workflow file, reporting every error found (sorted by
/// position): YAML syntax, the model, each expression, and the semantic checks.
pub fn check_workflow(text: &str, file: &str) -> Result<Workflow, Vec<Error>> {
    let root = from_yaml(text, file).map_err(|e| vec![e])?;
    let unknown_keys = std::cell::RefCell::new(Vec::new());
    let cx = Ctx { file, unknown_keys: Some(&unknown_keys) };
    let parsed = parse_root(&cx, &root);
    let mut errors = unknown_keys.into_inner();
    if !root.is_null() {
        let mut linter = Linter { file, text, line_starts: line_starts(text), errors: Vec::new() };
        linter.walk(&root, &mut Vec::new(), "");
        errors.extend(linter.errors);
    }
    let wf = match parsed {
        Ok(wf) => {
            if let Err(errs) = validate(&wf) {
                errors.extend(errs);
            }
            Some(wf)
        }
        Err(e) => {
            errors.push(e);
            None
        }
    };
    errors.sort_by_key(|e| (e.line.unwrap_or(0), e.column.unwrap_or(0)));
    errors.dedup();
    match wf {
        Some(wf) if errors.is_empty() => Ok(wf),
        _ => Err(errors),
    }
}

/// The expression checks of a workflow alone (the model and semantic checks left out).
pub fn lint_workflow(text: &str, file: &str) -> Vec<Error> {
    match from_yaml(text, file) {
        Err(e) => vec![e],
        Ok(root) => {
            let mut linter =
                Linter { file, text, line_starts: line_starts(text), errors: Vec::new() };
            linter.walk(&root, &mut Vec::new(), "");
            linter.errors
        }
    }
}

fn line_starts(text: &str) -> Vec<usize> {
    std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1)).collect()
}

struct Linter<'a> {
    file: &'a str,
    text: &'a str,
    line_starts: Vec<usize>,
    errors: Vec<Error>,
}

impl Linter<'_> {
    fn walk(&mut self, node: &Node, keys: &mut Vec<String>, path: &str) {
        match &node.kind {
            Kind::Map(entries) => {
                for (k, v) in entries {
                    let Some(key) = k.scalar_text() else { continue };
                    let p = join(path, &key);
                    keys.push(key);
                    self.walk(v, keys, &p);
                    keys.pop();
                }
            }
            Kind::Seq(items) => {
                for (i, item) in items.iter().enumerate() {
                    keys.push("[]".to_owned());
                    self.walk(item, keys, &format!("{path}[{i}]"));
                    keys.pop();
                }
            }
            Kind::Str(s) => {
                let k: Vec<&str> = keys.iter().map(String::as_str).collect();
                if let Some(place) = place_of(&k) {
                    self.check_value(node, s, path, &place);
                }
            }
            _ => {}
        }
    }

    /// Checks one string value: its `${{ }}` expressions, or the whole text of a condition.
    fn check_value(&mut self, node: &Node, s: &str, path: &str, place: &Place) {
        if place.condition && !s.contains("${{") {
            if s.trim().is_empty() {
                return;
            }
            let lead = s.chars().take_while(|c| c.is_whitespace()).count();
            let parsed = expr::parse(s);
            self.check_expr(node, s, lead, parsed, path, place);
            return;
        }
        for (offset, parsed) in expr::template_expressions(s) {
            self.check_expr(node, s, offset, parsed, path, place);
        }
    }

    fn check_expr(
        &mut self,
        node: &Node,
        s: &str,
        offset: usize,
        parsed: Result<expr::Expr, expr::Error>,
        path: &str,
        place: &Place,
    ) {
        let e = match parsed {
            Ok(e) => e,
            Err(err) => {
                let (line, col) = self.locate(node, s, offset + err.column().saturating_sub(1));
                let message = format!(
                    "invalid expression `{}`: {} (column {}); fix the expression",
                    err.expression(),
                    err.message(),
                    err.column()
                );
                self.push(line, col, path, message);
                return;
            }
        };
        for r in e.references() {
            let (message, col) = match r {
                Reference::Context(name, col) => {
                    let mut lower = name.to_ascii_lowercase();
                    // Forgejo's names of `github`.
                    if lower == "forgejo" || lower == "forge" {
                        lower = "github".to_owned();
                    }
                    if !ALL_CONTEXTS.contains(&lower.as_str()) {
                        (
                            format!(
                                "unknown context `{name}` in `{}`; available here: {}",
                                e.source(),
                                place.contexts.join(", ")
                            ),
                            col,
                        )
                    } else if !place.contexts.contains(&lower.as_str()) {
                        (
                            format!(
                                "context `{name}` is not available in `{}`; available there: {}",
                                place.name,
                                place.contexts.join(", ")
                            ),
                            col,
                        )
                    } else {
                        continue;
                    }
                }
                Reference::Function(f, col) => {
                    let status = matches!(f, "success" | "failure" | "cancelled" | "always");
                    if status && !place.status {
                        (
                            format!(
                                "function `{f}()` is only available in `if:` conditions, not in `{}`",
                                place.name
                            ),
                            col,
                        )
                    } else if f == "hashFiles" && !place.hash_files {
                        (
                            format!(
                                "function `hashFiles()` is only available in steps and step conditions, not in `{}`",
                                place.name
                            ),
                            col,
                        )
                    } else {
                        continue;
                    }
                }
            };
            let (line, c) = self.locate(node, s, offset + col - 1);
            self.push(line, c, path, message);
        }
    }

    fn push(&mut self, line: u32, col: u32, path: &str, message: String) {
        self.errors.push(Error {
            file: self.file.to_owned(),
            line: (line > 0).then_some(line),
            column: (line > 0 && col > 0).then_some(col),
            path: path.to_owned(),
            message,
        });
    }

    /// The source line and column of the character at `offset` in a scalar's value: found by
    /// looking for the value's text around that character in the file, from the scalar's
    /// start; the scalar's own position when the text is not found verbatim (escapes, folds).
    fn locate(&self, node: &Node, value: &str, offset: usize) -> (u32, u32) {
        let fallback = (node.line, node.col);
        let Some(&start) = self.line_starts.get(node.line.saturating_sub(1) as usize) else {
            return fallback;
        };
        let chars: Vec<char> = value.chars().collect();
        let offset = offset.min(chars.len());
        // The line of the value holding the character, cut at the character.
        let line_begin = chars[..offset].iter().rposition(|c| *c == '\n').map_or(0, |i| i + 1);
        let line_end =
            chars[offset..].iter().position(|c| *c == '\n').map_or(chars.len(), |i| offset + i);
        let needle: String = chars[line_begin..line_end].iter().collect();
        let before = offset - line_begin;
        let Some(rest) = self.text.get(start..) else { return fallback };
        let pos = if needle.trim().is_empty() { None } else { rest.find(needle.trim_start()) };
        let Some(found) = pos else { return fallback };
        let trimmed = needle.chars().count() - needle.trim_start().chars().count();
        let byte = start + found;
        let line_idx = match self.line_starts.binary_search(&byte) {
            Ok(i) => i,
            Err(i) => i - 1,
        };
        let col_chars = self.text[self.line_starts[line_idx]..byte].chars().count();
        let col = col_chars + before.saturating_sub(trimmed) + 1;
        (line_idx as u32 + 1, col as u32)
    }
}
