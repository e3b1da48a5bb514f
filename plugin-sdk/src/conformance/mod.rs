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
mod record;
mod report;
mod semantics;
mod wire;

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
    /// Where the plugin listens, for the cases that speak to the wire directly (metadata,
    /// the error trailer, grpc.health, message size, socket mode); without it they are
    /// skipped.
    pub endpoint: Option<crate::client::Endpoint>,
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
            endpoint: None,
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

    /// Sends SIGTERM to the plugin and reports whether it exited within `within` (§1.3).
    /// Optional.
    async fn terminate(&self, within: Duration) -> Result<bool> {
        let _ = within;
        Err(Error::unimplemented("this plugin control cannot signal the plugin"))
    }
}

/// The name of the case that checks nothing is left behind; it always runs last.
pub const CLEANUP_CASE: &str = "protocol/cleanup/nothing-left-behind";

type CaseFuture<'a> = Pin<Box<dyn Future<Output = Result<(), Stop>> + 'a>>;

/// One case of the suite.
struct Case {
    tier: Tier,
    name: &'static str,
    /// The sections of `proto/backend/v1/README.md` whose MUSTs the case checks, e.g. `§2.3`.
    rule: &'static str,
    run: for<'a> fn(&'a Ctx<'a>) -> CaseFuture<'a>,
}

macro_rules! case {
    ($tier:ident, $name:literal, $rule:literal, $f:path) => {
        Case { tier: Tier::$tier, name: $name, rule: $rule, run: |ctx| Box::pin($f(ctx)) }
    };
}

/// Every case, in the order they run.
fn cases() -> Vec<Case> {
    vec![
        case!(Protocol, "protocol/capabilities/negotiate", "§2.2 §3.1 §5.1", protocol::negotiate),
        case!(
            Protocol,
            "protocol/capabilities/version-mismatch",
            "§2.2",
            protocol::version_mismatch
        ),
        case!(Protocol, "protocol/metadata/instance-id", "§2.3", wire::instance_id_header),
        case!(Protocol, "protocol/metadata/version-refused", "§2.3", wire::version_refused),
        case!(Protocol, "protocol/errors/error-detail", "§7.2 §4.1 §4.4 §3.3", wire::error_detail),
        case!(Protocol, "protocol/health/serving", "§1.5", wire::health),
        case!(Protocol, "protocol/limits/message-size", "§1.6", wire::message_size),
        case!(Protocol, "protocol/transport/socket-mode", "§1.4", wire::socket_mode),
        case!(Protocol, "protocol/environment/create", "§5.2", protocol::create_environment),
        case!(Protocol, "protocol/environment/replay", "§4.4", protocol::replay),
        case!(Protocol, "protocol/environment/invalid-ids", "§4.1", protocol::invalid_ids),
        case!(
            Protocol,
            "protocol/errors/not-found",
            "§5.5 §5.6 §5.9 §5.10 §5.7",
            protocol::not_found
        ),
        case!(Protocol, "protocol/remove/idempotent", "§4.5 §5.12", protocol::remove_idempotent),
        case!(Protocol, "protocol/exec/id-reuse", "§4.6", protocol::exec_id_reuse),
        case!(Protocol, "protocol/list/owner-labels", "§5.13.1 §6.2", protocol::list_owner_labels),
        case!(Protocol, "protocol/list/selectors", "§5.13.1", protocol::list_selectors),
        case!(
            Protocol,
            "protocol/containers/unimplemented",
            "§3.3 §3.5",
            protocol::unimplemented_layers
        ),
        case!(Protocol, "protocol/stdin/undeclared", "§3.2 §3.3", protocol::stdin_undeclared),
        case!(Semantics, "semantics/inspect/primary-running", "§5.5", semantics::inspect_primary),
        case!(
            Semantics,
            "semantics/exec/output-and-exit-codes",
            "§5.6.1 §7.3",
            semantics::output_and_codes
        ),
        case!(Semantics, "semantics/exec/stream-grammar", "§5.6.1", wire::stream_grammar),
        case!(
            Semantics,
            "semantics/exec/killed-by-signal",
            "§5.6.4 §7.3",
            semantics::killed_by_signal
        ),
        case!(Semantics, "semantics/exec/missing-program", "§5.6.2", semantics::missing_program),
        case!(Semantics, "semantics/exec/tty-undeclared", "§3.2 §3.3", semantics::tty_undeclared),
        case!(Semantics, "semantics/exec/large-output", "§5.6.1 §1.6", semantics::large_output),
        case!(Semantics, "semantics/exec/streaming", "§5.6.1", semantics::streaming),
        case!(Semantics, "semantics/exec/keepalive", "§5.6.1", semantics::keepalive),
        case!(Semantics, "semantics/exec/env-exact", "§5.6.3", semantics::env_exact),
        case!(Semantics, "semantics/exec/path-prepend", "§5.6.3", semantics::path_prepend),
        case!(Semantics, "semantics/exec/working-dir", "§5.6.2", semantics::working_dir),
        case!(
            Semantics,
            "semantics/exec/staged-and-collected-files",
            "§5.6.5 §5.6.6",
            semantics::staged_files
        ),
        case!(Semantics, "semantics/files/symlink-staging", "§5.6.5", semantics::symlink_staging),
        case!(
            Semantics,
            "semantics/files/symlink-collection",
            "§5.6.6",
            semantics::symlink_collection
        ),
        case!(Semantics, "semantics/exec/timeout", "§5.6.7", semantics::timeout),
        case!(
            Semantics,
            "semantics/exec/finished-with-background",
            "§5.6.4",
            semantics::finished_background
        ),
        case!(Semantics, "semantics/exec/stdin", "§5.8", semantics::stdin),
        case!(Semantics, "semantics/signal/term-process-group", "§5.7", semantics::signal_term),
        case!(
            Semantics,
            "semantics/signal/kill-escalation",
            "§5.7 §5.6.7",
            semantics::signal_escalation
        ),
        case!(Semantics, "semantics/cancel/disconnect", "§5.6.7", semantics::cancel_disconnect),
        case!(
            Semantics,
            "semantics/remove/ends-every-process",
            "§5.12",
            semantics::remove_ends_processes
        ),
        case!(
            Semantics,
            "semantics/copy/round-trip",
            "§5.9 §5.10 §5.11",
            semantics::copy_round_trip
        ),
        case!(Semantics, "semantics/copy/traversal", "§5.11", semantics::copy_traversal),
        case!(Semantics, "semantics/copy/local-path", "§5.9", semantics::copy_local_path),
        case!(Semantics, "semantics/containers/job", "§5.3", semantics::job_container),
        case!(Semantics, "semantics/containers/service", "§5.3 §5.5", semantics::service_container),
        case!(Semantics, "semantics/containers/step", "§5.3 §5.6.2", semantics::step_container),
        case!(Faults, "faults/plugin/killed-mid-exec", "§8 §2.4 §6.2", faults::killed_mid_exec),
        case!(
            Faults,
            "faults/plugin/exec-ids-survive-restart",
            "§4.6",
            faults::exec_ids_survive_restart
        ),
        case!(
            Faults,
            "faults/plugin/remove-after-restart",
            "§5.12 §6.3",
            faults::remove_after_restart
        ),
        case!(Faults, "faults/plugin/stdin-eof-exit", "§1.3", faults::stdin_eof_exit),
        case!(Faults, "faults/plugin/sigterm-exit", "§1.3", faults::sigterm_exit),
        case!(
            Protocol,
            "protocol/cleanup/nothing-left-behind",
            "§5.12 §5.13.1",
            protocol::nothing_left_behind
        ),
    ]
}

/// The names and tiers of every case, in run order.
pub fn case_names() -> Vec<(Tier, &'static str)> {
    cases().into_iter().map(|c| (c.tier, c.name)).collect()
}

/// Every case with the spec sections (`§…`) it holds a plugin to, in run order.
pub fn case_rules() -> Vec<(&'static str, &'static str)> {
    cases().into_iter().map(|c| (c.name, c.rule)).collect()
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
                    rule: case.rule,
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
        if let Outcome::Fail(m) = &mut outcome {
            let calls = ctx.journal.lines();
            if !calls.is_empty() {
                m.push_str("\nreproduction (the case's last calls, oldest first):");
                for c in calls {
                    m.push_str("\n  ");
                    m.push_str(&c);
                }
            }
        }
        if let Err(why) = ctx.cleanup().await {
            outcome = match outcome {
                Outcome::Fail(m) => Outcome::Fail(format!("{m}\n(and cleanup: {why})")),
                _ => Outcome::Fail(format!("cleanup: {why}")),
            };
        }
        backend = ctx.inner_backend();
        report.cases.push(CaseResult {
            name: case.name.to_owned(),
            tier: case.tier,
            rule: case.rule,
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
