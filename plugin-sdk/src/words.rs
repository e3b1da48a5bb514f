//! Splitting a command line or an options string into words, as `sh` does without expansions:
//! whitespace separates, `'…'` and `"…"` quote, `\` escapes.

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
                        None => return Err(format!("unterminated ' in {s:?}")),
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
                            None => return Err(format!("unterminated \" in {s:?}")),
                        },
                        Some(c) => cur.push(c),
                        None => return Err(format!("unterminated \" in {s:?}")),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some(c) => cur.push(c),
                    None => return Err(format!("trailing \\ in {s:?}")),
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

    #[test]
    fn splits_like_sh() {
        assert_eq!(
            split_command(r#"target/debug/p --root '/tmp/a b' --x="y z" a\ b "q\"q" ''"#),
            Ok(vec![
                "target/debug/p".to_owned(),
                "--root".to_owned(),
                "/tmp/a b".to_owned(),
                "--x=y z".to_owned(),
                "a b".to_owned(),
                "q\"q".to_owned(),
                String::new(),
            ])
        );
        assert!(split_command("a 'b").is_err());
        assert_eq!(split_command("  "), Ok(vec![]));
    }
}
