//! The reporter: an [`EventSink`] that turns a run's events into the task's log rows and step
//! states, and sends them with `UpdateLog` / `UpdateTask` every `report_interval`.
//!
//! Rows are kept until the server acknowledges them (`ack_index`), and the whole unacknowledged
//! buffer is resent each time. Outputs are resent until `sent_outputs` names them. When the
//! server answers CANCELLED (a user stopped the job) the run's token is cancelled. `close` sends
//! the final logs with `no_more` first, then the final state, both retried.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::client::{Backoff, Client, Error};
use super::types::{self, LogRow, StepState, TaskResult, TaskState};
use crate::mask::Masker;
use crate::output::{Event, EventSink, LineKind};
use crate::workflow::AnnotationLevel;

/// Forgejo Runner's last row for a job over `runner.timeout`.
pub const TIMEOUT_LINE: &str =
    "The runner cancelled the job because it exceeds the maximum run time";

/// Longest output key the server stores.
const MAX_OUTPUT_KEY: usize = 255;
/// Longest output value the server stores.
const MAX_OUTPUT_VALUE: usize = 1024 * 1024;
/// Longest row the server stores.
const MAX_ROW: usize = 64 * 1024;

/// How a task ended, as the reporter's caller saw it.
#[derive(Debug, Clone)]
pub enum Ending {
    /// The run finished with this result.
    Finished(TaskResult),
    /// `runner.timeout` passed.
    DeadlineExceeded,
    /// The task could not run at all.
    Error(String),
}

struct State {
    state: TaskState,
    /// Rows not acknowledged yet; `rows[0]` has the absolute index `log_offset`.
    rows: Vec<LogRow>,
    log_offset: i64,
    /// The step whose rows are being written.
    current_step: Option<usize>,
    outputs: BTreeMap<String, String>,
    sent_outputs: BTreeSet<String>,
    masker: Masker,
    show_debug: bool,
    /// `log.job_level` above info: kiln's own progress lines are left out.
    quiet_runner: bool,
}

impl State {
    fn position(&self) -> i64 {
        self.log_offset + i64::try_from(self.rows.len()).unwrap_or(i64::MAX)
    }

    fn push_row(&mut self, text: &str, step: Option<usize>) {
        let text = text.trim_end_matches(['\r', '\n']);
        let mut content = self.masker.mask(text).into_owned();
        if content.len() > MAX_ROW {
            let mut cut = MAX_ROW;
            while !content.is_char_boundary(cut) {
                cut -= 1;
            }
            content.truncate(cut);
        }
        // A job-level row while a step runs belongs to that step, so step ranges stay contiguous.
        let step = step.or(self.current_step);
        if let Some(s) = step.and_then(|i| self.state.steps.get_mut(i)) {
            if s.log_length == 0 {
                s.log_index = self.log_offset + i64::try_from(self.rows.len()).unwrap_or(0);
            }
            s.log_length += 1;
            if s.started_at.is_none() {
                s.started_at = Some(types::now());
            }
        }
        if self.state.started_at.is_none() {
            self.state.started_at = Some(types::now());
        }
        self.rows.push(LogRow { time: types::now(), content });
    }
}

/// Reports one task.
pub struct Reporter {
    client: Arc<Client>,
    task_id: i64,
    state: Mutex<State>,
    /// Serialises UpdateLog/UpdateTask pairs.
    send: tokio::sync::Mutex<()>,
    /// The run's token, cancelled when the server says the task was stopped.
    cancel: CancellationToken,
    /// Stops the periodic loop.
    closing: CancellationToken,
}

impl Reporter {
    /// A reporter for task `task_id` with `steps` steps. `secrets` are masked in every row (the
    /// run masks them already; this also covers the runner's own messages), `cancel` is the
    /// run's token.
    pub fn new(
        client: Arc<Client>,
        task_id: i64,
        steps: usize,
        secrets: &[&str],
        show_debug: bool,
        cancel: CancellationToken,
    ) -> Arc<Reporter> {
        let mut masker = Masker::new();
        for s in secrets {
            masker.add(s);
        }
        masker.add(client.token());
        let steps = (0..steps)
            .map(|i| StepState { id: i64::try_from(i).unwrap_or(0), ..StepState::default() })
            .collect();
        Arc::new(Reporter {
            client,
            task_id,
            state: Mutex::new(State {
                state: TaskState { id: task_id, steps, ..TaskState::default() },
                rows: Vec::new(),
                log_offset: 0,
                current_step: None,
                outputs: BTreeMap::new(),
                sent_outputs: BTreeSet::new(),
                masker,
                show_debug,
                quiet_runner: false,
            }),
            send: tokio::sync::Mutex::new(()),
            cancel,
            closing: CancellationToken::new(),
        })
    }

    /// Adds a row of the runner itself (outside any step unless one is running).
    pub fn log(&self, text: &str) {
        if let Ok(mut st) = self.state.lock() {
            st.push_row(text, None);
        }
    }

    /// Queues the job's outputs (sent with the next UpdateTask). Keys over 255 bytes and values
    /// over 1 MiB are refused with a row saying so; the first value of a key wins.
    pub fn set_outputs(&self, outputs: impl IntoIterator<Item = (String, String)>) {
        let Ok(mut st) = self.state.lock() else { return };
        for (k, v) in outputs {
            if k.len() > MAX_OUTPUT_KEY {
                st.push_row(&format!("ignoring output {k:.40}…: the name is over 255 bytes"), None);
            } else if v.len() > MAX_OUTPUT_VALUE {
                st.push_row(&format!("ignoring output {k}: the value is over 1 MiB"), None);
            } else {
                st.outputs.entry(k).or_insert(v);
            }
        }
    }

    /// Sends everything every `interval` until [`Reporter::close`] starts. Errors are logged;
    /// the next tick resends.
    pub fn spawn_loop(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = me.closing.cancelled() => return,
                }
                if let Err(e) = me.report(false).await {
                    tracing::warn!(task = me.task_id, error = %e, "reporting the task failed; will retry");
                }
            }
        })
    }

    /// One UpdateLog then one UpdateTask. With `no_more`, fails unless every row was acked and
    /// every output confirmed.
    async fn report(&self, no_more: bool) -> Result<(), Error> {
        let _guard = self.send.lock().await;
        self.report_log(no_more).await?;
        self.report_state(no_more).await
    }

    async fn report_log(&self, no_more: bool) -> Result<(), Error> {
        let (index, rows) = {
            let st = self.state.lock().map_err(|_| poisoned("UpdateLog"))?;
            (st.log_offset, st.rows.clone())
        };
        let sent = i64::try_from(rows.len()).unwrap_or(i64::MAX);
        let req = types::UpdateLogRequest { task_id: self.task_id, index, rows, no_more };
        let resp = self.client.update_log(&req).await?;
        let mut st = self.state.lock().map_err(|_| poisoned("UpdateLog"))?;
        let ack = resp.ack_index;
        if ack < st.log_offset {
            return Err(Error::Decode {
                method: "UpdateLog",
                detail: format!(
                    "ack_index {ack} is below the {} rows already acknowledged: submitted logs are \
                     lost",
                    st.log_offset
                ),
            });
        }
        let acked = usize::try_from(ack - st.log_offset).unwrap_or(0).min(st.rows.len());
        st.rows.drain(..acked);
        st.log_offset += i64::try_from(acked).unwrap_or(0);
        if no_more && st.log_offset < index + sent {
            return Err(Error::Connect {
                method: "UpdateLog",
                code: "unavailable".into(),
                message: format!(
                    "not all logs are submitted: {} of {} rows acknowledged",
                    st.log_offset,
                    index + sent
                ),
            });
        }
        Ok(())
    }

    async fn report_state(&self, final_state: bool) -> Result<(), Error> {
        let req = {
            let st = self.state.lock().map_err(|_| poisoned("UpdateTask"))?;
            let outputs = st
                .outputs
                .iter()
                .filter(|(k, _)| !st.sent_outputs.contains(*k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            types::UpdateTaskRequest { state: st.state.clone(), outputs }
        };
        let resp = self.client.update_task(&req).await?;
        let mut st = self.state.lock().map_err(|_| poisoned("UpdateTask"))?;
        st.sent_outputs.extend(resp.sent_outputs);
        let server = resp.state.map(|s| s.result).unwrap_or_default();
        if matches!(server, TaskResult::Cancelled | TaskResult::Failure)
            && st.state.result == TaskResult::Unspecified
            && !self.cancel.is_cancelled()
        {
            tracing::info!(
                task = self.task_id,
                result = server.name(),
                "the server stopped the task; cancelling it"
            );
            self.cancel.cancel();
        }
        let unsent = st.outputs.keys().filter(|k| !st.sent_outputs.contains(*k)).count();
        if final_state && unsent > 0 {
            return Err(Error::Connect {
                method: "UpdateTask",
                code: "unavailable".into(),
                message: format!("{unsent} outputs are not confirmed yet"),
            });
        }
        Ok(())
    }

    /// Ends the task: sets the final result (open steps become cancelled), then sends the logs
    /// with `no_more` until all are acknowledged, then the final state, each retried with
    /// backoff until `force` is cancelled.
    pub async fn close(&self, ending: Ending, force: &CancellationToken) -> Result<(), Error> {
        self.closing.cancel();
        // Hold the send lock from here: the final rows must go with `no_more` (a call without
        // new rows does not archive the log), not with a periodic report.
        let _guard = self.send.lock().await;
        {
            let mut st = self.state.lock().map_err(|_| poisoned("close"))?;
            let result = match &ending {
                Ending::Finished(TaskResult::Unspecified) => {
                    st.push_row("Cancelled", None);
                    TaskResult::Failure
                }
                Ending::Finished(r) => *r,
                Ending::DeadlineExceeded => TaskResult::Cancelled,
                Ending::Error(e) => {
                    let e = e.clone();
                    st.push_row(&e, None);
                    TaskResult::Failure
                }
            };
            st.current_step = None;
            if matches!(ending, Ending::DeadlineExceeded) {
                st.push_row(TIMEOUT_LINE, None);
            } else {
                let word = match result {
                    TaskResult::Success => "succeeded",
                    TaskResult::Cancelled => "cancelled",
                    TaskResult::Skipped => "skipped",
                    _ => "failed",
                };
                st.push_row(&format!("Job {word}"), None);
            }
            if result != TaskResult::Success {
                st.outputs.clear();
            }
            let now = types::now();
            let open = if result == TaskResult::Skipped {
                TaskResult::Skipped
            } else {
                TaskResult::Cancelled
            };
            let position = st.position();
            for step in &mut st.state.steps {
                if step.result == TaskResult::Unspecified {
                    step.result = open;
                    if step.started_at.is_some() {
                        step.stopped_at = Some(now.clone());
                    }
                    if step.log_length == 0 {
                        step.log_index = position;
                    }
                }
            }
            if st.state.started_at.is_none() {
                st.state.started_at = Some(now.clone());
            }
            st.state.result = result;
            st.state.stopped_at = Some(now);
        }
        Backoff::REPORT.retry("sending the final logs", force, || self.report_log(true)).await?;
        Backoff::REPORT.retry("sending the final state", force, || self.report_state(true)).await
    }

    /// The current state (for tests and logging).
    pub fn snapshot(&self) -> Option<(TaskState, Vec<LogRow>, i64)> {
        let st = self.state.lock().ok()?;
        Some((st.state.clone(), st.rows.clone(), st.log_offset))
    }
}

fn poisoned(method: &'static str) -> Error {
    Error::Decode { method, detail: "the reporter's state lock is poisoned".into() }
}

impl Reporter {
    /// Applies `log.job_level`: `debug` also sends the steps' debug lines; above `info`,
    /// kiln's own progress lines are not sent (its error lines always are).
    pub fn set_job_level(&self, level: crate::config::JobLevel) {
        if let Ok(mut st) = self.state.lock() {
            st.show_debug |= level == crate::config::JobLevel::Debug;
            st.quiet_runner = level > crate::config::JobLevel::Info;
        }
    }
}

impl EventSink for Reporter {
    fn event(&self, event: Event) {
        let Ok(mut st) = self.state.lock() else { return };
        match event {
            Event::JobStarted { .. } => {
                if st.state.started_at.is_none() {
                    st.state.started_at = Some(types::now());
                }
            }
            Event::StepStarted { index, .. } => {
                let position = st.position();
                if let Some(s) = st.state.steps.get_mut(index) {
                    s.started_at.get_or_insert_with(types::now);
                    if s.log_length == 0 {
                        s.log_index = position;
                    }
                }
                st.current_step = Some(index);
            }
            Event::Line { step, text, kind, .. } => {
                let row = match kind {
                    LineKind::Runner if st.quiet_runner => return,
                    LineKind::Output | LineKind::Runner | LineKind::RunnerError => text,
                    LineKind::Group => format!("##[group]{text}"),
                    LineKind::EndGroup => "##[endgroup]".to_owned(),
                    LineKind::Debug if st.show_debug => format!("##[debug]{text}"),
                    LineKind::Debug => return,
                    LineKind::Annotation { level, location, title } => {
                        let level = match level {
                            AnnotationLevel::Error => "error",
                            AnnotationLevel::Warning => "warning",
                            AnnotationLevel::Notice => "notice",
                        };
                        let loc = location.map(|l| format!("{l}: ")).unwrap_or_default();
                        let title = title.map(|t| format!("{t}: ")).unwrap_or_default();
                        format!("##[{level}]{loc}{title}{text}")
                    }
                };
                for line in row.split('\n') {
                    st.push_row(line, step);
                }
            }
            Event::StepFinished { index, conclusion, duration, .. } => {
                crate::metrics::global().step_duration.observe(duration.as_secs_f64());
                let position = st.position();
                if let Some(s) = st.state.steps.get_mut(index) {
                    s.result = conclusion.into();
                    s.stopped_at = Some(types::now());
                    if s.log_length == 0 {
                        s.log_index = position;
                    }
                }
                if st.current_step == Some(index) {
                    st.current_step = None;
                }
            }
            Event::JobFinished { .. } => {
                st.current_step = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::Outcome;

    fn line(step: Option<usize>, text: &str, kind: LineKind) -> Event {
        Event::Line { job: "j".into(), step, text: text.into(), kind }
    }

    #[test]
    fn events_become_rows_and_step_ranges() {
        let client = Arc::new(
            Client::new("http://127.0.0.1:9", "u", "runner-token-xyz", Duration::from_secs(1))
                .unwrap(),
        );
        let r = Reporter::new(client, 7, 3, &["task-token-abc"], false, CancellationToken::new());
        r.log("received task 7");
        r.event(Event::JobStarted { job: "j".into(), runs_on: "x:host".into() });
        r.event(Event::StepStarted { job: "j".into(), index: 0, name: "a".into() });
        r.event(line(Some(0), "out task-token-abc runner-token-xyz\r", LineKind::Output));
        r.event(line(Some(0), "g", LineKind::Group));
        r.event(line(None, "a runner note during the step", LineKind::Runner));
        r.event(line(Some(0), "", LineKind::EndGroup));
        r.event(line(Some(0), "hidden", LineKind::Debug));
        let finished = |index, outcome| Event::StepFinished {
            job: "j".into(),
            index,
            name: "s".into(),
            outcome,
            conclusion: outcome,
            duration: Duration::ZERO,
        };
        r.event(finished(0, Outcome::Success));
        r.event(finished(1, Outcome::Skipped));
        r.event(line(None, "cleaning up", LineKind::Runner));
        let (state, rows, offset) = r.snapshot().unwrap();
        let contents: Vec<&str> = rows.iter().map(|r| r.content.as_str()).collect();
        assert_eq!(
            contents,
            [
                "received task 7",
                "out *** ***",
                "##[group]g",
                "a runner note during the step",
                "##[endgroup]",
                "cleaning up"
            ]
        );
        assert_eq!(offset, 0);
        let ranges: Vec<(i64, i64, TaskResult)> =
            state.steps.iter().map(|s| (s.log_index, s.log_length, s.result)).collect();
        assert_eq!(
            ranges,
            [
                (1, 4, TaskResult::Success),
                (5, 0, TaskResult::Skipped),
                (0, 0, TaskResult::Unspecified)
            ]
        );
        assert!(state.started_at.is_some() && state.steps[0].stopped_at.is_some());
        r.set_outputs([("k".to_owned(), "1".to_owned()), ("k".to_owned(), "2".to_owned())]);
        r.set_outputs([("x".repeat(300), "v".to_owned())]);
        let st = r.state.lock().unwrap();
        assert_eq!(st.outputs.iter().collect::<Vec<_>>(), [(&"k".to_owned(), &"1".to_owned())]);
        assert!(st.rows.last().unwrap().content.contains("over 255 bytes"));
    }
}
