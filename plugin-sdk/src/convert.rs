//! Conversions between the generated `kiln.backend.v1` types and the domain types, and between
//! [`Error`] and `tonic::Status`. The only place where both meet.

use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use prost_types::value::Kind;

use crate::backend::*;
use crate::error::{Code, Error, Fault};
use crate::pb;

// ---------------------------------------------------------------------------------------------
// Errors

impl From<Error> for tonic::Status {
    fn from(err: Error) -> tonic::Status {
        let code = match err.code {
            Code::InvalidArgument => tonic::Code::InvalidArgument,
            Code::NotFound => tonic::Code::NotFound,
            Code::AlreadyExists => tonic::Code::AlreadyExists,
            Code::FailedPrecondition => tonic::Code::FailedPrecondition,
            Code::Unimplemented => tonic::Code::Unimplemented,
            Code::Unavailable => tonic::Code::Unavailable,
            Code::PermissionDenied => tonic::Code::PermissionDenied,
            Code::ResourceExhausted => tonic::Code::ResourceExhausted,
            Code::DeadlineExceeded => tonic::Code::DeadlineExceeded,
            Code::Cancelled => tonic::Code::Cancelled,
            Code::Internal => tonic::Code::Internal,
        };
        let detail = pb::ErrorDetail {
            fault: match err.fault {
                Fault::Unspecified => pb::Fault::Unspecified,
                Fault::User => pb::Fault::User,
                Fault::Infrastructure => pb::Fault::Infrastructure,
                Fault::Config => pb::Fault::Config,
            } as i32,
            retryable: err.retryable,
            field: err.field.unwrap_or_default(),
        };
        // The details trailer holds a google.rpc.Status whose details carry the ErrorDetail as
        // an Any, so every gRPC implementation can read it.
        let rpc = RpcStatus {
            code: code as i32,
            message: err.message.clone(),
            details: vec![prost_types::Any {
                type_url: ERROR_DETAIL_TYPE_URL.to_owned(),
                value: detail.encode_to_vec(),
            }],
        };
        tonic::Status::with_details(code, err.message, Bytes::from(rpc.encode_to_vec()))
    }
}

/// The type URL of [`pb::ErrorDetail`] inside `google.rpc.Status.details`.
pub(crate) const ERROR_DETAIL_TYPE_URL: &str = "type.googleapis.com/kiln.backend.v1.ErrorDetail";

/// `google.rpc.Status`, the standard payload of the `grpc-status-details-bin` trailer.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct RpcStatus {
    #[prost(int32, tag = "1")]
    pub(crate) code: i32,
    #[prost(string, tag = "2")]
    pub(crate) message: String,
    #[prost(message, repeated, tag = "3")]
    pub(crate) details: Vec<prost_types::Any>,
}

/// The ErrorDetail of a status, if its details carry one.
pub(crate) fn error_detail(status: &tonic::Status) -> Option<pb::ErrorDetail> {
    if status.details().is_empty() {
        return None;
    }
    let rpc = RpcStatus::decode(status.details()).ok()?;
    let any = rpc.details.into_iter().find(|a| a.type_url == ERROR_DETAIL_TYPE_URL)?;
    pb::ErrorDetail::decode(any.value.as_slice()).ok()
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Error {
        let code = match status.code() {
            tonic::Code::InvalidArgument | tonic::Code::OutOfRange => Code::InvalidArgument,
            tonic::Code::NotFound => Code::NotFound,
            tonic::Code::AlreadyExists => Code::AlreadyExists,
            tonic::Code::FailedPrecondition | tonic::Code::Aborted => Code::FailedPrecondition,
            tonic::Code::Unimplemented => Code::Unimplemented,
            tonic::Code::Unavailable => Code::Unavailable,
            tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => Code::PermissionDenied,
            tonic::Code::ResourceExhausted => Code::ResourceExhausted,
            tonic::Code::DeadlineExceeded => Code::DeadlineExceeded,
            tonic::Code::Cancelled => Code::Cancelled,
            tonic::Code::Ok
            | tonic::Code::Unknown
            | tonic::Code::Internal
            | tonic::Code::DataLoss => Code::Internal,
        };
        let mut err = Error::new(code, status.message().to_owned());
        match error_detail(&status) {
            Some(detail) => {
                err.fault = match pb::Fault::try_from(detail.fault) {
                    Ok(pb::Fault::User) => Fault::User,
                    Ok(pb::Fault::Infrastructure) => Fault::Infrastructure,
                    Ok(pb::Fault::Config) => Fault::Config,
                    _ => Fault::Unspecified,
                };
                err.retryable = detail.retryable;
                err.field = (!detail.field.is_empty()).then_some(detail.field);
            }
            _ => {
                if code == Code::Unavailable {
                    err.fault = Fault::Infrastructure;
                    err.retryable = true;
                }
            }
        }
        err
    }
}

// ---------------------------------------------------------------------------------------------
// JSON objects <-> google.protobuf.Struct

/// A JSON object as a protobuf `Struct`.
pub(crate) fn struct_from_json(
    map: &serde_json::Map<String, serde_json::Value>,
) -> prost_types::Struct {
    prost_types::Struct {
        fields: map.iter().map(|(k, v)| (k.clone(), value_from_json(v))).collect(),
    }
}

fn value_from_json(v: &serde_json::Value) -> prost_types::Value {
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(value_from_json).collect(),
        }),
        serde_json::Value::Object(o) => Kind::StructValue(struct_from_json(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

/// A protobuf `Struct` as a JSON object; a missing struct is an empty object.
pub(crate) fn json_from_struct(
    s: Option<prost_types::Struct>,
) -> serde_json::Map<String, serde_json::Value> {
    let mut fields: Vec<_> = s.map(|s| s.fields.into_iter().collect()).unwrap_or_default();
    fields.sort_by(|a: &(String, _), b| a.0.cmp(&b.0));
    fields.into_iter().map(|(k, v)| (k, json_from_value(v))).collect()
}

fn json_from_value(v: prost_types::Value) -> serde_json::Value {
    match v.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(b),
        Some(Kind::NumberValue(n)) => {
            if n.fract() == 0.0 && n.abs() < 9.0e15 {
                serde_json::Value::from(n as i64)
            } else {
                serde_json::Number::from_f64(n).map_or(serde_json::Value::Null, Into::into)
            }
        }
        Some(Kind::StringValue(s)) => serde_json::Value::String(s),
        Some(Kind::ListValue(l)) => {
            serde_json::Value::Array(l.values.into_iter().map(json_from_value).collect())
        }
        Some(Kind::StructValue(s)) => serde_json::Value::Object(json_from_struct(Some(s))),
    }
}

fn ms(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

// ---------------------------------------------------------------------------------------------
// Capabilities

impl From<CapabilitiesRequest> for pb::CapabilitiesRequest {
    fn from(r: CapabilitiesRequest) -> Self {
        pb::CapabilitiesRequest {
            client_name: r.client_name,
            client_version: r.client_version,
            protocol_versions: r.protocol_versions,
        }
    }
}

impl From<pb::CapabilitiesRequest> for CapabilitiesRequest {
    fn from(r: pb::CapabilitiesRequest) -> Self {
        CapabilitiesRequest {
            client_name: r.client_name,
            client_version: r.client_version,
            protocol_versions: r.protocol_versions,
        }
    }
}

impl From<LayerSupport> for pb::LayerSupport {
    fn from(l: LayerSupport) -> Self {
        match l {
            LayerSupport::Unsupported(detail) => pb::LayerSupport {
                support: pb::Support::Unsupported as i32,
                delegate: String::new(),
                detail,
            },
            LayerSupport::Native => {
                pb::LayerSupport { support: pb::Support::Native as i32, ..Default::default() }
            }
            LayerSupport::Delegated { backend } => pb::LayerSupport {
                support: pb::Support::Delegated as i32,
                delegate: backend,
                detail: String::new(),
            },
        }
    }
}

impl From<Option<pb::LayerSupport>> for LayerSupport {
    fn from(l: Option<pb::LayerSupport>) -> Self {
        let Some(l) = l else { return LayerSupport::default() };
        match pb::Support::try_from(l.support) {
            Ok(pb::Support::Native) => LayerSupport::Native,
            Ok(pb::Support::Delegated) => LayerSupport::Delegated { backend: l.delegate },
            _ => LayerSupport::Unsupported(l.detail),
        }
    }
}

impl From<Features> for pb::Features {
    fn from(f: Features) -> Self {
        pb::Features {
            stdin: f.stdin,
            tty: f.tty,
            local_copy: f.local_copy,
            image_build: f.image_build,
            exec_files: f.exec_files,
            exec_timeout: f.exec_timeout,
            health: f.health,
        }
    }
}

impl From<Option<pb::Features>> for Features {
    fn from(f: Option<pb::Features>) -> Self {
        let f = f.unwrap_or_default();
        Features {
            stdin: f.stdin,
            tty: f.tty,
            local_copy: f.local_copy,
            image_build: f.image_build,
            exec_files: f.exec_files,
            exec_timeout: f.exec_timeout,
            health: f.health,
        }
    }
}

impl From<Capabilities> for pb::CapabilitiesResponse {
    fn from(c: Capabilities) -> Self {
        pb::CapabilitiesResponse {
            plugin_name: c.plugin_name,
            plugin_version: c.plugin_version,
            protocol_version: c.protocol_version,
            instance_id: c.instance_id,
            environment: Some(c.environment.into()),
            job_container: Some(c.job_container.into()),
            service_containers: Some(c.service_containers.into()),
            step_containers: Some(c.step_containers.into()),
            features: Some(c.features.into()),
            os: c.os,
            arch: c.arch,
            max_message_bytes: c.max_message_bytes,
        }
    }
}

impl From<pb::CapabilitiesResponse> for Capabilities {
    fn from(c: pb::CapabilitiesResponse) -> Self {
        Capabilities {
            plugin_name: c.plugin_name,
            plugin_version: c.plugin_version,
            protocol_version: c.protocol_version,
            instance_id: c.instance_id,
            environment: c.environment.into(),
            job_container: c.job_container.into(),
            service_containers: c.service_containers.into(),
            step_containers: c.step_containers.into(),
            features: c.features.into(),
            os: c.os,
            arch: c.arch,
            max_message_bytes: c.max_message_bytes,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Environments

impl From<Owner> for pb::Owner {
    fn from(o: Owner) -> Self {
        pb::Owner {
            runner_id: o.runner_id,
            boot_id: o.boot_id,
            job_id: o.job_id,
            parent_environment_id: o.parent_environment_id,
            created_at_unix_ms: o.created_at_unix_ms,
            expires_at_unix_ms: o.expires_at_unix_ms,
            labels: o.labels.into_iter().collect(),
        }
    }
}

impl From<Option<pb::Owner>> for Owner {
    fn from(o: Option<pb::Owner>) -> Self {
        let o = o.unwrap_or_default();
        Owner {
            runner_id: o.runner_id,
            boot_id: o.boot_id,
            job_id: o.job_id,
            parent_environment_id: o.parent_environment_id,
            created_at_unix_ms: o.created_at_unix_ms,
            expires_at_unix_ms: o.expires_at_unix_ms,
            labels: o.labels.into_iter().collect(),
        }
    }
}

impl From<EnvironmentRequest> for pb::CreateEnvironmentRequest {
    fn from(r: EnvironmentRequest) -> Self {
        pb::CreateEnvironmentRequest {
            environment_id: r.environment_id,
            owner: Some(r.owner.into()),
            label: r.label,
            options: Some(struct_from_json(&r.options)),
            hints: Some(pb::EnvironmentHints {
                job_container: r.hints.job_container,
                service_containers: r.hints.service_containers,
                step_containers: r.hints.step_containers,
            }),
        }
    }
}

impl From<pb::CreateEnvironmentRequest> for EnvironmentRequest {
    fn from(r: pb::CreateEnvironmentRequest) -> Self {
        let hints = r.hints.unwrap_or_default();
        EnvironmentRequest {
            environment_id: r.environment_id,
            owner: r.owner.into(),
            label: r.label,
            options: json_from_struct(r.options),
            hints: EnvironmentHints {
                job_container: hints.job_container,
                service_containers: hints.service_containers,
                step_containers: hints.step_containers,
            },
        }
    }
}

impl From<Environment> for pb::Environment {
    fn from(e: Environment) -> Self {
        pb::Environment {
            id: e.id,
            primary_container_id: e.primary_container_id,
            os: e.os,
            arch: e.arch,
            paths: Some(pb::Paths {
                workspace: e.paths.workspace,
                temp: e.paths.temp,
                tool_cache: e.paths.tool_cache,
                runner_files: e.paths.runner_files,
                home: e.paths.home,
            }),
            path_variable: e.path_variable,
            path_separator: e.path_separator,
            delegation: e.delegation.map(|d| pb::Delegation {
                backend: d.backend,
                options: Some(struct_from_json(&d.options)),
            }),
            owner: Some(e.owner.into()),
        }
    }
}

impl From<pb::Environment> for Environment {
    fn from(e: pb::Environment) -> Self {
        let paths = e.paths.unwrap_or_default();
        Environment {
            id: e.id,
            primary_container_id: e.primary_container_id,
            os: e.os,
            arch: e.arch,
            paths: Paths {
                workspace: paths.workspace,
                temp: paths.temp,
                tool_cache: paths.tool_cache,
                runner_files: paths.runner_files,
                home: paths.home,
            },
            path_variable: e.path_variable,
            path_separator: e.path_separator,
            delegation: e
                .delegation
                .map(|d| Delegation { backend: d.backend, options: json_from_struct(d.options) }),
            owner: e.owner.into(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Containers

impl From<EnvVar> for pb::EnvVar {
    fn from(e: EnvVar) -> Self {
        pb::EnvVar { name: e.name, value: e.value, secret: e.secret }
    }
}

impl From<pb::EnvVar> for EnvVar {
    fn from(e: pb::EnvVar) -> Self {
        EnvVar { name: e.name, value: e.value, secret: e.secret }
    }
}

impl From<ContainerRequest> for pb::CreateContainerRequest {
    fn from(r: ContainerRequest) -> Self {
        let s = r.spec;
        pb::CreateContainerRequest {
            environment_id: r.environment_id,
            container_id: r.container_id,
            spec: Some(pb::ContainerSpec {
                image: s.image,
                build: s.build.map(|b| pb::ImageBuild {
                    context_dir: b.context_dir,
                    dockerfile: b.dockerfile,
                }),
                entrypoint: s.entrypoint,
                cmd: s.cmd,
                env: s.env.into_iter().map(Into::into).collect(),
                working_dir: s.working_dir,
                volumes: s.volumes,
                ports: s.ports,
                network_aliases: s.network_aliases,
                options: s.options,
                credentials: s.credentials.map(|c| pb::RegistryCredentials {
                    username: c.username,
                    password: c.password,
                }),
                user: s.user,
                mount_workspace: s.mount_workspace,
                force_pull: s.force_pull,
            }),
        }
    }
}

impl From<pb::CreateContainerRequest> for ContainerRequest {
    fn from(r: pb::CreateContainerRequest) -> Self {
        let s = r.spec.unwrap_or_default();
        ContainerRequest {
            environment_id: r.environment_id,
            container_id: r.container_id,
            spec: ContainerSpec {
                image: s.image,
                build: s
                    .build
                    .map(|b| ImageBuild { context_dir: b.context_dir, dockerfile: b.dockerfile }),
                entrypoint: s.entrypoint,
                cmd: s.cmd,
                env: s.env.into_iter().map(Into::into).collect(),
                working_dir: s.working_dir,
                volumes: s.volumes,
                ports: s.ports,
                network_aliases: s.network_aliases,
                options: s.options,
                credentials: s
                    .credentials
                    .map(|c| RegistryCredentials { username: c.username, password: c.password }),
                user: s.user,
                mount_workspace: s.mount_workspace,
                force_pull: s.force_pull,
            },
        }
    }
}

impl From<ContainerRef> for pb::ContainerRef {
    fn from(r: ContainerRef) -> Self {
        pb::ContainerRef { environment_id: r.environment_id, container_id: r.container_id }
    }
}

impl From<pb::ContainerRef> for ContainerRef {
    fn from(r: pb::ContainerRef) -> Self {
        ContainerRef { environment_id: r.environment_id, container_id: r.container_id }
    }
}

fn state_to_pb(s: ContainerState) -> i32 {
    (match s {
        ContainerState::Unspecified => pb::ContainerState::Unspecified,
        ContainerState::Created => pb::ContainerState::Created,
        ContainerState::Running => pb::ContainerState::Running,
        ContainerState::Exited => pb::ContainerState::Exited,
    }) as i32
}

fn state_from_pb(s: i32) -> ContainerState {
    match pb::ContainerState::try_from(s) {
        Ok(pb::ContainerState::Created) => ContainerState::Created,
        Ok(pb::ContainerState::Running) => ContainerState::Running,
        Ok(pb::ContainerState::Exited) => ContainerState::Exited,
        _ => ContainerState::Unspecified,
    }
}

fn ports_to_pb(p: Vec<PortBinding>) -> Vec<pb::PortBinding> {
    p.into_iter()
        .map(|p| pb::PortBinding {
            container_port: p.container_port,
            host_ip: p.host_ip,
            host_port: p.host_port,
        })
        .collect()
}

fn ports_from_pb(p: Vec<pb::PortBinding>) -> Vec<PortBinding> {
    p.into_iter()
        .map(|p| PortBinding {
            container_port: p.container_port,
            host_ip: p.host_ip,
            host_port: p.host_port,
        })
        .collect()
}

impl From<Container> for pb::Container {
    fn from(c: Container) -> Self {
        pb::Container {
            id: c.id,
            environment_id: c.environment_id,
            state: state_to_pb(c.state),
            ports: ports_to_pb(c.ports),
        }
    }
}

impl From<pb::Container> for Container {
    fn from(c: pb::Container) -> Self {
        Container {
            id: c.id,
            environment_id: c.environment_id,
            state: state_from_pb(c.state),
            ports: ports_from_pb(c.ports),
        }
    }
}

impl From<ContainerStatus> for pb::ContainerStatus {
    fn from(c: ContainerStatus) -> Self {
        pb::ContainerStatus {
            id: c.id,
            state: state_to_pb(c.state),
            health: (match c.health {
                Health::Unspecified => pb::Health::Unspecified,
                Health::None => pb::Health::None,
                Health::Starting => pb::Health::Starting,
                Health::Healthy => pb::Health::Healthy,
                Health::Unhealthy => pb::Health::Unhealthy,
            }) as i32,
            exit_code: c.exit_code,
            oom_killed: c.oom_killed,
            ports: ports_to_pb(c.ports),
            image_env: c.image_env,
            ip_address: c.ip_address,
            detail: c.detail,
        }
    }
}

impl From<pb::ContainerStatus> for ContainerStatus {
    fn from(c: pb::ContainerStatus) -> Self {
        ContainerStatus {
            id: c.id,
            state: state_from_pb(c.state),
            health: match pb::Health::try_from(c.health) {
                Ok(pb::Health::None) => Health::None,
                Ok(pb::Health::Starting) => Health::Starting,
                Ok(pb::Health::Healthy) => Health::Healthy,
                Ok(pb::Health::Unhealthy) => Health::Unhealthy,
                _ => Health::Unspecified,
            },
            exit_code: c.exit_code,
            oom_killed: c.oom_killed,
            ports: ports_from_pb(c.ports),
            image_env: c.image_env,
            ip_address: c.ip_address,
            detail: c.detail,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Exec

impl From<ExecRequest> for pb::ExecRequest {
    fn from(r: ExecRequest) -> Self {
        pb::ExecRequest {
            exec_id: r.exec_id,
            environment_id: r.environment_id,
            container_id: r.container_id,
            argv: r.argv,
            env: r.env.into_iter().map(Into::into).collect(),
            path_prepend: r.path_prepend,
            working_dir: r.working_dir,
            files: r
                .files
                .into_iter()
                .map(|f| pb::StagedFile { path: f.path, content: f.content.into(), mode: f.mode })
                .collect(),
            collect: r.collect,
            collect_limit_bytes: r.collect_limit_bytes,
            stdin: r.stdin,
            tty: r.tty,
            timeout_ms: r.timeout.map_or(0, |t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
            grace_ms: ms(r.grace),
        }
    }
}

impl From<pb::ExecRequest> for ExecRequest {
    fn from(r: pb::ExecRequest) -> Self {
        ExecRequest {
            exec_id: r.exec_id,
            environment_id: r.environment_id,
            container_id: r.container_id,
            argv: r.argv,
            env: r.env.into_iter().map(Into::into).collect(),
            path_prepend: r.path_prepend,
            working_dir: r.working_dir,
            files: r
                .files
                .into_iter()
                .map(|f| StagedFile { path: f.path, content: f.content.into(), mode: f.mode })
                .collect(),
            collect: r.collect,
            collect_limit_bytes: r.collect_limit_bytes,
            stdin: r.stdin,
            tty: r.tty,
            timeout: (r.timeout_ms > 0).then(|| Duration::from_millis(r.timeout_ms)),
            grace: Duration::from_millis(u64::from(r.grace_ms)),
        }
    }
}

impl From<ExecEvent> for pb::ExecEvent {
    fn from(e: ExecEvent) -> Self {
        use pb::exec_event::Event;
        let event = match e {
            ExecEvent::Started => Event::Started(pb::Started {}),
            ExecEvent::Keepalive => Event::Keepalive(pb::Keepalive {}),
            ExecEvent::Output { stream, data } => Event::Output(pb::Output {
                stream: match stream {
                    OutputStream::Stdout => pb::Stream::Stdout,
                    OutputStream::Stderr => pb::Stream::Stderr,
                } as i32,
                data: data.into(),
            }),
            ExecEvent::Exited(x) => Event::Exited(pb::Exited {
                status: Some(match x.status {
                    ExitStatus::Code(c) => pb::exited::Status::ExitCode(c),
                    ExitStatus::Signal(s) => pb::exited::Status::Signal(s),
                }),
                oom_killed: x.oom_killed,
                timed_out: x.timed_out,
                files: x
                    .files
                    .into_iter()
                    .map(|f| pb::CollectedFile {
                        path: f.path,
                        content: f.content.into(),
                        truncated: f.truncated,
                        missing: f.missing,
                    })
                    .collect(),
                duration_ms: u64::try_from(x.duration.as_millis()).unwrap_or(u64::MAX),
            }),
        };
        pb::ExecEvent { event: Some(event) }
    }
}

impl TryFrom<pb::ExecEvent> for ExecEvent {
    type Error = Error;

    fn try_from(e: pb::ExecEvent) -> Result<Self, Error> {
        use pb::exec_event::Event;
        Ok(match e.event {
            None => return Err(Error::internal("exec event without a payload").field("event")),
            Some(Event::Started(_)) => ExecEvent::Started,
            Some(Event::Keepalive(_)) => ExecEvent::Keepalive,
            Some(Event::Output(o)) => ExecEvent::Output {
                stream: match pb::Stream::try_from(o.stream) {
                    Ok(pb::Stream::Stderr) => OutputStream::Stderr,
                    _ => OutputStream::Stdout,
                },
                data: o.data.into(),
            },
            Some(Event::Exited(x)) => ExecEvent::Exited(Exited {
                status: match x.status {
                    Some(pb::exited::Status::ExitCode(c)) => ExitStatus::Code(c),
                    Some(pb::exited::Status::Signal(s)) => ExitStatus::Signal(s),
                    None => {
                        return Err(
                            Error::internal("exited frame without a status").field("exited.status")
                        );
                    }
                },
                oom_killed: x.oom_killed,
                timed_out: x.timed_out,
                files: x
                    .files
                    .into_iter()
                    .map(|f| CollectedFile {
                        path: f.path,
                        content: f.content.into(),
                        truncated: f.truncated,
                        missing: f.missing,
                    })
                    .collect(),
                duration: Duration::from_millis(x.duration_ms),
            }),
        })
    }
}

impl From<SignalRequest> for pb::SignalExecRequest {
    fn from(r: SignalRequest) -> Self {
        pb::SignalExecRequest { exec_id: r.exec_id, signal: r.signal, grace_ms: ms(r.grace) }
    }
}

impl From<pb::SignalExecRequest> for SignalRequest {
    fn from(r: pb::SignalExecRequest) -> Self {
        SignalRequest {
            exec_id: r.exec_id,
            signal: r.signal,
            grace: Duration::from_millis(u64::from(r.grace_ms)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Copy, remove, list

impl From<CopyInTarget> for pb::CopyInHeader {
    fn from(t: CopyInTarget) -> Self {
        pb::CopyInHeader {
            environment_id: t.environment_id,
            container_id: t.container_id,
            dest_path: t.dest_path,
            local_path: t.local_path.unwrap_or_default(),
        }
    }
}

impl From<pb::CopyInHeader> for CopyInTarget {
    fn from(h: pb::CopyInHeader) -> Self {
        CopyInTarget {
            environment_id: h.environment_id,
            container_id: h.container_id,
            dest_path: h.dest_path,
            local_path: (!h.local_path.is_empty()).then_some(h.local_path),
        }
    }
}

impl From<CopyOutSource> for pb::CopyOutRequest {
    fn from(s: CopyOutSource) -> Self {
        pb::CopyOutRequest {
            environment_id: s.environment_id,
            container_id: s.container_id,
            path: s.path,
        }
    }
}

impl From<pb::CopyOutRequest> for CopyOutSource {
    fn from(s: pb::CopyOutRequest) -> Self {
        CopyOutSource {
            environment_id: s.environment_id,
            container_id: s.container_id,
            path: s.path,
        }
    }
}

impl From<RemoveRequest> for pb::RemoveRequest {
    fn from(r: RemoveRequest) -> Self {
        pb::RemoveRequest {
            environment_id: r.environment_id,
            container_id: r.container_id.unwrap_or_default(),
            grace_ms: ms(r.grace),
        }
    }
}

impl From<pb::RemoveRequest> for RemoveRequest {
    fn from(r: pb::RemoveRequest) -> Self {
        RemoveRequest {
            environment_id: r.environment_id,
            container_id: (!r.container_id.is_empty()).then_some(r.container_id),
            grace: Duration::from_millis(u64::from(r.grace_ms)),
        }
    }
}

impl From<Selector> for pb::ListEnvironmentsRequest {
    fn from(s: Selector) -> Self {
        pb::ListEnvironmentsRequest {
            runner_id: s.runner_id,
            labels: s.labels.into_iter().collect(),
        }
    }
}

impl From<pb::ListEnvironmentsRequest> for Selector {
    fn from(s: pb::ListEnvironmentsRequest) -> Self {
        Selector { runner_id: s.runner_id, labels: s.labels.into_iter().collect() }
    }
}

impl From<EnvironmentSummary> for pb::EnvironmentSummary {
    fn from(s: EnvironmentSummary) -> Self {
        pb::EnvironmentSummary {
            id: s.id,
            owner: Some(s.owner.into()),
            container_ids: s.container_ids,
        }
    }
}

impl From<pb::EnvironmentSummary> for EnvironmentSummary {
    fn from(s: pb::EnvironmentSummary) -> Self {
        EnvironmentSummary { id: s.id, owner: s.owner.into(), container_ids: s.container_ids }
    }
}
