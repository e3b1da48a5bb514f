//! Parsers for the files steps write: `GITHUB_ENV`, `GITHUB_OUTPUT`, `GITHUB_STATE`, `GITHUB_PATH`.

use super::error::Error;

/// Parses `GITHUB_ENV` / `GITHUB_OUTPUT` / `GITHUB_STATE` content: `NAME=value` lines and
/// `NAME<<DELIM` heredocs (the value is the lines up to a line equal to `DELIM`, joined with
/// `\n`). A UTF-8 BOM is skipped, CRLF line ends are accepted, empty lines are skipped.
/// Entries are returned in file order (a later entry for a name wins when applied).
pub fn parse_env_file(content: &str) -> Result<Vec<(String, String)>, Error> {
    let content = content.strip_prefix('\u{feff}').unwrap_or(content);
    let mut lines = content.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l)).enumerate();
    let mut out = Vec::new();
    while let Some((i, line)) = lines.next() {
        if line.is_empty() {
            continue;
        }
        let line_no = i + 1;
        let eq = line.find('=');
        let heredoc = line.find("<<");
        match (eq, heredoc) {
            (Some(e), h) if h.is_none_or(|h| e < h) => {
                let name = &line[..e];
                check_name(name, line_no)?;
                out.push((name.to_string(), line[e + 1..].to_string()));
            }
            (_, Some(h)) => {
                let name = &line[..h];
                check_name(name, line_no)?;
                let delim = &line[h + 2..];
                if delim.is_empty() {
                    return Err(Error::msg(format!(
                        "line {line_no}: heredoc for `{name}` has no delimiter; write `{name}<<EOF`"
                    )));
                }
                let mut value: Vec<&str> = Vec::new();
                let mut closed = false;
                for (_, l) in lines.by_ref() {
                    if l == delim {
                        closed = true;
                        break;
                    }
                    value.push(l);
                }
                if !closed {
                    return Err(Error::msg(format!(
                        "line {line_no}: no closing delimiter `{delim}` for `{name}`; end the value with a line `{delim}`"
                    )));
                }
                out.push((name.to_string(), value.join("\n")));
            }
            _ => {
                return Err(Error::msg(format!(
                    "line {line_no}: expected `NAME=value` or `NAME<<DELIMITER`, found {line:?}; fix the line"
                )));
            }
        }
    }
    Ok(out)
}

fn check_name(name: &str, line_no: usize) -> Result<(), Error> {
    if name.trim().is_empty() {
        return Err(Error::msg(format!("line {line_no}: empty name; write `NAME=value`")));
    }
    Ok(())
}

/// Parses `GITHUB_PATH` content: one directory per non-empty line, in file order.
pub fn parse_path_file(content: &str) -> Vec<String> {
    let content = content.strip_prefix('\u{feff}').unwrap_or(content);
    content
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}
