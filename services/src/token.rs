//! Per-job tokens: an HS256 JWT (`jsonwebtoken`) that the runner signs with the servers'
//! secret and gives a job as `ACTIONS_RUNTIME_TOKEN`. Its `scp` claim carries
//! `Actions.Results:<run>:<job>`, which `@actions/artifact` reads; the `kiln_cache` claim is
//! the job's cache scope. A job can therefore reach only its own run's artifacts and its own
//! scope's caches, and a standalone cache server shared by several runners trusts exactly the
//! tokens signed with the shared secret.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// What a job may do with the cache (`ACTIONS_CACHE_MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CacheMode {
    /// Restore and save.
    Write,
    /// Restore only (untrusted events: pull requests from forks).
    Read,
    /// Neither.
    None,
}

impl CacheMode {
    /// Parses `read`, `write` or `none`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "write" => Some(CacheMode::Write),
            "read" => Some(CacheMode::Read),
            "none" => Some(CacheMode::None),
            _ => None,
        }
    }

    /// The value of `ACTIONS_CACHE_MODE`.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheMode::Write => "write",
            CacheMode::Read => "read",
            CacheMode::None => "none",
        }
    }
}

/// A job's cache scope, as GitHub's: entries are written under the run's ref, and read from
/// that ref and from the default branch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheScope {
    /// The repository (`owner/name`); caches of different repositories never meet.
    pub repo: String,
    /// The ref entries are written to (`refs/heads/x`, `refs/pull/1/merge`).
    pub write_ref: String,
    /// Refs readable besides `write_ref` (the default branch).
    pub read_refs: Vec<String>,
    /// What the job may do.
    pub mode: CacheMode,
}

/// The claims of a job's token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// Space-separated scopes; includes `Actions.Results:<run>:<job>`.
    pub scp: String,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// The job's cache scope, if it may use the cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kiln_cache: Option<CacheScope>,
    /// A download grant: the blob this token may fetch (signed download URLs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kiln_blob: Option<String>,
}

impl Claims {
    /// The `(run, job)` of the `Actions.Results` scope.
    pub fn results(&self) -> Option<(&str, &str)> {
        self.scp.split(' ').find_map(|s| {
            let mut parts = s.split(':');
            match (parts.next(), parts.next(), parts.next(), parts.next()) {
                (Some("Actions.Results"), Some(run), Some(job), None) => Some((run, job)),
                _ => None,
            }
        })
    }
}

/// Signs and checks tokens with one secret.
#[derive(Clone)]
pub struct Signer {
    enc: EncodingKey,
    dec: DecodingKey,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(..)")
    }
}

/// Why a token was refused.
#[derive(Debug, thiserror::Error)]
#[error("invalid token: {0}")]
pub struct TokenError(#[from] jsonwebtoken::errors::Error);

impl Signer {
    /// A signer for `secret` (any bytes; at least 32 random ones in practice).
    pub fn new(secret: &[u8]) -> Self {
        Signer { enc: EncodingKey::from_secret(secret), dec: DecodingKey::from_secret(secret) }
    }

    /// A signer with a fresh random secret (an embedded server: only this process signs).
    pub fn random() -> Self {
        let mut secret = Vec::with_capacity(32);
        secret.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
        secret.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
        Signer::new(&secret)
    }

    /// Signs claims.
    pub fn sign(&self, claims: &Claims) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.enc)
            .expect("HS256 signing of serializable claims cannot fail")
    }

    /// Checks a token's signature and expiry.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let mut v = Validation::new(Algorithm::HS256);
        v.required_spec_claims = ["exp".to_string()].into();
        v.leeway = 0;
        Ok(jsonwebtoken::decode::<Claims>(token, &self.dec, &v)?.claims)
    }

    /// A job's token, valid for `ttl`.
    pub fn job_token(
        &self,
        run: &str,
        job: &str,
        cache: Option<CacheScope>,
        ttl: std::time::Duration,
    ) -> String {
        self.sign(&Claims {
            scp: format!("Actions.GenericRead:00000000-0000-0000-0000-000000000000 Actions.Results:{run}:{job}"),
            exp: now_secs() + ttl.as_secs(),
            kiln_cache: cache,
            kiln_blob: None,
        })
    }

    /// A short grant to fetch one blob (the `sig` of a download URL).
    pub fn blob_grant(&self, blob: &str, ttl: std::time::Duration) -> String {
        self.sign(&Claims {
            scp: String::new(),
            exp: now_secs() + ttl.as_secs(),
            kiln_cache: None,
            kiln_blob: Some(blob.to_string()),
        })
    }
}

/// Seconds since the epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn round_trip_and_foreign_secret() {
        let s = Signer::new(b"secret-one");
        let t = s.job_token("12", "build", None, Duration::from_secs(60));
        let c = s.verify(&t).unwrap();
        assert_eq!(c.results(), Some(("12", "build")));
        assert!(Signer::new(b"secret-two").verify(&t).is_err());
        assert!(s.verify("not.a.token").is_err());
        let expired =
            s.sign(&Claims { scp: String::new(), exp: 1, kiln_cache: None, kiln_blob: None });
        assert!(s.verify(&expired).is_err());
    }
}
