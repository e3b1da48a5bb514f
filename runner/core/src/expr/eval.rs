//! Tree-walking evaluator: contexts lookup, property/index/filter access, operators and
//! function calls.

use std::borrow::Cow;

use serde_json::Value;

use super::functions::{self, Func};
use super::parser::{Accessor, BinOp, Literal, Node, NodeKind};
use super::value::{Val, get_ignore_case, loose_eq, loose_lt, to_num, to_str, truthy};
use super::{JobStatus, Scope};

/// An evaluation failure: message and 1-based column.
#[derive(Debug)]
pub(crate) struct EvalError {
    pub(crate) message: String,
    pub(crate) col: usize,
}

type EResult<T> = Result<T, EvalError>;

fn err<T>(message: String, col: usize) -> EResult<T> {
    Err(EvalError { message, col })
}

/// Checks that every named value in the expression exists, before anything is evaluated,
/// so a typo is reported even in a branch that short-circuiting would skip (as GitHub does).
pub(crate) fn check_named_values(node: &Node, scope: &Scope<'_>) -> EResult<()> {
    match &node.kind {
        NodeKind::Literal(_) => Ok(()),
        NodeKind::NamedValue(name) => match named_value(scope.contexts, name) {
            Some(_) => Ok(()),
            None => {
                let names: Vec<&str> = scope.contexts.keys().map(String::as_str).collect();
                err(
                    format!(
                        "unrecognized named-value: '{name}' (available: {})",
                        if names.is_empty() { "none".to_string() } else { names.join(", ") }
                    ),
                    node.col,
                )
            }
        },
        NodeKind::Call { args, .. } => args.iter().try_for_each(|a| check_named_values(a, scope)),
        NodeKind::Not(inner) => check_named_values(inner, scope),
        NodeKind::Binary { left, right, .. } => {
            check_named_values(left, scope)?;
            check_named_values(right, scope)
        }
        NodeKind::And(items) | NodeKind::Or(items) => {
            items.iter().try_for_each(|a| check_named_values(a, scope))
        }
        NodeKind::Access { base, path } => {
            check_named_values(base, scope)?;
            path.iter().try_for_each(|(a, _)| match a {
                Accessor::Index(index) => check_named_values(index, scope),
                _ => Ok(()),
            })
        }
    }
}

/// A context by name; `forgejo` and `forge` are Forgejo's names of `github`, as Forgejo Runner
/// has them, unless the caller gives them.
fn named_value<'m>(
    contexts: &'m serde_json::Map<String, serde_json::Value>,
    name: &str,
) -> Option<&'m serde_json::Value> {
    get_ignore_case(contexts, name).or_else(|| {
        (name.eq_ignore_ascii_case("forgejo") || name.eq_ignore_ascii_case("forge"))
            .then(|| get_ignore_case(contexts, "github"))
            .flatten()
    })
}

/// Evaluates a node.
pub(crate) fn eval<'a>(node: &Node, scope: &Scope<'a>) -> EResult<Val<'a>> {
    match &node.kind {
        NodeKind::Literal(lit) => Ok(match lit {
            Literal::Null => Val::Null,
            Literal::Bool(b) => Val::Bool(*b),
            Literal::Num(n) => Val::Num(*n),
            Literal::Str(s) => Val::Str(Cow::Owned(s.clone())),
        }),
        NodeKind::NamedValue(name) => match named_value(scope.contexts, name) {
            Some(v) => Ok(Val::from_json(v)),
            None => check_named_values(node, scope).map(|()| Val::Null),
        },
        NodeKind::Not(inner) => Ok(Val::Bool(!truthy(&eval(inner, scope)?))),
        NodeKind::And(items) => {
            let mut last = Val::Null;
            for item in items {
                last = eval(item, scope)?;
                if !truthy(&last) {
                    break;
                }
            }
            Ok(last)
        }
        NodeKind::Or(items) => {
            let mut last = Val::Null;
            for item in items {
                last = eval(item, scope)?;
                if truthy(&last) {
                    break;
                }
            }
            Ok(last)
        }
        NodeKind::Binary { op, left, right } => {
            let l = eval(left, scope)?;
            let r = eval(right, scope)?;
            Ok(Val::Bool(match op {
                BinOp::Eq => loose_eq(&l, &r),
                BinOp::Ne => !loose_eq(&l, &r),
                BinOp::Lt => loose_lt(&l, &r),
                BinOp::Gt => loose_lt(&r, &l),
                BinOp::Le => loose_lt(&l, &r) || loose_eq(&l, &r),
                BinOp::Ge => loose_lt(&r, &l) || loose_eq(&l, &r),
            }))
        }
        NodeKind::Access { base, path } => {
            let mut cur = eval(base, scope)?;
            for (accessor, _) in path {
                cur = match accessor {
                    Accessor::Property(name) => access(cur, &Key::Name(name)),
                    Accessor::Star => star(cur),
                    Accessor::Index(index) => {
                        let key = eval(index, scope)?;
                        access(cur, &Key::Value(&key))
                    }
                };
            }
            Ok(cur)
        }
        NodeKind::Call { func, args } => call(*func, args, node.col, scope),
    }
}

/// What an accessor looks up.
enum Key<'k, 'v> {
    Name(&'k str),
    Value(&'k Val<'v>),
}

/// Looks one key up in a JSON value; `None` when absent or not applicable.
fn lookup<'a>(v: Cow<'a, Value>, key: &Key<'_, '_>) -> Option<Cow<'a, Value>> {
    let array_index = |arr: &Vec<Value>| -> Option<usize> {
        let n = match key {
            Key::Name(_) => return None,
            Key::Value(v) if v.is_primitive() => to_num(v),
            Key::Value(_) => return None,
        };
        // Non-negative, integral after truncation, in range.
        if n.is_nan() || n < 0.0 {
            return None;
        }
        let i = n.floor();
        if i < arr.len() as f64 { Some(i as usize) } else { None }
    };
    let object_key = || -> Option<Cow<'_, str>> {
        match key {
            Key::Name(name) => Some(Cow::Borrowed(name)),
            Key::Value(v) if v.is_primitive() => Some(to_str(v)),
            Key::Value(_) => None,
        }
    };
    match v {
        Cow::Borrowed(Value::Array(arr)) => {
            array_index(arr).and_then(|i| arr.get(i)).map(Cow::Borrowed)
        }
        Cow::Borrowed(Value::Object(map)) => {
            object_key().and_then(|k| get_ignore_case(map, &k)).map(Cow::Borrowed)
        }
        Cow::Owned(Value::Array(arr)) => {
            array_index(&arr).and_then(|i| arr.get(i)).map(|x| Cow::Owned(x.clone()))
        }
        Cow::Owned(Value::Object(map)) => {
            object_key().and_then(|k| get_ignore_case(&map, &k)).map(|x| Cow::Owned(x.clone()))
        }
        _ => None,
    }
}

/// Property or index access; missing paths give null, filter results are mapped over.
fn access<'a>(cur: Val<'a>, key: &Key<'_, '_>) -> Val<'a> {
    match cur {
        Val::Json(v) => lookup(v, key).map_or(Val::Null, Val::from_cow),
        Val::Filtered(items) => {
            Val::Filtered(items.into_iter().filter_map(|item| lookup(item, key)).collect())
        }
        _ => Val::Null,
    }
}

/// Children of an array or object, as a filter sees them.
fn children<'a>(v: Cow<'a, Value>) -> Vec<Cow<'a, Value>> {
    match v {
        Cow::Borrowed(Value::Array(a)) => a.iter().map(Cow::Borrowed).collect(),
        Cow::Borrowed(Value::Object(m)) => m.values().map(Cow::Borrowed).collect(),
        Cow::Owned(Value::Array(a)) => a.into_iter().map(Cow::Owned).collect(),
        Cow::Owned(Value::Object(m)) => m.into_iter().map(|(_, x)| Cow::Owned(x)).collect(),
        _ => Vec::new(),
    }
}

/// The object filter `.*`.
fn star(cur: Val<'_>) -> Val<'_> {
    match cur {
        Val::Json(v) => Val::Filtered(children(v)),
        Val::Filtered(items) => Val::Filtered(items.into_iter().flat_map(children).collect()),
        _ => Val::Null,
    }
}

fn call<'a>(func: Func, args: &[Node], col: usize, scope: &Scope<'a>) -> EResult<Val<'a>> {
    // Re-checked here so a hand-built AST can never index out of range.
    func.check_arity(args.len()).map_err(|message| EvalError { message, col })?;
    let status = || scope.host.job_status();
    match func {
        Func::Success => return Ok(Val::Bool(status() == JobStatus::Success)),
        Func::Failure => return Ok(Val::Bool(status() == JobStatus::Failure)),
        Func::Cancelled => return Ok(Val::Bool(status() == JobStatus::Cancelled)),
        Func::Always => return Ok(Val::Bool(true)),
        _ => {}
    }
    let mut values = Vec::with_capacity(args.len());
    for arg in args {
        values.push(eval(arg, scope)?);
    }
    let str_owned = |s: String| Val::Str(Cow::Owned(s));
    Ok(match (func, values.as_slice()) {
        (Func::Contains, [a, b]) => Val::Bool(functions::contains(a, b)),
        (Func::StartsWith, [a, b]) => Val::Bool(functions::starts_with(a, b)),
        (Func::EndsWith, [a, b]) => Val::Bool(functions::ends_with(a, b)),
        (Func::Join, [a]) => str_owned(functions::join(a, None)),
        (Func::Join, [a, b]) => str_owned(functions::join(a, Some(b))),
        (Func::ToJson, [a]) => str_owned(functions::to_json(a)),
        (Func::FromJson, [a]) => match functions::from_json(&to_str(a)) {
            Ok(v) => Val::from_owned_json(v),
            Err(message) => return err(message, col),
        },
        (Func::Format, [fmt, rest @ ..]) => match functions::format(&to_str(fmt), rest) {
            Ok(s) => str_owned(s),
            Err(message) => return err(message, col),
        },
        (Func::HashFiles, _) => {
            let patterns: Vec<String> = values.iter().map(|v| to_str(v).into_owned()).collect();
            match scope.host.hash_files(&patterns) {
                Ok(s) => str_owned(s),
                Err(e) => return err(format!("hashFiles failed: {e}"), col),
            }
        }
        _ => return err(format!("invalid call of function '{}'", func.name()), col),
    })
}
