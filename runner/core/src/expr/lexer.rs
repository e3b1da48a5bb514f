//! Tokenizer for GitHub Actions expressions, with 1-based character columns for error messages.

use super::value::parse_number_literal;

/// One lexical token.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Tok {
    Null,
    True,
    False,
    Number(f64),
    Str(String),
    /// A named value, function name or property name, as written.
    Ident(String),
    Dot,
    Star,
    Comma,
    LParen,
    RParen,
    LBracket,
    RBracket,
    Not,
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
    And,
    Or,
}

impl Tok {
    /// How the token is shown in error messages.
    pub(crate) fn describe(&self) -> String {
        match self {
            Tok::Null => "null".into(),
            Tok::True => "true".into(),
            Tok::False => "false".into(),
            Tok::Number(n) => super::value::number_to_string(*n),
            Tok::Str(s) => format!("'{}'", s.replace('\'', "''")),
            Tok::Ident(s) => s.clone(),
            Tok::Dot => ".".into(),
            Tok::Star => "*".into(),
            Tok::Comma => ",".into(),
            Tok::LParen => "(".into(),
            Tok::RParen => ")".into(),
            Tok::LBracket => "[".into(),
            Tok::RBracket => "]".into(),
            Tok::Not => "!".into(),
            Tok::Lt => "<".into(),
            Tok::Le => "<=".into(),
            Tok::Gt => ">".into(),
            Tok::Ge => ">=".into(),
            Tok::Eq => "==".into(),
            Tok::Ne => "!=".into(),
            Tok::And => "&&".into(),
            Tok::Or => "||".into(),
        }
    }
}

/// A token and the 1-based character column where it starts.
#[derive(Debug, Clone)]
pub(crate) struct Token {
    pub(crate) tok: Tok,
    pub(crate) col: usize,
}

/// A lexing failure: message and 1-based column.
#[derive(Debug)]
pub(crate) struct LexError {
    pub(crate) message: String,
    pub(crate) col: usize,
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

/// Characters that may appear inside a number literal (validated afterwards).
fn is_number_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '.' || c == '_'
}

/// Whether a `.` or `-` at this point starts an operand (rather than following one).
fn operand_expected(last: Option<&Tok>) -> bool {
    !matches!(
        last,
        Some(
            Tok::Null
                | Tok::True
                | Tok::False
                | Tok::Number(_)
                | Tok::Str(_)
                | Tok::Ident(_)
                | Tok::Star
                | Tok::RParen
                | Tok::RBracket
        )
    )
}

/// Splits an expression into tokens.
pub(crate) fn lex(src: &str) -> Result<Vec<Token>, LexError> {
    let chars: Vec<char> = src.chars().collect();
    let mut tokens: Vec<Token> = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let col = i + 1;
        let next = chars.get(i + 1).copied();
        let last = tokens.last().map(|t| &t.tok);
        let after_dot = matches!(last, Some(Tok::Dot));
        let simple = |tok: Tok, len: usize, tokens: &mut Vec<Token>| {
            tokens.push(Token { tok, col });
            len
        };
        let consumed = match c {
            ' ' | '\t' | '\r' | '\n' => 1,
            '(' => simple(Tok::LParen, 1, &mut tokens),
            ')' => simple(Tok::RParen, 1, &mut tokens),
            '[' => simple(Tok::LBracket, 1, &mut tokens),
            ']' => simple(Tok::RBracket, 1, &mut tokens),
            ',' => simple(Tok::Comma, 1, &mut tokens),
            '*' => simple(Tok::Star, 1, &mut tokens),
            '!' if next == Some('=') => simple(Tok::Ne, 2, &mut tokens),
            '!' => simple(Tok::Not, 1, &mut tokens),
            '<' if next == Some('=') => simple(Tok::Le, 2, &mut tokens),
            '<' => simple(Tok::Lt, 1, &mut tokens),
            '>' if next == Some('=') => simple(Tok::Ge, 2, &mut tokens),
            '>' => simple(Tok::Gt, 1, &mut tokens),
            '=' if next == Some('=') => simple(Tok::Eq, 2, &mut tokens),
            '&' if next == Some('&') => simple(Tok::And, 2, &mut tokens),
            '|' if next == Some('|') => simple(Tok::Or, 2, &mut tokens),
            '.' if !(operand_expected(last) && next.is_some_and(|n| n.is_ascii_digit())) => {
                simple(Tok::Dot, 1, &mut tokens)
            }
            '\'' => {
                let mut s = String::new();
                let mut j = i + 1;
                loop {
                    match chars.get(j) {
                        None => {
                            return Err(LexError { message: "unterminated string".into(), col });
                        }
                        Some('\'') if chars.get(j + 1) == Some(&'\'') => {
                            s.push('\'');
                            j += 2;
                        }
                        Some('\'') => break,
                        Some(&ch) => {
                            s.push(ch);
                            j += 1;
                        }
                    }
                }
                tokens.push(Token { tok: Tok::Str(s), col });
                j + 1 - i
            }
            c if after_dot && is_ident_start(c) => {
                let len = chars[i..].iter().take_while(|&&ch| is_ident_char(ch)).count();
                let word: String = chars[i..i + len].iter().collect();
                tokens.push(Token { tok: Tok::Ident(word), col });
                len
            }
            c if is_ident_start(c) => {
                let len = chars[i..].iter().take_while(|&&ch| is_ident_char(ch)).count();
                let word: String = chars[i..i + len].iter().collect();
                let tok = match word.as_str() {
                    "null" => Tok::Null,
                    "true" => Tok::True,
                    "false" => Tok::False,
                    "NaN" => Tok::Number(f64::NAN),
                    "Infinity" => Tok::Number(f64::INFINITY),
                    _ => Tok::Ident(word),
                };
                tokens.push(Token { tok, col });
                len
            }
            c if !after_dot
                && (c.is_ascii_digit()
                    || c == '.'
                    || (c == '-'
                        && next.is_some_and(|n| n.is_ascii_digit() || n == '.' || n == 'I'))) =>
            {
                // Sign, then the number body; an exponent may carry its own sign.
                let mut j = i + usize::from(c == '-');
                while let Some(&ch) = chars.get(j) {
                    let exp_sign = (ch == '-' || ch == '+')
                        && j > i
                        && matches!(chars.get(j - 1), Some('e' | 'E'))
                        && !chars[i..j].iter().any(|c| *c == 'x' || *c == 'X');
                    if is_number_char(ch) || exp_sign {
                        j += 1;
                    } else {
                        break;
                    }
                }
                let text: String = chars[i..j].iter().collect();
                match parse_number_literal(&text) {
                    Some(n) => tokens.push(Token { tok: Tok::Number(n), col }),
                    None => {
                        return Err(LexError { message: format!("invalid number '{text}'"), col });
                    }
                }
                j - i
            }
            other => {
                return Err(LexError { message: format!("unexpected symbol '{other}'"), col });
            }
        };
        i += consumed;
    }
    Ok(tokens)
}

/// Finds the end of an embedded expression that starts at char index `start` of `chars`
/// (just after `${{`): returns the char index of the closing `}}`, skipping string literals.
pub(crate) fn find_expression_end(chars: &[char], start: usize) -> Option<usize> {
    let mut i = start;
    while i < chars.len() {
        match chars[i] {
            '\'' => {
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return None,
                        Some('\'') if chars.get(i + 1) == Some(&'\'') => i += 2,
                        Some('\'') => break,
                        Some(_) => i += 1,
                    }
                }
                i += 1;
            }
            '}' if chars.get(i + 1) == Some(&'}') => return Some(i),
            _ => i += 1,
        }
    }
    None
}
