//! Secret masking: every secret value and every `::add-mask::` value becomes `***` in logs,
//! including each line of a multi-line secret.

/// The values to hide, longest first so overlapping secrets are hidden whole.
#[derive(Debug, Clone, Default)]
pub struct Masker {
    values: Vec<String>,
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
        self.values.sort_by_key(|v| std::cmp::Reverse(v.len()));
    }

    /// Whether nothing is masked.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The line with every secret replaced by `***`.
    pub fn mask<'a>(&self, line: &'a str) -> std::borrow::Cow<'a, str> {
        if self.values.is_empty() || !self.values.iter().any(|v| line.contains(v.as_str())) {
            return std::borrow::Cow::Borrowed(line);
        }
        let mut out = line.to_owned();
        for v in &self.values {
            if out.contains(v.as_str()) {
                out = out.replace(v.as_str(), "***");
            }
        }
        std::borrow::Cow::Owned(out)
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
    }
}
