//! The black-box conformance suite for backend plugins (rule 15), modelled on `critest` and
//! `csi-sanity`: it talks to a plugin only through the [`Backend`] trait (in practice a
//! [`crate::client::GrpcBackend`] over a socket), so any plugin in any language can be checked.
//!
//! - Three tiers: [`Tier::Protocol`] (negotiation, ids, idempotency, every documented error),
//!   [`Tier::Semantics`] (exec, signals, cancellation, env, staged and collected files, copy,
//!   containers) and [`Tier::Faults`] (the plugin killed and restarted, which needs a
//!   [`PluginControl`]: the suite must have started the plugin itself).
//! - Capability-aware: what the plugin declares unsupported is skipped with the reason, and
//!   checked to answer UNIMPLEMENTED where the protocol says so.
//! - Every case creates its own environments, labelled with the suite's namespace
//!   (`Owner.runner_id`) and `kiln.conformance=<nonce>`, and removes them even when it fails;
//!   the last case checks that nothing is left behind.
//!
//! ```no_run
//! # async fn demo(backend: std::sync::Arc<dyn kiln_plugin_sdk::Backend>) {
//! use kiln_plugin_sdk::conformance::{run_suite, SuiteConfig};
//! let report = run_suite(backend, &SuiteConfig::new(), None).await;
//! print!("{}", report.render_text());
//! assert!(report.passed());
//! # }
//! ```

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;

use crate::backend::{Backend, CapabilitiesRequest, PROTOCOL_VERSION};
use crate::error::{Error, Result};

/// Fails the current case with a formatted message.
macro_rules! fail {
    ($($arg:tt)+) => {
        return Err($crate::conformance::harness::Stop::Fail(format!($($arg)+)))
    };
}

/// Fails the current case with a formatted message unless the condition holds.
macro_rules! ensure {
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            fail!($($arg)+);
        }
    };
}

mod cli;
mod faults;
mod harness;
mod process;
mod protocol;
mod report;
mod semantics;

pub use crate::words::split_command;
pub use cli::main;
pub use process::ManagedPlugin;
pub use report::{CaseResult, Outcome, Report};

use harness::{Ctx, Stop};

/// A group of cases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tier {
    /// The wire contract: negotiation, ids, idempotency, documented errors.
    Protocol,
    /// What processes, signals, files and copies do.
    Semantics,
    /// The plugin killed and restarted (needs a [`PluginControl`]).
    Faults,
}

impl Tier {
    /// All tiers, in the order they run.
    pub const ALL: [Tier; 3] = [Tier::Protocol, Tier::Semantics, Tier::Faults];

    /// The tier's name as used in case names and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Tier::Protocol => "protocol",
            Tier::Semantics => "semantics",
            Tier::Faults => "faults",
        }
    }
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.name())
    }
}

impl std::str::FromStr for Tier {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Tier, String> {
        Tier::ALL
            .into_iter()
            .find(|t| t.name() == s.trim())
            .ok_or_else(|| format!("unknown tier {s:?}: use protocol, semantics or faults"))
    }
}

/// What to run and how to label what the suite creates.
#[derive(Debug, Clone)]
pub struct SuiteConfig {
    /// Tiers to run.
    pub tiers: Vec<Tier>,
    /// The suite's label namespace, e.g. `conformance-1a2b3c4d`: used as `Owner.runner_id` of
    /// everything it creates (and so for the final "nothing left behind" listing).
    pub namespace: String,
    /// Only cases whose name contains this substring (the cleanup check always runs).
    pub filter: Option<String>,
    /// Options passed to `create_environment`, e.g. `{"image": "debian:12"}` for docker.
    pub env_options: serde_json::Map<String, serde_json::Value>,
    /// The `runs-on` label passed to `create_environment`.
    pub label: String,
    /// Image for the container-layer cases (job, service, step containers); without it those
    /// cases are skipped.
    pub container_image: Option<String>,
    /// Bound on one case, cleanup excluded.
    pub case_timeout: Duration,
}

impl SuiteConfig {
    /// All tiers, a fresh `conformance-<nonce>` namespace, label `conformance`, no options.
    pub fn new() -> SuiteConfig {
        SuiteConfig {
            tiers: Tier::ALL.to_vec(),
            namespace: format!("conformance-{}", harness::nonce(8)),
            filter: None,
            env_options: serde_json::Map::new(),
            label: "conformance".to_owned(),
            container_image: None,
            case_timeout: Duration::from_secs(300),
        }
    }
}

impl Default for SuiteConfig {
    fn default() -> SuiteConfig {
        SuiteConfig::new()
    }
}

/// Control over the plugin process, for the faults tier: available only when the suite (or
/// its caller) started the plugin itself. See [`ManagedPlugin`].
#[async_trait::async_trait]
pub trait PluginControl: Send + Sync {
    /// Kills the plugin process with SIGKILL and waits for it to be gone.
    async fn kill(&self) -> Result<()>;

    /// Starts the plugin again (after [`PluginControl::kill`] or an exit), waits until it
    /// answers and returns a client for it.
    async fn restart(&self) -> Result<Arc<dyn Backend>>;

    /// Closes the plugin's standard input and reports whether it exited within `within`
    /// (rule 13: a managed plugin never outlives its runner). Optional.
    async fn close_stdin(&self, within: Duration) -> Result<bool> {
        let _ = within;
        Err(Error::unimplemented("this plugin control cannot close the plugin's stdin"))
    }
}

/// The name of the case that checks nothing is left behind; it always runs last.
pub const CLEANUP_CASE: &str = "protocol/cleanup/nothing-left-behind";

type CaseFuture<'a> = Pin<Box<dyn Future<Output = Result<(), Stop>> + 'a>>;

/// One case of the suite.
struct Case {
    tier: Tier,
    name: &'static str,
    run: for<'a> fn(&'a Ctx<'a>) -> CaseFuture<'a>,
}

macro_rules! case {
    ($tier:ident, $name:literal, $f:path) => {
        Case { tier: Tier::$tier, name: $name, run: |ctx| Box::pin($f(ctx)) }
    };
}

/// Every case, in the order they run.
fn cases() -> Vec<Case> {
    vec![
        case!(Protocol, "protocol/capabilities/negotiate", protocol::negotiate),
        case!(Protocol, "protocol/capabilities/version-mismatch", protocol::version_mismatch),
        case!(Protocol, "protocol/environment/create", protocol::create_environment),
        case!(Protocol, "protocol/environment/replay", protocol::replay),
        case!(Protocol, "protocol/environment/invalid-ids", protocol::invalid_ids),
        case!(Protocol, "protocol/errors/not-found", protocol::not_found),
        case!(Protocol, "protocol/remove/idempotent", protocol::remove_idempotent),
        case!(Protocol, "protocol/exec/id-reuse", protocol::exec_id_reuse),
        case!(Protocol, "protocol/list/owner-labels", protocol::list_owner_labels),
        case!(Protocol, "protocol/list/selectors", protocol::list_selectors),
        case!(Protocol, "protocol/containers/unimplemented", protocol::unimplemented_layers),
        case!(Protocol, "protocol/stdin/undeclared", protocol::stdin_undeclared),
        case!(Semantics, "semantics/inspect/primary-running", semantics::inspect_primary),
        case!(Semantics, "semantics/exec/output-and-exit-codes", semantics::output_and_codes),
        case!(Semantics, "semantics/exec/killed-by-signal", semantics::killed_by_signal),
        case!(Semantics, "semantics/exec/large-output", semantics::large_output),
        case!(Semantics, "semantics/exec/streaming", semantics::streaming),
        case!(Semantics, "semantics/exec/env-exact", semantics::env_exact),
        case!(Semantics, "semantics/exec/path-prepend", semantics::path_prepend),
        case!(Semantics, "semantics/exec/working-dir", semantics::working_dir),
        case!(Semantics, "semantics/exec/staged-and-collected-files", semantics::staged_files),
        case!(Semantics, "semantics/exec/timeout", semantics::timeout),
        case!(Semantics, "semantics/exec/finished-with-background", semantics::finished_background),
        case!(Semantics, "semantics/exec/stdin", semantics::stdin),
        case!(Semantics, "semantics/signal/term-process-group", semantics::signal_term),
        case!(Semantics, "semantics/signal/kill-escalation", semantics::signal_escalation),
        case!(Semantics, "semantics/cancel/disconnect", semantics::cancel_disconnect),
        case!(Semantics, "semantics/copy/round-trip", semantics::copy_round_trip),
        case!(Semantics, "semantics/copy/traversal", semantics::copy_traversal),
        case!(Semantics, "semantics/copy/local-path", semantics::copy_local_path),
        case!(Semantics, "semantics/containers/job", semantics::job_container),
        case!(Semantics, "semantics/containers/service", semantics::service_container),
        case!(Semantics, "semantics/containers/step", semantics::step_container),
        case!(Faults, "faults/plugin/killed-mid-exec", faults::killed_mid_exec),
        case!(Faults, "faults/plugin/stdin-eof-exit", faults::stdin_eof_exit),
        case!(Protocol, "protocol/cleanup/nothing-left-behind", protocol::nothing_left_behind),
    ]
}

/// The names and tiers of every case, in run order.
pub fn case_names() -> Vec<(Tier, &'static str)> {
    cases().into_iter().map(|c| (c.tier, c.name)).collect()
}

/// Runs the suite against `backend`. `control` enables the faults tier (the caller started
/// the plugin and can kill and restart it); without it those cases are skipped.
pub async fn run_suite(
    backend: Arc<dyn Backend>,
    config: &SuiteConfig,
    control: Option<&dyn PluginControl>,
) -> Report {
    let nonce = harness::nonce(8);
    let request = CapabilitiesRequest {
        client_name: "kiln-conformance".to_owned(),
        client_version: env!("CARGO_PKG_VERSION").to_owned(),
        protocol_versions: vec![PROTOCOL_VERSION],
    };
    let started = Instant::now();
    let caps = tokio::time::timeout(harness::RPC_TIMEOUT, backend.capabilities(request)).await;
    let caps = match caps {
        Ok(Ok(caps)) => caps,
        failed => {
            let why = match failed {
                Ok(Err(e)) => format!("capabilities failed: {}: {e}", e.code),
                _ => format!("capabilities: no answer within {:?}", harness::RPC_TIMEOUT),
            };
            let mut report = Report { cases: Vec::new(), plugin: Default::default() };
            for case in cases() {
                let outcome = if case.name == "protocol/capabilities/negotiate" {
                    Outcome::Fail(why.clone())
                } else {
                    Outcome::Skip("capabilities failed".to_owned())
                };
                let duration = if matches!(outcome, Outcome::Fail(_)) {
                    started.elapsed()
                } else {
                    Duration::ZERO
                };
                report.cases.push(CaseResult {
                    name: case.name.to_owned(),
                    tier: case.tier,
                    outcome,
                    duration,
                });
            }
            return report;
        }
    };

    let mut report = Report { cases: Vec::new(), plugin: caps.clone() };
    let mut backend = backend;
    for case in cases() {
        let always = case.name == CLEANUP_CASE;
        if !always && !config.tiers.contains(&case.tier) {
            continue;
        }
        if !always && config.filter.as_deref().is_some_and(|f| !case.name.contains(f)) {
            continue;
        }
        let short = case.name.rsplit('/').next().unwrap_or(case.name);
        let ctx = Ctx::new(backend.clone(), caps.clone(), config, control, &nonce, short);
        let start = Instant::now();
        let run = AssertUnwindSafe((case.run)(&ctx)).catch_unwind();
        let mut outcome = match tokio::time::timeout(config.case_timeout, run).await {
            Err(_) => {
                Outcome::Fail(format!("the case did not finish within {:?}", config.case_timeout))
            }
            Ok(Err(panic)) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_default();
                Outcome::Fail(format!("the case panicked: {msg}"))
            }
            Ok(Ok(Ok(()))) => Outcome::Pass,
            Ok(Ok(Err(Stop::Fail(m)))) => Outcome::Fail(m),
            Ok(Ok(Err(Stop::Skip(m)))) => Outcome::Skip(m),
        };
        if let Err(why) = ctx.cleanup().await {
            outcome = match outcome {
                Outcome::Fail(m) => Outcome::Fail(format!("{m}\n(and cleanup: {why})")),
                _ => Outcome::Fail(format!("cleanup: {why}")),
            };
        }
        backend = ctx.backend();
        report.cases.push(CaseResult {
            name: case.name.to_owned(),
            tier: case.tier,
            outcome,
            duration: start.elapsed(),
        });
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn case_names_are_unique_and_well_formed() {
        let names = case_names();
        let mut seen = std::collections::BTreeSet::new();
        for (tier, name) in &names {
            assert!(seen.insert(*name), "duplicate case {name}");
            assert!(name.starts_with(&format!("{}/", tier.name())), "{name} not under {tier}");
            assert_eq!(name.split('/').count(), 3, "{name}: tier/area/what");
        }
        assert_eq!(names.last().map(|n| n.1), Some(CLEANUP_CASE));
    }

    /// A backend that negotiates and refuses everything else: the suite must run through,
    /// fail fast and never hang, over a real socket.
    struct Stub;

    #[async_trait::async_trait]
    impl Backend for Stub {
        async fn capabilities(
            &self,
            _: CapabilitiesRequest,
        ) -> Result<crate::backend::Capabilities> {
            Ok(crate::backend::Capabilities {
                plugin_name: "stub".into(),
                plugin_version: "0.0.1".into(),
                protocol_version: PROTOCOL_VERSION,
                environment: crate::backend::LayerSupport::Native,
                ..Default::default()
            })
        }
        async fn create_environment(
            &self,
            _: crate::backend::EnvironmentRequest,
        ) -> Result<crate::backend::Environment> {
            Err(Error::unavailable("stub: no environments"))
        }
        async fn inspect(
            &self,
            _: crate::backend::ContainerRef,
        ) -> Result<crate::backend::ContainerStatus> {
            Err(Error::not_found("stub"))
        }
        async fn exec(&self, _: crate::backend::ExecRequest) -> Result<crate::backend::ExecStream> {
            Err(Error::not_found("stub"))
        }
        async fn signal_exec(&self, _: crate::backend::SignalRequest) -> Result<bool> {
            Err(Error::not_found("stub"))
        }
        async fn copy_in(
            &self,
            _: crate::backend::CopyInTarget,
            _: crate::backend::ByteStream,
        ) -> Result<crate::backend::CopyStats> {
            Err(Error::not_found("stub"))
        }
        async fn copy_out(
            &self,
            _: crate::backend::CopyOutSource,
        ) -> Result<crate::backend::ByteStream> {
            Err(Error::not_found("stub"))
        }
        async fn remove(&self, _: crate::backend::RemoveRequest) -> Result<bool> {
            Ok(false)
        }
        async fn list_environments(
            &self,
            _: crate::backend::Selector,
        ) -> Result<Vec<crate::backend::EnvironmentSummary>> {
            Ok(Vec::new())
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn suite_runs_over_a_socket_against_a_stub() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("p.sock");
        let token = tokio_util::sync::CancellationToken::new();
        let server = tokio::spawn(crate::server::serve(
            Stub,
            crate::server::Listen::Unix(socket.clone()),
            token.clone(),
        ));
        let endpoint = crate::client::Endpoint::Unix(socket);
        let mut backend = None;
        for _ in 0..50 {
            if let Ok(b) = crate::client::connect(&endpoint, "stub", Duration::from_secs(1)).await {
                backend = Some(b);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let backend: Arc<dyn Backend> = Arc::new(backend.expect("the stub server answers"));
        let config = SuiteConfig { case_timeout: Duration::from_secs(20), ..SuiteConfig::new() };
        let report = run_suite(backend, &config, None).await;
        token.cancel();
        let _ = server.await;

        let outcome =
            |name: &str| report.cases.iter().find(|c| c.name == name).map(|c| c.outcome.clone());
        assert_eq!(outcome("protocol/capabilities/negotiate"), Some(Outcome::Pass), "{report:?}");
        assert_eq!(outcome("protocol/capabilities/version-mismatch"), Some(Outcome::Pass));
        assert!(
            matches!(outcome("protocol/environment/create"), Some(Outcome::Fail(m)) if m.contains("UNAVAILABLE"))
        );
        assert!(
            matches!(outcome("faults/plugin/killed-mid-exec"), Some(Outcome::Skip(m)) if m.contains("--command"))
        );
        assert!(
            matches!(outcome("semantics/exec/stdin"), Some(Outcome::Skip(m)) if m.contains("feature stdin"))
        );
        assert_eq!(outcome(CLEANUP_CASE), Some(Outcome::Pass));
        assert_eq!(report.cases.len(), case_names().len());
        assert!(!report.passed());
        let text = report.render_text();
        assert!(text.starts_with("plugin: stub 0.0.1 (protocol 1, instance "), "{text}");
    }

    #[test]
    fn tiers_parse() {
        assert_eq!("semantics".parse::<Tier>(), Ok(Tier::Semantics));
        assert!("nope".parse::<Tier>().is_err());
    }
}
