//! The smallest reproduction of a failure: every call a case makes goes through a
//! [`Recorder`], which keeps the last few requests and what came back, so that a failed case
//! can show them (`reproduction:` in the report).

use std::collections::VecDeque;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};

use crate::backend::*;
use crate::error::Result;

use super::harness::code_name;

/// How many calls a failure shows.
const KEPT: usize = 4;
/// Bound on one request or answer in the report.
const WIDTH: usize = 360;

/// The calls of one case, newest last; a call repeated with only a fresh exec id (a poll)
/// is kept once with a count, so it does not push the calls that matter out.
#[derive(Debug, Default, Clone)]
pub(crate) struct Journal(Arc<Mutex<VecDeque<(String, String, usize)>>>);

/// A call without its exec id, to recognise repeats.
fn key(line: &str) -> String {
    match line.find("exec_id: \"") {
        Some(i) => {
            let rest = &line[i + 10..];
            let end = rest.find('"').map_or(rest.len(), |e| e + 1);
            format!("{}{}", &line[..i], &rest[end..])
        }
        None => line.to_owned(),
    }
}

impl Journal {
    fn push(&self, line: String) {
        if let Ok(mut j) = self.0.lock() {
            let k = key(&line);
            if let Some(last) = j.back_mut()
                && last.0 == k
            {
                last.1 = line;
                last.2 += 1;
                return;
            }
            if j.len() == KEPT {
                j.pop_front();
            }
            j.push_back((k, line, 1));
        }
    }

    /// The kept calls as report lines, oldest first.
    pub(crate) fn lines(&self) -> Vec<String> {
        self.0
            .lock()
            .map(|j| {
                j.iter()
                    .map(
                        |(_, l, n)| {
                            if *n > 1 { format!("{l} (×{n}, the last shown)") } else { l.clone() }
                        },
                    )
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn cut(s: String) -> String {
    if s.len() <= WIDTH {
        return s;
    }
    let mut end = WIDTH;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} chars)", &s[..end], s.len())
}

fn answer<T: Debug>(r: &Result<T>) -> String {
    match r {
        Ok(v) => cut(format!("ok {v:?}")),
        Err(e) => cut(format!("{} {:?} (field {:?})", code_name(e.code), e.message, e.field)),
    }
}

/// A backend that records what is asked of the one it wraps.
pub(crate) struct Recorder {
    pub(crate) inner: Arc<dyn Backend>,
    pub(crate) journal: Journal,
}

impl Recorder {
    fn note<T: Debug>(&self, call: &str, request: String, r: &Result<T>) {
        self.journal.push(format!("{call} {} → {}", cut(request), answer(r)));
    }
}

#[async_trait::async_trait]
impl Backend for Recorder {
    async fn capabilities(&self, request: CapabilitiesRequest) -> Result<Capabilities> {
        let q = format!("{request:?}");
        let r = self.inner.capabilities(request).await;
        self.note("Capabilities", q, &r);
        r
    }
    async fn create_environment(&self, request: EnvironmentRequest) -> Result<Environment> {
        let q = format!("{request:?}");
        let r = self.inner.create_environment(request).await;
        self.note(
            "CreateExecutionEnvironment",
            q,
            &r.as_ref().map(|e| e.id.clone()).map_err(Clone::clone),
        );
        r
    }
    async fn create_container(
        &self,
        kind: ContainerKind,
        request: ContainerRequest,
    ) -> Result<Container> {
        let q = format!("{kind} {request:?}");
        let r = self.inner.create_container(kind, request).await;
        self.note("CreateContainer", q, &r);
        r
    }
    async fn start_container(&self, target: ContainerRef) -> Result<Container> {
        let q = format!("{target:?}");
        let r = self.inner.start_container(target).await;
        self.note("StartContainer", q, &r);
        r
    }
    async fn inspect(&self, target: ContainerRef) -> Result<ContainerStatus> {
        let q = format!("{target:?}");
        let r = self.inner.inspect(target).await;
        self.note("Inspect", q, &r);
        r
    }
    async fn exec(&self, request: ExecRequest) -> Result<ExecStream> {
        let q = format!("{request:?}");
        let r = self.inner.exec(request).await;
        self.note("Exec", q, &r.as_ref().map(|_| "stream").map_err(Clone::clone));
        r
    }
    async fn signal_exec(&self, request: SignalRequest) -> Result<bool> {
        let q = format!("{request:?}");
        let r = self.inner.signal_exec(request).await;
        self.note("SignalExec", q, &r);
        r
    }
    async fn write_stdin(&self, exec_id: String, data: ByteStream) -> Result<u64> {
        let q = format!("exec_id {exec_id:?}");
        let r = self.inner.write_stdin(exec_id, data).await;
        self.note("WriteStdin", q, &r);
        r
    }
    async fn copy_in(&self, target: CopyInTarget, data: ByteStream) -> Result<CopyStats> {
        let q = format!("{target:?}");
        let r = self.inner.copy_in(target, data).await;
        self.note("CopyIn", q, &r);
        r
    }
    async fn copy_out(&self, source: CopyOutSource) -> Result<ByteStream> {
        let q = format!("{source:?}");
        let r = self.inner.copy_out(source).await;
        self.note("CopyOut", q, &r.as_ref().map(|_| "stream").map_err(Clone::clone));
        r
    }
    async fn remove(&self, request: RemoveRequest) -> Result<bool> {
        let q = format!("{request:?}");
        let r = self.inner.remove(request).await;
        self.note("Remove", q, &r);
        r
    }
    async fn list_environments(&self, selector: Selector) -> Result<Vec<EnvironmentSummary>> {
        let q = format!("{selector:?}");
        let r = self.inner.list_environments(selector).await;
        self.note(
            "ListEnvironments",
            q,
            &r.as_ref()
                .map(|l| l.iter().map(|e| e.id.clone()).collect::<Vec<_>>())
                .map_err(Clone::clone),
        );
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polls_fold() {
        let j = Journal::default();
        j.push("Create a → ok".to_owned());
        for i in 0..5 {
            j.push(format!("Exec ExecRequest {{ exec_id: \"x-{i}\", argv: [\"poll\"] }} → ok"));
        }
        j.push("Remove a → ok true".to_owned());
        let lines = j.lines();
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(lines[1].contains("x-4") && lines[1].ends_with("(×5, the last shown)"));
        assert_eq!(lines[2], "Remove a → ok true");
    }
}
