//! A strict fake Forgejo server for daemon-mode tests: `runner.v1.RunnerService` and
//! `ping.v1.PingService` over Connect JSON on 127.0.0.1, enforcing what the real server does
//! (§5 of `shared/design/forgejo-protocol.md`): the auth interceptor, the `tasks_version` gate,
//! `task_capacity`, the request key, the UpdateLog ack arithmetic and archiving on `no_more`,
//! done tasks ignoring updates, first-wins outputs, and cancelling by answering CANCELLED.
//!
//! Tests enqueue jobs, read back logs, states and outputs, cancel tasks, and take the server
//! down (its listener closes, so connections are refused) and up again. Protocol deviations
//! that the real server would tolerate silently but that matter (a missing header, logs sent
//! after the final state, an unparsable timestamp) are collected in [`FakeForgejo::violations`].

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use serde_json::{Map, Value, json};

/// The registration token the fake accepts.
pub(crate) const REGISTRATION_TOKEN: &str = "fake-registration-token-0123456789";

const RESULTS: [&str; 5] = [
    "RESULT_UNSPECIFIED",
    "RESULT_SUCCESS",
    "RESULT_FAILURE",
    "RESULT_CANCELLED",
    "RESULT_SKIPPED",
];

/// A job to enqueue.
pub(crate) struct JobSpec {
    /// The single-job workflow (the task's `workflow_payload`).
    pub(crate) yaml: String,
    /// The job's `runs-on` labels.
    pub(crate) runs_on: Vec<String>,
    /// How many steps the job has (the server's step records).
    pub(crate) steps: usize,
    /// Secrets besides the token entries.
    pub(crate) secrets: BTreeMap<String, String>,
    /// Variables.
    pub(crate) vars: BTreeMap<String, String>,
    /// `needs` in protojson form: `{id: {"outputs": {...}, "result": "RESULT_SUCCESS"}}`.
    pub(crate) needs: Value,
    /// The instance's default actions URL (`forgejo_default_actions_url`).
    pub(crate) actions_url: String,
    /// `server_url` and `sha` of the context, when not the fake's own URL and a fixed SHA (the
    /// repository of the run served by a local git server).
    pub(crate) repository_at: Option<(String, String)>,
}

impl JobSpec {
    /// A job with no secrets, vars or needs on `ubuntu-latest`.
    pub(crate) fn new(yaml: &str, steps: usize) -> JobSpec {
        JobSpec {
            yaml: yaml.to_owned(),
            runs_on: vec!["ubuntu-latest".into()],
            steps,
            secrets: BTreeMap::new(),
            vars: BTreeMap::new(),
            needs: json!({}),
            actions_url: "https://data.forgejo.org".into(),
            repository_at: None,
        }
    }
}

/// A registered runner.
#[derive(Debug, Clone)]
pub(crate) struct RunnerRec {
    pub(crate) id: i64,
    pub(crate) uuid: String,
    pub(crate) token: String,
    pub(crate) name: String,
    pub(crate) labels: Vec<String>,
    pub(crate) version: String,
    pub(crate) declared: bool,
}

struct JobRec {
    id: i64,
    spec: JobSpec,
    task: Option<i64>,
}

/// A step record, as the server stores it.
#[derive(Debug, Clone, Default)]
pub(crate) struct StepView {
    pub(crate) result: String,
    pub(crate) started: Option<String>,
    pub(crate) stopped: Option<String>,
    pub(crate) log_index: i64,
    pub(crate) log_length: i64,
}

/// A task, as the server stores it.
#[derive(Debug, Clone, Default)]
pub(crate) struct TaskView {
    pub(crate) id: i64,
    pub(crate) job: i64,
    pub(crate) runner: String,
    pub(crate) token: String,
    /// `RESULT_*`.
    pub(crate) result: String,
    pub(crate) started: Option<String>,
    pub(crate) stopped: Option<String>,
    pub(crate) steps: Vec<StepView>,
    /// Log rows, content only.
    pub(crate) rows: Vec<String>,
    pub(crate) archived: bool,
    /// First value wins.
    pub(crate) outputs: Vec<(String, String)>,
    /// The runner sent a final result (even if the server ignored it).
    pub(crate) runner_final: bool,
    /// Stopped from the test (as a user cancelling the run).
    pub(crate) cancelled_by_user: bool,
}

impl TaskView {
    /// The rows of step `i` by its `log_index`/`log_length`.
    pub(crate) fn step_rows(&self, i: usize) -> Vec<String> {
        let s = &self.steps[i];
        let start = usize::try_from(s.log_index).unwrap_or(0);
        let end = start + usize::try_from(s.log_length).unwrap_or(0);
        self.rows.get(start..end.min(self.rows.len())).unwrap_or(&[]).to_vec()
    }

    /// Whether the runner is done with it: final state sent and the log archived.
    pub(crate) fn finished(&self) -> bool {
        self.runner_final && self.archived
    }

    /// Step results, `RESULT_` stripped and lowercased.
    pub(crate) fn step_results(&self) -> Vec<String> {
        self.steps.iter().map(|s| short(&s.result)).collect()
    }

    /// The result, `RESULT_` stripped and lowercased.
    pub(crate) fn short_result(&self) -> String {
        short(&self.result)
    }

    /// All rows joined, for failure messages.
    pub(crate) fn log(&self) -> String {
        self.rows.join("\n")
    }
}

fn short(r: &str) -> String {
    r.trim_start_matches("RESULT_").to_lowercase()
}

#[derive(Default)]
struct State {
    url: String,
    runners: Vec<RunnerRec>,
    jobs: Vec<JobRec>,
    tasks: BTreeMap<i64, TaskView>,
    tasks_version: i64,
    next_id: i64,
    violations: Vec<String>,
    /// Request key → the tasks assigned under it.
    request_keys: HashMap<String, Vec<i64>>,
    /// Highest number of unfinished tasks held by one runner at once.
    peak_running: usize,
    /// Every call, as `Method`.
    calls: Vec<String>,
    /// Answer Declare with the router's 404, as servers before Gitea 1.20 do.
    old_server: bool,
}

/// The fake server. Dropping it stops it.
pub(crate) struct FakeForgejo {
    url: String,
    state: Arc<Mutex<State>>,
    down: tokio::sync::watch::Sender<bool>,
    _runtime: tokio::runtime::Runtime,
}

fn random_hex(n: usize) -> String {
    let mut s = String::new();
    while s.len() < n {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_usize(s.len());
        s.push_str(&format!("{:016x}", h.finish()));
    }
    s.truncate(n);
    s
}

impl FakeForgejo {
    /// Starts a server on an ephemeral port.
    pub(crate) fn start() -> FakeForgejo {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("binding the fake server");
        let addr = listener.local_addr().expect("address");
        let url = format!("http://{addr}");
        let state =
            Arc::new(Mutex::new(State { url: url.clone(), next_id: 1, ..State::default() }));
        let (down, down_rx) = tokio::sync::watch::channel(false);
        runtime.spawn(serve(listener, addr, state.clone(), down_rx));
        FakeForgejo { url, state, down, _runtime: runtime }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `http://127.0.0.1:PORT`.
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// Queues a job; returns its id. Bumps the tasks version.
    pub(crate) fn enqueue(&self, spec: JobSpec) -> i64 {
        let mut st = self.lock();
        let id = st.next_id;
        st.next_id += 1;
        st.jobs.push(JobRec { id, spec, task: None });
        st.tasks_version += 1;
        id
    }

    /// The task of a job, once a runner picked it.
    pub(crate) fn task_of(&self, job: i64) -> Option<TaskView> {
        let st = self.lock();
        let task = st.jobs.iter().find(|j| j.id == job)?.task?;
        st.tasks.get(&task).cloned()
    }

    /// Waits up to `secs` for the runner to finish the job's task; panics otherwise.
    pub(crate) fn wait_finished(&self, job: i64, secs: u64) -> TaskView {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        loop {
            let t = self.task_of(job);
            if let Some(t) = &t
                && t.finished()
            {
                return t.clone();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "job {job} did not finish within {secs}s: {t:#?}\ncalls: {:?}",
                self.lock().calls.iter().rev().take(20).collect::<Vec<_>>()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Waits up to `secs` until some row of the job's log contains `needle`.
    pub(crate) fn wait_row(&self, job: i64, needle: &str, secs: u64) {
        let ok = crate::support::wait_for(secs, || {
            self.task_of(job).is_some_and(|t| t.rows.iter().any(|r| r.contains(needle)))
        });
        assert!(ok, "no row with {needle:?} in job {job} within {secs}s: {:#?}", self.task_of(job));
    }

    /// Stops a running task as a user would: the task is done with CANCELLED, and UpdateTask
    /// answers so.
    pub(crate) fn cancel(&self, job: i64) {
        let mut st = self.lock();
        let task =
            st.jobs.iter().find(|j| j.id == job).and_then(|j| j.task).expect("job has a task");
        let t = st.tasks.get_mut(&task).expect("task");
        t.result = RESULTS[3].into();
        t.stopped = Some("cancelled by the test".into());
        t.cancelled_by_user = true;
        st.tasks_version += 1;
    }

    /// Takes the server down (connections refused) or brings it back.
    pub(crate) fn set_down(&self, down: bool) {
        let _ = self.down.send(down);
    }

    /// Behave as a server older than Declare (its path is a 404).
    pub(crate) fn set_old_server(&self, old: bool) {
        self.lock().old_server = old;
    }

    /// Registered runners.
    pub(crate) fn runners(&self) -> Vec<RunnerRec> {
        self.lock().runners.clone()
    }

    /// Protocol deviations seen so far.
    pub(crate) fn violations(&self) -> Vec<String> {
        self.lock().violations.clone()
    }

    /// The most tasks one runner held unfinished at once.
    pub(crate) fn peak_running(&self) -> usize {
        self.lock().peak_running
    }

    /// How many calls of `method` were made.
    pub(crate) fn calls(&self, method: &str) -> usize {
        self.lock().calls.iter().filter(|c| *c == method).count()
    }
}

impl Drop for FakeForgejo {
    fn drop(&mut self) {
        let _ = self.down.send(true);
    }
}

async fn bind(addr: SocketAddr) -> tokio::net::TcpListener {
    loop {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        let _ = socket.set_reuseaddr(true);
        if socket.bind(addr).is_ok()
            && let Ok(l) = socket.listen(128)
        {
            return l;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

async fn serve(
    first: tokio::net::TcpListener,
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    mut down: tokio::sync::watch::Receiver<bool>,
) {
    let mut listener = Some(first);
    loop {
        let l = match listener.take() {
            Some(l) => l,
            None => bind(addr).await,
        };
        let mut conns = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                accepted = l.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    let state = state.clone();
                    conns.spawn(async move {
                        let io = hyper_util::rt::TokioIo::new(stream);
                        let service = hyper::service::service_fn(move |req| {
                            let state = state.clone();
                            async move { Ok::<_, std::convert::Infallible>(handle(&state, req).await) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, service)
                            .await;
                    });
                }
                changed = down.changed() => {
                    if changed.is_err() || *down.borrow() {
                        break;
                    }
                }
            }
        }
        drop(l);
        conns.abort_all();
        loop {
            if !*down.borrow() {
                break;
            }
            if down.changed().await.is_err() {
                return;
            }
        }
    }
}

fn connect_error(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    let body = json!({ "code": code, "message": message }).to_string();
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

fn ok(v: Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())))
        .unwrap_or_default()
}

/// A field by its camelCase or proto name.
fn field<'a>(v: &'a Value, camel: &str, proto: &str) -> Option<&'a Value> {
    v.get(camel).or_else(|| v.get(proto)).filter(|v| !v.is_null())
}

/// An int64: a string or a number.
fn int64(v: Option<&Value>) -> Result<i64, String> {
    match v {
        None => Ok(0),
        Some(Value::Number(n)) => n.as_i64().ok_or_else(|| format!("{n} is not an int64")),
        Some(Value::String(s)) => s.parse().map_err(|_| format!("{s:?} is not an int64")),
        Some(other) => Err(format!("{other} is not an int64")),
    }
}

/// An enum: a name or a number.
fn result_enum(v: Option<&Value>) -> Result<usize, String> {
    match v {
        None => Ok(0),
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .filter(|n| *n < 5)
            .ok_or("bad enum".into()),
        Some(Value::String(s)) => {
            RESULTS.iter().position(|r| r == s).ok_or_else(|| format!("unknown result {s:?}"))
        }
        Some(other) => Err(format!("{other} is not an enum")),
    }
}

fn timestamp_ok(v: &Value) -> bool {
    // RFC 3339: 2006-01-02T15:04:05[.frac](Z|±hh:mm).
    let Some(s) = v.as_str() else { return false };
    let b = s.as_bytes();
    b.len() >= 20
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && (s.ends_with('Z') || s[19..].contains(['+', '-']))
}

async fn handle(
    state: &Arc<Mutex<State>>,
    req: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let headers = req.headers().clone();
    let method_ok = req.method() == hyper::Method::POST;
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return connect_error(StatusCode::BAD_REQUEST, "invalid_argument", "bad body"),
    };
    let mut st = state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let Some(procedure) = path.strip_prefix("/api/actions/") else {
        return Response::builder()
            .status(404)
            .body(Full::new(Bytes::from("404 page not found")))
            .unwrap_or_default();
    };
    if !method_ok {
        return Response::builder().status(404).body(Full::new(Bytes::new())).unwrap_or_default();
    }
    let header =
        |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let (service, method) = procedure.split_once('/').unwrap_or(("", ""));
    st.calls.push(method.to_owned());
    if header("content-type") != "application/json" {
        st.violations.push(format!(
            "{method}: content-type {:?}, not application/json",
            header("content-type")
        ));
        return connect_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unknown",
            "unsupported content type",
        );
    }
    if header("connect-protocol-version") != "1" {
        st.violations.push(format!("{method}: no Connect-Protocol-Version: 1 header"));
    }
    if header("accept-encoding").contains("gzip") {
        st.violations.push(format!("{method}: gzip advertised (the fake does not compress)"));
    }
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return connect_error(StatusCode::BAD_REQUEST, "invalid_argument", "unmarshal: not JSON");
    };
    match (service, method) {
        ("ping.v1.PingService", "Ping") => {
            let data = field(&body, "data", "data").and_then(Value::as_str).unwrap_or("");
            ok(json!({ "data": format!("Hello, {data}!") }))
        }
        ("runner.v1.RunnerService", "Register") => register(&mut st, &body),
        ("runner.v1.RunnerService", m) => {
            // The auth interceptor.
            let uuid = header("x-runner-uuid");
            let token = header("x-runner-token");
            let Some(runner) =
                st.runners.iter().find(|r| r.uuid == uuid && r.token == token).cloned()
            else {
                return connect_error(
                    StatusCode::UNAUTHORIZED,
                    "unauthenticated",
                    "unregistered runner",
                );
            };
            match m {
                "Declare" if st.old_server => not_found(),
                "Declare" => declare(&mut st, &runner, &body),
                "FetchTask" => fetch_task(&mut st, &runner, &body, &header("x-runner-request-key")),
                "UpdateTask" => update_task(&mut st, &runner, &body),
                "UpdateLog" => update_log(&mut st, &runner, &body),
                _ => Response::builder()
                    .status(404)
                    .body(Full::new(Bytes::from("404 page not found")))
                    .unwrap_or_default(),
            }
        }
        _ => Response::builder()
            .status(404)
            .body(Full::new(Bytes::from("404 page not found")))
            .unwrap_or_default(),
    }
}

fn runner_json(r: &RunnerRec, with_token: bool) -> Value {
    let mut v = json!({
        "id": r.id.to_string(),
        "uuid": r.uuid,
        "name": r.name,
        "version": r.version,
        "labels": r.labels,
    });
    if with_token {
        v["token"] = json!(r.token);
    }
    v
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
        .unwrap_or_default()
}

fn register(st: &mut State, body: &Value) -> Response<Full<Bytes>> {
    let name = field(body, "name", "name").and_then(Value::as_str).unwrap_or("");
    let token = field(body, "token", "token").and_then(Value::as_str).unwrap_or("");
    if name.is_empty() || token.is_empty() {
        return connect_error(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            "missing runner token, name",
        );
    }
    if token != REGISTRATION_TOKEN {
        return connect_error(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            "runner registration token not found",
        );
    }
    let id = st.next_id;
    st.next_id += 1;
    let hex = random_hex(32);
    let uuid =
        format!("{}-{}-{}-{}-{}", &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32]);
    let runner = RunnerRec {
        id,
        uuid,
        token: random_hex(40),
        name: name.chars().take(255).collect(),
        labels: strings(field(body, "labels", "labels")),
        version: field(body, "version", "version").and_then(Value::as_str).unwrap_or("").to_owned(),
        declared: false,
    };
    let reply = json!({ "runner": runner_json(&runner, true) });
    st.runners.push(runner);
    ok(reply)
}

fn declare(st: &mut State, runner: &RunnerRec, body: &Value) -> Response<Full<Bytes>> {
    let Some(r) = st.runners.iter_mut().find(|r| r.uuid == runner.uuid) else {
        return connect_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", "runner vanished");
    };
    r.labels = strings(field(body, "labels", "labels"));
    r.version = field(body, "version", "version").and_then(Value::as_str).unwrap_or("").to_owned();
    r.declared = true;
    ok(json!({ "runner": runner_json(r, false) }))
}

fn task_json(st: &State, task: &TaskView) -> Value {
    let Some(job) = st.jobs.iter().find(|j| j.id == task.job) else { return json!({}) };
    let spec = &job.spec;
    let mut secrets: Map<String, Value> =
        spec.secrets.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
    for k in ["GITHUB_TOKEN", "GITEA_TOKEN", "FORGEJO_TOKEN"] {
        secrets.insert(k.into(), json!(task.token));
    }
    let url = &st.url;
    let mut context = json!({
        "action": "", "actor": "alice", "api_url": format!("{url}/api/v1"),
        "base_ref": "", "event": {"ref": "refs/heads/main"}, "event_name": "push",
        "event_path": "", "graphql_url": "", "head_ref": "", "job": "build",
        "ref": "refs/heads/main", "ref_name": "main", "ref_protected": false, "ref_type": "branch",
        "repository": "acme/widgets", "repository_owner": "acme",
        "repositoryUrl": format!("{url}/acme/widgets.git"), "retention_days": "90",
        "run_attempt": "1", "run_id": job.id.to_string(), "run_number": "1",
        "secret_source": "Actions", "server_url": format!("{url}/"), "sha": "0123456789abcdef0123456789abcdef01234567",
        "triggering_actor": "alice", "workflow": "ci.yml", "workspace": "",
        "token": task.token,
        "gitea_runtime_token": format!("runtime-{}", task.token),
        "forgejo_runtime_token": format!("runtime-{}", task.token),
        "gitea_default_actions_url": spec.actions_url,
        "forgejo_default_actions_url": spec.actions_url,
    });
    if let Some((server_url, sha)) = &spec.repository_at {
        context["server_url"] = json!(server_url);
        context["sha"] = json!(sha);
    }
    let mut v = json!({
        "id": task.id.to_string(),
        "workflowPayload": base64::engine::general_purpose::STANDARD.encode(spec.yaml.as_bytes()),
        "context": context,
        "secrets": secrets,
    });
    if spec.needs.as_object().is_some_and(|m| !m.is_empty()) {
        v["needs"] = spec.needs.clone();
    }
    if !spec.vars.is_empty() {
        v["vars"] = json!(spec.vars);
    }
    v
}

fn fetch_task(
    st: &mut State,
    runner: &RunnerRec,
    body: &Value,
    key: &str,
) -> Response<Full<Bytes>> {
    let req_version = match int64(field(body, "tasksVersion", "tasks_version")) {
        Ok(v) => v,
        Err(e) => return connect_error(StatusCode::BAD_REQUEST, "invalid_argument", &e),
    };
    let capacity = match field(body, "taskCapacity", "task_capacity") {
        None => 1,
        v => match int64(v) {
            Ok(n) => n.max(1),
            Err(e) => return connect_error(StatusCode::BAD_REQUEST, "invalid_argument", &e),
        },
    };
    if key.is_empty() {
        st.violations.push("FetchTask: no x-runner-request-key".into());
    }
    // A repeated key gets the same tasks again, with tasks_version 0.
    if let Some(ids) = st.request_keys.get(key).cloned()
        && !key.is_empty()
    {
        let tasks: Vec<Value> =
            ids.iter().filter_map(|id| st.tasks.get(id)).map(|t| task_json(st, t)).collect();
        return ok(fetch_reply(tasks, 0));
    }
    if st.tasks_version == 0 {
        st.tasks_version = 1;
    }
    let latest = st.tasks_version;
    let mut picked = Vec::new();
    if req_version != latest {
        let labels = runner.labels.clone();
        for job in st.jobs.iter_mut() {
            if picked.len() >= usize::try_from(capacity).unwrap_or(1) {
                break;
            }
            if job.task.is_some()
                || labels.is_empty()
                || !job.spec.runs_on.iter().all(|l| labels.contains(l))
            {
                continue;
            }
            picked.push(job.id);
        }
    }
    let mut tasks = Vec::new();
    let mut ids = Vec::new();
    for job_id in picked {
        let id = st.next_id;
        st.next_id += 1;
        let steps = st.jobs.iter().find(|j| j.id == job_id).map_or(0, |j| j.spec.steps);
        let task = TaskView {
            id,
            job: job_id,
            runner: runner.uuid.clone(),
            token: random_hex(40),
            result: RESULTS[0].into(),
            steps: vec![StepView { result: RESULTS[0].into(), ..StepView::default() }; steps],
            ..TaskView::default()
        };
        tasks.push(task_json(st, &task));
        st.tasks.insert(id, task);
        if let Some(j) = st.jobs.iter_mut().find(|j| j.id == job_id) {
            j.task = Some(id);
        }
        ids.push(id);
    }
    if !ids.is_empty() {
        st.request_keys.insert(key.to_owned(), ids);
    }
    let running = st.tasks.values().filter(|t| t.runner == runner.uuid && !t.runner_final).count();
    st.peak_running = st.peak_running.max(running);
    ok(fetch_reply(tasks, latest))
}

fn fetch_reply(mut tasks: Vec<Value>, version: i64) -> Value {
    let mut v = json!({ "tasksVersion": version.to_string() });
    if !tasks.is_empty() {
        v["task"] = tasks.remove(0);
    }
    if !tasks.is_empty() {
        v["additionalTasks"] = json!(tasks);
    }
    v
}

/// The task `id` of `runner`; otherwise the `internal` error message the server gives.
fn owned_task<'a>(
    st: &'a mut State,
    runner: &RunnerRec,
    id: i64,
    what: &str,
) -> Result<&'a mut TaskView, String> {
    match st.tasks.get_mut(&id) {
        None => Err(format!("{what}: task {id} not found")),
        Some(t) if t.runner != runner.uuid => Err("invalid runner for task".into()),
        Some(t) => Ok(t),
    }
}

fn update_task(st: &mut State, runner: &RunnerRec, body: &Value) -> Response<Full<Bytes>> {
    let Some(state) = field(body, "state", "state") else {
        st.violations.push("UpdateTask without state".into());
        return connect_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "update task: state is nil",
        );
    };
    let id = match int64(field(state, "id", "id")) {
        Ok(id) => id,
        Err(e) => return connect_error(StatusCode::BAD_REQUEST, "invalid_argument", &e),
    };
    let result = match result_enum(field(state, "result", "result")) {
        Ok(r) => r,
        Err(e) => return connect_error(StatusCode::BAD_REQUEST, "invalid_argument", &e),
    };
    let mut problems = Vec::new();
    for key in ["startedAt", "stoppedAt"] {
        if let Some(t) = state.get(key)
            && !timestamp_ok(t)
        {
            problems.push(format!("UpdateTask: {key} {t} is not RFC 3339"));
        }
    }
    let task = match owned_task(st, runner, id, "update task") {
        Ok(t) => t,
        Err(e) => return connect_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", &e),
    };
    if result != 0 {
        task.runner_final = true;
    }
    let done = task.result != RESULTS[0];
    if !done {
        if task.started.is_none() {
            task.started = state.get("startedAt").and_then(Value::as_str).map(str::to_owned);
        }
        if let Some(steps) = field(state, "steps", "steps").and_then(Value::as_array) {
            for s in steps {
                let Ok(sid) = int64(field(s, "id", "id")) else { continue };
                let Some(rec) = usize::try_from(sid).ok().and_then(|i| task.steps.get_mut(i))
                else {
                    continue; // Unknown ids are ignored.
                };
                rec.result = RESULTS[result_enum(field(s, "result", "result")).unwrap_or(0)].into();
                rec.started = s.get("startedAt").and_then(Value::as_str).map(str::to_owned);
                rec.stopped = s.get("stoppedAt").and_then(Value::as_str).map(str::to_owned);
                rec.log_index = int64(field(s, "logIndex", "log_index")).unwrap_or(-1);
                rec.log_length = int64(field(s, "logLength", "log_length")).unwrap_or(-1);
            }
        }
        if result != 0 {
            task.result = RESULTS[result].into();
            task.stopped = Some(
                state
                    .get("stoppedAt")
                    .and_then(Value::as_str)
                    .unwrap_or("1970-01-01T00:00:00Z")
                    .to_owned(),
            );
        }
        if let Some(outputs) = field(body, "outputs", "outputs").and_then(Value::as_object) {
            for (k, v) in outputs {
                let v = v.as_str().unwrap_or("");
                if k.len() > 255
                    || v.len() > 1024 * 1024
                    || task.outputs.iter().any(|(have, _)| have == k)
                {
                    continue;
                }
                task.outputs.push((k.clone(), v.to_owned()));
            }
        }
    }
    let reply = json!({
        "state": { "id": task.id.to_string(), "result": task.result },
        "sentOutputs": task.outputs.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(),
    });
    st.violations.extend(problems);
    if result != 0 {
        st.tasks_version += 1;
    }
    ok(reply)
}

fn update_log(st: &mut State, runner: &RunnerRec, body: &Value) -> Response<Full<Bytes>> {
    let (id, index) =
        match (int64(field(body, "taskId", "task_id")), int64(field(body, "index", "index"))) {
            (Ok(id), Ok(index)) => (id, index),
            (Err(e), _) | (_, Err(e)) => {
                return connect_error(StatusCode::BAD_REQUEST, "invalid_argument", &e);
            }
        };
    let rows = field(body, "rows", "rows").and_then(Value::as_array).cloned().unwrap_or_default();
    let no_more = field(body, "noMore", "no_more").and_then(Value::as_bool).unwrap_or(false);
    let mut problems = Vec::new();
    for r in &rows {
        if !r.get("time").is_some_and(timestamp_ok) {
            problems.push(format!("UpdateLog: row time {:?} is not RFC 3339", r.get("time")));
        }
    }
    let task = match owned_task(st, runner, id, "update log") {
        Ok(t) => t,
        Err(e) => return connect_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", &e),
    };
    let ack = i64::try_from(task.rows.len()).unwrap_or(0);
    let n = i64::try_from(rows.len()).unwrap_or(0);
    if rows.is_empty() || index > ack || index + n <= ack {
        st.violations.extend(problems);
        return ok(json!({ "ackIndex": ack.to_string() }));
    }
    if task.archived {
        return connect_error(StatusCode::CONFLICT, "already_exists", "log file has been archived");
    }
    if task.runner_final {
        problems.push(format!("UpdateLog: task {id} got rows after its final state"));
    }
    let skip = usize::try_from(ack - index).unwrap_or(0);
    for r in &rows[skip..] {
        let content = r.get("content").and_then(Value::as_str).unwrap_or("");
        task.rows.push(content.chars().take(64 * 1024).collect());
    }
    if no_more {
        task.archived = true;
    }
    let len = task.rows.len();
    st.violations.extend(problems);
    ok(json!({ "ackIndex": len.to_string() }))
}

fn not_found() -> Response<Full<Bytes>> {
    Response::builder()
        .status(404)
        .body(Full::new(Bytes::from("404 page not found")))
        .unwrap_or_default()
}
