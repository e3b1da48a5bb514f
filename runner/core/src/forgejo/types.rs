//! The `runner.v1` and `ping.v1` messages in their Connect JSON (protojson) form: lowerCamelCase
//! names, `int64` written as strings and read as strings or numbers, enums by name (read by name
//! or number), bytes as base64, timestamps as RFC 3339 strings, and unknown fields ignored.
//!
//! These types belong to the Forgejo client only; they never leave this module's users.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// `ping.v1.PingRequest`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct PingRequest {
    /// Echoed back by the server.
    pub data: String,
}

/// `ping.v1.PingResponse`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct PingResponse {
    /// `Hello, <data>!` on Forgejo.
    pub data: String,
}

/// `runner.v1.Runner`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Runner {
    /// Database id.
    #[serde(with = "int64")]
    pub id: i64,
    /// The runner's uuid (`x-runner-uuid`).
    pub uuid: String,
    /// The runner's secret (`x-runner-token`); empty in Declare answers.
    pub token: String,
    /// Display name.
    pub name: String,
    /// The version the runner declared.
    pub version: String,
    /// Label names.
    pub labels: Vec<String>,
    /// Whether it takes one job and is then deleted.
    pub ephemeral: bool,
}

/// `runner.v1.RegisterRequest`.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RegisterRequest {
    /// Runner name.
    pub name: String,
    /// The registration token.
    pub token: String,
    /// Deprecated copy of `labels`, still filled for old servers.
    pub agent_labels: Vec<String>,
    /// kiln's version.
    pub version: String,
    /// Label names (no schemes).
    pub labels: Vec<String>,
    /// One job, then deleted.
    pub ephemeral: bool,
}

/// `runner.v1.RegisterResponse` and `DeclareResponse`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct RunnerResponse {
    /// The runner record.
    pub runner: Option<Runner>,
}

/// `runner.v1.DeclareRequest`.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeclareRequest {
    /// kiln's version.
    pub version: String,
    /// Label names.
    pub labels: Vec<String>,
}

/// `runner.v1.FetchTaskRequest` (with Forgejo's `task_capacity`).
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FetchTaskRequest {
    /// The last version seen (0 forces a query).
    #[serde(with = "int64")]
    pub tasks_version: i64,
    /// How many tasks we can take (Forgejo >= 14).
    #[serde(skip_serializing_if = "Option::is_none", with = "opt_int64")]
    pub task_capacity: Option<i64>,
}

/// `runner.v1.FetchTaskResponse` (with Forgejo's `additional_tasks`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct FetchTaskResponse {
    /// The task, if one was assigned.
    pub task: Option<Task>,
    /// The server's current version.
    #[serde(with = "int64")]
    pub tasks_version: i64,
    /// More tasks, up to `task_capacity - 1`.
    pub additional_tasks: Vec<Task>,
}

/// `runner.v1.FetchSingleTaskRequest` (Forgejo >= 15).
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FetchSingleTaskRequest {
    /// Always 0 here.
    #[serde(with = "int64")]
    pub tasks_version: i64,
    /// The job handle.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handle: Option<String>,
}

/// `runner.v1.FetchSingleTaskResponse`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct FetchSingleTaskResponse {
    /// The server's current version.
    #[serde(with = "int64")]
    pub tasks_version: i64,
    /// The task, if one was assigned.
    pub task: Option<Task>,
}

/// `runner.v1.Task`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Task {
    /// Task id, never reused.
    #[serde(with = "int64")]
    pub id: i64,
    /// The single-job workflow YAML.
    #[serde(with = "base64_bytes")]
    pub workflow_payload: Vec<u8>,
    /// The github/forgejo context.
    pub context: Map<String, Value>,
    /// Secrets, including the token entries.
    pub secrets: BTreeMap<String, String>,
    /// The jobs this one needs.
    pub needs: BTreeMap<String, TaskNeed>,
    /// Configuration variables.
    pub vars: BTreeMap<String, String>,
}

/// `runner.v1.TaskNeed`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct TaskNeed {
    /// The needed job's outputs.
    pub outputs: BTreeMap<String, String>,
    /// Its result.
    pub result: TaskResult,
}

/// `runner.v1.Result`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TaskResult {
    /// Not decided (running).
    #[default]
    Unspecified,
    /// Succeeded.
    Success,
    /// Failed.
    Failure,
    /// Cancelled.
    Cancelled,
    /// Skipped.
    Skipped,
}

impl TaskResult {
    /// The protojson name.
    pub fn name(self) -> &'static str {
        match self {
            TaskResult::Unspecified => "RESULT_UNSPECIFIED",
            TaskResult::Success => "RESULT_SUCCESS",
            TaskResult::Failure => "RESULT_FAILURE",
            TaskResult::Cancelled => "RESULT_CANCELLED",
            TaskResult::Skipped => "RESULT_SKIPPED",
        }
    }

    /// `success`, `failure`, … as the `needs` context spells it (empty when unspecified).
    pub fn as_context(self) -> &'static str {
        match self {
            TaskResult::Unspecified => "",
            TaskResult::Success => "success",
            TaskResult::Failure => "failure",
            TaskResult::Cancelled => "cancelled",
            TaskResult::Skipped => "skipped",
        }
    }

    fn from_number(n: i64) -> TaskResult {
        match n {
            1 => TaskResult::Success,
            2 => TaskResult::Failure,
            3 => TaskResult::Cancelled,
            4 => TaskResult::Skipped,
            _ => TaskResult::Unspecified,
        }
    }
}

impl From<crate::output::Outcome> for TaskResult {
    fn from(o: crate::output::Outcome) -> TaskResult {
        use crate::output::Outcome;
        match o {
            Outcome::Success => TaskResult::Success,
            Outcome::Failure => TaskResult::Failure,
            Outcome::Cancelled => TaskResult::Cancelled,
            Outcome::Skipped => TaskResult::Skipped,
        }
    }
}

impl Serialize for TaskResult {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for TaskResult {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<TaskResult, D::Error> {
        Ok(match Value::deserialize(d)? {
            Value::String(s) => match s.as_str() {
                "RESULT_SUCCESS" => TaskResult::Success,
                "RESULT_FAILURE" => TaskResult::Failure,
                "RESULT_CANCELLED" => TaskResult::Cancelled,
                "RESULT_SKIPPED" => TaskResult::Skipped,
                other => TaskResult::from_number(other.parse().unwrap_or(0)),
            },
            Value::Number(n) => TaskResult::from_number(n.as_i64().unwrap_or(0)),
            _ => TaskResult::Unspecified,
        })
    }
}

/// `runner.v1.TaskState`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct TaskState {
    /// Task id.
    #[serde(with = "int64")]
    pub id: i64,
    /// The job's result (unspecified while it runs).
    pub result: TaskResult,
    /// RFC 3339.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// RFC 3339.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stopped_at: Option<String>,
    /// Every step, by index.
    pub steps: Vec<StepState>,
}

/// `runner.v1.StepState`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct StepState {
    /// The step's 0-based index in `jobs.<id>.steps`.
    #[serde(with = "int64")]
    pub id: i64,
    /// Its result.
    pub result: TaskResult,
    /// RFC 3339.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// RFC 3339.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stopped_at: Option<String>,
    /// Absolute row index of the step's first log row.
    #[serde(with = "int64")]
    pub log_index: i64,
    /// Rows the step owns.
    #[serde(with = "int64")]
    pub log_length: i64,
}

/// `runner.v1.LogRow`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct LogRow {
    /// RFC 3339.
    pub time: String,
    /// One line, no terminator.
    pub content: String,
}

/// `runner.v1.UpdateTaskRequest`.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UpdateTaskRequest {
    /// The full state, every step included.
    pub state: TaskState,
    /// Outputs not acknowledged yet.
    pub outputs: BTreeMap<String, String>,
}

/// `runner.v1.UpdateTaskResponse`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct UpdateTaskResponse {
    /// `{id, result}`: the server's view (CANCELLED when a user stopped the task).
    pub state: Option<TaskState>,
    /// Every output key the server stores.
    pub sent_outputs: Vec<String>,
}

/// `runner.v1.UpdateLogRequest`.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UpdateLogRequest {
    /// Task id.
    #[serde(with = "int64")]
    pub task_id: i64,
    /// Absolute index of `rows[0]`.
    #[serde(with = "int64")]
    pub index: i64,
    /// Rows not acknowledged yet.
    pub rows: Vec<LogRow>,
    /// The last call: archive the log.
    pub no_more: bool,
}

/// `runner.v1.UpdateLogResponse`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct UpdateLogResponse {
    /// How many rows the server holds.
    #[serde(with = "int64")]
    pub ack_index: i64,
}

/// `int64` fields: written as a string, read as a string or a number.
mod int64 {
    use serde::{Deserialize, Deserializer, Serializer};
    use serde_json::Value;

    pub(super) fn serialize<S: Serializer>(v: &i64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.to_string())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        match Value::deserialize(d)? {
            Value::Null => Ok(0),
            Value::Number(n) => {
                n.as_i64().ok_or_else(|| serde::de::Error::custom(format!("{n} is not an int64")))
            }
            Value::String(s) => {
                s.parse().map_err(|_| serde::de::Error::custom(format!("{s:?} is not an int64")))
            }
            other => Err(serde::de::Error::custom(format!("expected an int64, got {other}"))),
        }
    }
}

mod opt_int64 {
    use serde::Serializer;

    pub(super) fn serialize<S: Serializer>(v: &Option<i64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.serialize_str(&v.to_string()),
            None => s.serialize_none(),
        }
    }
}

/// `bytes` fields: base64 (standard or URL-safe, padded or not).
mod base64_bytes {
    use base64::Engine;
    use serde::{Deserialize, Deserializer};

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = Option::<String>::deserialize(d)?.unwrap_or_default();
        let s = s.trim_end_matches('=');
        let standard = base64::engine::general_purpose::STANDARD_NO_PAD.decode(s);
        standard
            .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s))
            .map_err(|e| serde::de::Error::custom(format!("bytes are not valid base64: {e}")))
    }
}

/// RFC 3339 in UTC with milliseconds, as protojson writes Timestamps.
pub fn timestamp(t: std::time::SystemTime) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = i64::try_from(d.as_secs()).unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Now, as a protojson Timestamp.
pub fn now() -> String {
    timestamp(std::time::SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123);
        assert_eq!(timestamp(t), "2023-11-14T22:13:20.123Z");
        assert_eq!(timestamp(std::time::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = std::time::UNIX_EPOCH + std::time::Duration::from_secs(951_782_400);
        assert_eq!(timestamp(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn int64_as_string_or_number_and_enums_by_name_or_number() {
        let r: FetchTaskResponse =
            serde_json::from_str(r#"{"tasksVersion":"7","unknownField":1}"#).unwrap();
        assert_eq!(r.tasks_version, 7);
        assert!(r.task.is_none());
        let r: FetchTaskResponse = serde_json::from_str(
            r#"{"tasksVersion":3,"task":{"id":"12","workflowPayload":"b246IHB1c2g=",
                "context":{"token":"t"},"needs":{"a":{"outputs":{"x":"1"},"result":"RESULT_FAILURE"},
                "b":{"result":1}}}}"#,
        )
        .unwrap();
        let task = r.task.unwrap();
        assert_eq!((r.tasks_version, task.id), (3, 12));
        assert_eq!(task.workflow_payload, b"on: push");
        assert_eq!(task.needs["a"].result, TaskResult::Failure);
        assert_eq!(task.needs["b"].result, TaskResult::Success);
        let req =
            serde_json::to_string(&FetchTaskRequest { tasks_version: 5, task_capacity: Some(2) })
                .unwrap();
        assert_eq!(req, r#"{"tasksVersion":"5","taskCapacity":"2"}"#);
        let req =
            serde_json::to_string(&FetchTaskRequest { tasks_version: 0, task_capacity: None })
                .unwrap();
        assert_eq!(req, r#"{"tasksVersion":"0"}"#);
    }
}
