//! Tests of the workflow model: data-driven snapshots of parsed models and error texts.

use std::fmt::Write as _;

use expect_test::Expect;

use super::{Action, Env, Job, Runs, Step, Workflow, parse_action, parse_workflow, validate};

mod action;
mod commands;
mod corpus;
mod envfile;
mod forgejo_syntax;
mod lint;
mod matrix;
mod shell;
mod validation;
mod workflow;

macro_rules! field {
    ($out:expr, $ind:expr, $name:expr, $v:expr) => {
        if let Some(v) = &$v {
            writeln!($out, "{}{}: {:?}", $ind, $name, v).unwrap();
        }
    };
}

fn env_str(env: &Env) -> Option<String> {
    match env {
        Env::Map(m) if m.is_empty() => None,
        Env::Map(m) => Some(format!("{m:?}")),
        Env::Expr(e) => Some(format!("expr {e:?}")),
    }
}

fn show_step(out: &mut String, ind: &str, s: &Step) {
    writeln!(out, "{ind}- step @{}", s.line).unwrap();
    let ind = format!("{ind}  ");
    field!(out, ind, "id", s.id);
    field!(out, ind, "if", s.if_);
    field!(out, ind, "name", s.name);
    field!(out, ind, "uses", s.uses);
    field!(out, ind, "run", s.run);
    field!(out, ind, "shell", s.shell);
    field!(out, ind, "working-directory", s.working_directory);
    if let Some(e) = env_str(&s.env) {
        writeln!(out, "{ind}env: {e}").unwrap();
    }
    field!(out, ind, "with", (!s.with.is_empty()).then_some(&s.with));
    field!(out, ind, "continue-on-error", s.continue_on_error);
    field!(out, ind, "timeout-minutes", s.timeout_minutes);
}

fn show_job(out: &mut String, id: &str, j: &Job) {
    writeln!(out, "job {id} @{}", j.line).unwrap();
    let ind = "  ";
    field!(out, ind, "name", j.name);
    field!(out, ind, "needs", (!j.needs.is_empty()).then_some(&j.needs));
    field!(out, ind, "if", j.if_);
    field!(out, ind, "runs-on", j.runs_on);
    field!(out, ind, "environment", j.environment);
    field!(out, ind, "concurrency", j.concurrency);
    field!(out, ind, "outputs", (!j.outputs.is_empty()).then_some(&j.outputs));
    if let Some(e) = env_str(&j.env) {
        writeln!(out, "{ind}env: {e}").unwrap();
    }
    field!(out, ind, "defaults", j.defaults);
    field!(out, ind, "timeout-minutes", j.timeout_minutes);
    field!(out, ind, "cancel-timeout-minutes", j.cancel_timeout_minutes);
    if let Some(s) = &j.strategy {
        field!(out, ind, "matrix", s.matrix.as_ref().map(|m| m.to_string()));
        field!(out, ind, "fail-fast", s.fail_fast);
        field!(out, ind, "max-parallel", s.max_parallel);
    }
    field!(out, ind, "continue-on-error", j.continue_on_error);
    field!(out, ind, "container", j.container);
    field!(out, ind, "services", (!j.services.is_empty()).then_some(&j.services));
    field!(out, ind, "uses", j.uses);
    field!(out, ind, "with", (!j.with.is_empty()).then_some(&j.with));
    field!(out, ind, "secrets", j.secrets);
    field!(out, ind, "permissions", j.permissions);
    if let Some(steps) = &j.steps {
        writeln!(out, "  steps:").unwrap();
        for s in steps {
            show_step(out, "  ", s);
        }
    }
}

pub(super) fn show_workflow(wf: &Workflow) -> String {
    let mut out = String::new();
    field!(out, "", "name", wf.name);
    field!(out, "", "description", wf.description);
    field!(out, "", "enable-email-notifications", wf.enable_email_notifications);
    field!(out, "", "run-name", wf.run_name);
    match &wf.on {
        None => writeln!(out, "on: <missing>").unwrap(),
        Some(t) => {
            for (name, ev) in &t.events {
                write!(out, "on {name}").unwrap();
                if !ev.config.is_null() {
                    write!(out, " {}", ev.config).unwrap();
                }
                writeln!(out).unwrap();
                for (iname, i) in &ev.inputs {
                    writeln!(out, "  input {iname}: {i:?}").unwrap();
                }
                for (oname, o) in &ev.outputs {
                    writeln!(out, "  output {oname}: {o:?}").unwrap();
                }
                for (sname, s) in &ev.secrets {
                    writeln!(out, "  secret {sname}: {s:?}").unwrap();
                }
            }
        }
    }
    if let Some(e) = env_str(&wf.env) {
        writeln!(out, "env: {e}").unwrap();
    }
    field!(out, "", "defaults", wf.defaults);
    field!(out, "", "concurrency", wf.concurrency);
    field!(out, "", "permissions", wf.permissions);
    for (id, j) in &wf.jobs {
        show_job(&mut out, id, j);
    }
    out
}

pub(super) fn show_action(a: &Action) -> String {
    let mut out = String::new();
    field!(out, "", "name", a.name);
    field!(out, "", "description", a.description);
    field!(out, "", "author", a.author);
    for (n, i) in &a.inputs {
        writeln!(out, "input {n}: {i:?}").unwrap();
    }
    for (n, o) in &a.outputs {
        writeln!(out, "output {n}: {o:?}").unwrap();
    }
    match &a.runs {
        Runs::Composite { steps } => {
            writeln!(out, "runs composite").unwrap();
            for s in steps {
                show_step(&mut out, "", s);
            }
        }
        Runs::Node(n) => writeln!(out, "runs {n:?}").unwrap(),
        Runs::Docker(d) => writeln!(out, "runs {d:?}").unwrap(),
    }
    out
}

/// Parses a workflow and snapshots the model, or the error.
pub(super) fn check(yaml: &str, expect: Expect) {
    let actual = match parse_workflow(yaml, "wf.yml") {
        Ok(wf) => show_workflow(&wf),
        Err(e) => format!("error: {e}\n"),
    };
    expect.assert_eq(&actual);
}

/// Parses and validates a workflow; snapshots "ok" or the errors.
pub(super) fn check_valid(yaml: &str, expect: Expect) {
    let actual = match parse_workflow(yaml, "wf.yml") {
        Ok(wf) => match validate(&wf) {
            Ok(()) => "ok\n".to_string(),
            Err(errs) => errs.iter().map(|e| format!("{e}\n")).collect(),
        },
        Err(e) => format!("parse error: {e}\n"),
    };
    expect.assert_eq(&actual);
}

/// Parses an action manifest and snapshots the model, or the error.
pub(super) fn check_action(yaml: &str, expect: Expect) {
    let actual = match parse_action(yaml, "action.yml") {
        Ok(a) => show_action(&a),
        Err(e) => format!("error: {e}\n"),
    };
    expect.assert_eq(&actual);
}
