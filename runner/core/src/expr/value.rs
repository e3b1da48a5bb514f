//! Runtime values of the evaluator and the GitHub coercion rules: truthiness, string and
//! number conversion, loose equality and comparison.

use std::borrow::Cow;
use std::cmp::Ordering;

use serde_json::{Map, Value};

/// A value during evaluation. Numbers are f64 (so NaN and Infinity exist); arrays and
/// objects are borrowed from the contexts where possible.
#[derive(Debug, Clone)]
pub(crate) enum Val<'a> {
    Null,
    Bool(bool),
    Num(f64),
    Str(Cow<'a, str>),
    /// A JSON array or object (never a scalar).
    Json(Cow<'a, Value>),
    /// The result of an object filter (`.*`), a fresh array.
    Filtered(Vec<Cow<'a, Value>>),
}

/// The kind of a value, for the coercion rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Null,
    Bool,
    Num,
    Str,
    Array,
    Object,
}

impl<'a> Val<'a> {
    /// Wraps a borrowed JSON value.
    pub(crate) fn from_json(v: &'a Value) -> Val<'a> {
        match v {
            Value::Null => Val::Null,
            Value::Bool(b) => Val::Bool(*b),
            Value::Number(n) => Val::Num(n.as_f64().unwrap_or(f64::NAN)),
            Value::String(s) => Val::Str(Cow::Borrowed(s)),
            Value::Array(_) | Value::Object(_) => Val::Json(Cow::Borrowed(v)),
        }
    }

    /// Wraps an owned JSON value.
    pub(crate) fn from_owned_json(v: Value) -> Val<'a> {
        match v {
            Value::Null => Val::Null,
            Value::Bool(b) => Val::Bool(b),
            Value::Number(n) => Val::Num(n.as_f64().unwrap_or(f64::NAN)),
            Value::String(s) => Val::Str(Cow::Owned(s)),
            other => Val::Json(Cow::Owned(other)),
        }
    }

    /// Wraps a possibly borrowed JSON value.
    pub(crate) fn from_cow(v: Cow<'a, Value>) -> Val<'a> {
        match v {
            Cow::Borrowed(b) => Val::from_json(b),
            Cow::Owned(o) => Val::from_owned_json(o),
        }
    }

    fn kind(&self) -> Kind {
        match self {
            Val::Null => Kind::Null,
            Val::Bool(_) => Kind::Bool,
            Val::Num(_) => Kind::Num,
            Val::Str(_) => Kind::Str,
            Val::Json(v) if v.is_object() => Kind::Object,
            Val::Json(_) | Val::Filtered(_) => Kind::Array,
        }
    }

    /// Whether the value is null, a bool, a number or a string.
    pub(crate) fn is_primitive(&self) -> bool {
        matches!(self, Val::Null | Val::Bool(_) | Val::Num(_) | Val::Str(_))
    }

    /// The elements when the value is an array (including a filter result).
    pub(crate) fn array_items(&self) -> Option<Vec<Val<'_>>> {
        match self {
            Val::Json(v) => v.as_array().map(|a| a.iter().map(Val::from_json).collect()),
            Val::Filtered(items) => Some(items.iter().map(|v| Val::from_json(v)).collect()),
            _ => None,
        }
    }

    /// Converts to a JSON value; non-finite numbers become their string form.
    pub(crate) fn into_json(self) -> Value {
        match self {
            Val::Null => Value::Null,
            Val::Bool(b) => Value::Bool(b),
            Val::Num(n) => number_to_json(n),
            Val::Str(s) => Value::String(s.into_owned()),
            Val::Json(v) => v.into_owned(),
            Val::Filtered(items) => Value::Array(items.into_iter().map(Cow::into_owned).collect()),
        }
    }
}

/// A number as JSON: integral values as integers, non-finite values as strings.
pub(crate) fn number_to_json(n: f64) -> Value {
    if !n.is_finite() {
        return Value::String(number_to_string(n));
    }
    if n.fract() == 0.0 && n.abs() <= 9_007_199_254_740_992.0 {
        // Exact: integral and within the f64 integer range.
        return Value::from(n as i64);
    }
    serde_json::Number::from_f64(n).map_or(Value::Null, Value::Number)
}

/// GitHub truthiness.
pub(crate) fn truthy(v: &Val<'_>) -> bool {
    match v {
        Val::Null => false,
        Val::Bool(b) => *b,
        Val::Num(n) => !(n.is_nan() || *n == 0.0),
        Val::Str(s) => !s.is_empty(),
        Val::Json(_) | Val::Filtered(_) => true,
    }
}

/// Number formatting: integral values without decimals, others in shortest round-trip form.
pub(crate) fn number_to_string(n: f64) -> String {
    if n.is_nan() {
        "NaN".into()
    } else if n.is_infinite() {
        if n > 0.0 { "Infinity".into() } else { "-Infinity".into() }
    } else if n == 0.0 {
        "0".into()
    } else {
        format!("{n}")
    }
}

/// String conversion as used by interpolation and the string functions.
pub(crate) fn to_str<'b>(v: &'b Val<'_>) -> Cow<'b, str> {
    match v {
        Val::Null => Cow::Borrowed(""),
        Val::Bool(true) => Cow::Borrowed("true"),
        Val::Bool(false) => Cow::Borrowed("false"),
        Val::Num(n) => Cow::Owned(number_to_string(*n)),
        Val::Str(s) => Cow::Borrowed(s),
        Val::Json(j) if j.is_object() => Cow::Borrowed("Object"),
        Val::Json(_) | Val::Filtered(_) => Cow::Borrowed("Array"),
    }
}

/// Number conversion for loose equality and comparison.
pub(crate) fn to_num(v: &Val<'_>) -> f64 {
    match v {
        Val::Null => 0.0,
        Val::Bool(b) => f64::from(u8::from(*b)),
        Val::Num(n) => *n,
        Val::Str(s) => parse_number_string(s),
        Val::Json(_) | Val::Filtered(_) => f64::NAN,
    }
}

/// Parses a string the way GitHub coerces strings to numbers: surrounding whitespace is
/// ignored, the empty string is 0, decimal (with sign and exponent), `0x`/`0o`/`0b`
/// prefixes and `Infinity` are accepted, anything else is NaN.
pub(crate) fn parse_number_string(s: &str) -> f64 {
    let t = s.trim();
    if t.is_empty() {
        return 0.0;
    }
    for (prefix, radix) in [("0x", 16), ("0X", 16), ("0o", 8), ("0O", 8), ("0b", 2), ("0B", 2)] {
        if let Some(digits) = t.strip_prefix(prefix) {
            return parse_radix(digits, radix).unwrap_or(f64::NAN);
        }
    }
    parse_decimal(t).unwrap_or(f64::NAN)
}

/// Parses a number literal in an expression: decimal, exponent, `0x` hex, `Infinity`,
/// each optionally preceded by `-`.
pub(crate) fn parse_number_literal(s: &str) -> Option<f64> {
    let (neg, body) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let n = if let Some(hex) = body.strip_prefix("0x").or_else(|| body.strip_prefix("0X")) {
        parse_radix(hex, 16)?
    } else if body.starts_with(['-', '+']) {
        return None;
    } else {
        parse_decimal(body)?
    };
    Some(if neg { -n } else { n })
}

fn parse_radix(digits: &str, radix: u32) -> Option<f64> {
    if digits.is_empty() {
        return None;
    }
    let mut n = 0.0_f64;
    for c in digits.chars() {
        n = n * f64::from(radix) + f64::from(c.to_digit(radix)?);
    }
    Some(n)
}

/// Strict decimal syntax: `[+-]digits[.digits][e[+-]digits]` (digits on at least one side
/// of the point) or `[+-]Infinity`. Rust's own parser alone would also accept `inf`/`nan`.
fn parse_decimal(t: &str) -> Option<f64> {
    let unsigned = t.strip_prefix(['+', '-']).unwrap_or(t);
    if unsigned == "Infinity" {
        return Some(if t.starts_with('-') { f64::NEG_INFINITY } else { f64::INFINITY });
    }
    let (mantissa, exponent) = match unsigned.find(['e', 'E']) {
        Some(pos) => (&unsigned[..pos], Some(&unsigned[pos + 1..])),
        None => (unsigned, None),
    };
    let (int, frac) = match mantissa.split_once('.') {
        Some((i, f)) => (i, f),
        None => (mantissa, ""),
    };
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if (int.is_empty() && frac.is_empty()) || !all_digits(int) || !all_digits(frac) {
        return None;
    }
    if let Some(exp) = exponent {
        let digits = exp.strip_prefix(['+', '-']).unwrap_or(exp);
        if digits.is_empty() || !all_digits(digits) {
            return None;
        }
    }
    t.parse::<f64>().ok()
}

/// Simple (one-to-one) upper-case mapping, like .NET's ordinal ignore-case comparison.
fn fold_char(c: char) -> char {
    let mut up = c.to_uppercase();
    match (up.next(), up.next()) {
        (Some(u), None) => u,
        _ => c,
    }
}

/// Upper-cases a string character by character for case-insensitive comparison.
pub(crate) fn fold(s: &str) -> String {
    s.chars().map(fold_char).collect()
}

/// Case-insensitive ordinal string ordering.
pub(crate) fn cmp_ignore_case(a: &str, b: &str) -> Ordering {
    a.chars().map(fold_char).cmp(b.chars().map(fold_char))
}

/// Case-insensitive string equality.
pub(crate) fn eq_ignore_case(a: &str, b: &str) -> bool {
    cmp_ignore_case(a, b) == Ordering::Equal
}

/// Looks a key up in an object: exact match first, then case-insensitively.
pub(crate) fn get_ignore_case<'m>(map: &'m Map<String, Value>, key: &str) -> Option<&'m Value> {
    map.get(key).or_else(|| map.iter().find(|(k, _)| eq_ignore_case(k, key)).map(|(_, v)| v))
}

/// GitHub loose equality.
pub(crate) fn loose_eq(a: &Val<'_>, b: &Val<'_>) -> bool {
    let (ka, kb) = (a.kind(), b.kind());
    if ka != kb {
        return to_num(a) == to_num(b);
    }
    match (a, b) {
        (Val::Null, Val::Null) => true,
        (Val::Bool(x), Val::Bool(y)) => x == y,
        (Val::Num(x), Val::Num(y)) => x == y,
        (Val::Str(x), Val::Str(y)) => eq_ignore_case(x, y),
        // Arrays and objects are equal only when they are the same instance.
        (Val::Json(Cow::Borrowed(x)), Val::Json(Cow::Borrowed(y))) => std::ptr::eq(*x, *y),
        _ => false,
    }
}

/// GitHub `<`: numbers when the kinds differ, ordinal ignore-case for strings.
pub(crate) fn loose_lt(a: &Val<'_>, b: &Val<'_>) -> bool {
    if a.kind() != b.kind() {
        return to_num(a) < to_num(b);
    }
    match (a, b) {
        (Val::Num(x), Val::Num(y)) => x < y,
        (Val::Bool(x), Val::Bool(y)) => !x & y,
        (Val::Str(x), Val::Str(y)) => cmp_ignore_case(x, y) == Ordering::Less,
        _ => false,
    }
}
