//! What the cases share: the per-case context (its environments, cleanup), an exec watcher
//! that records event order and timing, expectations on error codes, and tar builders.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::StreamExt;

use crate::backend::*;
use crate::error::{Code, Error, Result};
use crate::ids::make_id;

use super::record::{Journal, Recorder};
use super::{PluginControl, SuiteConfig};

/// Bound on one ordinary call.
pub(crate) const RPC_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on creating an environment (a docker plugin may pull an image).
pub(crate) const CREATE_TIMEOUT: Duration = Duration::from_secs(300);
/// Bound on a short helper exec (`cat`, `kill -0`).
pub(crate) const EXEC_TIMEOUT: Duration = Duration::from_secs(60);
/// The label every created environment carries, with the suite's nonce as value.
pub(crate) const LABEL: &str = "kiln.conformance";

/// Why a case stopped early.
#[derive(Debug)]
pub(crate) enum Stop {
    /// An expectation did not hold.
    Fail(String),
    /// The case does not apply to this plugin.
    Skip(String),
}

/// The result of a case.
pub(crate) type Check<T = ()> = std::result::Result<T, Stop>;

/// A random lowercase hex string of `len` characters.
pub(crate) fn nonce(len: usize) -> String {
    let mut s = uuid::Uuid::new_v4().simple().to_string();
    s.truncate(len);
    s
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Quotes a string for `sh`.
pub(crate) fn sq(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Joins a directory and a relative name with one `/`.
pub(crate) fn join(dir: &str, name: &str) -> String {
    format!("{}/{}", dir.trim_end_matches('/'), name)
}

/// Shortens output for messages.
pub(crate) fn shorten(data: &[u8]) -> String {
    const MAX: usize = 400;
    let s = String::from_utf8_lossy(data);
    if s.len() <= MAX {
        return format!("{s:?}");
    }
    let mut cut = MAX;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{:?}… ({} bytes)", &s[..cut], data.len())
}

/// Awaits `f` for at most `limit`.
pub(crate) async fn within<T>(
    what: impl Display,
    limit: Duration,
    f: impl Future<Output = T>,
) -> Check<T> {
    match tokio::time::timeout(limit, f).await {
        Ok(v) => Ok(v),
        Err(_) => Err(Stop::Fail(format!("{what}: no answer within {limit:?}"))),
    }
}

/// Turns a backend error into a failure naming the call.
pub(crate) trait OrFail<T> {
    /// Fails with `what: code: message` on error.
    fn or_fail(self, what: impl Display) -> Check<T>;
}

impl<T> OrFail<T> for Result<T> {
    fn or_fail(self, what: impl Display) -> Check<T> {
        self.map_err(|e| Stop::Fail(format!("{what}: unexpected {} error: {e}", code_name(e.code))))
    }
}

/// The gRPC spelling of a code, as the protocol documents it.
pub(crate) fn code_name(code: Code) -> &'static str {
    match code {
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Unavailable => "UNAVAILABLE",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::Cancelled => "CANCELLED",
        Code::Internal => "INTERNAL",
    }
}

fn codes_text(codes: &[Code]) -> String {
    codes.iter().map(|c| code_name(*c)).collect::<Vec<_>>().join(" or ")
}

/// Expects `result` to be an error with one of `codes`; returns it.
pub(crate) fn expect_code<T>(
    what: impl Display,
    result: Result<T>,
    codes: &[Code],
) -> Check<Error> {
    match result {
        Ok(_) => fail!("{what}: expected {}, got success", codes_text(codes)),
        Err(e) if codes.contains(&e.code) => Ok(e),
        Err(e) => fail!("{what}: expected {}, got {}: {e}", codes_text(codes), code_name(e.code)),
    }
}

/// The per-case context.
pub(crate) struct Ctx<'s> {
    /// The plugin, behind the case's [`Recorder`].
    backend: Mutex<Arc<dyn Backend>>,
    /// The plugin as given (for the next case).
    inner: Mutex<Arc<dyn Backend>>,
    /// The case's last calls, shown with a failure.
    pub(crate) journal: Journal,
    pub(crate) caps: Capabilities,
    pub(crate) config: &'s SuiteConfig,
    control: Option<&'s dyn PluginControl>,
    /// The suite's nonce: boot id and value of the `kiln.conformance` label.
    pub(crate) nonce: String,
    short: &'static str,
    created: Mutex<Vec<String>>,
}

impl<'s> Ctx<'s> {
    pub(crate) fn new(
        backend: Arc<dyn Backend>,
        caps: Capabilities,
        config: &'s SuiteConfig,
        control: Option<&'s dyn PluginControl>,
        nonce: &str,
        short: &'static str,
    ) -> Ctx<'s> {
        let journal = Journal::default();
        let recorded: Arc<dyn Backend> =
            Arc::new(Recorder { inner: backend.clone(), journal: journal.clone() });
        Ctx {
            backend: Mutex::new(recorded),
            inner: Mutex::new(backend),
            journal,
            caps,
            config,
            control,
            nonce: nonce.to_owned(),
            short,
            created: Mutex::new(Vec::new()),
        }
    }

    /// The plugin as currently reachable.
    pub(crate) fn backend(&self) -> Arc<dyn Backend> {
        match self.backend.lock() {
            Ok(b) => b.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// The plugin as given, without the recorder (for the next case).
    pub(crate) fn inner_backend(&self) -> Arc<dyn Backend> {
        match self.inner.lock() {
            Ok(b) => b.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Replaces the plugin client (after a restart).
    pub(crate) fn set_backend(&self, backend: Arc<dyn Backend>) {
        let recorded: Arc<dyn Backend> =
            Arc::new(Recorder { inner: backend.clone(), journal: self.journal.clone() });
        match self.inner.lock() {
            Ok(mut b) => *b = backend,
            Err(p) => *p.into_inner() = backend,
        }
        match self.backend.lock() {
            Ok(mut b) => *b = recorded,
            Err(p) => *p.into_inner() = recorded,
        }
    }

    /// The plugin control, or a skip when the suite did not start the plugin.
    pub(crate) fn control(&self) -> Check<&'s dyn PluginControl> {
        self.control.ok_or_else(|| {
            Stop::Skip(
                "the suite did not start the plugin itself (use --command to run the faults tier)"
                    .to_owned(),
            )
        })
    }

    /// Skips unless `declared`.
    pub(crate) fn require_feature(&self, name: &str, declared: bool) -> Check {
        if declared { Ok(()) } else { Err(Stop::Skip(format!("feature {name} not declared"))) }
    }

    /// A fresh id in the suite's namespace: `<namespace>-<case>-<random>`.
    pub(crate) fn new_id(&self) -> String {
        make_id(&[&self.config.namespace, self.short, &nonce(6)])
    }

    /// A fresh exec id.
    pub(crate) fn exec_id(&self) -> String {
        make_id(&["x", &self.config.namespace, self.short, &nonce(8)])
    }

    /// The owner of everything this case creates.
    pub(crate) fn owner(&self) -> Owner {
        Owner {
            runner_id: self.config.namespace.clone(),
            boot_id: self.nonce.clone(),
            job_id: make_id(&["job", self.short, &self.nonce]),
            parent_environment_id: String::new(),
            created_at_unix_ms: 0,
            expires_at_unix_ms: now_ms() + 10 * 60 * 1000,
            labels: BTreeMap::from([(LABEL.to_owned(), self.nonce.clone())]),
        }
    }

    /// A request for a fresh environment.
    pub(crate) fn env_request(&self) -> EnvironmentRequest {
        EnvironmentRequest {
            environment_id: self.new_id(),
            owner: self.owner(),
            label: self.config.label.clone(),
            options: self.config.env_options.clone(),
            hints: EnvironmentHints::default(),
        }
    }

    /// Remembers an environment id to remove at the end of the case.
    pub(crate) fn track(&self, id: &str) {
        if let Ok(mut c) = self.created.lock()
            && !c.iter().any(|x| x == id)
        {
            c.push(id.to_owned());
        }
    }

    /// Forgets an environment the case removed itself.
    pub(crate) fn untrack(&self, id: &str) {
        if let Ok(mut c) = self.created.lock() {
            c.retain(|x| x != id);
        }
    }

    /// Calls `create_environment`, tracking the id first (remove is safe after a failed
    /// create), bounded by [`CREATE_TIMEOUT`].
    pub(crate) async fn try_create(
        &self,
        request: EnvironmentRequest,
    ) -> Check<Result<Environment>> {
        self.track(&request.environment_id);
        let id = request.environment_id.clone();
        within(
            format!("create_environment {id}"),
            CREATE_TIMEOUT,
            self.backend().create_environment(request),
        )
        .await
    }

    /// Creates an environment that must succeed.
    pub(crate) async fn create(&self, request: EnvironmentRequest) -> Check<Environment> {
        let id = request.environment_id.clone();
        let env = self.try_create(request).await?.or_fail(format!("create_environment {id}"))?;
        ensure!(
            !env.primary_container_id.is_empty(),
            "environment {id}: no primary container id (hints did not ask for a job container)"
        );
        Ok(env)
    }

    /// A fresh environment for the case.
    pub(crate) async fn env(&self) -> Check<Environment> {
        self.create(self.env_request()).await
    }

    /// Removes an environment, bounded.
    pub(crate) async fn remove(&self, id: &str) -> Check<Result<bool>> {
        within(
            format!("remove {id}"),
            RPC_TIMEOUT,
            self.backend().remove(RemoveRequest {
                environment_id: id.to_owned(),
                container_id: None,
                grace: Duration::from_secs(1),
            }),
        )
        .await
    }

    /// Removes everything the case created.
    pub(crate) async fn cleanup(&self) -> std::result::Result<(), String> {
        let ids: Vec<String> = match self.created.lock() {
            Ok(mut c) => std::mem::take(&mut *c),
            Err(_) => return Err("state poisoned".to_owned()),
        };
        let mut errors = Vec::new();
        for id in ids.iter().rev() {
            match self.remove(id).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => errors.push(format!("remove {id}: {} error: {e}", code_name(e.code))),
                Err(Stop::Fail(m) | Stop::Skip(m)) => errors.push(m),
            }
        }
        if errors.is_empty() { Ok(()) } else { Err(errors.join("; ")) }
    }

    /// An exec request for `argv` in the primary container of `env`.
    pub(crate) fn exec_request(&self, env: &Environment, argv: &[&str]) -> ExecRequest {
        ExecRequest {
            exec_id: self.exec_id(),
            environment_id: env.id.clone(),
            container_id: env.primary_container_id.clone(),
            argv: argv.iter().map(|s| (*s).to_owned()).collect(),
            grace: Duration::from_secs(2),
            ..ExecRequest::default()
        }
    }

    /// An exec request for `sh -c script` in the primary container of `env`.
    pub(crate) fn sh_request(&self, env: &Environment, script: &str) -> ExecRequest {
        self.exec_request(env, &["sh", "-c", script])
    }

    /// Starts an exec that must be accepted.
    pub(crate) async fn start(&self, request: ExecRequest) -> Check<Watch> {
        let id = request.exec_id.clone();
        let stream = within(format!("exec {id}"), RPC_TIMEOUT, self.backend().exec(request))
            .await?
            .or_fail(format!("exec {id}"))?;
        Ok(Watch::new(id, stream))
    }

    /// Runs an exec to its end (bounded by [`EXEC_TIMEOUT`]).
    pub(crate) async fn run(&self, request: ExecRequest) -> Check<Watch> {
        let mut w = self.start(request).await?;
        w.finish(EXEC_TIMEOUT).await?;
        Ok(w)
    }

    /// Runs `sh -c script`, which must exit 0; returns its stdout.
    pub(crate) async fn sh_ok(&self, env: &Environment, script: &str) -> Check<String> {
        let w = self.run(self.sh_request(env, script)).await?;
        let x = w.exited()?;
        ensure!(
            x.status == ExitStatus::Code(0),
            "helper exec `sh -c {script:?}` ended with {}, expected exit code 0 (stderr {})",
            x.status,
            shorten(&w.stderr)
        );
        Ok(String::from_utf8_lossy(&w.stdout).into_owned())
    }

    /// Runs `sh -c script` and returns its exit status and stdout.
    pub(crate) async fn sh_status(
        &self,
        env: &Environment,
        script: &str,
    ) -> Check<(ExitStatus, String)> {
        let w = self.run(self.sh_request(env, script)).await?;
        let status = w.exited()?.status;
        Ok((status, String::from_utf8_lossy(&w.stdout).into_owned()))
    }

    /// Whether the process whose pid is in `pidfile` (inside the environment) is alive; a
    /// zombie counts as dead.
    pub(crate) async fn is_alive(&self, env: &Environment, pidfile: &str) -> Check<bool> {
        let script = format!(
            "pid=$(cat {f}) || exit 2; [ -n \"$pid\" ] || exit 2; \
             if kill -0 \"$pid\" 2>/dev/null; then \
               case \"$(cat /proc/$pid/stat 2>/dev/null)\" in *\") Z \"*) echo dead;; *) echo alive;; esac; \
             else echo dead; fi",
            f = sq(pidfile)
        );
        let out = self.sh_ok(env, &script).await?;
        Ok(out.trim() == "alive")
    }

    /// Waits until every process named by `pidfiles` is gone; fails after `limit`.
    pub(crate) async fn wait_dead(
        &self,
        env: &Environment,
        pidfiles: &[&str],
        limit: Duration,
    ) -> Check {
        let deadline = Instant::now() + limit;
        for pidfile in pidfiles {
            loop {
                let polled = Instant::now();
                if !self.is_alive(env, pidfile).await? {
                    break;
                }
                if polled >= deadline {
                    let pid = self.sh_ok(env, &format!("cat {}", sq(pidfile))).await?;
                    fail!(
                        "process {} (pid file {pidfile}) is still running {limit:?} later",
                        pid.trim()
                    );
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok(())
    }

    /// The error of an exec that must be refused, whether the call or the stream's first
    /// item carries it.
    pub(crate) async fn exec_error(&self, request: ExecRequest) -> Check<Result<()>> {
        let id = request.exec_id.clone();
        let started =
            within(format!("exec {id}"), RPC_TIMEOUT, self.backend().exec(request)).await?;
        let stream = match started {
            Err(e) => return Ok(Err(e)),
            Ok(s) => s,
        };
        let mut w = Watch::new(id, stream);
        w.finish(EXEC_TIMEOUT).await?;
        match (w.error, w.exited) {
            (_, Some(x)) => fail!(
                "exec {} was expected to be refused but ran and ended with {} (stdout {})",
                w.exec_id,
                x.status,
                shorten(&w.stdout)
            ),
            (Some(e), None) => Ok(Err(e)),
            (None, None) => Ok(Ok(())),
        }
    }
}

/// A script that starts processes meant to outlive their exec, each a bounded `sh` loop
/// (two minutes, so a plugin that fails to end them does not leak them for long) whose `$0`
/// is `marker`: a plain background one, a double-forked one, and, where `setsid` exists, one
/// in a session of its own with an empty environment, working in `/` (nothing ties it to
/// the environment but how it was started). Prints `setsid` when it started the third.
pub(crate) fn escapees(marker: &str) -> String {
    let m = sq(marker);
    let body = "i=0; while [ $i -lt 120 ]; do sleep 1; i=$((i+1)); done";
    format!(
        "sh -c '{body}' {m} >/dev/null 2>&1 </dev/null &\n\
         ( sh -c '{body}' {m} >/dev/null 2>&1 </dev/null & )\n\
         if command -v setsid >/dev/null 2>&1; then \
           ( cd / && setsid env -i sh -c '{body}' {m} >/dev/null 2>&1 </dev/null & ); \
           echo setsid; fi\n\
         echo started"
    )
}

impl Ctx<'_> {
    /// How many processes visible from `env` carry `marker` in their command line (through
    /// `/proc`; 0 where there is none).
    pub(crate) async fn count_marked(&self, env: &Environment, marker: &str) -> Check<usize> {
        // The pattern is split by quotes, so that this script's own command line never
        // matches it.
        let (a, b) = marker.split_at(marker.len() / 2);
        let script = format!(
            "n=0; for d in /proc/[0-9]*; do \
               case \"$(tr '\\0' ' ' < $d/cmdline 2>/dev/null)\" in *'{a}''{b}'*) n=$((n+1));; esac; \
             done; echo $n"
        );
        let out = self.sh_ok(env, &script).await?;
        out.trim()
            .parse()
            .map_err(|_| Stop::Fail(format!("counting processes printed {out:?}, not a number")))
    }

    /// Polls until no process carrying `marker` is visible from `env`; returns how many
    /// were still there after `limit`.
    pub(crate) async fn wait_unmarked(
        &self,
        env: &Environment,
        marker: &str,
        limit: Duration,
    ) -> Check<usize> {
        let deadline = Instant::now() + limit;
        loop {
            let n = self.count_marked(env, marker).await?;
            if n == 0 || Instant::now() >= deadline {
                return Ok(n);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// Kinds of exec events, for order checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Started,
    Stdout,
    Stderr,
    Keepalive,
    Exited,
}

/// What [`Watch::step`] saw.
enum Step {
    Event,
    Ended,
    TimedOut,
}

/// Follows one exec stream, recording everything.
pub(crate) struct Watch {
    stream: Option<ExecStream>,
    pub(crate) exec_id: String,
    begun: Instant,
    pub(crate) kinds: Vec<Kind>,
    pub(crate) output_frames: usize,
    pub(crate) stdout: Vec<u8>,
    pub(crate) stderr: Vec<u8>,
    pub(crate) exited: Option<Exited>,
    /// When `Exited` arrived.
    pub(crate) exited_at: Option<Instant>,
    /// When the first output arrived.
    pub(crate) first_output_at: Option<Instant>,
    pub(crate) error: Option<Error>,
    pub(crate) ended: bool,
}

impl Watch {
    pub(crate) fn new(exec_id: String, stream: ExecStream) -> Watch {
        Watch {
            stream: Some(stream),
            exec_id,
            begun: Instant::now(),
            kinds: Vec::new(),
            output_frames: 0,
            stdout: Vec::new(),
            stderr: Vec::new(),
            exited: None,
            exited_at: None,
            first_output_at: None,
            error: None,
            ended: false,
        }
    }

    async fn step(&mut self, deadline: Instant) -> Step {
        if self.ended {
            return Step::Ended;
        }
        let Some(stream) = self.stream.as_mut() else {
            self.ended = true;
            return Step::Ended;
        };
        let next = match tokio::time::timeout_at(deadline.into(), stream.next()).await {
            Err(_) => return Step::TimedOut,
            Ok(n) => n,
        };
        match next {
            None => {
                self.ended = true;
                Step::Ended
            }
            Some(Err(e)) => {
                // An error ends the exec; the SDK's client stops there too.
                self.error = Some(e);
                self.ended = true;
                self.stream = None;
                Step::Ended
            }
            Some(Ok(event)) => {
                match event {
                    ExecEvent::Started => self.kinds.push(Kind::Started),
                    ExecEvent::Keepalive => self.kinds.push(Kind::Keepalive),
                    ExecEvent::Output { stream, data } => {
                        self.output_frames += 1;
                        self.first_output_at.get_or_insert_with(Instant::now);
                        match stream {
                            OutputStream::Stdout => {
                                self.kinds.push(Kind::Stdout);
                                self.stdout.extend_from_slice(&data);
                            }
                            OutputStream::Stderr => {
                                self.kinds.push(Kind::Stderr);
                                self.stderr.extend_from_slice(&data);
                            }
                        }
                    }
                    ExecEvent::Exited(x) => {
                        self.kinds.push(Kind::Exited);
                        if self.exited.is_none() {
                            self.exited = Some(x);
                            self.exited_at = Some(Instant::now());
                        }
                    }
                }
                Step::Event
            }
        }
    }

    /// Reads until stdout contains `marker`.
    pub(crate) async fn until_stdout(&mut self, marker: &str, limit: Duration) -> Check {
        let deadline = Instant::now() + limit;
        loop {
            if contains(&self.stdout, marker.as_bytes()) {
                return Ok(());
            }
            match self.step(deadline).await {
                Step::Event => {}
                Step::Ended => fail!(
                    "exec {} ended before printing {marker:?}: {}",
                    self.exec_id,
                    self.summary()
                ),
                Step::TimedOut => fail!(
                    "exec {} did not print {marker:?} within {limit:?}: {}",
                    self.exec_id,
                    self.summary()
                ),
            }
        }
    }

    /// Reads until the stream ends; fails when it is still open after `limit`.
    pub(crate) async fn finish(&mut self, limit: Duration) -> Check {
        let deadline = Instant::now() + limit;
        loop {
            match self.step(deadline).await {
                Step::Event => {}
                Step::Ended => return Ok(()),
                Step::TimedOut => {
                    fail!("exec {} did not end within {limit:?}: {}", self.exec_id, self.summary())
                }
            }
        }
    }

    /// Drops the stream: the client cancels the exec.
    pub(crate) fn disconnect(&mut self) {
        self.stream = None;
        self.ended = true;
    }

    /// Time from the start of the exec to its `Exited` frame.
    pub(crate) fn exited_after(&self) -> Option<Duration> {
        self.exited_at.map(|t| t.saturating_duration_since(self.begun))
    }

    /// The terminal frame, failing when the exec ended with an error or without one; also
    /// checks the event order (Started first if sent, Exited last and unique).
    pub(crate) fn exited(&self) -> Check<&Exited> {
        if let Some(e) = &self.error {
            fail!(
                "exec {} failed with {} error: {e} (stdout {}, stderr {})",
                self.exec_id,
                code_name(e.code),
                shorten(&self.stdout),
                shorten(&self.stderr)
            );
        }
        self.check_order()?;
        match &self.exited {
            Some(x) => Ok(x),
            None => fail!("exec {}: the stream ended without an Exited frame", self.exec_id),
        }
    }

    /// The protocol's event order: `Started` (optional) first, exactly one `Exited`, last.
    pub(crate) fn check_order(&self) -> Check {
        if let Some(i) = self.kinds.iter().position(|k| *k == Kind::Started) {
            ensure!(
                i == 0 && self.kinds.iter().filter(|k| **k == Kind::Started).count() == 1,
                "exec {}: Started must be the first event and sent once; events: {}",
                self.exec_id,
                self.kinds_text()
            );
        }
        let exits = self.kinds.iter().filter(|k| **k == Kind::Exited).count();
        ensure!(
            exits <= 1,
            "exec {}: {exits} Exited frames, expected exactly one; events: {}",
            self.exec_id,
            self.kinds_text()
        );
        if exits == 1 {
            ensure!(
                self.kinds.last() == Some(&Kind::Exited),
                "exec {}: events after Exited; events: {}",
                self.exec_id,
                self.kinds_text()
            );
        }
        Ok(())
    }

    /// The event kinds, run-length encoded ("Started, Stdout x3, Exited").
    pub(crate) fn kinds_text(&self) -> String {
        let mut parts: Vec<(Kind, usize)> = Vec::new();
        for k in &self.kinds {
            match parts.last_mut() {
                Some((last, n)) if last == k => *n += 1,
                _ => parts.push((*k, 1)),
            }
        }
        parts
            .iter()
            .map(|(k, n)| if *n == 1 { format!("{k:?}") } else { format!("{k:?} x{n}") })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// A one-line account of the exec so far, for failure messages.
    pub(crate) fn summary(&self) -> String {
        let end = match (&self.exited, &self.error) {
            (Some(x), _) => format!("{}", x.status),
            (None, Some(e)) => format!("{} error: {e}", code_name(e.code)),
            (None, None) if self.ended => "stream ended without Exited".to_owned(),
            (None, None) => "still running".to_owned(),
        };
        format!(
            "{end}; stdout {}, stderr {}; after {:?}",
            shorten(&self.stdout),
            shorten(&self.stderr),
            self.begun.elapsed()
        )
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

// ---------------------------------------------------------------------------------------------
// Tar archives

/// Builds tar archives entry by entry, including the malformed ones the traversal case needs
/// (names the `tar` crate refuses are written raw, long ones as GNU long-name entries).
pub(crate) struct TarBuilder {
    builder: tar::Builder<Vec<u8>>,
}

impl TarBuilder {
    pub(crate) fn new() -> TarBuilder {
        TarBuilder { builder: tar::Builder::new(Vec::new()) }
    }

    fn long(&mut self, kind: u8, value: &[u8]) -> std::io::Result<()> {
        let mut h = tar::Header::new_gnu();
        if let Some(gnu) = h.as_gnu_mut() {
            gnu.name[..13].copy_from_slice(b"././@LongLink");
        }
        let mut data = value.to_vec();
        data.push(0);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_entry_type(tar::EntryType::new(kind));
        h.set_cksum();
        self.builder.append(&h, &data[..])
    }

    /// Appends one entry with a raw name (no checks at all).
    pub(crate) fn raw(
        &mut self,
        name: &str,
        kind: tar::EntryType,
        mode: u32,
        data: &[u8],
        link: Option<&str>,
    ) -> Check {
        let add = |b: &mut TarBuilder| -> std::io::Result<()> {
            let mut h = tar::Header::new_gnu();
            if name.len() >= 100 {
                b.long(b'L', name.as_bytes())?;
            }
            if let Some(link) = link
                && link.len() >= 100
            {
                b.long(b'K', link.as_bytes())?;
            }
            if let Some(gnu) = h.as_gnu_mut() {
                let n = name.len().min(99);
                gnu.name[..n].copy_from_slice(&name.as_bytes()[..n]);
                if let Some(link) = link {
                    let n = link.len().min(99);
                    gnu.linkname[..n].copy_from_slice(&link.as_bytes()[..n]);
                }
            }
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_size(data.len() as u64);
            h.set_mtime(1_700_000_000);
            h.set_uid(0);
            h.set_gid(0);
            h.set_cksum();
            b.builder.append(&h, data)
        };
        add(self).map_err(|e| Stop::Fail(format!("building a tar entry {name:?}: {e}")))
    }

    pub(crate) fn dir(&mut self, name: &str, mode: u32) -> Check {
        self.raw(name, tar::EntryType::Directory, mode, &[], None)
    }

    pub(crate) fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> Check {
        self.raw(name, tar::EntryType::Regular, mode, data, None)
    }

    pub(crate) fn symlink(&mut self, name: &str, target: &str) -> Check {
        self.raw(name, tar::EntryType::Symlink, 0o777, &[], Some(target))
    }

    pub(crate) fn hardlink(&mut self, name: &str, target: &str) -> Check {
        self.raw(name, tar::EntryType::Link, 0o644, &[], Some(target))
    }

    pub(crate) fn finish(self) -> Check<Vec<u8>> {
        self.builder.into_inner().map_err(|e| Stop::Fail(format!("finishing a tar archive: {e}")))
    }
}

/// A byte stream of `data` in 256 KiB chunks.
pub(crate) fn byte_stream(data: Vec<u8>) -> ByteStream {
    let data = Bytes::from(data);
    let chunks: Vec<Result<Bytes>> = (0..data.len())
        .step_by(crate::archive::CHUNK_SIZE)
        .map(|i| Ok(data.slice(i..(i + crate::archive::CHUNK_SIZE).min(data.len()))))
        .collect();
    Box::pin(futures::stream::iter(chunks))
}

/// One entry read back from an archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TarEntry {
    pub(crate) kind: &'static str,
    pub(crate) mode: u32,
    pub(crate) link: Option<String>,
    pub(crate) data: Vec<u8>,
}

/// Reads an archive into a map of normalized names (no `./`, no trailing `/`).
pub(crate) fn read_tar(data: &[u8]) -> Check<BTreeMap<String, TarEntry>> {
    use std::io::Read;
    let mut archive = tar::Archive::new(data);
    let mut out = BTreeMap::new();
    let entries = archive.entries().map_err(|e| Stop::Fail(format!("reading the tar: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| Stop::Fail(format!("reading a tar entry: {e}")))?;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let mut name = name.trim_end_matches('/');
        while let Some(rest) = name.strip_prefix("./") {
            name = rest;
        }
        let name = name.to_owned();
        if name.is_empty() || name == "." {
            continue;
        }
        let ty = entry.header().entry_type();
        let kind = match ty {
            tar::EntryType::Regular | tar::EntryType::Continuous => "file",
            tar::EntryType::Directory => "dir",
            tar::EntryType::Symlink => "symlink",
            tar::EntryType::Link => "hardlink",
            _ => "other",
        };
        let mode = entry.header().mode().unwrap_or(0) & 0o7777;
        let link = entry.link_name_bytes().map(|l| String::from_utf8_lossy(&l).into_owned());
        let mut content = Vec::new();
        entry
            .read_to_end(&mut content)
            .map_err(|e| Stop::Fail(format!("reading tar entry {name}: {e}")))?;
        out.insert(name, TarEntry { kind, mode, link, data: content });
    }
    Ok(out)
}

/// Collects a byte stream, bounded.
pub(crate) async fn collect_bytes(
    what: &str,
    mut stream: ByteStream,
    limit: Duration,
) -> Check<Result<Vec<u8>>> {
    within(what, limit, async move {
        let mut out = Vec::new();
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(c) => out.extend_from_slice(&c),
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_tar_entries_round_trip() {
        let mut t = TarBuilder::new();
        t.dir("d", 0o755).unwrap_or_else(|_| panic!("dir"));
        t.file("../evil", 0o600, b"x").unwrap_or_else(|_| panic!("file"));
        let long = format!("/{}", "l".repeat(150));
        t.file(&long, 0o644, b"yy").unwrap_or_else(|_| panic!("long"));
        t.symlink("esc", &"t".repeat(120)).unwrap_or_else(|_| panic!("link"));
        let data = t.finish().unwrap_or_else(|_| panic!("finish"));
        let entries = read_tar(&data).unwrap_or_else(|_| panic!("read"));
        assert_eq!(entries["d"].kind, "dir");
        assert_eq!(entries["../evil"].mode, 0o600);
        assert_eq!(entries[&long].data, b"yy");
        assert_eq!(entries["esc"].link.as_deref(), Some("t".repeat(120).as_str()));
    }

    #[test]
    fn quoting() {
        assert_eq!(sq("a'b"), "'a'\\''b'");
        assert_eq!(join("/a/", "b"), "/a/b");
        assert!(contains(b"hello", b"ll"));
    }
}
