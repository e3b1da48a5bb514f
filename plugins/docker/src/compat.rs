//! Reads that tolerate what Docker-compatible engines answer and bollard cannot parse. Podman
//! 4.3 reports a container whose process has ended as `stopped` until its cleanup has run (a
//! moment later it is `exited`); Docker's API has no such state, so bollard rejects the whole
//! answer, and with it an inspect or a list. Such reads are asked again, for a few seconds.

use std::future::Future;
use std::time::Duration;

use bollard::Docker;
use bollard::errors::Error;
use bollard::models::{ContainerInspectResponse, ContainerSummary};
use bollard::query_parameters::{InspectContainerOptions, ListContainersOptions};

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
