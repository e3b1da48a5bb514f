//! The error type of the workflow model: names the file, the line and column, and the key path.

use std::fmt;

/// A parse or validation error, located in a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// The file the error is in, as given to the parser (may be empty for in-memory text).
    pub file: String,
    /// 1-based line, when known.
    pub line: Option<u32>,
    /// 1-based column, when known.
    pub column: Option<u32>,
    /// Key path such as `jobs.build.steps[0].uses` (empty for the document root or non-YAML input).
    pub path: String,
    /// What is wrong and what to do about it (lowercase, no trailing period).
    pub message: String,
}

impl Error {
    /// An error with no location, for inputs that are not files (a matrix, a shell name).
    pub fn msg(message: impl Into<String>) -> Self {
        Error {
            file: String::new(),
            line: None,
            column: None,
            path: String::new(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut wrote = false;
        if !self.file.is_empty() {
            f.write_str(&self.file)?;
            wrote = true;
        }
        if let Some(line) = self.line {
            if wrote {
                f.write_str(":")?;
            }
            write!(f, "{line}")?;
            if let Some(col) = self.column {
                write!(f, ":{col}")?;
            }
            wrote = true;
        }
        if !self.path.is_empty() {
            if wrote {
                f.write_str(": ")?;
            }
            f.write_str(&self.path)?;
            wrote = true;
        }
        if wrote {
            f.write_str(": ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

/// Several errors, as validation reports them; displayed one per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Errors(pub Vec<Error>);

impl fmt::Display for Errors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Errors {}
