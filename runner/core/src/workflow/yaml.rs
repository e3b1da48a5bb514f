//! The one place that talks to the YAML library: text → a located node tree, plus typed readers.
//!
//! Everything else in the workflow model converts [`Node`]s, so swapping the YAML library
//! means rewriting [`from_yaml`] only.

use indexmap::IndexMap;
use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use serde_saphyr::Spanned;

use super::error::Error;

/// A YAML node with its 1-based source position.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Node {
    pub(crate) kind: Kind,
    pub(crate) line: u32,
    pub(crate) col: u32,
}

/// The shape of a YAML node, resolved with YAML 1.2 core schema rules (`on`, `yes` are strings).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Kind {
    Null,
    Bool(bool),
    /// A number with its source text (`1.50` stays `1.50`).
    Number(serde_json::Number, String),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

/// Parses YAML text into a located node tree; the only function that calls the YAML library.
pub(crate) fn from_yaml(text: &str, file: &str) -> Result<Node, Error> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let options = serde_saphyr::options! { strict_booleans: true, with_snippet: false };
    let raw: Spanned<Raw> = serde_saphyr::from_str_with_options(text, options).map_err(|e| {
        let loc = e.location();
        let inner = e.without_snippet().to_string();
        // The library appends " at line N, column M"; the location is reported separately.
        let message = match inner.rfind(" at line ") {
            Some(i) if loc.is_some() => inner[..i].to_string(),
            _ => inner,
        };
        let message = if let Some(rest) = message.strip_prefix("duplicate mapping key: ") {
            let key = rest.split(", set DuplicateKeyPolicy").next().unwrap_or(rest);
            format!("duplicate key `{key}`; remove one of them")
        } else if message.starts_with("multiple YAML documents") {
            "more than one yaml document (`---`); keep a single document".to_string()
        } else {
            format!("{}; fix the yaml syntax", lowercase_first(&message))
        };
        Error {
            file: file.to_string(),
            line: loc.map(|l| l.line() as u32).filter(|l| *l > 0),
            column: loc.map(|l| l.column() as u32).filter(|c| *c > 0),
            path: String::new(),
            message: format!("invalid yaml: {message}"),
        }
    })?;
    Ok(convert(text, raw))
}

fn lowercase_first(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_lowercase().chain(c).collect(),
        None => String::new(),
    }
}

#[derive(Debug)]
enum Raw {
    Null,
    Bool(bool),
    I64(i64),
    U64(u64),
    F64(f64),
    Str(String),
    Seq(Vec<Spanned<Raw>>),
    Map(Vec<(Spanned<Raw>, Spanned<Raw>)>),
}

impl<'de> Deserialize<'de> for Raw {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Raw;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any yaml value")
            }
            fn visit_unit<E>(self) -> Result<Raw, E> {
                Ok(Raw::Null)
            }
            fn visit_none<E>(self) -> Result<Raw, E> {
                Ok(Raw::Null)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Raw, D::Error> {
                Raw::deserialize(d)
            }
            fn visit_bool<E>(self, v: bool) -> Result<Raw, E> {
                Ok(Raw::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Raw, E> {
                Ok(Raw::I64(v))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Raw, E> {
                Ok(Raw::U64(v))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Raw, E> {
                Ok(Raw::F64(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Raw, E> {
                Ok(Raw::Str(v.to_string()))
            }
            fn visit_string<E>(self, v: String) -> Result<Raw, E> {
                Ok(Raw::Str(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Raw, A::Error> {
                let mut v = Vec::new();
                while let Some(x) = a.next_element()? {
                    v.push(x);
                }
                Ok(Raw::Seq(v))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Raw, A::Error> {
                let mut v = Vec::new();
                while let Some(x) = a.next_entry()? {
                    v.push(x);
                }
                Ok(Raw::Map(v))
            }
        }
        d.deserialize_any(V)
    }
}

fn source_text<'a>(text: &'a str, loc: &serde_saphyr::Location) -> Option<&'a str> {
    let span = loc.span();
    let start = usize::try_from(span.byte_offset()?).ok()?;
    let len = usize::try_from(span.byte_len()?).ok()?;
    text.get(start..start.checked_add(len)?)
}

fn convert(text: &str, raw: Spanned<Raw>) -> Node {
    let loc = raw.referenced;
    let line = u32::try_from(loc.line()).unwrap_or(0);
    let col = u32::try_from(loc.column()).unwrap_or(0);
    let src = source_text(text, &loc).filter(|s| !s.starts_with('*')).map(str::trim);
    let number = |n: serde_json::Number, fallback: String| {
        Kind::Number(n, src.map(str::to_string).unwrap_or(fallback))
    };
    let kind = match raw.value {
        Raw::Null => Kind::Null,
        Raw::Bool(b) => Kind::Bool(b),
        Raw::I64(i) => number(i.into(), i.to_string()),
        Raw::U64(u) => number(u.into(), u.to_string()),
        Raw::F64(f) => match serde_json::Number::from_f64(f) {
            Some(n) => number(n, f.to_string()),
            None => Kind::Str(src.map(str::to_string).unwrap_or_else(|| f.to_string())),
        },
        Raw::Str(s) => Kind::Str(s),
        Raw::Seq(v) => Kind::Seq(v.into_iter().map(|x| convert(text, x)).collect()),
        Raw::Map(v) => {
            Kind::Map(v.into_iter().map(|(k, x)| (convert(text, k), convert(text, x))).collect())
        }
    };
    Node { kind, line, col }
}

impl Node {
    /// The node as JSON (maps keep source order; keys are scalar text).
    pub(crate) fn to_json(&self) -> Value {
        match &self.kind {
            Kind::Null => Value::Null,
            Kind::Bool(b) => Value::Bool(*b),
            Kind::Number(n, _) => Value::Number(n.clone()),
            Kind::Str(s) => Value::String(s.clone()),
            Kind::Seq(v) => Value::Array(v.iter().map(Node::to_json).collect()),
            Kind::Map(v) => Value::Object(
                v.iter().map(|(k, x)| (k.scalar_text().unwrap_or_default(), x.to_json())).collect(),
            ),
        }
    }

    /// A scalar as text: strings as is, booleans `true`/`false`, numbers in source form,
    /// null as the empty string. `None` for sequences and maps.
    pub(crate) fn scalar_text(&self) -> Option<String> {
        match &self.kind {
            Kind::Null => Some(String::new()),
            Kind::Bool(b) => Some(b.to_string()),
            Kind::Number(_, src) => Some(src.clone()),
            Kind::Str(s) => Some(s.clone()),
            Kind::Seq(_) | Kind::Map(_) => None,
        }
    }

    pub(crate) fn is_null(&self) -> bool {
        matches!(self.kind, Kind::Null)
    }

    pub(crate) fn type_name(&self) -> &'static str {
        match self.kind {
            Kind::Null => "null",
            Kind::Bool(_) => "a boolean",
            Kind::Number(..) => "a number",
            Kind::Str(_) => "a string",
            Kind::Seq(_) => "a sequence",
            Kind::Map(_) => "a map",
        }
    }
}

/// Conversion context: the file name, for errors.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ctx<'a> {
    pub(crate) file: &'a str,
    /// When set, unknown keys are recorded here and parsing goes on (the linter reports every
    /// error of a file); when not, the first unknown key is the error.
    pub(crate) unknown_keys: Option<&'a std::cell::RefCell<Vec<Error>>>,
}

/// A key path such as `jobs.build.steps[0]`.
pub(crate) fn join(path: &str, key: &str) -> String {
    let simple =
        !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    match (path.is_empty(), simple) {
        (true, true) => key.to_string(),
        (true, false) => format!("[{key:?}]"),
        (false, true) => format!("{path}.{key}"),
        (false, false) => format!("{path}[{key:?}]"),
    }
}

impl<'a> Ctx<'a> {
    pub(crate) fn err(&self, node: &Node, path: &str, message: impl Into<String>) -> Error {
        Error {
            file: self.file.to_string(),
            line: (node.line > 0).then_some(node.line),
            column: (node.col > 0).then_some(node.col),
            path: path.to_string(),
            message: message.into(),
        }
    }

    fn expected(&self, node: &Node, path: &str, what: &str) -> Error {
        self.err(
            node,
            path,
            format!("expected {what}, found {}; change the value", node.type_name()),
        )
    }

    /// A map's entries with string keys; fails on non-maps and non-scalar keys.
    pub(crate) fn map<'n>(
        &self,
        node: &'n Node,
        path: &str,
    ) -> Result<Vec<(String, &'n Node, &'n Node)>, Error> {
        match &node.kind {
            Kind::Map(entries) => entries
                .iter()
                .map(|(k, v)| match k.scalar_text() {
                    Some(key) => Ok((key, k, v)),
                    None => {
                        Err(self.err(k, path, "map keys must be scalars; use a plain string key"))
                    }
                })
                .collect(),
            _ => Err(self.expected(node, path, "a map")),
        }
    }

    /// A map whose keys must be among `allowed`.
    pub(crate) fn fields<'n>(
        &self,
        node: &'n Node,
        path: &str,
        what: &str,
        allowed: &[&str],
    ) -> Result<Fields<'n>, Error> {
        let mut entries = self.map(node, path)?;
        for (key, knode, _) in &entries {
            if !allowed.contains(&key.as_str()) {
                let e = self.err(
                    knode,
                    &join(path, key),
                    format!(
                        "unknown key `{key}` in {what}; remove it or use one of: {}",
                        allowed.join(", ")
                    ),
                );
                match self.unknown_keys {
                    Some(found) => found.borrow_mut().push(e),
                    None => return Err(e),
                }
            }
        }
        entries.retain(|(key, _, _)| allowed.contains(&key.as_str()));
        Ok(Fields { entries })
    }

    /// Any scalar as a string (booleans and numbers in source form); null is an error.
    pub(crate) fn string(&self, node: &Node, path: &str) -> Result<String, Error> {
        match &node.kind {
            Kind::Str(_) | Kind::Bool(_) | Kind::Number(..) => {
                Ok(node.scalar_text().unwrap_or_default())
            }
            _ => Err(self.expected(node, path, "a string")),
        }
    }

    /// Any scalar as a string, null as `None`.
    pub(crate) fn opt_string(
        &self,
        node: Option<&Node>,
        path: &str,
    ) -> Result<Option<String>, Error> {
        match node {
            None => Ok(None),
            Some(n) if n.is_null() => Ok(None),
            Some(n) => self.string(n, path).map(Some),
        }
    }

    /// A string or a list of strings.
    pub(crate) fn string_list(&self, node: &Node, path: &str) -> Result<Vec<String>, Error> {
        match &node.kind {
            Kind::Null => Ok(Vec::new()),
            Kind::Seq(items) => items
                .iter()
                .enumerate()
                .map(|(i, n)| self.string(n, &format!("{path}[{i}]")))
                .collect(),
            _ => self.string(node, path).map(|s| vec![s]),
        }
    }

    /// A map of scalar values as strings (null → empty string).
    pub(crate) fn string_map(
        &self,
        node: &Node,
        path: &str,
    ) -> Result<IndexMap<String, String>, Error> {
        if node.is_null() {
            return Ok(IndexMap::new());
        }
        let mut out = IndexMap::new();
        for (key, _, v) in self.map(node, path)? {
            let p = join(path, &key);
            let s = v.scalar_text().ok_or_else(|| self.expected(v, &p, "a scalar value"))?;
            out.insert(key, s);
        }
        Ok(out)
    }

    /// `true`/`false`, or a string (an expression, or `"true"`/`"false"`).
    pub(crate) fn bool_or_expr(
        &self,
        node: &Node,
        path: &str,
    ) -> Result<super::model::BoolOrExpr, Error> {
        use super::model::BoolOrExpr;
        match &node.kind {
            Kind::Bool(b) => Ok(BoolOrExpr::Bool(*b)),
            Kind::Str(s) if s.trim() == "true" => Ok(BoolOrExpr::Bool(true)),
            Kind::Str(s) if s.trim() == "false" => Ok(BoolOrExpr::Bool(false)),
            Kind::Str(s) if s.contains("${{") => Ok(BoolOrExpr::Expr(s.clone())),
            _ => Err(self.expected(node, path, "`true`, `false` or a `${{ }}` expression")),
        }
    }

    /// A plain boolean (`"true"`/`"false"` strings accepted).
    pub(crate) fn boolean(&self, node: &Node, path: &str) -> Result<bool, Error> {
        match &node.kind {
            Kind::Bool(b) => Ok(*b),
            Kind::Str(s) if s.trim() == "true" => Ok(true),
            Kind::Str(s) if s.trim() == "false" => Ok(false),
            Kind::Null => Ok(false),
            _ => Err(self.expected(node, path, "`true` or `false`")),
        }
    }

    /// A number, or a string expression.
    pub(crate) fn number_or_expr(
        &self,
        node: &Node,
        path: &str,
    ) -> Result<super::model::NumberOrExpr, Error> {
        use super::model::NumberOrExpr;
        match &node.kind {
            Kind::Number(n, _) => Ok(NumberOrExpr::Number(n.as_f64().unwrap_or(0.0))),
            Kind::Str(s) if s.contains("${{") => Ok(NumberOrExpr::Expr(s.clone())),
            Kind::Str(s) => match s.trim().parse::<f64>() {
                Ok(f) if f.is_finite() => Ok(NumberOrExpr::Number(f)),
                _ => Err(self.expected(node, path, "a number or a `${{ }}` expression")),
            },
            _ => Err(self.expected(node, path, "a number or a `${{ }}` expression")),
        }
    }
}

/// The entries of a checked map, looked up by key.
#[derive(Debug)]
pub(crate) struct Fields<'n> {
    pub(crate) entries: Vec<(String, &'n Node, &'n Node)>,
}

impl<'n> Fields<'n> {
    pub(crate) fn get(&self, key: &str) -> Option<&'n Node> {
        self.entries.iter().find(|(k, _, _)| k == key).map(|(_, _, v)| *v)
    }
}
