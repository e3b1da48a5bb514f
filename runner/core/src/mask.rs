//! Secret masking: every secret value and every `::add-mask::` value becomes `***` in logs,
//! including each line of a multi-line secret.
//!
//! The values are searched together in one pass (an Aho-Corasick automaton, rebuilt when a
//! value is added), and only when there are values: output with no secrets is copied as is.

use std::borrow::Cow;

use aho_corasick::AhoCorasick;

/// The values to hide. Where occurrences overlap, all of their bytes are hidden together.
#[derive(Debug, Clone, Default)]
pub struct Masker {
    values: Vec<String>,
    /// The automaton over the single-line `values`; `None` when there are none. A value that
    /// holds a line break can never be inside one log line (its lines are values of their own).
    matcher: Option<AhoCorasick>,
}

impl Masker {
    /// An empty masker.
    pub fn new() -> Masker {
        Masker::default()
    }

    /// Adds a value; a multi-line value also adds each of its lines (a log line never holds
    /// more than one). Values shorter than 2 characters are not masked (they would hide every
    /// occurrence of a letter), nor are blank lines.
    pub fn add(&mut self, value: &str) {
        let before = self.values.len();
        let mut add_one = |v: &str| {
            let v = v.trim_end_matches('\r');
            if v.trim().chars().count() >= 2 && !self.values.iter().any(|x| x == v) {
                self.values.push(v.to_owned());
            }
        };
        add_one(value);
        if value.contains('\n') {
            for line in value.split('\n') {
                add_one(line);
            }
        }
        if self.values.len() != before {
            let single: Vec<&str> =
                self.values.iter().map(String::as_str).filter(|v| !v.contains('\n')).collect();
            // Building fails only past the automaton's size limits (gigabytes of secrets);
            // then nothing could be masked quickly, so the values are matched one by one.
            self.matcher = if single.is_empty() { None } else { AhoCorasick::new(single).ok() };
        }
    }

    /// Whether nothing is masked.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The line with every secret replaced by `***`.
    pub fn mask<'a>(&self, line: &'a str) -> Cow<'a, str> {
        if self.values.is_empty() {
            return Cow::Borrowed(line);
        }
        let mut out = String::new();
        if self.mask_into(line, &mut out) { Cow::Owned(out) } else { Cow::Borrowed(line) }
    }

    /// Appends `text` to `out` with every secret replaced by `***`, and says whether anything
    /// was replaced. `text` may hold many lines: no masked value spans a line break, so this is
    /// the same as masking line by line.
    pub fn mask_into(&self, text: &str, out: &mut String) -> bool {
        let Some(matcher) = &self.matcher else {
            if self.values.is_empty() {
                out.push_str(text);
                return false;
            }
            return self.mask_slowly(text, out);
        };
        let mut found = false;
        // Occurrences in order of their end; overlapping ones are merged into one span.
        let mut span: Option<(usize, usize)> = None;
        let mut copied = 0;
        let spans = |start: usize, end: usize, copied: &mut usize, out: &mut String| {
            out.push_str(&text[*copied..start]);
            out.push_str("***");
            *copied = end;
        };
        for m in matcher.find_overlapping_iter(text) {
            found = true;
            span = match span {
                // A span already written stays written: the merged one starts after it.
                Some((s, e)) if m.start() < e => {
                    Some((s.min(m.start()).max(copied), e.max(m.end())))
                }
                Some((s, e)) => {
                    spans(s, e, &mut copied, out);
                    Some((m.start().max(copied), m.end()))
                }
                None => Some((m.start(), m.end())),
            };
        }
        if let Some((s, e)) = span {
            spans(s, e, &mut copied, out);
        }
        out.push_str(&text[copied..]);
        found
    }

    /// [`Self::mask_into`] without the automaton: longest value first.
    fn mask_slowly(&self, text: &str, out: &mut String) -> bool {
        let mut values: Vec<&str> =
            self.values.iter().map(String::as_str).filter(|v| !v.contains('\n')).collect();
        values.sort_by_key(|v| std::cmp::Reverse(v.len()));
        let mut masked = Cow::Borrowed(text);
        for v in values {
            if masked.contains(v) {
                masked = Cow::Owned(masked.replace(v, "***"));
            }
        }
        out.push_str(&masked);
        matches!(masked, Cow::Owned(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks() {
        let mut m = Masker::new();
        assert_eq!(m.mask("nothing"), "nothing");
        m.add("s3cret");
        m.add("line one\nline two");
        m.add("x");
        assert_eq!(m.mask("a s3cret b s3cret"), "a *** b ***");
        assert_eq!(m.mask("got line two here"), "got *** here");
        assert_eq!(m.mask("x marks"), "x marks");
        m.add("s3cret-longer");
        assert_eq!(m.mask("s3cret-longer"), "***");
        assert_eq!(m.mask("s3cret-longers3cret"), "******");
    }

    #[test]
    fn overlapping_values_are_hidden_whole() {
        let mut m = Masker::new();
        m.add("bcd");
        m.add("ab");
        assert_eq!(m.mask("abcd"), "***");
        assert_eq!(m.mask("xabx bcdy"), "x***x ***y");
        m.add("cdefg");
        assert_eq!(m.mask("1abcdefg2"), "1***2");

        // Reported by end: "ab", then "cd" (written), then "abcde" over both.
        let mut m = Masker::new();
        for v in ["ab", "cd", "abcde"] {
            m.add(v);
        }
        assert_eq!(m.mask("abcdef"), "******f");
    }

    #[test]
    fn masks_blocks_of_lines() {
        let mut m = Masker::new();
        m.add("tok\nen");
        let mut out = String::new();
        assert!(m.mask_into("a tok\nb en\nc\n", &mut out));
        assert_eq!(out, "a ***\nb ***\nc\n");
        out.clear();
        assert!(!m.mask_into("nothing here\n", &mut out));
        assert_eq!(out, "nothing here\n");
    }

    #[test]
    fn multi_byte_text() {
        let mut m = Masker::new();
        m.add("pässwörd");
        assert_eq!(m.mask("ü pässwörd ü"), "ü *** ü");
    }
}
