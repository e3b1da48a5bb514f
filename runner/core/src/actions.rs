//! Where remote actions and reusable workflows come from: `owner/repo[/path]@ref` references,
//! fetched with the `git` CLI from a base URL (or an absolute `https://host/owner/repo@ref`),
//! kept in a cache directory keyed by URL and ref, served from that cache alone in offline
//! mode, and replaced by local directories through an override map (mirrors, tests).
//!
//! A fetch goes into a private temporary directory and is renamed into place, so concurrent
//! jobs (or kiln processes) never see half a checkout. Within one run a mutable ref (a branch
//! or tag) is fetched at most once; a full commit SHA is never fetched again once cached.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};

/// The default base URL of `owner/repo@ref` references.
pub const DEFAULT_BASE_URL: &str = "https://github.com";

/// How long one git command may take before the fetch is abandoned.
const GIT_TIMEOUT: Duration = Duration::from_secs(300);

/// Where actions come from.
#[derive(Debug, Clone)]
pub struct ActionSource {
    /// Base URL of `owner/repo@ref` references (`https://github.com`, a Forgejo instance's
    /// default actions URL, `git://…`, `file:///…`).
    pub base_url: String,
    /// The cache directory.
    pub cache_dir: PathBuf,
    /// Use only the cache (and the overrides); never fetch.
    pub offline: bool,
    /// `owner/repo@ref` (or `owner/repo` for every ref) → a local directory used instead.
    pub overrides: Vec<(String, PathBuf)>,
    /// URL prefix → token sent (as HTTP basic auth) to fetches under that prefix only: the
    /// instance's own repositories in daemon mode. Passed to git through its environment,
    /// never on a command line.
    pub credentials: Vec<(String, String)>,
}

impl ActionSource {
    /// The default source: github.com, the cache under kiln's state directory, online.
    pub fn new(cache_dir: PathBuf) -> ActionSource {
        ActionSource {
            base_url: DEFAULT_BASE_URL.into(),
            cache_dir,
            offline: false,
            overrides: Vec::new(),
            credentials: Vec::new(),
        }
    }

    /// Parses an override `owner/repo[@ref]=DIR` (the form of the command line).
    pub fn parse_override(text: &str) -> Result<(String, PathBuf), ActionError> {
        let bad = || ActionError::BadOverride { text: text.to_owned() };
        let (name, dir) = text.split_once('=').ok_or_else(bad)?;
        let name = name.trim();
        let repo = name.split('@').next().unwrap_or("");
        if repo.split('/').filter(|p| !p.is_empty()).count() != 2 || dir.is_empty() {
            return Err(bad());
        }
        Ok((name.to_owned(), PathBuf::from(dir)))
    }
}

/// Why a remote action (or reusable workflow) cannot be had; every message names the action
/// (or the text given) and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActionError {
    /// `--local-repository` / `actions.local_repositories` is not `owner/repo[@ref]=DIR`.
    #[error("action override {text:?}: expected owner/repo@ref=DIR (or owner/repo=DIR)")]
    BadOverride {
        /// The text given.
        text: String,
    },
    /// A `uses:` that is not `owner/repo[/path]@ref`.
    #[error(
        "uses: {uses:?}: expected {{owner}}/{{repo}}[/path]@{{ref}}{}",
        if *ref_missing { " (a ref is required)" } else { "" }
    )]
    BadReference {
        /// The `uses:` value.
        uses: String,
        /// It has no `@ref`.
        ref_missing: bool,
    },
    /// An override names a directory that does not exist.
    #[error("action {action}: the override directory {} does not exist", dir.display())]
    OverrideMissing {
        /// The action (`owner/repo[/path]@ref`).
        action: String,
        /// The directory.
        dir: PathBuf,
    },
    /// Offline mode, and the action is not in the cache.
    #[error(
        "action {action}: not in the action cache ({}) and offline mode is on; run once without \
         offline mode to fetch it from {url}",
        cache.display()
    )]
    Offline {
        /// The action.
        action: String,
        /// The cache directory.
        cache: PathBuf,
        /// Where it would come from.
        url: String,
    },
    /// The cache directory cannot be written.
    #[error("action {action}: {what}: {error}")]
    Cache {
        /// The action.
        action: String,
        /// What failed.
        what: String,
        /// The I/O error.
        error: String,
    },
    /// `git` cannot be run.
    #[error("action {action}: running git: {error}; install git to use remote actions")]
    NoGit {
        /// The action.
        action: String,
        /// Why.
        error: String,
    },
    /// A git command took too long.
    #[error("action {action}: git {command} took longer than {secs}s ({url})")]
    GitTimeout {
        /// The action.
        action: String,
        /// The git subcommand.
        command: String,
        /// The limit.
        secs: u64,
        /// The URL.
        url: String,
    },
    /// The server did not give the ref.
    #[error("action {action}: fetching ref {git_ref:?} from {url} failed: {detail}")]
    FetchFailed {
        /// The action.
        action: String,
        /// The ref.
        git_ref: String,
        /// The URL.
        url: String,
        /// git's last line of error output.
        detail: String,
    },
}

/// A parsed remote reference: `owner/repo[/path]@ref` or `https://host/owner/repo[/path]@ref`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteRef {
    /// The repository's URL, without `.git`.
    pub url: String,
    /// `owner/repo`.
    pub repo: String,
    /// The path inside the repository ("" for its root).
    pub path: String,
    /// The ref: a branch, a tag or a commit SHA.
    pub git_ref: String,
}

impl std::fmt::Display for RemoteRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}@{}", self.repo, self.git_ref)
        } else {
            write!(f, "{}/{}@{}", self.repo, self.path, self.git_ref)
        }
    }
}

impl RemoteRef {
    /// Parses a `uses:` value that is neither local (`./`) nor `docker://`.
    pub fn parse(uses: &str, base_url: &str) -> Result<RemoteRef, ActionError> {
        let uses = uses.trim();
        let bad = |ref_missing| ActionError::BadReference { uses: uses.to_owned(), ref_missing };
        let (location, git_ref) = match uses.rsplit_once('@') {
            Some((l, r)) if !r.trim().is_empty() && !l.trim().is_empty() => (l.trim(), r.trim()),
            _ => return Err(bad(true)),
        };
        let (host, rest) = match location.split_once("://") {
            Some((scheme, rest)) => {
                let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
                (Some(format!("{scheme}://{host}")), path)
            }
            None => (None, location),
        };
        let parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
        if parts.len() < 2 || parts.iter().any(|p| *p == "." || *p == "..") {
            return Err(bad(false));
        }
        let repo_name = parts[1].strip_suffix(".git").unwrap_or(parts[1]);
        let repo = format!("{}/{repo_name}", parts[0]);
        let base = host.unwrap_or_else(|| base_url.trim_end_matches('/').to_owned());
        Ok(RemoteRef {
            url: format!("{base}/{repo}"),
            repo,
            path: parts[2..].join("/"),
            git_ref: git_ref.to_owned(),
        })
    }

    /// Whether the ref is a full commit SHA (immutable: cached forever).
    pub fn is_full_sha(&self) -> bool {
        (self.git_ref.len() == 40 || self.git_ref.len() == 64)
            && self.git_ref.bytes().all(|b| b.is_ascii_hexdigit())
    }

    /// The cache key: readable, and unique per URL and ref.
    fn cache_key(&self) -> String {
        let mut hash = Sha256::new();
        hash.update(self.url.as_bytes());
        hash.update([0]);
        hash.update(self.git_ref.as_bytes());
        let readable: String = format!("{}@{}", self.repo, self.git_ref)
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || "-_.@".contains(c) { c } else { '_' })
            .take(80)
            .collect();
        format!("{readable}-{}", &hex::encode(hash.finalize())[..12])
    }
}

/// A fetched repository on this machine.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The repository's files (no `.git`).
    pub dir: PathBuf,
    /// A key unique per URL and ref (the cache entry's name; `override-…` for overrides).
    pub key: String,
}

/// One run's fetch of one cache key, shared by the jobs that need it.
type FetchCell = tokio::sync::OnceCell<Result<Fetched, ActionError>>;

/// Fetches remote references, once per run for mutable refs.
pub struct Resolver {
    source: ActionSource,
    /// Per cache key: the result of this run's fetch, behind a lock so concurrent jobs wait
    /// for one fetch instead of starting their own.
    fetched: Mutex<HashMap<String, Arc<FetchCell>>>,
}

impl Resolver {
    /// A resolver for one run.
    pub fn new(source: ActionSource) -> Resolver {
        Resolver { source, fetched: Mutex::new(HashMap::new()) }
    }

    /// The source it resolves from.
    pub fn source(&self) -> &ActionSource {
        &self.source
    }

    /// Parses a reference against this resolver's base URL.
    pub fn parse(&self, uses: &str) -> Result<RemoteRef, ActionError> {
        RemoteRef::parse(uses, &self.source.base_url)
    }

    /// The local directory holding the repository of `r` (its root; `r.path` is inside).
    pub async fn fetch(&self, r: &RemoteRef) -> Result<Fetched, ActionError> {
        if let Some(dir) = self.override_for(r) {
            if !dir.is_dir() {
                return Err(ActionError::OverrideMissing { action: r.to_string(), dir });
            }
            let key = format!("override-{}", r.cache_key());
            return Ok(Fetched { dir, key });
        }
        let key = r.cache_key();
        let cell = {
            let mut map = self.fetched.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(key.clone()).or_default().clone()
        };
        cell.get_or_init(|| self.fetch_uncached(r, key.clone())).await.clone()
    }

    fn override_for(&self, r: &RemoteRef) -> Option<PathBuf> {
        let exact = format!("{}@{}", r.repo, r.git_ref);
        let find = |name: &str| {
            self.source
                .overrides
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, d)| d.clone())
        };
        find(&exact).or_else(|| find(&r.repo))
    }

    async fn fetch_uncached(&self, r: &RemoteRef, key: String) -> Result<Fetched, ActionError> {
        let dir = self.source.cache_dir.join(&key);
        let cached = dir.is_dir();
        if self.source.offline {
            return if cached {
                Ok(Fetched { dir, key })
            } else {
                Err(ActionError::Offline {
                    action: r.to_string(),
                    cache: self.source.cache_dir.clone(),
                    url: r.url.clone(),
                })
            };
        }
        if cached && r.is_full_sha() {
            return Ok(Fetched { dir, key });
        }
        match self.clone_into_cache(r, &dir).await {
            Ok(()) => Ok(Fetched { dir, key }),
            Err(e) if cached => {
                tracing::warn!(action = %r, error = %e, "fetch failed; using the cached copy");
                Ok(Fetched { dir, key })
            }
            Err(e) => Err(e),
        }
    }

    /// Fetches `r` into a temporary directory and renames it to `dest`.
    async fn clone_into_cache(&self, r: &RemoteRef, dest: &Path) -> Result<(), ActionError> {
        let cache = &self.source.cache_dir;
        std::fs::create_dir_all(cache).map_err(|e| ActionError::Cache {
            action: r.to_string(),
            what: format!("creating the action cache {}", cache.display()),
            error: e.to_string(),
        })?;
        let tmp = cache.join(format!(".tmp-{}", crate::identity::short_nonce()));
        let auth =
            self.source.credentials.iter().find(|(prefix, _)| r.url.starts_with(prefix.as_str()));
        let result = fetch_to(r, &tmp, auth).await;
        if let Err(e) = result {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        let _ = std::fs::remove_dir_all(tmp.join(".git"));
        // Replace an older copy of a mutable ref; another process may have put one there
        // meanwhile: either copy will do.
        if dest.exists() {
            let old = cache.join(format!(".old-{}", crate::identity::short_nonce()));
            if std::fs::rename(dest, &old).is_ok() {
                let _ = std::fs::remove_dir_all(&old);
            }
        }
        if let Err(e) = std::fs::rename(&tmp, dest) {
            let _ = std::fs::remove_dir_all(&tmp);
            if !dest.is_dir() {
                return Err(ActionError::Cache {
                    action: r.to_string(),
                    what: "storing it in the cache".into(),
                    error: e.to_string(),
                });
            }
        }
        Ok(())
    }
}

/// `git init` + a shallow fetch of the ref + checkout, in `dir`.
async fn fetch_to(
    r: &RemoteRef,
    dir: &Path,
    auth: Option<&(String, String)>,
) -> Result<(), ActionError> {
    let dir_s = dir.to_string_lossy().into_owned();
    git(r, auth, &["init", "-q", &dir_s]).await?;
    let shallow =
        git(r, auth, &["-C", &dir_s, "fetch", "-q", "--depth", "1", &r.url, &r.git_ref]).await;
    if let Err(e) = shallow {
        if !r.is_full_sha() {
            return Err(e);
        }
        // Not every server serves a commit by its SHA: fetch everything and look for it.
        git(
            r,
            auth,
            &[
                "-C",
                &dir_s,
                "fetch",
                "-q",
                &r.url,
                "+refs/heads/*:refs/remotes/o/*",
                "+refs/tags/*:refs/tags/*",
            ],
        )
        .await?;
        return git(
            r,
            auth,
            &["-C", &dir_s, "-c", "advice.detachedHead=false", "checkout", "-q", &r.git_ref],
        )
        .await;
    }
    git(r, auth, &["-C", &dir_s, "-c", "advice.detachedHead=false", "checkout", "-q", "FETCH_HEAD"])
        .await
}

/// Runs one git command with no prompts, bounded in time; the error names the action, the ref
/// and the URL.
async fn git(
    r: &RemoteRef,
    auth: Option<&(String, String)>,
    args: &[&str],
) -> Result<(), ActionError> {
    let mut cmd = tokio::process::Command::new("git");
    if let Some((prefix, token)) = auth {
        use base64::Engine as _;
        let basic =
            base64::engine::general_purpose::STANDARD.encode(format!("x-access-token:{token}"));
        cmd.env("GIT_CONFIG_COUNT", "1")
            .env("GIT_CONFIG_KEY_0", format!("http.{prefix}.extraHeader"))
            .env("GIT_CONFIG_VALUE_0", format!("Authorization: basic {basic}"));
    }
    cmd.args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ASKPASS", "true")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let out = match tokio::time::timeout(GIT_TIMEOUT, cmd.output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => {
            return Err(ActionError::NoGit { action: r.to_string(), error: e.to_string() });
        }
        Err(_) => {
            let command = args.iter().find(|a| !a.starts_with('-') && **a != "-C").unwrap_or(&"");
            return Err(ActionError::GitTimeout {
                action: r.to_string(),
                command: (*command).to_owned(),
                secs: GIT_TIMEOUT.as_secs(),
                url: r.url.clone(),
            });
        }
    };
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let detail = stderr.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("").trim();
    Err(ActionError::FetchFailed {
        action: r.to_string(),
        git_ref: r.git_ref.clone(),
        url: r.url.clone(),
        detail: detail.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(uses: &str) -> String {
        match RemoteRef::parse(uses, "https://github.com/") {
            Ok(r) => format!("url={} repo={} path={} ref={}", r.url, r.repo, r.path, r.git_ref),
            Err(e) => format!("error: {e}"),
        }
    }

    #[test]
    fn references() {
        let cases = [
            (
                "actions/checkout@v4",
                "url=https://github.com/actions/checkout repo=actions/checkout path= ref=v4",
            ),
            ("o/r/sub/dir@main", "url=https://github.com/o/r path=sub/dir ref=main"),
            ("o/r.git@v1", "url=https://github.com/o/r repo=o/r path= ref=v1"),
            ("https://code.example/o/r@v2", "url=https://code.example/o/r repo=o/r path= ref=v2"),
            ("https://code.example/o/r/a/b@refs/heads/x", "path=a/b ref=refs/heads/x"),
            (
                "actions/checkout",
                "error: uses: \"actions/checkout\": expected {owner}/{repo}[/path]@{ref} (a ref is required)",
            ),
            ("", "error: uses: \"\": expected {owner}/{repo}[/path]@{ref} (a ref is required)"),
            ("checkout@v1", "error: uses: \"checkout@v1\": expected {owner}/{repo}[/path]@{ref}"),
            ("o/r/../x@v1", "error: uses: \"o/r/../x@v1\": expected"),
            ("o/r@", "error: uses: \"o/r@\": expected"),
        ];
        for (uses, want) in cases {
            let got = parse(uses);
            let ok = want.split(' ').all(|part| got.contains(part));
            assert!(ok, "{uses}: got {got:?}, want {want:?}");
        }
    }

    #[test]
    fn cache_keys_are_readable_and_distinct() {
        let a = RemoteRef::parse("o/r@v1", "https://a.example").unwrap();
        let b = RemoteRef::parse("o/r@v1", "https://b.example").unwrap();
        assert!(a.cache_key().starts_with("o_r@v1-"), "{}", a.cache_key());
        assert_ne!(a.cache_key(), b.cache_key());
        let sha = RemoteRef::parse(&format!("o/r@{}", "a".repeat(40)), "x").unwrap();
        assert!(sha.is_full_sha());
        assert!(!a.is_full_sha());
    }

    #[test]
    fn overrides() {
        assert_eq!(
            ActionSource::parse_override("o/r@v1=/tmp/x").unwrap(),
            ("o/r@v1".to_owned(), PathBuf::from("/tmp/x"))
        );
        assert!(ActionSource::parse_override("o/r").is_err());
        assert!(ActionSource::parse_override("r@v1=/x").is_err());
    }

    fn git_ok(dir: &Path, args: &[&str]) {
        let st = std::process::Command::new("git")
            .current_dir(dir)
            .args(["-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"])
            .args(args)
            .output()
            .unwrap();
        assert!(st.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&st.stderr));
    }

    /// A repository at `<base>/o/act` with `action.yml` saying `version`.
    fn make_repo(base: &Path, version: &str) {
        let repo = base.join("o/act");
        std::fs::create_dir_all(&repo).unwrap();
        if !repo.join(".git").exists() {
            git_ok(&repo, &["init", "-q"]);
        }
        std::fs::write(repo.join("action.yml"), format!("name: {version}\n")).unwrap();
        git_ok(&repo, &["add", "-A"]);
        git_ok(&repo, &["commit", "-qm", version]);
        git_ok(&repo, &["tag", "-f", "v1"]);
    }

    #[tokio::test]
    async fn fetch_cache_and_offline() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("server");
        make_repo(&base, "one");
        let mut source = ActionSource::new(tmp.path().join("cache"));
        source.base_url = format!("file://{}", base.display());
        let r = RemoteRef::parse("o/act@v1", &source.base_url).unwrap();

        // Offline with an empty cache: a clear error naming the action and the cache.
        let offline = Resolver::new(ActionSource { offline: true, ..source.clone() });
        let e = offline.fetch(&r).await.unwrap_err();
        assert!(matches!(e, ActionError::Offline { .. }), "{e:?}");
        let e = e.to_string();
        assert!(e.contains("o/act@v1") && e.contains("offline"), "{e}");

        let fetched = Resolver::new(source.clone()).fetch(&r).await.unwrap();
        let text = std::fs::read_to_string(fetched.dir.join("action.yml")).unwrap();
        assert_eq!(text, "name: one\n");
        assert!(!fetched.dir.join(".git").exists());

        // The tag moves: online runs see the new commit, offline runs the cached one.
        make_repo(&base, "two");
        // (A resolver serves one run: a new run sees the cache as it is now.)
        let offline = Resolver::new(ActionSource { offline: true, ..source.clone() });
        let cached = offline.fetch(&r).await.unwrap();
        assert_eq!(std::fs::read_to_string(cached.dir.join("action.yml")).unwrap(), "name: one\n");
        let fresh = Resolver::new(source.clone()).fetch(&r).await.unwrap();
        assert_eq!(std::fs::read_to_string(fresh.dir.join("action.yml")).unwrap(), "name: two\n");

        // A full commit SHA (which this server does not serve directly: the fallback fetches
        // every ref) is fetched once, then cached for good.
        let head = std::process::Command::new("git")
            .current_dir(base.join("o/act"))
            .args(["rev-parse", "HEAD"])
            .output()
            .unwrap();
        let sha = String::from_utf8_lossy(&head.stdout).trim().to_owned();
        let by_sha = RemoteRef::parse(&format!("o/act@{sha}"), &source.base_url).unwrap();
        let fetched = Resolver::new(source.clone()).fetch(&by_sha).await.unwrap();
        assert_eq!(std::fs::read_to_string(fetched.dir.join("action.yml")).unwrap(), "name: two\n");

        // A missing ref names the ref and the URL.
        let missing = RemoteRef::parse("o/act@v9", &source.base_url).unwrap();
        let e = Resolver::new(source.clone()).fetch(&missing).await.unwrap_err();
        assert!(matches!(e, ActionError::FetchFailed { .. }), "{e:?}");
        let e = e.to_string();
        assert!(e.contains("\"v9\"") && e.contains(&source.base_url), "{e}");

        // An override wins over the cache.
        let over = tmp.path().join("over");
        std::fs::create_dir_all(&over).unwrap();
        let with_override = Resolver::new(ActionSource {
            overrides: vec![("o/act@v1".into(), over.clone())],
            ..source
        });
        assert_eq!(with_override.fetch(&r).await.unwrap().dir, over);
    }
}
