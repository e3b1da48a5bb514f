//! `hashFiles()` on a local directory: glob patterns relative to a root, `!` exclusions,
//! SHA-256 of the concatenated per-file SHA-256 digests.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use glob::{MatchOptions, Pattern};
use sha2::{Digest, Sha256};

/// One pattern line: an exclusion (`!`) or an inclusion.
struct Rule {
    negate: bool,
    pattern: Pattern,
}

const MATCH_OPTIONS: MatchOptions = MatchOptions {
    case_sensitive: true,
    require_literal_separator: true,
    require_literal_leading_dot: false,
};

/// Turns the pattern arguments into rules; each argument may hold several lines.
fn rules(root: &Path, patterns: &[String]) -> Result<Vec<Rule>, String> {
    let root_prefix = format!("{}/", root.to_string_lossy().trim_end_matches('/'));
    let mut rules = Vec::new();
    for line in patterns.iter().flat_map(|p| p.lines()) {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (negate, mut pat) = match line.strip_prefix('!') {
            Some(rest) => (true, rest.trim_start()),
            None => (false, line),
        };
        if pat.starts_with('/') {
            // Absolute patterns only match when they point inside the root.
            match pat.strip_prefix(root_prefix.as_str()) {
                Some(rel) => pat = rel,
                None => continue,
            }
        }
        while let Some(rest) = pat.strip_prefix("./") {
            pat = rest;
        }
        let pat = pat.trim_end_matches('/');
        if pat.is_empty() {
            continue;
        }
        let pattern =
            Pattern::new(pat).map_err(|e| format!("invalid pattern '{line}': {}", e.msg))?;
        rules.push(Rule { negate, pattern });
    }
    Ok(rules)
}

/// Whether a relative path (with `/` separators) is selected: the last rule that matches
/// the path or one of its parent directories decides.
fn selected(rules: &[Rule], rel: &str) -> bool {
    let mut prefixes: Vec<&str> = rel.match_indices('/').map(|(i, _)| &rel[..i]).collect();
    prefixes.push(rel);
    let mut result = false;
    for rule in rules {
        if prefixes.iter().any(|p| rule.pattern.matches_with(p, MATCH_OPTIONS)) {
            result = !rule.negate;
        }
    }
    result
}

/// Collects regular files below `dir` (not following directory symlinks), as relative paths.
fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, PathBuf)>) -> Result<(), String> {
    let entries =
        fs::read_dir(dir).map_err(|e| format!("cannot read directory {}: {e}", dir.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("cannot read directory {}: {e}", dir.display()))?;
        let path = entry.path();
        let Ok(file_type) = entry.file_type() else { continue };
        if file_type.is_dir() {
            walk(root, &path, out)?;
        } else if fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            let Ok(rel) = path.strip_prefix(root) else { continue };
            let rel: Vec<String> =
                rel.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
            out.push((rel.join("/"), path));
        }
    }
    Ok(())
}

/// GitHub's `hashFiles` on a local directory. Returns the hex SHA-256 over the per-file
/// SHA-256 digests of the matched files in sorted path order, or `""` when nothing matched.
pub fn hash_files_in(root: &Path, patterns: &[String]) -> Result<String, String> {
    let rules = rules(root, patterns)?;
    if rules.iter().all(|r| r.negate) {
        return Ok(String::new());
    }
    let mut files = Vec::new();
    walk(root, root, &mut files)?;
    files.retain(|(rel, _)| selected(&rules, rel));
    if files.is_empty() {
        return Ok(String::new());
    }
    files.sort();
    let mut total = Sha256::new();
    for (_, path) in &files {
        let mut file =
            fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n =
                file.read(&mut buf).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        total.update(hasher.finalize());
    }
    Ok(hex::encode(total.finalize()))
}
