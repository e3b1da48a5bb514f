//! Caller-chosen ids: their grammar (rule 3) and how the runner builds them.

use crate::error::{Error, Result};

/// Longest id the protocol allows.
pub const MAX_ID_LEN: usize = 63;

/// Checks an environment, container or exec id: `[a-z0-9-]`, 1 to 63 characters, not starting
/// or ending with `-`. `field` names the request field in the error.
pub fn validate_id(id: &str, field: &str) -> Result<()> {
    let ok_chars = id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if id.is_empty()
        || id.len() > MAX_ID_LEN
        || !ok_chars
        || id.starts_with('-')
        || id.ends_with('-')
    {
        return Err(Error::invalid_argument(format!(
            "{field} {id:?} is not a valid id: use 1 to {MAX_ID_LEN} characters of [a-z0-9-], \
             not starting or ending with '-'"
        ))
        .field(field));
    }
    Ok(())
}

/// Builds an id from parts: lowercases, maps other characters to `-`, squeezes repeats and
/// cuts to 63 characters, keeping the last part (a nonce) intact when it is short.
pub fn make_id(parts: &[&str]) -> String {
    let mut out = String::new();
    for part in parts {
        let mut clean = String::new();
        for c in part.chars() {
            let c = c.to_ascii_lowercase();
            let c = if c.is_ascii_lowercase() || c.is_ascii_digit() { c } else { '-' };
            if c == '-' && (clean.ends_with('-') || clean.is_empty()) {
                continue;
            }
            clean.push(c);
        }
        let clean = clean.trim_end_matches('-');
        if clean.is_empty() {
            continue;
        }
        if !out.is_empty() {
            out.push('-');
        }
        out.push_str(clean);
    }
    if out.len() > MAX_ID_LEN {
        let last = parts.last().map(|p| p.len()).unwrap_or(0);
        if last > 0 && last < 20 {
            let tail = out[out.len() - last..].to_owned();
            let head = out[..MAX_ID_LEN - last - 1].trim_end_matches('-').to_owned();
            out = format!("{head}-{tail}");
        } else {
            out.truncate(MAX_ID_LEN);
        }
    }
    let out = out.trim_matches('-').to_owned();
    if out.is_empty() { "x".to_owned() } else { out }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(validate_id("abc-1", "id").is_ok());
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", &"a".repeat(64)] {
            assert!(validate_id(bad, "id").is_err(), "{bad}");
        }
        assert_eq!(make_id(&["Runner 1", "build/job", "0", "ab12"]), "runner-1-build-job-0-ab12");
        let long = make_id(&[&"x".repeat(80), "nonce1"]);
        assert_eq!(long.len(), MAX_ID_LEN);
        assert!(long.ends_with("-nonce1"));
        assert!(validate_id(&long, "id").is_ok());
        assert_eq!(make_id(&["---", "_"]), "x");
    }
}
