//! Workflow commands in step output (`::name k=v::data`, legacy `##[name k=v]data`), and a
//! line classifier that honours `::stop-commands::`.

use indexmap::IndexMap;

/// A command as written: name, unescaped properties, unescaped data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub name: String,
    pub properties: IndexMap<String, String>,
    pub data: String,
}

/// Parses one output line as a command; `None` when it is not command syntax.
/// Leading whitespace and trailing `\r`/`\n` are ignored.
pub fn parse_command(line: &str) -> Option<Command> {
    let line = line.trim_start().trim_end_matches(['\r', '\n']);
    if let Some(rest) = line.strip_prefix("::") {
        let end = rest.find("::")?;
        let (info, data) = (&rest[..end], &rest[end + 2..]);
        let (name, props) = match info.split_once(' ') {
            Some((n, p)) => (n, Some(p)),
            None => (info, None),
        };
        if name.is_empty() {
            return None;
        }
        let mut properties = IndexMap::new();
        for prop in props.unwrap_or("").trim().split(',').filter(|p| !p.is_empty()) {
            if let Some((k, v)) = prop.split_once('=')
                && !k.is_empty()
                && !v.is_empty()
            {
                properties.insert(k.to_string(), unescape(v, true));
            }
        }
        return Some(Command { name: name.to_string(), properties, data: unescape(data, false) });
    }
    let rest = line.strip_prefix("##[")?;
    let end = rest.find(']')?;
    let (info, data) = (&rest[..end], &rest[end + 1..]);
    let (name, props) = match info.split_once(' ') {
        Some((n, p)) => (n, Some(p)),
        None => (info, None),
    };
    if name.is_empty() {
        return None;
    }
    let mut properties = IndexMap::new();
    for prop in props.unwrap_or("").trim().split(';').filter(|p| !p.is_empty()) {
        if let Some((k, v)) = prop.split_once('=')
            && !k.is_empty()
        {
            properties.insert(k.trim().to_string(), unescape_legacy(v));
        }
    }
    Some(Command { name: name.to_string(), properties, data: unescape_legacy(data) })
}

/// Undoes command escaping in one left-to-right pass: `%25 %0D %0A`, plus `%3A %2C` in properties.
fn unescape(s: &str, property: bool) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        let code = rest.get(i..i + 3).unwrap_or("");
        let rep = match code.to_ascii_uppercase().as_str() {
            "%25" => Some('%'),
            "%0D" => Some('\r'),
            "%0A" => Some('\n'),
            "%3A" if property => Some(':'),
            "%2C" if property => Some(','),
            _ => None,
        };
        match rep {
            Some(c) => {
                out.push(c);
                rest = &rest[i + 3..];
            }
            None => {
                out.push('%');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Legacy (`##[…]`) escapes: `%3B` `;`, `%0D`, `%0A`, `%5D` `]`, `%25`.
fn unescape_legacy(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        let code = rest.get(i..i + 3).unwrap_or("");
        let rep = match code.to_ascii_uppercase().as_str() {
            "%25" => Some('%'),
            "%0D" => Some('\r'),
            "%0A" => Some('\n'),
            "%3B" => Some(';'),
            "%5D" => Some(']'),
            _ => None,
        };
        match rep {
            Some(c) => {
                out.push(c);
                rest = &rest[i + 3..];
            }
            None => {
                out.push('%');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Severity of an annotation command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnnotationLevel {
    Notice,
    Warning,
    Error,
}

/// A `notice` / `warning` / `error` command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Annotation {
    pub level: AnnotationLevel,
    pub message: String,
    pub title: Option<String>,
    pub file: Option<String>,
    pub line: Option<u32>,
    pub end_line: Option<u32>,
    pub col: Option<u32>,
    pub end_column: Option<u32>,
}

/// What one line of step output is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineKind {
    /// Plain output (also unknown commands and lines while commands are stopped).
    Output(String),
    AddMask(String),
    Group(String),
    EndGroup,
    Debug(String),
    Annotation(Annotation),
    SetOutput {
        name: String,
        value: String,
    },
    SaveState {
        name: String,
        value: String,
    },
    SetEnv {
        name: String,
        value: String,
    },
    AddPath(String),
    Echo(bool),
    /// `::stop-commands::TOKEN`: commands are ignored until `::TOKEN::`.
    StopCommands(String),
    /// `::TOKEN::` ended a `stop-commands`.
    ResumeCommands,
    /// A known command used wrongly; the line should be logged as is along with `message`.
    Invalid {
        line: String,
        message: String,
    },
}

/// Classifies output lines one at a time, tracking `stop-commands`.
#[derive(Debug, Clone, Default)]
pub struct CommandProcessor {
    stop_token: Option<String>,
}

impl CommandProcessor {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether commands are currently stopped.
    pub fn stopped(&self) -> bool {
        self.stop_token.is_some()
    }

    /// Classifies one line (trailing `\r`/`\n` are removed from plain output).
    pub fn process(&mut self, line: &str) -> LineKind {
        let text = line.trim_end_matches(['\r', '\n']);
        if let Some(token) = &self.stop_token {
            if text.trim() == format!("::{token}::") {
                self.stop_token = None;
                return LineKind::ResumeCommands;
            }
            return LineKind::Output(text.to_string());
        }
        let Some(cmd) = parse_command(text) else { return LineKind::Output(text.to_string()) };
        let invalid = |message: &str| LineKind::Invalid {
            line: text.to_string(),
            message: message.to_string(),
        };
        let name_prop = || cmd.properties.get("name").filter(|n| !n.is_empty()).cloned();
        match cmd.name.as_str() {
            "add-mask" => LineKind::AddMask(cmd.data),
            "group" => LineKind::Group(cmd.data),
            "endgroup" => LineKind::EndGroup,
            "debug" => LineKind::Debug(cmd.data),
            "notice" | "warning" | "error" => {
                let level = match cmd.name.as_str() {
                    "notice" => AnnotationLevel::Notice,
                    "warning" => AnnotationLevel::Warning,
                    _ => AnnotationLevel::Error,
                };
                let num =
                    |k: &str| cmd.properties.get(k).and_then(|v| v.trim().parse::<u32>().ok());
                LineKind::Annotation(Annotation {
                    level,
                    title: cmd.properties.get("title").cloned(),
                    file: cmd.properties.get("file").cloned(),
                    line: num("line"),
                    end_line: num("endLine"),
                    col: num("col"),
                    end_column: num("endColumn"),
                    message: cmd.data,
                })
            }
            "set-output" => match name_prop() {
                Some(name) => LineKind::SetOutput { name, value: cmd.data },
                None => invalid(
                    "set-output needs a `name` property; write `::set-output name=NAME::value`",
                ),
            },
            "save-state" => match name_prop() {
                Some(name) => LineKind::SaveState { name, value: cmd.data },
                None => invalid(
                    "save-state needs a `name` property; write `::save-state name=NAME::value`",
                ),
            },
            "set-env" => match name_prop() {
                Some(name) => LineKind::SetEnv { name, value: cmd.data },
                None => {
                    invalid("set-env needs a `name` property; write `::set-env name=NAME::value`")
                }
            },
            "add-path" => LineKind::AddPath(cmd.data),
            "echo" => match cmd.data.trim().to_ascii_lowercase().as_str() {
                "on" => LineKind::Echo(true),
                "off" => LineKind::Echo(false),
                _ => invalid("echo takes `on` or `off`; write `::echo::on` or `::echo::off`"),
            },
            "stop-commands" => {
                let token = cmd.data.trim().to_string();
                if token.is_empty() {
                    return invalid(
                        "stop-commands needs a token; write `::stop-commands::TOKEN` and later `::TOKEN::`",
                    );
                }
                self.stop_token = Some(token.clone());
                LineKind::StopCommands(token)
            }
            _ => LineKind::Output(text.to_string()),
        }
    }
}
