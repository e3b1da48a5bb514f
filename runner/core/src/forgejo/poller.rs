//! The daemon's loop: `Declare` at start, then `FetchTask` every `fetch_interval` with the
//! `tasks_version` gate and the free capacity, running up to `capacity` tasks at once. A stop
//! request ends fetching and waits up to `shutdown_timeout` for the running tasks, then cancels
//! them (they still report); `force` stops everything. Server outages are survived with backoff.

use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::client::{Backoff, Client, Error, VERSION};
use super::task::{RunnerSettings, run_task};
use super::types::{DeclareRequest, FetchSingleTaskRequest, FetchTaskRequest, Task, TaskResult};
use crate::backends::Backends;

/// How the daemon polls.
#[derive(Debug, Clone)]
pub struct PollSettings {
    /// Tasks at once.
    pub capacity: usize,
    /// Time between fetches.
    pub fetch_interval: Duration,
    /// Limit of one fetch.
    pub fetch_timeout: Duration,
    /// How long a stop waits for running tasks before cancelling them.
    pub shutdown_timeout: Duration,
    /// Label names, declared at start.
    pub labels: Vec<String>,
}

/// The longest wait between fetches while the server fails.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Declares the runner's version and labels; an older server (`unimplemented`) is fine.
/// Retries transient failures until `stop`.
pub async fn declare(
    client: &Client,
    labels: &[String],
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let req = DeclareRequest { version: VERSION.into(), labels: labels.to_vec() };
    let forever = Backoff { give_up_after: Duration::MAX, max: MAX_BACKOFF, ..Backoff::REPORT };
    match forever.retry("declaring the runner", stop, || client.declare(&req)).await {
        Ok(resp) => {
            let name = resp.runner.map(|r| r.name).unwrap_or_default();
            tracing::info!(runner = %name, labels = ?labels, "declared");
            Ok(())
        }
        Err(e) if e.is_unimplemented() => {
            tracing::info!("the server predates Declare (Gitea < 1.20); carrying on");
            Ok(())
        }
        Err(e) if stop.is_cancelled() => {
            tracing::warn!(error = %e, "stopped before the runner was declared");
            Ok(())
        }
        Err(e) if e.code() == "unauthenticated" => bail!(
            "{e}; the server does not know this runner: register it again with kiln register \
             (or kiln create-runner-file)"
        ),
        Err(e) => Err(e.into()),
    }
}

/// Runs the daemon until `stop` (and the drain) or `force`.
pub async fn run_daemon(
    client: Arc<Client>,
    poll: PollSettings,
    settings: Arc<RunnerSettings>,
    backends: Arc<Backends>,
    stop: CancellationToken,
    force: CancellationToken,
) -> anyhow::Result<()> {
    declare(&client, &poll.labels, &stop).await?;
    let capacity = poll.capacity.max(1);
    let jobs_cancel = CancellationToken::new();
    let mut running: JoinSet<TaskResult> = JoinSet::new();
    let mut tasks_version = 0i64;
    let mut request_key = uuid::Uuid::new_v4().to_string();
    let mut failures = 0u32;
    tracing::info!(capacity, "polling for tasks");
    crate::metrics::global().capacity.set(i64::try_from(capacity).unwrap_or(i64::MAX));
    while !stop.is_cancelled() {
        while let Some(done) = running.try_join_next() {
            log_join(done);
        }
        let free = capacity - running.len().min(capacity);
        let mut wait = poll.fetch_interval;
        if free > 0 {
            let req = FetchTaskRequest {
                tasks_version,
                task_capacity: Some(i64::try_from(free).unwrap_or(1)),
            };
            let fetched = tokio::select! {
                r = client.fetch_task(&req, &request_key, poll.fetch_timeout) => r,
                _ = stop.cancelled() => break,
            };
            match fetched {
                Ok(resp) => {
                    failures = 0;
                    request_key = uuid::Uuid::new_v4().to_string();
                    let tasks: Vec<Task> =
                        resp.task.into_iter().chain(resp.additional_tasks).collect();
                    if tasks.is_empty() {
                        tasks_version = tasks_version.max(resp.tasks_version);
                    } else {
                        // A task was picked: force a fresh query next time.
                        tasks_version = 0;
                        wait = Duration::ZERO;
                    }
                    if tasks.len() > free {
                        tracing::warn!(
                            got = tasks.len(),
                            free,
                            "the server sent more tasks than asked for; running them all"
                        );
                    }
                    for task in tasks {
                        running.spawn(run_task(
                            client.clone(),
                            task,
                            settings.clone(),
                            backends.clone(),
                            jobs_cancel.child_token(),
                            force.clone(),
                        ));
                    }
                }
                Err(e) => {
                    crate::metrics::global().fetch_errors.inc();
                    failures += 1;
                    wait = backoff(poll.fetch_interval, failures);
                    log_fetch_error(&e, wait);
                }
            }
        }
        if running.len() >= capacity {
            tokio::select! {
                _ = stop.cancelled() => break,
                done = running.join_next() => if let Some(done) = done { log_join(done) },
            }
        } else {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
    drain(running, &poll, &jobs_cancel, &force).await;
    Ok(())
}

fn backoff(interval: Duration, failures: u32) -> Duration {
    let base = interval.max(Duration::from_millis(500));
    base.saturating_mul(1 << failures.min(7)).min(MAX_BACKOFF)
}

fn log_fetch_error(e: &Error, wait: Duration) {
    if e.code() == "unauthenticated" {
        tracing::error!(error = %e, retry_in = ?wait, "the server does not accept this runner's credentials; register it again if this persists");
    } else {
        tracing::warn!(error = %e, retry_in = ?wait, "fetching tasks failed");
    }
}

fn log_join(done: Result<TaskResult, tokio::task::JoinError>) {
    if let Err(e) = done {
        tracing::error!(error = %e, "a task panicked");
    }
}

/// Waits for running tasks up to `shutdown_timeout`, then cancels them and waits for their
/// reports; `force` ends the wait at once.
async fn drain(
    mut running: JoinSet<TaskResult>,
    poll: &PollSettings,
    jobs_cancel: &CancellationToken,
    force: &CancellationToken,
) {
    if running.is_empty() {
        return;
    }
    tracing::info!(jobs = running.len(), timeout = ?poll.shutdown_timeout, "stopping: waiting for the running jobs");
    let wait_all = async {
        while let Some(done) = running.join_next().await {
            log_join(done);
        }
    };
    let finished = tokio::select! {
        _ = wait_all => true,
        _ = tokio::time::sleep(poll.shutdown_timeout) => false,
        _ = force.cancelled() => false,
    };
    if finished {
        return;
    }
    tracing::warn!(jobs = running.len(), "cancelling the jobs still running");
    jobs_cancel.cancel();
    let wait_all = async {
        while let Some(done) = running.join_next().await {
            log_join(done);
        }
    };
    tokio::select! {
        _ = wait_all => {}
        _ = async { force.cancelled().await; tokio::time::sleep(Duration::from_secs(10)).await } => {
            tracing::warn!("forced: abandoning the jobs still running");
            running.abort_all();
        }
    }
}

/// `one-job`: fetches one task (the one of `handle` with FetchSingleTask, else any with
/// FetchTask), runs it and reports it. `None` when the server had nothing.
pub async fn run_one(
    client: Arc<Client>,
    handle: Option<String>,
    poll: PollSettings,
    settings: Arc<RunnerSettings>,
    backends: Arc<Backends>,
    stop: CancellationToken,
    force: CancellationToken,
) -> anyhow::Result<Option<TaskResult>> {
    declare(&client, &poll.labels, &stop).await?;
    let key = uuid::Uuid::new_v4().to_string();
    let patient = Backoff {
        initial: poll.fetch_interval.max(Duration::from_millis(200)),
        max: MAX_BACKOFF,
        give_up_after: Duration::from_secs(300),
    };
    let task = match &handle {
        Some(h) => {
            let req = FetchSingleTaskRequest { tasks_version: 0, handle: Some(h.clone()) };
            let resp = patient
                .retry("fetching the task", &stop, || {
                    client.fetch_single_task(&req, &key, poll.fetch_timeout)
                })
                .await;
            match resp {
                Ok(r) => r.task,
                Err(e) if e.is_unimplemented() => bail!(
                    "{e}; this server has no FetchSingleTask (Forgejo >= 15 has it): run \
                     one-job without --handle"
                ),
                Err(e) => return Err(e.into()),
            }
        }
        None => {
            let req = FetchTaskRequest { tasks_version: 0, task_capacity: Some(1) };
            patient
                .retry("fetching a task", &stop, || {
                    client.fetch_task(&req, &key, poll.fetch_timeout)
                })
                .await?
                .task
        }
    };
    let Some(task) = task else { return Ok(None) };
    let cancel = stop.child_token();
    Ok(Some(run_task(client, task, settings, backends, cancel, force).await))
}
