//! How a step shows: a `StepStarted`/`StepFinished` event at the top of the job, a line of the
//! enclosing step inside a composite action (or for `pre:`/`post:` steps). Below `exec`.

use std::time::Duration;

use super::state::{Frame, StepContext};
use crate::output::{Event, LineKind, Outcome};

/// Announces a step: a StepStarted event at the top level, a line inside a composite action.
pub(crate) fn announce(cx: &StepContext, frame: &Frame, index: usize, name: &str) {
    if frame.nested {
        cx.shared.sink.event(Event::Line {
            job: cx.job_name.clone(),
            step: Some(index),
            text: format!("▶ {name}"),
            kind: LineKind::Runner,
        });
    } else {
        cx.shared.sink.event(Event::StepStarted {
            job: cx.job_name.clone(),
            index,
            name: name.to_owned(),
        });
    }
}

/// Reports a finished step: a StepFinished event at the top level, a line inside a composite.
pub(crate) fn report_finished(
    cx: &StepContext,
    frame: &Frame,
    index: usize,
    name: &str,
    outcome: Outcome,
    conclusion: Outcome,
    duration: Duration,
) {
    if frame.nested {
        let mark = match outcome {
            Outcome::Success => "✓",
            Outcome::Failure => "✗",
            Outcome::Cancelled => "⊘",
            Outcome::Skipped => "-",
        };
        cx.shared.sink.event(Event::Line {
            job: cx.job_name.clone(),
            step: Some(index),
            text: format!("{mark} {name} ({outcome}) [{}]", crate::output::fmt_duration(duration)),
            kind: LineKind::Runner,
        });
    } else {
        cx.shared.sink.event(Event::StepFinished {
            job: cx.job_name.clone(),
            index,
            name: name.to_owned(),
            outcome,
            conclusion,
            duration,
        });
    }
}
