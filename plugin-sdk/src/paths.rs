//! Checks on the paths a request names (`working_dir`, staged and collected files, CopyIn and
//! CopyOut paths): absolute, and without `..`, with errors naming the request's field.

use std::path::{Component, Path};

use crate::{Error, Result};

/// `path` as a [`Path`] when it is absolute and has no `..` component; else INVALID_ARGUMENT
/// naming `field`.
pub fn absolute_without_dotdot<'a>(path: &'a str, field: &str) -> Result<&'a Path> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(Error::invalid_argument(format!("{field} {path:?} is not an absolute path"))
            .field(field));
    }
    if p.components().any(|c| c == Component::ParentDir) {
        return Err(Error::invalid_argument(format!("{field} {path:?} contains '..'")).field(field));
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_and_dotdot_paths_are_refused_naming_the_field() {
        assert!(absolute_without_dotdot("/a/b", "f").is_ok());
        let e = absolute_without_dotdot("a/b", "working_dir").unwrap_err();
        assert_eq!(e.message, "working_dir \"a/b\" is not an absolute path");
        assert_eq!(e.field.as_deref(), Some("working_dir"));
        let e = absolute_without_dotdot("/a/../b", "path").unwrap_err();
        assert_eq!(e.message, "path \"/a/../b\" contains '..'");
    }
}
