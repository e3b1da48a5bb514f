//! Semantic checks of a parsed workflow, and the job dependency graph (`needs`).

use indexmap::{IndexMap, IndexSet};

use super::error::Error;
use super::model::{Job, Workflow};
use super::shell::shell_command;
use super::yaml::join;

/// Checks a workflow; returns every problem found, in source order.
pub fn validate(wf: &Workflow) -> Result<(), Vec<Error>> {
    let mut errs = Vec::new();
    let at = |(line, col): (u32, u32), path: &str, message: String| Error {
        file: wf.file.clone(),
        line: (line > 0).then_some(line),
        column: (line > 0 && col > 0).then_some(col),
        path: path.to_string(),
        message,
    };
    let err = |line: u32, path: &str, message: String| at((line, 0), path, message);
    match &wf.on {
        None => errs.push(err(
            1,
            "on",
            "missing `on`; add the events that trigger the workflow, e.g. `on: push`".into(),
        )),
        Some(t) if t.events.is_empty() => errs.push(err(
            wf.on_line,
            "on",
            "no events in `on`; add at least one event, e.g. `on: push`".into(),
        )),
        Some(_) => {}
    }
    if let Some(shell) =
        wf.defaults.as_ref().and_then(|d| d.run.as_ref()).and_then(|r| r.shell.as_deref())
        && !shell.contains("${{")
        && let Err(e) = shell_command(Some(shell), true)
    {
        errs.push(err(0, "defaults.run.shell", e.message));
    }
    for (id, job) in &wf.jobs {
        let path = join("jobs", id);
        if !valid_job_id(id) {
            errs.push(err(
                job.line,
                &path,
                format!("invalid job id `{id}`; job ids must start with a letter or `_` and contain only letters, digits, `-` and `_`"),
            ));
        }
        for (i, need) in job.needs.iter().enumerate() {
            if !wf.jobs.contains_key(need) {
                errs.push(at(
                    job.needs_pos.get(i).copied().unwrap_or((job.line, 0)),
                    &format!("{path}.needs"),
                    format!("job `{id}` needs `{need}`, which does not exist; fix the name or add the job"),
                ));
            }
        }
        check_job_shape(id, job, &path, &mut |p, m| {
            let pos = if p.ends_with(".uses") && job.uses_pos.0 > 0 {
                job.uses_pos
            } else {
                (job.line, 0)
            };
            errs.push(at(pos, p, m))
        });
        if let Some(uses) = &job.uses
            && let Err(m) = check_job_uses(uses)
        {
            errs.push(at(job.uses_pos, &format!("{path}.uses"), m));
        }
        let mut ids = IndexSet::new();
        for (i, step) in job.steps.iter().flatten().enumerate() {
            let spath = format!("{path}.steps[{i}]");
            if let Some(sid) = &step.id
                && !ids.insert(sid.as_str())
            {
                errs.push(err(
                    step.line,
                    &format!("{spath}.id"),
                    format!(
                        "step id `{sid}` is used twice in job `{id}`; give each step a unique id"
                    ),
                ));
            }
            if let Some(uses) = &step.uses
                && let Err(m) = check_uses(uses)
            {
                errs.push(at(step.uses_pos, &format!("{spath}.uses"), m));
            }
            if let Some(shell) = &step.shell
                && !shell.contains("${{")
                && let Err(e) = shell_command(Some(shell), true)
            {
                errs.push(err(
                    step.line,
                    &format!("{spath}.shell"),
                    format!("step {i} of job `{id}`: {}", e.message),
                ));
            }
        }
    }
    // Missing needs are reported above; cycles among the known ones here.
    if let Err(e) = stages(wf, &job_graph(wf)) {
        errs.push(e);
    }
    if errs.is_empty() { Ok(()) } else { Err(errs) }
}

fn check_job_shape(id: &str, job: &Job, path: &str, push: &mut dyn FnMut(&str, String)) {
    match (&job.steps, &job.uses) {
        (Some(_), Some(_)) => push(
            path,
            format!(
                "job `{id}` has both `steps` and `uses`; a job either runs steps or calls a reusable workflow"
            ),
        ),
        (None, None) => {
            push(path, format!("job `{id}` has neither `steps` nor `uses`; add `steps:`"))
        }
        (None, Some(uses)) => {
            for (set, key) in [
                (job.runs_on.is_some(), "runs-on"),
                (job.container.is_some(), "container"),
                (!job.services.is_empty(), "services"),
                (!job.env.is_empty(), "env"),
                (job.defaults.is_some(), "defaults"),
                (job.timeout_minutes.is_some(), "timeout-minutes"),
                (job.continue_on_error.is_some(), "continue-on-error"),
                (job.environment.is_some(), "environment"),
            ] {
                if set {
                    push(
                        &format!("{path}.{key}"),
                        format!(
                            "job `{id}` calls a reusable workflow and cannot set `{key}`; remove it or move it into the called workflow"
                        ),
                    );
                }
            }
            if uses.trim().is_empty() {
                push(
                    &format!("{path}.uses"),
                    format!("job `{id}` has an empty `uses`; name a workflow file"),
                );
            }
        }
        (Some(_), None) => {
            if job.runs_on.is_none() {
                push(
                    &format!("{path}.runs-on"),
                    format!("job `{id}` has no `runs-on`; add e.g. `runs-on: ubuntu-latest`"),
                );
            }
            if !job.with.is_empty() {
                push(
                    &format!("{path}.with"),
                    format!(
                        "job `{id}` has `with` but no `uses`; `with` is for reusable workflow calls"
                    ),
                );
            }
            if job.secrets.is_some() {
                push(
                    &format!("{path}.secrets"),
                    format!(
                        "job `{id}` has `secrets` but no `uses`; `secrets` is for reusable workflow calls"
                    ),
                );
            }
        }
    }
}

/// Whether `id` is a valid job id: `^[A-Za-z_][A-Za-z0-9_-]*$`.
pub fn valid_job_id(id: &str) -> bool {
    let mut chars = id.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Checks a job's `uses` (a reusable workflow): `./path`, `$/path` (the workflow's own
/// repository at the same commit) or `owner/repo/path@ref`.
pub fn check_job_uses(uses: &str) -> Result<(), String> {
    let u = uses.trim();
    if u.is_empty() || u.contains("${{") || u.starts_with("./") {
        return Ok(());
    }
    if let Some(rel) = u.strip_prefix("$/") {
        return if rel.is_empty() || rel.contains('@') {
            Err(format!(
                "invalid `uses: {uses}`; `$/` names a file of this repository at this commit, so it takes no `@ref`: write `$/.github/workflows/<file>.yml`"
            ))
        } else {
            Ok(())
        };
    }
    check_uses(u)
}

/// Checks a step's `uses`: `./local/path`, `$/path` (the workflow's own repository at the same
/// commit), `docker://image`, or `owner/repo[/path]@ref`.
pub fn check_uses(uses: &str) -> Result<(), String> {
    let u = uses.trim();
    if let Some(rel) = u.strip_prefix("$/") {
        return if rel.contains('@') {
            Err(format!(
                "invalid `uses: {uses}`; `$/` names a path of this repository at this commit, so it takes no `@ref`: write `$/path/to/action`"
            ))
        } else {
            Ok(())
        };
    }
    if u.contains("${{")
        || u.starts_with("./")
        || u.starts_with(".\\")
        || u.starts_with("docker://")
    {
        return Ok(());
    }
    let bad = || {
        format!(
            "invalid `uses: {uses}`; expected `{{owner}}/{{repo}}[/path]@{{ref}}`, `./local/path`, `$/path` or `docker://image`"
        )
    };
    if u.starts_with("http://") || u.starts_with("https://") {
        // Forgejo/Gitea accept a full URL to an action repository.
        return if u.contains('@') { Ok(()) } else { Err(bad()) };
    }
    let Some((repo, git_ref)) = u.rsplit_once('@') else { return Err(bad()) };
    let mut parts = repo.split('/');
    let owner = parts.next().unwrap_or("");
    let name = parts.next().unwrap_or("");
    if owner.is_empty() || name.is_empty() || git_ref.is_empty() || parts.any(str::is_empty) {
        return Err(bad());
    }
    Ok(())
}

/// The `needs` graph: for each job (source order), the jobs it needs and the jobs that need it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct JobGraph {
    pub dependencies: IndexMap<String, Vec<String>>,
    pub dependents: IndexMap<String, Vec<String>>,
}

/// Builds the dependency graph; unknown `needs` entries are left out (validation reports them).
pub fn job_graph(wf: &Workflow) -> JobGraph {
    let mut g = JobGraph::default();
    for id in wf.jobs.keys() {
        g.dependencies.insert(id.clone(), Vec::new());
        g.dependents.insert(id.clone(), Vec::new());
    }
    for (id, job) in &wf.jobs {
        for need in &job.needs {
            if !wf.jobs.contains_key(need) {
                continue;
            }
            let deps = g.dependencies.entry(id.clone()).or_default();
            if !deps.contains(need) {
                deps.push(need.clone());
                g.dependents.entry(need.clone()).or_default().push(id.clone());
            }
        }
    }
    g
}

/// Jobs in dependency stages: every job of a stage needs only jobs of earlier stages; jobs keep
/// source order within a stage. Fails on an unknown `needs` or a cycle, naming it.
pub fn needs_order(wf: &Workflow) -> Result<Vec<Vec<String>>, Error> {
    let located = |id: &str, message: String| Error {
        file: wf.file.clone(),
        line: wf.jobs.get(id).map(|j| j.line).filter(|l| *l > 0),
        column: None,
        path: join(&join("jobs", id), "needs"),
        message,
    };
    for (id, job) in &wf.jobs {
        for need in &job.needs {
            if !wf.jobs.contains_key(need) {
                return Err(located(
                    id,
                    format!(
                        "job `{id}` needs `{need}`, which does not exist; fix the name or add the job"
                    ),
                ));
            }
        }
    }
    stages(wf, &job_graph(wf))
}

fn stages(wf: &Workflow, g: &JobGraph) -> Result<Vec<Vec<String>>, Error> {
    let mut done: IndexSet<&str> = IndexSet::new();
    let mut stages = Vec::new();
    while done.len() < g.dependencies.len() {
        let stage: Vec<String> = g
            .dependencies
            .iter()
            .filter(|(id, deps)| {
                !done.contains(id.as_str()) && deps.iter().all(|d| done.contains(d.as_str()))
            })
            .map(|(id, _)| id.clone())
            .collect();
        if stage.is_empty() {
            let cycle = find_cycle(g, &done);
            let first = cycle.first().cloned().unwrap_or_default();
            return Err(Error {
                file: wf.file.clone(),
                line: wf.jobs.get(&first).map(|j| j.line).filter(|l| *l > 0),
                column: None,
                path: join(&join("jobs", &first), "needs"),
                message: format!(
                    "jobs form a dependency cycle: {} (each needs the next); remove one of these `needs`",
                    cycle.join(" -> ")
                ),
            });
        }
        for id in &stage {
            if let Some((k, _)) = g.dependencies.get_key_value(id.as_str()) {
                done.insert(k.as_str());
            }
        }
        stages.push(stage);
    }
    Ok(stages)
}

/// A cycle among the jobs not yet `done`, as `a -> b -> a`.
fn find_cycle(g: &JobGraph, done: &IndexSet<&str>) -> Vec<String> {
    let Some(start) = g.dependencies.keys().find(|k| !done.contains(k.as_str())) else {
        return Vec::new();
    };
    // Follow unfinished dependencies until a job repeats: every remaining job has one.
    let mut path: Vec<&str> = vec![start.as_str()];
    loop {
        let Some(cur) = path.last().copied() else { return Vec::new() };
        let next = g
            .dependencies
            .get(cur)
            .and_then(|deps| deps.iter().find(|d| !done.contains(d.as_str())));
        let Some(next) = next else { return path.iter().map(|s| s.to_string()).collect() };
        if let Some(pos) = path.iter().position(|p| *p == next.as_str()) {
            let mut cycle: Vec<String> = path[pos..].iter().map(|s| s.to_string()).collect();
            cycle.push(next.clone());
            return cycle;
        }
        path.push(next.as_str());
    }
}
