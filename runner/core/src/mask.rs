//! Secret masking: every secret value and every `::add-mask::` value becomes `***` in logs,
//! including each line of a multi-line secret.
//!
//! Output is searched only when there are values, with one vectorized substring search per
//! value (`memchr::memmem`; a job has a handful of secrets), over a block of lines at once.
//! Output with no secrets is copied as is.

use std::borrow::Cow;

use memchr::memmem;

/// The values to hide. Where occurrences overlap, all of their bytes are hidden together.
#[derive(Debug, Clone, Default)]
pub struct Masker {
    values: Vec<String>,
    /// A search for each single-line value. A value that holds a line break can never be
    /// inside one log line (its lines are values of their own).
    finders: Vec<memmem::Finder<'static>>,
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
            self.finders = self
                .values
                .iter()
                .filter(|v| !v.contains('\n'))
                .map(|v| memmem::Finder::new(v).into_owned())
                .collect();
        }
    }

    /// Whether nothing is masked.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The line with every secret replaced by `***`.
    pub fn mask<'a>(&self, line: &'a str) -> Cow<'a, str> {
        if self.finders.is_empty() {
            return Cow::Borrowed(line);
        }
        let mut out = String::new();
        if self.mask_into(line, &mut out) { Cow::Owned(out) } else { Cow::Borrowed(line) }
    }

    /// Appends `text` to `out` with every secret replaced by `***`, and says whether anything
    /// was replaced. `text` may hold many lines: no masked value spans a line break, so this is
    /// the same as masking line by line.
    pub fn mask_into(&self, text: &str, out: &mut String) -> bool {
        // Every occurrence, overlapping ones included (no allocation when there is none).
        let mut spans: Vec<(usize, usize)> = Vec::new();
        for f in &self.finders {
            let len = f.needle().len();
            let mut at = 0;
            while let Some(i) = f.find(&text.as_bytes()[at..]) {
                spans.push((at + i, at + i + len));
                at += i + 1;
            }
        }
        spans.sort_unstable();
        let Some(&first) = spans.first() else {
            out.push_str(text);
            return false;
        };
        // Overlapping occurrences are merged into one span; each span becomes `***`.
        let mut copied = 0;
        let mut write = |(start, end): (usize, usize), out: &mut String| {
            out.push_str(&text[copied..start]);
            out.push_str("***");
            copied = end;
        };
        let mut span = first;
        for &(start, end) in &spans[1..] {
            if start < span.1 {
                span.1 = span.1.max(end);
            } else {
                write(span, out);
                span = (start, end);
            }
        }
        write(span, out);
        out.push_str(&text[copied..]);
        true
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

        let mut m = Masker::new();
        for v in ["ab", "cd", "abcde"] {
            m.add(v);
        }
        assert_eq!(m.mask("abcdef"), "***f");
        assert_eq!(m.mask("abcd"), "******");
        m.add("aa");
        assert_eq!(m.mask("aaa b"), "*** b");
    }

    #[test]
    fn many_values() {
        let mut m = Masker::new();
        for v in ["one1", "two2", "three3", "four4", "five5", "six6", "ab", "bcd"] {
            m.add(v);
        }
        assert_eq!(m.mask("one1 two2 x six6 abcd five5!"), "*** *** x *** *** ***!");
        assert_eq!(m.mask("nothing"), "nothing");
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
