//! The GitHub Actions expression language: parsing, evaluation, `${{ }}` interpolation and
//! `if:` conditions, with GitHub's coercion rules and built-in functions.
//!
//! ```text
//! let expr = parse("github.event_name == 'push' && success()")?;
//! let value = evaluate(&expr, &Scope { contexts: &contexts, host: &host })?;
//! ```

mod eval;
mod functions;
mod hash;
mod lexer;
mod parser;
mod value;

#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use hash::hash_files_in;
pub use serde_json::Value;

use parser::Node;

use value::Val;

/// Maximum nesting of arrays/objects that [`interpolate_value`] walks.
const MAX_VALUE_DEPTH: usize = 128;

/// The status of the job (or composite action) so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobStatus {
    /// No step failed and the run was not cancelled.
    Success,
    /// A step failed.
    Failure,
    /// The run was cancelled.
    Cancelled,
}

/// What the evaluator needs from its caller besides the contexts.
pub trait Host {
    /// The status of the job (or composite action) so far: Success, Failure or Cancelled.
    fn job_status(&self) -> JobStatus;
    /// hashFiles(patterns): SHA-256 hex as GitHub computes it, or "" when nothing matched.
    fn hash_files(&self, patterns: &[String]) -> Result<String, String>;
}

/// A [`Host`] for a fixed status that hashes files below a local workspace directory.
#[derive(Debug, Clone)]
pub struct LocalHost {
    /// What the status functions report.
    pub status: JobStatus,
    /// The root that `hashFiles` patterns are relative to.
    pub workspace: PathBuf,
}

impl Host for LocalHost {
    fn job_status(&self) -> JobStatus {
        self.status
    }

    fn hash_files(&self, patterns: &[String]) -> Result<String, String> {
        hash_files_in(&self.workspace, patterns)
    }
}

/// Everything an evaluation can see.
#[derive(Clone, Copy)]
pub struct Scope<'a> {
    /// Root named values (`github`, `env`, `matrix`, …), looked up case-insensitively.
    pub contexts: &'a serde_json::Map<String, Value>,
    /// Job status and file hashing.
    pub host: &'a (dyn Host + Sync),
}

/// An error while parsing or evaluating an expression, with its location.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} at column {column} in expression: '{expression}'")]
pub struct Error {
    message: String,
    column: usize,
    expression: String,
}

impl Error {
    fn new(message: impl Into<String>, column: usize, expression: &str) -> Error {
        Error { message: message.into(), column, expression: expression.to_string() }
    }

    /// What went wrong, without the location.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The 1-based character column in [`Error::expression`].
    pub fn column(&self) -> usize {
        self.column
    }

    /// The expression (or template) text the column refers to.
    pub fn expression(&self) -> &str {
        &self.expression
    }
}

/// A parsed expression.
#[derive(Debug, Clone)]
pub struct Expr {
    root: Node,
    source: String,
}

impl Expr {
    /// The expression text (without surrounding whitespace).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the expression calls `success()`, `failure()`, `cancelled()` or `always()`.
    pub fn uses_status_function(&self) -> bool {
        self.root.calls_status_function()
    }

    /// The contexts (root named values) and functions the expression uses, in source order,
    /// each with its 1-based column in [`Expr::source`].
    pub fn references(&self) -> Vec<Reference> {
        let mut out = Vec::new();
        self.root.references(&mut out);
        out.sort_by_key(|r| match r {
            Reference::Context(_, c) | Reference::Function(_, c) => *c,
        });
        out
    }
}

/// A name an expression uses, with its 1-based column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    /// A context such as `github` (as written).
    Context(String, usize),
    /// A function, by its canonical name (`hashFiles`, `success`).
    Function(&'static str, usize),
}

/// Each `${{ … }}` of a template, in order: the 0-based character offset in `template` where
/// the expression's trimmed text starts, and the parsed expression or the parse error (whose
/// column counts from that offset). An unclosed `${{` is an error at its `$`.
pub fn template_expressions(template: &str) -> Vec<(usize, Result<Expr, Error>)> {
    let chars: Vec<char> = template.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i + 2 < chars.len() {
        if chars[i] == '$' && chars[i + 1] == '{' && chars[i + 2] == '{' {
            let Some(end) = lexer::find_expression_end(&chars, i + 3) else {
                out.push((i, Err(Error::new("unclosed expression: missing '}}'", 1, template))));
                break;
            };
            let lead = chars[i + 3..end].iter().take_while(|c| c.is_whitespace()).count();
            let inner: String = chars[i + 3..end].iter().collect();
            out.push((i + 3 + lead, parse(&inner)));
            i = end + 2;
        } else {
            i += 1;
        }
    }
    out
}

/// Parses an expression: the text between `${{` and `}}`, or a bare `if:` condition.
pub fn parse(src: &str) -> Result<Expr, Error> {
    let source = src.trim();
    match parser::parse_node(source) {
        Ok(root) => Ok(Expr { root, source: source.to_string() }),
        Err(e) => Err(Error::new(e.message, e.col, source)),
    }
}

fn eval_val<'a>(expr: &Expr, scope: &Scope<'a>) -> Result<Val<'a>, Error> {
    eval::check_named_values(&expr.root, scope)
        .and_then(|()| eval::eval(&expr.root, scope))
        .map_err(|e| Error::new(e.message, e.col, &expr.source))
}

/// Evaluates a parsed expression. NaN and ±Infinity results become the strings `"NaN"`,
/// `"Infinity"` and `"-Infinity"`, since JSON cannot hold them.
pub fn evaluate(expr: &Expr, scope: &Scope) -> Result<Value, Error> {
    eval_val(expr, scope).map(Val::into_json)
}

/// Parses and evaluates an expression.
pub fn evaluate_str(src: &str, scope: &Scope) -> Result<Value, Error> {
    evaluate(&parse(src)?, scope)
}

/// GitHub truthiness: `false`, `0`, `-0`, `""` and `null` are falsy (NaN cannot occur in a
/// JSON value); everything else, including empty arrays and objects, is truthy.
pub fn truthy(v: &Value) -> bool {
    value::truthy(&Val::from_json(v))
}

/// Converts a value to a string the way interpolation does.
pub fn to_string(v: &Value) -> String {
    value::to_str(&Val::from_json(v)).into_owned()
}

/// Whether the string contains a `${{`.
pub fn contains_expression(s: &str) -> bool {
    s.contains("${{")
}

/// A piece of a template.
enum Part {
    Text(String),
    Expr(Expr),
}

/// Splits a template into text and parsed `${{ … }}` expressions.
fn split_template(template: &str) -> Result<Vec<Part>, Error> {
    let chars: Vec<char> = template.chars().collect();
    let mut parts = Vec::new();
    let mut text = String::new();
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == '$' && chars.get(i + 1) == Some(&'{') && chars.get(i + 2) == Some(&'{') {
            let Some(end) = lexer::find_expression_end(&chars, i + 3) else {
                return Err(Error::new("unclosed expression: missing '}}'", i + 1, template));
            };
            let inner: String = chars[i + 3..end].iter().collect();
            if !text.is_empty() {
                parts.push(Part::Text(std::mem::take(&mut text)));
            }
            parts.push(Part::Expr(parse(&inner)?));
            i = end + 2;
        } else {
            text.push(chars[i]);
            i += 1;
        }
    }
    if !text.is_empty() {
        parts.push(Part::Text(text));
    }
    Ok(parts)
}

/// The expression of a template that is exactly one `${{ … }}` (surrounding whitespace
/// allowed), if it is one.
fn single_expression(template: &str) -> Result<Option<Expr>, Error> {
    let trimmed = template.trim();
    if !trimmed.starts_with("${{") {
        return Ok(None);
    }
    let mut parts = split_template(trimmed)?;
    match (parts.pop(), parts.is_empty()) {
        (Some(Part::Expr(e)), true) => Ok(Some(e)),
        _ => Ok(None),
    }
}

fn interpolate_parts(parts: &[Part], scope: &Scope) -> Result<String, Error> {
    let mut out = String::new();
    for part in parts {
        match part {
            Part::Text(t) => out.push_str(t),
            Part::Expr(e) => out.push_str(&value::to_str(&eval_val(e, scope)?)),
        }
    }
    Ok(out)
}

/// Replaces every `${{ … }}` in a string with the value converted to a string; text
/// outside stays verbatim.
pub fn interpolate(template: &str, scope: &Scope) -> Result<String, Error> {
    if !contains_expression(template) {
        return Ok(template.to_string());
    }
    interpolate_parts(&split_template(template)?, scope)
}

/// Interpolates strings inside a value, recursively over arrays and objects (keys too).
/// A string that is exactly one `${{ expr }}` keeps the type of the value.
pub fn interpolate_value(v: &Value, scope: &Scope) -> Result<Value, Error> {
    interpolate_value_at(v, scope, 0)
}

fn interpolate_value_at(v: &Value, scope: &Scope, depth: usize) -> Result<Value, Error> {
    if depth > MAX_VALUE_DEPTH {
        return Err(Error::new(
            format!("value nesting exceeds the maximum depth of {MAX_VALUE_DEPTH}"),
            1,
            "",
        ));
    }
    match v {
        Value::String(s) if contains_expression(s) => match single_expression(s)? {
            Some(e) => evaluate(&e, scope),
            None => interpolate(s, scope).map(Value::String),
        },
        Value::Array(items) => items
            .iter()
            .map(|x| interpolate_value_at(x, scope, depth + 1))
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Array),
        Value::Object(map) => {
            let mut out = serde_json::Map::new();
            for (k, x) in map {
                out.insert(interpolate(k, scope)?, interpolate_value_at(x, scope, depth + 1)?);
            }
            Ok(Value::Object(out))
        }
        other => Ok(other.clone()),
    }
}

/// Evaluates an `if:` condition. The text may or may not be wrapped in `${{ }}`; when it
/// calls no status function it means `success() && (cond)`, and an empty condition means
/// `success()`.
pub fn evaluate_if(cond: &str, scope: &Scope) -> Result<bool, Error> {
    let cond = cond.trim();
    let success = || scope.host.job_status() == JobStatus::Success;
    if cond.is_empty() {
        return Ok(success());
    }
    if contains_expression(cond) {
        if let Some(e) = single_expression(cond)? {
            return eval_if_expr(&e, scope);
        }
        // Text mixed with expressions: the interpolated string is the condition.
        let parts = split_template(cond)?;
        let status = parts.iter().any(|p| matches!(p, Part::Expr(e) if e.uses_status_function()));
        for part in &parts {
            if let Part::Expr(e) = part {
                check_named_values(e, scope)?;
            }
        }
        if !status && !success() {
            return Ok(false);
        }
        return Ok(!interpolate_parts(&parts, scope)?.is_empty());
    }
    eval_if_expr(&parse(cond)?, scope)
}

/// Reports unknown named values even when the condition is not going to be evaluated.
fn check_named_values(e: &Expr, scope: &Scope) -> Result<(), Error> {
    eval::check_named_values(&e.root, scope)
        .map_err(|err| Error::new(err.message, err.col, &e.source))
}

fn eval_if_expr(e: &Expr, scope: &Scope) -> Result<bool, Error> {
    check_named_values(e, scope)?;
    if !e.uses_status_function() && scope.host.job_status() != JobStatus::Success {
        return Ok(false);
    }
    Ok(value::truthy(&eval_val(e, scope)?))
}
