//! The built-in functions: names, arity and the implementations of the pure ones
//! (`contains`, `startsWith`, `endsWith`, `format`, `join`, `toJSON`, `fromJSON`).

use std::borrow::Cow;

use serde_json::Value;

use super::value::{Val, fold, loose_eq, number_to_json, to_str};

/// A built-in function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Func {
    Contains,
    StartsWith,
    EndsWith,
    Format,
    Join,
    ToJson,
    FromJson,
    HashFiles,
    Success,
    Always,
    Cancelled,
    Failure,
}

const FUNCS: &[(&str, Func, usize, usize)] = &[
    ("contains", Func::Contains, 2, 2),
    ("startsWith", Func::StartsWith, 2, 2),
    ("endsWith", Func::EndsWith, 2, 2),
    ("format", Func::Format, 1, usize::MAX),
    ("join", Func::Join, 1, 2),
    ("toJSON", Func::ToJson, 1, 1),
    ("fromJSON", Func::FromJson, 1, 1),
    ("hashFiles", Func::HashFiles, 1, usize::MAX),
    ("success", Func::Success, 0, 0),
    ("always", Func::Always, 0, 0),
    ("cancelled", Func::Cancelled, 0, 0),
    ("failure", Func::Failure, 0, 0),
];

impl Func {
    /// Finds a function by name, case-insensitively.
    pub(crate) fn lookup(name: &str) -> Option<Func> {
        FUNCS.iter().find(|(n, ..)| n.eq_ignore_ascii_case(name)).map(|(_, f, ..)| *f)
    }

    /// The canonical name.
    pub(crate) fn name(self) -> &'static str {
        FUNCS.iter().find(|(_, f, ..)| *f == self).map_or("?", |(n, ..)| n)
    }

    /// Whether this is one of the job status functions.
    pub(crate) fn is_status(self) -> bool {
        matches!(self, Func::Success | Func::Always | Func::Cancelled | Func::Failure)
    }

    /// Checks the number of arguments.
    pub(crate) fn check_arity(self, n: usize) -> Result<(), String> {
        let Some(&(name, _, min, max)) = FUNCS.iter().find(|(_, f, ..)| *f == self) else {
            return Ok(());
        };
        let expected = if min == max {
            format!("{min}")
        } else if max == usize::MAX {
            format!("at least {min}")
        } else {
            format!("{min} to {max}")
        };
        if n < min {
            Err(format!("too few arguments to function '{name}': expected {expected}, got {n}"))
        } else if n > max {
            Err(format!("too many arguments to function '{name}': expected {expected}, got {n}"))
        } else {
            Ok(())
        }
    }
}

/// `contains(search, item)`.
pub(crate) fn contains(search: &Val<'_>, item: &Val<'_>) -> bool {
    if let Some(items) = search.array_items() {
        return items.iter().any(|x| loose_eq(x, item));
    }
    if search.is_primitive() && item.is_primitive() {
        return fold(&to_str(search)).contains(&fold(&to_str(item)));
    }
    false
}

/// `startsWith(a, b)`.
pub(crate) fn starts_with(a: &Val<'_>, b: &Val<'_>) -> bool {
    a.is_primitive() && b.is_primitive() && fold(&to_str(a)).starts_with(&fold(&to_str(b)))
}

/// `endsWith(a, b)`.
pub(crate) fn ends_with(a: &Val<'_>, b: &Val<'_>) -> bool {
    a.is_primitive() && b.is_primitive() && fold(&to_str(a)).ends_with(&fold(&to_str(b)))
}

/// `join(array, sep)`: a non-array is converted to a string.
pub(crate) fn join(v: &Val<'_>, sep: Option<&Val<'_>>) -> String {
    let sep = sep.map_or(Cow::Borrowed(","), to_str);
    match v.array_items() {
        Some(items) => items.iter().map(|x| to_str(x).into_owned()).collect::<Vec<_>>().join(&sep),
        None => to_str(v).into_owned(),
    }
}

/// `format(fmt, args…)`.
pub(crate) fn format(fmt: &str, args: &[Val<'_>]) -> Result<String, String> {
    let invalid = || format!("the following format string is invalid: '{fmt}'");
    let mut out = String::new();
    let mut chars = fmt.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                out.push('{');
            }
            '{' => {
                let mut digits = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some(d) if d.is_ascii_digit() => digits.push(d),
                        _ => return Err(invalid()),
                    }
                }
                let index: usize = digits.parse().map_err(|_| invalid())?;
                let arg = args.get(index).ok_or_else(|| {
                    format!(
                        "the following format string references more arguments than were supplied: '{fmt}'"
                    )
                })?;
                out.push_str(&to_str(arg));
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                out.push('}');
            }
            '}' => return Err(invalid()),
            other => out.push(other),
        }
    }
    Ok(out)
}

/// `toJSON(value)`: pretty-printed with two-space indentation like `JSON.stringify(v, null, 2)`.
pub(crate) fn to_json(v: &Val<'_>) -> String {
    let mut out = String::new();
    match v {
        Val::Num(n) if !n.is_finite() => out.push_str(&to_str(v)),
        Val::Filtered(items) => write_array(&mut out, items.iter().map(|c| &**c), 0),
        Val::Json(j) => write_json(&mut out, j, 0),
        other => write_json(&mut out, &other.clone().into_json(), 0),
    }
    out
}

fn indent(out: &mut String, level: usize) {
    out.push('\n');
    for _ in 0..level {
        out.push_str("  ");
    }
}

fn write_array<'v>(
    out: &mut String,
    items: impl ExactSizeIterator<Item = &'v Value>,
    level: usize,
) {
    if items.len() == 0 {
        out.push_str("[]");
        return;
    }
    out.push('[');
    for (i, item) in items.enumerate() {
        if i > 0 {
            out.push(',');
        }
        indent(out, level + 1);
        write_json(out, item, level + 1);
    }
    indent(out, level);
    out.push(']');
}

fn write_json(out: &mut String, v: &Value, level: usize) {
    match v {
        Value::Number(n) => {
            let normalized = n.as_f64().map_or_else(|| v.clone(), number_to_json);
            out.push_str(&normalized.to_string());
        }
        Value::Array(items) => write_array(out, items.iter(), level),
        Value::Object(map) if map.is_empty() => out.push_str("{}"),
        Value::Object(map) => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                indent(out, level + 1);
                out.push_str(&Value::String(k.clone()).to_string());
                out.push_str(": ");
                write_json(out, item, level + 1);
            }
            indent(out, level);
            out.push('}');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// `fromJSON(text)`.
pub(crate) fn from_json(text: &str) -> Result<Value, String> {
    serde_json::from_str(text.trim()).map_err(|e| {
        let shown: String = text.chars().take(100).collect();
        let ellipsis = if text.chars().nth(100).is_some() { "…" } else { "" };
        // serde_json appends " at line L column C"; show the position in our own words.
        let full = e.to_string();
        let what = full.split(" at line ").next().unwrap_or(&full);
        format!(
            "invalid JSON in fromJSON('{shown}{ellipsis}'): {what} (line {}, column {})",
            e.line(),
            e.column()
        )
    })
}
