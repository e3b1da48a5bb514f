//! Cases that speak to the wire directly, below the [`crate::Backend`] trait: response and
//! request metadata (§2.3), the `google.rpc.Status` / `ErrorDetail` trailer of every error
//! class (§7.2), `grpc.health.v1` (§1.5), the announced message size (§1.6), the unix
//! socket's mode (§1.4), and the exact frame sequence of an `Exec` stream (§5.6.1), which
//! the SDK client would otherwise cut after the first `Exited`.
//!
//! They need [`super::SuiteConfig::endpoint`] (set by `--endpoint` and `--command`); without
//! it they are skipped.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::Channel;

use crate::backend::*;
use crate::client::Endpoint;
use crate::convert::error_detail as detail_of;
use crate::pb;
use crate::server::{INSTANCE_ID_HEADER, PROTOCOL_VERSION_HEADER, SERVICE_NAME};

use super::harness::*;

type Raw = pb::backend_client::BackendClient<Channel>;

/// Bound on what the raw client sends and accepts (above any sane announced limit).
const RAW_LIMIT: usize = 80 * 1024 * 1024;

async fn channel(ctx: &Ctx<'_>) -> Check<Channel> {
    let Some(endpoint) = &ctx.config.endpoint else {
        return Err(Stop::Skip(
            "the suite was given no endpoint to speak to the wire (SuiteConfig::endpoint)"
                .to_owned(),
        ));
    };
    within(
        "connecting to the plugin",
        Duration::from_secs(20),
        crate::client::channel(endpoint, "plugin", Duration::from_secs(10)),
    )
    .await?
    .or_fail(format!("connecting to {endpoint}"))
}

async fn raw(ctx: &Ctx<'_>) -> Check<Raw> {
    Ok(Raw::new(channel(ctx).await?)
        .max_decoding_message_size(RAW_LIMIT)
        .max_encoding_message_size(RAW_LIMIT))
}

/// A request carrying `kiln-protocol-version: version` (none with `None`).
fn request<T>(message: T, version: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    if let Some(v) = version
        && let Ok(v) = MetadataValue::try_from(v)
    {
        r.metadata_mut().insert(PROTOCOL_VERSION_HEADER, v);
    }
    r
}

fn instance_of(md: &MetadataMap) -> Option<String> {
    md.get(INSTANCE_ID_HEADER).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

fn keys(md: &MetadataMap) -> String {
    let keys: Vec<String> = md
        .keys()
        .map(|k| match k {
            tonic::metadata::KeyRef::Ascii(k) => k.as_str().to_owned(),
            tonic::metadata::KeyRef::Binary(k) => k.as_str().to_owned(),
        })
        .collect();
    format!("[{}]", keys.join(", "))
}

fn status_text(s: &tonic::Status) -> String {
    format!("{:?}: {:?}", s.code(), s.message())
}

fn caps_request(versions: Vec<u32>) -> pb::CapabilitiesRequest {
    pb::CapabilitiesRequest::from(CapabilitiesRequest {
        client_name: "kiln-conformance".to_owned(),
        client_version: env!("CARGO_PKG_VERSION").to_owned(),
        protocol_versions: versions,
    })
}

fn selector(ctx: &Ctx<'_>) -> pb::ListEnvironmentsRequest {
    pb::ListEnvironmentsRequest::from(Selector {
        runner_id: ctx.config.namespace.clone(),
        labels: Default::default(),
    })
}

/// Every successful call, unary and streaming, carries `kiln-instance-id` in its response
/// headers, equal to `CapabilitiesResponse.instance_id`.
pub(crate) async fn instance_id_header(ctx: &Ctx<'_>) -> Check {
    let mut c = raw(ctx).await?;
    let want = ctx.caps.instance_id.clone();
    let mut problems = Vec::new();
    let mut judge = |call: &str, md: &MetadataMap| match instance_of(md) {
        Some(id) if id == want => {}
        Some(id) => problems
            .push(format!("{call}: kiln-instance-id {id:?}, but Capabilities said {want:?}")),
        None => problems
            .push(format!("{call}: no kiln-instance-id response header (headers {})", keys(md))),
    };
    let r = within(
        "capabilities",
        RPC_TIMEOUT,
        c.capabilities(request(caps_request(vec![1]), Some("1"))),
    )
    .await?
    .map_err(|s| Stop::Fail(format!("Capabilities failed: {}", status_text(&s))))?;
    judge("Capabilities", r.metadata());
    let r = within("list", RPC_TIMEOUT, c.list_environments(request(selector(ctx), Some("1"))))
        .await?
        .map_err(|s| Stop::Fail(format!("ListEnvironments failed: {}", status_text(&s))))?;
    judge("ListEnvironments", r.metadata());
    let env = ctx.env().await?;
    let req = pb::ExecRequest::from(ctx.sh_request(&env, "true"));
    let r = within("exec", RPC_TIMEOUT, c.exec(request(req, Some("1"))))
        .await?
        .map_err(|s| Stop::Fail(format!("Exec `sh -c true` failed: {}", status_text(&s))))?;
    judge("Exec (initial headers of the stream)", r.metadata());
    let mut stream = r.into_inner();
    let _ = within("draining the exec", EXEC_TIMEOUT, async {
        while let Ok(Some(_)) = stream.message().await {}
    })
    .await;
    let r = within(
        "inspect",
        RPC_TIMEOUT,
        c.inspect(request(
            pb::ContainerRef::from(ContainerRef {
                environment_id: env.id.clone(),
                container_id: env.primary_container_id.clone(),
            }),
            Some("1"),
        )),
    )
    .await?
    .map_err(|s| Stop::Fail(format!("Inspect failed: {}", status_text(&s))))?;
    judge("Inspect", r.metadata());
    ensure!(problems.is_empty(), "{}", problems.join("\n"));
    Ok(())
}

/// A call whose `kiln-protocol-version` names no version the plugin speaks fails
/// FAILED_PRECONDITION naming both versions; a list holding a spoken version is accepted.
pub(crate) async fn version_refused(ctx: &Ctx<'_>) -> Check {
    let mut c = raw(ctx).await?;
    let r = within("list", RPC_TIMEOUT, c.list_environments(request(selector(ctx), Some("999"))))
        .await?;
    match r {
        Ok(_) => fail!(
            "ListEnvironments with request header kiln-protocol-version: 999 succeeded; a plugin \
             must refuse a call in a version it does not speak (FAILED_PRECONDITION naming both \
             versions)"
        ),
        Err(s) if s.code() == tonic::Code::FailedPrecondition => {
            let numbers: Vec<&str> = s
                .message()
                .split(|c: char| !c.is_ascii_digit())
                .filter(|s| !s.is_empty())
                .collect();
            ensure!(
                numbers.contains(&"999") && numbers.contains(&"1"),
                "the refusal of kiln-protocol-version: 999 must name both versions (999 and 1): \
                 {:?}",
                s.message()
            );
        }
        Err(s) => fail!(
            "ListEnvironments with kiln-protocol-version: 999 failed {}, expected \
             FAILED_PRECONDITION",
            status_text(&s)
        ),
    }
    let r = within("list", RPC_TIMEOUT, c.list_environments(request(selector(ctx), Some("999,1"))))
        .await?;
    if let Err(s) = r {
        fail!(
            "ListEnvironments with kiln-protocol-version: 999,1 (a list holding 1) failed {}; \
             the value may be a comma-separated list of which one must match",
            status_text(&s)
        );
    }
    Ok(())
}

/// The error status of an exec, whether the call or the stream's first item carries it.
async fn exec_status(c: &mut Raw, req: pb::ExecRequest) -> Check<Option<tonic::Status>> {
    let r = within("exec", RPC_TIMEOUT, c.exec(request(req, Some("1")))).await?;
    let mut stream = match r {
        Err(s) => return Ok(Some(s)),
        Ok(r) => r.into_inner(),
    };
    let first = within("exec stream", EXEC_TIMEOUT, stream.message()).await?;
    match first {
        Err(s) => Ok(Some(s)),
        Ok(_) => {
            let _ = within("draining the exec", EXEC_TIMEOUT, async {
                while let Ok(Some(_)) = stream.message().await {}
            })
            .await;
            Ok(None)
        }
    }
}

/// Every error class the suite can provoke carries a `google.rpc.Status` with an
/// `ErrorDetail` in `grpc-status-details-bin`, and `field` where the spec names one.
pub(crate) async fn error_detail_check(
    what: &str,
    got: Option<tonic::Status>,
    code: tonic::Code,
    field: Option<&str>,
    problems: &mut Vec<String>,
) {
    let Some(s) = got else {
        problems.push(format!("{what}: succeeded, expected {code:?}"));
        return;
    };
    if s.code() != code {
        problems.push(format!("{what}: {}, expected {code:?}", status_text(&s)));
        return;
    }
    let Some(detail) = detail_of(&s) else {
        problems.push(format!(
            "{what}: {code:?} without an ErrorDetail (no google.rpc.Status with a \
             type.googleapis.com/kiln.backend.v1.ErrorDetail in the grpc-status-details-bin \
             trailer)"
        ));
        return;
    };
    match field {
        Some("") if detail.field.is_empty() => {
            problems.push(format!("{what}: ErrorDetail.field is empty; it must name the field"))
        }
        Some(f) if !f.is_empty() && detail.field != f => problems
            .push(format!("{what}: ErrorDetail.field is {:?}, expected {f:?}", detail.field)),
        _ => {}
    }
}

/// ErrorDetail (and `field`) on INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS,
/// FAILED_PRECONDITION, UNIMPLEMENTED and (where the plugin refuses a staged path outside the
/// environment) PERMISSION_DENIED.
pub(crate) async fn error_detail(ctx: &Ctx<'_>) -> Check {
    use tonic::Code as C;
    let mut c = raw(ctx).await?;
    let mut problems = Vec::new();

    let mut bad = ctx.env_request();
    bad.environment_id = "Bad_ID".to_owned();
    let r = within(
        "create",
        CREATE_TIMEOUT,
        c.create_execution_environment(request(pb::CreateEnvironmentRequest::from(bad), Some("1"))),
    )
    .await?;
    if r.is_ok() {
        ctx.track("Bad_ID");
    }
    error_detail_check(
        "CreateExecutionEnvironment with environment_id \"Bad_ID\"",
        r.err(),
        C::InvalidArgument,
        Some("environment_id"),
        &mut problems,
    )
    .await;

    let env_req = ctx.env_request();
    let env = ctx.create(env_req.clone()).await?;
    let mut other = env_req.clone();
    other.owner.job_id = format!("{}-other", other.owner.job_id);
    let r = within(
        "create",
        CREATE_TIMEOUT,
        c.create_execution_environment(request(
            pb::CreateEnvironmentRequest::from(other),
            Some("1"),
        )),
    )
    .await?;
    error_detail_check(
        "CreateExecutionEnvironment with the id of a live environment and another owner.job_id",
        r.err(),
        C::AlreadyExists,
        Some("environment_id"),
        &mut problems,
    )
    .await;

    let r = within(
        "inspect",
        RPC_TIMEOUT,
        c.inspect(request(
            pb::ContainerRef::from(ContainerRef {
                environment_id: ctx.new_id(),
                container_id: env.primary_container_id.clone(),
            }),
            Some("1"),
        )),
    )
    .await?;
    error_detail_check(
        "Inspect in an unknown environment",
        r.err(),
        C::NotFound,
        None,
        &mut problems,
    )
    .await;

    let r = within("list", RPC_TIMEOUT, c.list_environments(request(selector(ctx), Some("999"))))
        .await?;
    error_detail_check(
        "ListEnvironments with kiln-protocol-version: 999",
        r.err(),
        C::FailedPrecondition,
        None,
        &mut problems,
    )
    .await;

    let used = ctx.sh_request(&env, "true");
    ctx.run(used.clone()).await?;
    let got = exec_status(&mut c, pb::ExecRequest::from(used)).await?;
    error_detail_check("Exec with a used exec_id", got, C::AlreadyExists, None, &mut problems)
        .await;

    let mut bad_exec = ctx.sh_request(&env, "echo should-not-run");
    bad_exec.exec_id = "Bad_ID".to_owned();
    let got = exec_status(&mut c, pb::ExecRequest::from(bad_exec)).await?;
    error_detail_check(
        "Exec with exec_id \"Bad_ID\"",
        got,
        C::InvalidArgument,
        Some("exec_id"),
        &mut problems,
    )
    .await;

    let f = ctx.caps.features;
    let undeclared = if !f.tty {
        Some(("tty", {
            let mut r = ctx.sh_request(&env, "echo should-not-run");
            r.tty = true;
            r
        }))
    } else if !f.stdin {
        Some(("stdin", {
            let mut r = ctx.sh_request(&env, "echo should-not-run");
            r.stdin = true;
            r
        }))
    } else {
        None
    };
    if let Some((field, req)) = undeclared {
        let got = exec_status(&mut c, pb::ExecRequest::from(req)).await?;
        error_detail_check(
            &format!("Exec with {field} = true on a plugin not declaring {field}"),
            got,
            C::Unimplemented,
            Some(field),
            &mut problems,
        )
        .await;
    }

    if f.exec_files {
        let mut req = ctx.sh_request(&env, "echo should-not-run");
        req.files = vec![StagedFile {
            path: format!("relative-{}/x", nonce(4)),
            content: bytes::Bytes::from_static(b"x"),
            mode: 0,
        }];
        let got = exec_status(&mut c, pb::ExecRequest::from(req)).await?;
        error_detail_check(
            "Exec staging a relative path",
            got,
            C::InvalidArgument,
            Some("files[0].path"),
            &mut problems,
        )
        .await;
        // Outside the environment: a plugin may allow it; when it refuses, PERMISSION_DENIED
        // carries the detail and names the field (§9.2).
        let mut req = ctx.sh_request(&env, "true");
        req.files = vec![StagedFile {
            path: format!("/kiln-conformance-outside-{}/x", nonce(8)),
            content: bytes::Bytes::from_static(b"x"),
            mode: 0,
        }];
        let got = exec_status(&mut c, pb::ExecRequest::from(req)).await?;
        if got.as_ref().is_some_and(|s| s.code() == C::PermissionDenied) {
            error_detail_check(
                "Exec staging a path outside the environment",
                got,
                C::PermissionDenied,
                Some("files[0].path"),
                &mut problems,
            )
            .await;
        }
    }
    ensure!(problems.is_empty(), "{}", problems.join("\n"));
    Ok(())
}

/// `grpc.health.v1.Health/Check` answers SERVING for `kiln.backend.v1.Backend` on the same
/// endpoint, without kiln metadata.
pub(crate) async fn health(ctx: &Ctx<'_>) -> Check {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
    let mut h = HealthClient::new(channel(ctx).await?);
    let r = within(
        "grpc.health.v1.Health/Check",
        RPC_TIMEOUT,
        h.check(HealthCheckRequest { service: SERVICE_NAME.to_owned() }),
    )
    .await?;
    match r {
        Err(s) => fail!(
            "grpc.health.v1.Health/Check for {SERVICE_NAME:?} failed {}: a plugin must serve \
             grpc.health.v1 on the endpoint of its Backend service",
            status_text(&s)
        ),
        Ok(r) => {
            let status = r.into_inner().status;
            ensure!(
                status == ServingStatus::Serving as i32,
                "grpc.health.v1.Health/Check for {SERVICE_NAME:?} answered status {status} \
                 ({:?}), expected SERVING",
                ServingStatus::try_from(status).ok()
            );
        }
    }
    Ok(())
}

/// The plugin announces at least 4 MiB and accepts a request of (nearly) the size it
/// announces.
pub(crate) async fn message_size(ctx: &Ctx<'_>) -> Check {
    let announced = ctx.caps.max_message_bytes;
    ensure!(
        announced >= 4 * 1024 * 1024,
        "max_message_bytes is {announced}: a plugin must announce at least 4 MiB (4194304)"
    );
    let size = usize::try_from(announced).unwrap_or(usize::MAX).min(64 * 1024 * 1024) - 64 * 1024;
    let mut c = raw(ctx).await?;
    let mut req = caps_request(vec![1]);
    req.client_version = "x".repeat(size);
    let r =
        within("capabilities", Duration::from_secs(120), c.capabilities(request(req, Some("1"))))
            .await?;
    if let Err(s) = r {
        fail!(
            "a Capabilities request of about {size} bytes (client_version padded; the plugin \
             announces max_message_bytes = {announced}) failed {}: a plugin must accept \
             messages up to the size it announces",
            status_text(&s)
        );
    }
    Ok(())
}

/// A unix socket is created 0600 (or 0660 for one group).
pub(crate) async fn socket_mode(ctx: &Ctx<'_>) -> Check {
    let Some(Endpoint::Unix(path)) = &ctx.config.endpoint else {
        return Err(Stop::Skip("the endpoint is not a unix socket".to_owned()));
    };
    let meta = std::fs::metadata(path)
        .map_err(|e| Stop::Fail(format!("cannot stat the socket {}: {e}", path.display())))?;
    let mode = meta.permissions().mode() & 0o777;
    ensure!(
        mode == 0o600 || mode == 0o660,
        "the plugin's socket {} has mode {mode:04o}; it must be created 0600 (or 0660 for the \
         runners of one group)",
        path.display()
    );
    Ok(())
}

/// The raw frame sequence of an exec: at most one `Started`, before any output; non-empty
/// output; exactly one `Exited`, the last frame, with an exit code or a signal; then the
/// stream closes OK.
pub(crate) async fn stream_grammar(ctx: &Ctx<'_>) -> Check {
    use pb::exec_event::Event;
    let mut c = raw(ctx).await?;
    let env = ctx.env().await?;
    let req = ctx.sh_request(&env, "printf out; printf err >&2; exit 3");
    let r = within("exec", RPC_TIMEOUT, c.exec(request(pb::ExecRequest::from(req), Some("1"))))
        .await?
        .map_err(|s| Stop::Fail(format!("Exec failed: {}", status_text(&s))))?;
    let mut stream = r.into_inner();
    let mut frames: Vec<&'static str> = Vec::new();
    let mut problems = Vec::new();
    let mut exited_at = None;
    loop {
        // After Exited the stream must close promptly.
        let limit = if exited_at.is_some() { Duration::from_secs(5) } else { EXEC_TIMEOUT };
        let next = match tokio::time::timeout(limit, stream.message()).await {
            Err(_) if exited_at.is_some() => {
                problems.push("the stream stayed open 5 s after Exited".to_owned());
                break;
            }
            Err(_) => fail!("the exec did not end within {limit:?}; frames so far {frames:?}"),
            Ok(n) => n,
        };
        match next {
            Ok(None) => break,
            Err(s) => {
                problems.push(format!("the stream ended with an error {}", status_text(&s)));
                break;
            }
            Ok(Some(ev)) => match ev.event {
                Some(Event::Started(_)) => frames.push("Started"),
                Some(Event::Keepalive(_)) => frames.push("Keepalive"),
                Some(Event::Output(o)) => {
                    if o.data.is_empty() {
                        problems.push("an Output frame with empty data".to_owned());
                    }
                    frames.push("Output");
                }
                Some(Event::Exited(x)) => {
                    if x.status.is_none() {
                        problems
                            .push("an Exited frame with neither exit_code nor signal".to_owned());
                    }
                    exited_at.get_or_insert(frames.len());
                    frames.push("Exited");
                }
                None => frames.push("empty"),
            },
        }
    }
    let count = |k: &str| frames.iter().filter(|f| **f == k).count();
    if count("Exited") != 1 {
        problems.push(format!("{} Exited frames, expected exactly one", count("Exited")));
    }
    if let Some(i) = exited_at
        && i + 1 != frames.len()
    {
        problems.push(format!("frames after Exited: {:?}", &frames[i + 1..]));
    }
    if count("Started") > 1 {
        problems.push(format!("{} Started frames, expected at most one", count("Started")));
    }
    if let (Some(s), Some(o)) =
        (frames.iter().position(|f| *f == "Started"), frames.iter().position(|f| *f == "Output"))
        && s > o
    {
        problems.push("Started came after Output".to_owned());
    }
    if count("empty") > 0 {
        problems.push("a frame with no event set".to_owned());
    }
    ensure!(
        problems.is_empty(),
        "`sh -c 'printf out; printf err >&2; exit 3'`: {}; frames {frames:?}",
        problems.join("; ")
    );
    Ok(())
}
