//! What a run reports while it goes: job and step lifecycle, log lines and annotations, as a
//! closed enum of events sent to a sink (the console printer of `kiln exec`, the Forgejo
//! reporter of `kiln daemon`).

use std::io::Write;
use std::sync::Mutex;
use std::time::Duration;

use crate::workflow::AnnotationLevel;

/// The outcome of a step or the result of a job, in GitHub's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// It succeeded.
    Success,
    /// It failed.
    Failure,
    /// It was cancelled.
    Cancelled,
    /// Its `if` was false (or a job it needs did not succeed).
    Skipped,
}

impl Outcome {
    /// "success", "failure", "cancelled", "skipped".
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
            Outcome::Cancelled => "cancelled",
            Outcome::Skipped => "skipped",
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What kind of log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineKind {
    /// Output of a step.
    Output,
    /// `::group::title`.
    Group,
    /// `::endgroup::`.
    EndGroup,
    /// `::debug::`, shown only with debug logging.
    Debug,
    /// An annotation.
    Annotation {
        /// error, warning or notice.
        level: AnnotationLevel,
        /// `file:line[:col]` when given.
        location: Option<String>,
        /// Title, when given.
        title: Option<String>,
    },
    /// A message of the runner itself (setup, errors).
    Runner,
    /// A message of the runner about a failure.
    RunnerError,
}

/// One event of a workflow run.
#[derive(Debug, Clone)]
pub enum Event {
    /// A job (one matrix combination) started.
    JobStarted {
        /// Display name: `build (linux, 1)`.
        job: String,
        /// Where it runs: `ubuntu-latest:host`.
        runs_on: String,
    },
    /// A step started.
    StepStarted {
        /// The job's display name.
        job: String,
        /// 0-based index among the job's steps (the server's step index).
        index: usize,
        /// Display name.
        name: String,
    },
    /// A log line (already masked).
    Line {
        /// The job's display name.
        job: String,
        /// The step, when inside one.
        step: Option<usize>,
        /// The text, without line terminator.
        text: String,
        /// What kind of line.
        kind: LineKind,
    },
    /// A step ended.
    StepFinished {
        /// The job's display name.
        job: String,
        /// The step's index.
        index: usize,
        /// Display name.
        name: String,
        /// Outcome before continue-on-error.
        outcome: Outcome,
        /// Conclusion after continue-on-error.
        conclusion: Outcome,
        /// How long it took.
        duration: Duration,
    },
    /// A job ended.
    JobFinished {
        /// The job's display name.
        job: String,
        /// Its result.
        result: Outcome,
        /// How long it took.
        duration: Duration,
    },
}

/// Receives the events of a run.
pub trait EventSink: Send + Sync {
    /// Called for every event, in order per job.
    fn event(&self, event: Event);

    /// A step's plain output lines as one block: `lines` holds whole lines, each ending in a
    /// line feed, already masked. The same as one [`Event::Line`] of [`LineKind::Output`] per
    /// line, which is what the default sends; a sink may take the block at once.
    fn output(&self, job: &str, step: usize, lines: &str) {
        for line in lines.split_terminator('\n') {
            self.event(Event::Line {
                job: job.to_owned(),
                step: Some(step),
                text: line.to_owned(),
                kind: LineKind::Output,
            });
        }
    }

    /// Called after a batch of lines (one chunk of output): a good moment to flush.
    fn flush(&self) {}
}

/// The readable live output of `kiln exec`.
pub struct ConsolePrinter {
    state: Mutex<PrinterState>,
    show_debug: bool,
    color: bool,
}

struct PrinterState {
    out: std::io::BufWriter<std::io::Stdout>,
    annotations: Vec<String>,
    results: Vec<(String, Outcome, Duration)>,
    group_depth: usize,
}

impl ConsolePrinter {
    /// A printer to stdout; `show_debug` shows `::debug::` lines.
    pub fn new(show_debug: bool) -> ConsolePrinter {
        let color = std::env::var_os("NO_COLOR").is_none() && is_terminal();
        ConsolePrinter {
            state: Mutex::new(PrinterState {
                out: std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout()),
                annotations: Vec::new(),
                results: Vec::new(),
                group_depth: 0,
            }),
            show_debug,
            color,
        }
    }

    fn paint(&self, code: &str, s: &str) -> String {
        if self.color { format!("\x1b[{code}m{s}\x1b[0m") } else { s.to_owned() }
    }

    fn mark(&self, o: Outcome) -> String {
        match o {
            Outcome::Success => self.paint("32", "✓"),
            Outcome::Failure => self.paint("31", "✗"),
            Outcome::Cancelled => self.paint("33", "⊘"),
            Outcome::Skipped => self.paint("2", "-"),
        }
    }

    /// Prints the summary: annotations, then one line per job, then the workflow result.
    pub fn summary(&self, result: Outcome, duration: Duration) {
        let Ok(mut st) = self.state.lock() else { return };
        let mut text = String::new();
        if !st.annotations.is_empty() {
            text.push_str("\nAnnotations:\n");
            for a in &st.annotations {
                text.push_str(&format!("  {a}\n"));
            }
        }
        text.push_str("\nJobs:\n");
        for (job, outcome, d) in &st.results {
            text.push_str(&format!(
                "  {} {job} ({}) [{}]\n",
                self.mark(*outcome),
                outcome,
                fmt_duration(*d)
            ));
        }
        text.push_str(&format!("\nWorkflow {} in {}\n", result, fmt_duration(duration)));
        let _ = st.out.write_all(text.as_bytes());
        let _ = st.out.flush();
    }
}

fn is_terminal() -> bool {
    use std::io::IsTerminal;
    std::io::stdout().is_terminal()
}

/// `12ms`, `1.52s`, `2m03s`.
pub fn fmt_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.2}s", d.as_secs_f64())
    } else {
        format!("{}m{:02}s", ms / 60_000, (ms / 1000) % 60)
    }
}

impl EventSink for ConsolePrinter {
    fn event(&self, event: Event) {
        let Ok(mut st) = self.state.lock() else { return };
        let st = &mut *st;
        let is_line = matches!(event, Event::Line { .. });
        // The hot path (a step's output line) is written in pieces, with no allocation.
        if let Event::Line { job, text, kind: LineKind::Output, .. } = &event {
            let out = &mut st.out;
            let _ = out.write_all(b"[");
            let _ = out.write_all(job.as_bytes());
            let _ = out.write_all(b"] ");
            for _ in 0..=st.group_depth {
                let _ = out.write_all(b"  ");
            }
            let _ = out.write_all(text.as_bytes());
            let _ = out.write_all(b"\n");
            return;
        }
        let line = match event {
            Event::JobStarted { job, runs_on } => {
                format!(
                    "{} {} {}\n",
                    self.paint("1", &format!("[{job}]")),
                    self.paint("36", "▶ Job"),
                    self.paint("2", &format!("on {runs_on}"))
                )
            }
            Event::StepStarted { job, name, .. } => {
                st.group_depth = 0;
                format!("[{job}] {} {name}\n", self.paint("36", "▶"))
            }
            Event::Line { job, text, kind, .. } => {
                let indent = "  ".repeat(st.group_depth + 1);
                match kind {
                    LineKind::Output => format!("[{job}] {indent}{text}\n"),
                    LineKind::Group => {
                        let l = format!("[{job}] {indent}{} {text}\n", self.paint("1", "▼"));
                        st.group_depth += 1;
                        l
                    }
                    LineKind::EndGroup => {
                        st.group_depth = st.group_depth.saturating_sub(1);
                        String::new()
                    }
                    LineKind::Debug if !self.show_debug => String::new(),
                    LineKind::Debug => {
                        format!("[{job}] {indent}{}\n", self.paint("2", &format!("debug: {text}")))
                    }
                    LineKind::Annotation { level, location, title } => {
                        let level = match level {
                            AnnotationLevel::Error => "error",
                            AnnotationLevel::Warning => "warning",
                            AnnotationLevel::Notice => "notice",
                        };
                        let loc = location.map(|l| format!(" {l}")).unwrap_or_default();
                        let title = title.map(|t| format!(" {t}:")).unwrap_or_default();
                        let a = format!("{level}{loc}:{title} {text} ({job})");
                        st.annotations.push(a);
                        let color = if level == "error" { "31" } else { "33" };
                        format!(
                            "[{job}] {indent}{}\n",
                            self.paint(color, &format!("{level}{loc}:{title} {text}"))
                        )
                    }
                    LineKind::Runner => format!("[{job}] {indent}{}\n", self.paint("2", &text)),
                    LineKind::RunnerError => {
                        format!("[{job}] {indent}{}\n", self.paint("31", &text))
                    }
                }
            }
            Event::StepFinished { job, name, outcome, conclusion, duration, .. } => {
                let extra = if outcome != conclusion { " (continue-on-error)" } else { "" };
                let mark = self.mark(outcome);
                if outcome == Outcome::Skipped {
                    format!("[{job}] {mark} {name} {}\n", self.paint("2", "(skipped)"))
                } else {
                    format!(
                        "[{job}] {mark} {name} {}{extra}\n",
                        self.paint("2", &format!("[{}]", fmt_duration(duration)))
                    )
                }
            }
            Event::JobFinished { job, result, duration } => {
                st.results.push((job.clone(), result, duration));
                format!(
                    "[{job}] {} Job {result} {}\n",
                    self.mark(result),
                    self.paint("2", &format!("[{}]", fmt_duration(duration)))
                )
            }
        };
        if line.is_empty() {
            return;
        }
        let _ = st.out.write_all(line.as_bytes());
        if !is_line {
            let _ = st.out.flush();
        }
    }

    fn output(&self, job: &str, _step: usize, lines: &str) {
        let Ok(mut st) = self.state.lock() else { return };
        let st = &mut *st;
        let indent = st.group_depth + 1;
        let out = &mut st.out;
        for line in lines.split_terminator('\n') {
            let _ = out.write_all(b"[");
            let _ = out.write_all(job.as_bytes());
            let _ = out.write_all(b"] ");
            for _ in 0..indent {
                let _ = out.write_all(b"  ");
            }
            let _ = out.write_all(line.as_bytes());
            let _ = out.write_all(b"\n");
        }
    }

    fn flush(&self) {
        if let Ok(mut st) = self.state.lock() {
            let _ = st.out.flush();
        }
    }
}
