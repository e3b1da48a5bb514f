//! What Docker-compatible engines do differently, made to look like Docker.
//!
//! - Podman 4.3 reports a container whose process has ended as `stopped` until its cleanup has
//!   run (a moment later it is `exited`); Docker's API has no such state, so bollard rejects the
//!   whole answer, and with it an inspect or a list. Such reads are asked again, for a few
//!   seconds.
//! - Podman schedules health checks with systemd timers: without systemd (a container, a CI
//!   machine) they never run and a service stays `starting` for ever. A container still
//!   `starting`, with no check result at all, once its first check is overdue (start period +
//!   interval + timeout + a grace, counted from when the plugin first saw it starting) is probed
//!   by the plugin with the image's own check, through an exec: exit 0 is healthy.

use std::future::Future;
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::errors::Error;
use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::models::{ContainerInspectResponse, ContainerSummary, HealthStatusEnum};
use bollard::query_parameters::{InspectContainerOptions, ListContainersOptions};
use futures::StreamExt;

/// How long a transient answer is asked again.
const RETRY_FOR: Duration = Duration::from_secs(5);

fn transient(e: &Error) -> bool {
    e.to_string().contains("unknown variant `stopped`")
}

async fn again<T, F, Fut>(mut read: F) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Error>>,
{
    let deadline = tokio::time::Instant::now() + RETRY_FOR;
    loop {
        match read().await {
            Err(e) if transient(&e) && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => return other,
        }
    }
}

/// `inspect_container`, asked again while the engine reports a transient state.
pub(crate) async fn inspect_container(
    docker: &Docker,
    name: &str,
) -> Result<ContainerInspectResponse, Error> {
    again(|| docker.inspect_container(name, None::<InspectContainerOptions>)).await
}

/// `list_containers`, asked again while the engine reports a transient state.
pub(crate) async fn list_containers(
    docker: &Docker,
    options: ListContainersOptions,
) -> Result<Vec<ContainerSummary>, Error> {
    again(|| docker.list_containers(Some(options.clone()))).await
}

/// Docker's defaults for a health check's interval and timeout.
const DEFAULT_CHECK_PERIOD: Duration = Duration::from_secs(30);

/// The health to report for a container the engine says is `starting`: the engine's answer,
/// unless the engine is overdue with its first check (see the module docs); then the result of
/// running the image's check now. `first_seen` is when the plugin first saw it starting.
pub(crate) async fn overdue_health(
    docker: &Docker,
    name: &str,
    c: &ContainerInspectResponse,
    first_seen: Instant,
) -> HealthStatusEnum {
    let state = c.state.clone().unwrap_or_default();
    let checked = state.health.as_ref().and_then(|h| h.log.as_ref()).is_some_and(|l| !l.is_empty());
    let Some(check) = c.config.as_ref().and_then(|c| c.healthcheck.as_ref()) else {
        return HealthStatusEnum::STARTING;
    };
    let nanos = |v: Option<i64>, default: Duration| match v {
        Some(n) if n > 0 => Duration::from_nanos(n as u64),
        _ => default,
    };
    let interval = nanos(check.interval, DEFAULT_CHECK_PERIOD);
    let timeout = nanos(check.timeout, DEFAULT_CHECK_PERIOD);
    let start = nanos(check.start_period, Duration::ZERO);
    let due = start + interval + timeout + Duration::from_secs(2);
    if checked || !state.running.unwrap_or(false) || first_seen.elapsed() < due {
        return HealthStatusEnum::STARTING;
    }
    let test = check.test.clone().unwrap_or_default();
    let argv: Vec<String> = match test.split_first() {
        Some((kind, rest)) if kind == "CMD-SHELL" => {
            vec!["/bin/sh".into(), "-c".into(), rest.join(" ")]
        }
        Some((kind, rest)) if kind == "CMD" && !rest.is_empty() => rest.to_vec(),
        _ => return HealthStatusEnum::STARTING,
    };
    tracing::debug!(container = name, "the engine runs no health checks: probing");
    match tokio::time::timeout(timeout, run_probe(docker, name, argv)).await {
        Ok(Ok(0)) => HealthStatusEnum::HEALTHY,
        _ => HealthStatusEnum::STARTING,
    }
}

/// Runs `argv` in the container to the end; its exit code.
async fn run_probe(docker: &Docker, name: &str, argv: Vec<String>) -> Result<i64, Error> {
    let exec = docker
        .create_exec(
            name,
            CreateExecOptions {
                cmd: Some(argv),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                ..Default::default()
            },
        )
        .await?;
    if let StartExecResults::Attached { mut output, .. } = docker.start_exec(&exec.id, None).await?
    {
        while output.next().await.is_some() {}
    }
    Ok(docker.inspect_exec(&exec.id).await?.exit_code.unwrap_or(-1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(rename_all = "lowercase")]
    enum State {
        Running,
    }

    /// What bollard reports for a state it does not know (Podman's `stopped`), or another
    /// malformed answer.
    fn error(json: &str) -> Error {
        let err = serde_json::from_str::<State>(json).map(|State::Running| ()).unwrap_err();
        Error::JsonSerdeError { err }
    }

    #[tokio::test]
    async fn transient_answers_are_asked_again_others_are_not() {
        let mut calls = 0;
        let r = again(|| {
            calls += 1;
            let answer = if calls < 3 { Err(error(r#""stopped""#)) } else { Ok(7) };
            async move { answer }
        })
        .await;
        assert_eq!((r.unwrap(), calls), (7, 3));

        let mut calls = 0;
        let r: Result<u8, Error> = again(|| {
            calls += 1;
            let answer = Err(error(r#""paused""#));
            async move { answer }
        })
        .await;
        assert!(r.is_err());
        assert_eq!(calls, 1, "other errors are not asked again");
    }
}
