//! Splitting a command line or an options string into words, as `sh` does without expansions:
//! whitespace separates, `'…'` and `"…"` quote, `\` escapes. The one splitter of the project:
//! the runner's shell templates (`shell: perl {0}`), docker steps' `with.args`, the docker
//! plugin's `options`, the conformance suite's `--command` (act splits templates the same way).

const UNCLOSED_SINGLE: &str = "unclosed `'`; close the quote";
const UNCLOSED_DOUBLE: &str = "unclosed `\"`; close the quote";
const TRAILING_BACKSLASH: &str = "a trailing `\\` escapes nothing; remove it or quote it";

/// Splits a command line into words: whitespace separates, `'…'` and `"…"` quote, `\` escapes
/// (as `sh` does, without expansions).
pub fn split_command(s: &str) -> std::result::Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => cur.push(c),
                        None => return Err(UNCLOSED_SINGLE.into()),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => cur.push(c),
                            Some(c) => {
                                cur.push('\\');
                                cur.push(c);
                            }
                            None => return Err(UNCLOSED_DOUBLE.into()),
                        },
                        Some(c) => cur.push(c),
                        None => return Err(UNCLOSED_DOUBLE.into()),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some(c) => cur.push(c),
                    None => return Err(TRAILING_BACKSLASH.into()),
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each case and its words (`[a|b]`) or error, one line each.
    #[test]
    fn splits_like_sh() {
        let cases = [
            r#"target/debug/p --root '/tmp/a b' --x="y z" a\ b "q\"q" ''"#,
            "  ",
            "bash -e {0}",
            "python3 -u {0}",
            r#"pwsh -command ". '{0}'""#,
            r"C:\bin\sh {0}",
            r#""C:\bin\sh" {0}"#,
            r#"echo "\$HOME \`x\` \n""#,
            r"a\\b 'c\d'",
            "a 'b",
            r#"a "b"#,
            r#"a "b\"#,
            r"a \",
        ];
        let got: Vec<String> = cases
            .iter()
            .map(|c| match split_command(c) {
                Ok(words) => format!("{c}  →  [{}]", words.join("|")),
                Err(e) => format!("{c}  →  error: {e}"),
            })
            .collect();
        expect_test::expect![[r#"
            target/debug/p --root '/tmp/a b' --x="y z" a\ b "q\"q" ''  →  [target/debug/p|--root|/tmp/a b|--x=y z|a b|q"q|]
                →  []
            bash -e {0}  →  [bash|-e|{0}]
            python3 -u {0}  →  [python3|-u|{0}]
            pwsh -command ". '{0}'"  →  [pwsh|-command|. '{0}']
            C:\bin\sh {0}  →  [C:binsh|{0}]
            "C:\bin\sh" {0}  →  [C:\bin\sh|{0}]
            echo "\$HOME \`x\` \n"  →  [echo|$HOME `x` \n]
            a\\b 'c\d'  →  [a\b|c\d]
            a 'b  →  error: unclosed `'`; close the quote
            a "b  →  error: unclosed `"`; close the quote
            a "b\  →  error: unclosed `"`; close the quote
            a \  →  error: a trailing `\` escapes nothing; remove it or quote it"#]].assert_eq(&got.join("\n"));
    }
}
