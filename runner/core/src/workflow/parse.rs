//! Workflow YAML → [`Workflow`]: strict at workflow, job and step level, with located errors.

use indexmap::IndexMap;

use super::error::Error;
use super::model::{
    CallOutput, CallSecret, Concurrency, Container, Credentials, Defaults, Env, Environment, Event,
    Input, InputType, Job, JobSecrets, Permissions, RunDefaults, RunsOn, Step, Strategy, Triggers,
    Workflow,
};
use super::yaml::{Ctx, Kind, Node, from_yaml, join};

const WORKFLOW_KEYS: &[&str] = &[
    "name",
    "description",
    "enable-email-notifications",
    "run-name",
    "on",
    "env",
    "defaults",
    "concurrency",
    "permissions",
    "jobs",
];
const JOB_KEYS: &[&str] = &[
    "name",
    "needs",
    "permissions",
    "if",
    "runs-on",
    "environment",
    "concurrency",
    "outputs",
    "env",
    "defaults",
    "steps",
    "timeout-minutes",
    "cancel-timeout-minutes",
    "strategy",
    "continue-on-error",
    "container",
    "services",
    "uses",
    "with",
    "secrets",
];
pub(crate) const STEP_KEYS: &[&str] = &[
    "id",
    "if",
    "name",
    "uses",
    "run",
    "shell",
    "working-directory",
    "env",
    "with",
    "continue-on-error",
    "timeout-minutes",
];

/// Parses a workflow file. `file` is used in error messages only.
pub fn parse_workflow(text: &str, file: &str) -> Result<Workflow, Error> {
    let root = from_yaml(text, file)?;
    parse_root(&Ctx { file, unknown_keys: None }, &root)
}

/// Converts a workflow's YAML tree to the model; stops at the first error.
pub(crate) fn parse_root(cx: &Ctx<'_>, root: &Node) -> Result<Workflow, Error> {
    let file = cx.file;
    let cx = *cx;
    if root.is_null() {
        return Err(cx.err(root, "", "the workflow is empty; add `on:` and `jobs:`"));
    }
    let f = cx.fields(root, "", "a workflow", WORKFLOW_KEYS)?;
    let mut wf = Workflow { file: file.to_string(), ..Workflow::default() };
    wf.name = cx.opt_string(f.get("name"), "name")?;
    wf.description = cx.opt_string(f.get("description"), "description")?;
    if let Some(n) = f.get("enable-email-notifications") {
        wf.enable_email_notifications = Some(cx.boolean(n, "enable-email-notifications")?);
    }
    wf.run_name = cx.opt_string(f.get("run-name"), "run-name")?;
    if let Some(on) = f.get("on") {
        wf.on = Some(parse_triggers(&cx, on)?);
        wf.on_line = f.entries.iter().find(|(k, _, _)| k == "on").map_or(0, |(_, k, _)| k.line);
    }
    if let Some(n) = f.get("env") {
        wf.env = parse_env(&cx, n, "env")?;
    }
    if let Some(n) = f.get("defaults") {
        wf.defaults = parse_defaults(&cx, n, "defaults")?;
    }
    if let Some(n) = f.get("concurrency") {
        wf.concurrency = parse_concurrency(&cx, n, "concurrency")?;
    }
    if let Some(n) = f.get("permissions") {
        wf.permissions = Some(parse_permissions(&cx, n, "permissions")?);
    }
    match f.get("jobs") {
        None => {
            return Err(cx.err(
                root,
                "",
                "missing `jobs`; add a `jobs:` map with at least one job",
            ));
        }
        Some(jobs) if jobs.is_null() => {
            return Err(cx.err(jobs, "jobs", "`jobs` is empty; add at least one job"));
        }
        Some(jobs) => {
            for (id, knode, jnode) in cx.map(jobs, "jobs")? {
                let path = join("jobs", &id);
                let mut job = parse_job(&cx, jnode, &path, &id)?;
                job.line = knode.line;
                wf.jobs.insert(id, job);
            }
        }
    }
    Ok(wf)
}

fn parse_triggers(cx: &Ctx<'_>, node: &Node) -> Result<Triggers, Error> {
    let mut t = Triggers::default();
    match &node.kind {
        Kind::Str(_) | Kind::Seq(_) => {
            for name in cx.string_list(node, "on")? {
                t.events.insert(name, Event::default());
            }
        }
        Kind::Map(_) => {
            for (name, _, cfg) in cx.map(node, "on")? {
                let path = join("on", &name);
                let event = parse_event(cx, &name, cfg, &path)?;
                t.events.insert(name, event);
            }
        }
        _ => {
            return Err(cx.err(
                node,
                "on",
                format!(
                    "expected an event name, a list or a map, found {}; write e.g. `on: push`",
                    node.type_name()
                ),
            ));
        }
    }
    Ok(t)
}

fn parse_event(cx: &Ctx<'_>, name: &str, cfg: &Node, path: &str) -> Result<Event, Error> {
    let mut ev = Event { config: cfg.to_json(), ..Event::default() };
    if cfg.is_null() {
        return Ok(ev);
    }
    match name {
        "workflow_dispatch" => {
            let f = cx.fields(cfg, path, "`workflow_dispatch`", &["inputs"])?;
            if let Some(n) = f.get("inputs") {
                ev.inputs = parse_inputs(cx, n, &join(path, "inputs"))?;
            }
        }
        "workflow_call" => {
            let f = cx.fields(cfg, path, "`workflow_call`", &["inputs", "outputs", "secrets"])?;
            if let Some(n) = f.get("inputs") {
                ev.inputs = parse_inputs(cx, n, &join(path, "inputs"))?;
            }
            if let Some(n) = f.get("outputs").filter(|n| !n.is_null()) {
                let p = join(path, "outputs");
                for (oname, _, o) in cx.map(n, &p)? {
                    let op = join(&p, &oname);
                    let of =
                        cx.fields(o, &op, "a workflow_call output", &["description", "value"])?;
                    let value = match of.get("value") {
                        Some(v) => cx.string(v, &join(&op, "value"))?,
                        None => {
                            return Err(cx.err(
                                o,
                                &op,
                                "missing `value`; add `value: ${{ jobs.<id>.outputs.<name> }}`",
                            ));
                        }
                    };
                    let description =
                        cx.opt_string(of.get("description"), &join(&op, "description"))?;
                    ev.outputs.insert(oname, CallOutput { description, value });
                }
            }
            if let Some(n) = f.get("secrets").filter(|n| !n.is_null()) {
                let p = join(path, "secrets");
                for (sname, _, s) in cx.map(n, &p)? {
                    let sp = join(&p, &sname);
                    let mut secret = CallSecret::default();
                    if !s.is_null() {
                        let sf = cx.fields(
                            s,
                            &sp,
                            "a workflow_call secret",
                            &["description", "required"],
                        )?;
                        secret.description =
                            cx.opt_string(sf.get("description"), &join(&sp, "description"))?;
                        if let Some(r) = sf.get("required") {
                            secret.required = cx.boolean(r, &join(&sp, "required"))?;
                        }
                    }
                    ev.secrets.insert(sname, secret);
                }
            }
        }
        _ => {}
    }
    Ok(ev)
}

fn parse_inputs(cx: &Ctx<'_>, node: &Node, path: &str) -> Result<IndexMap<String, Input>, Error> {
    let mut out = IndexMap::new();
    if node.is_null() {
        return Ok(out);
    }
    for (name, _, n) in cx.map(node, path)? {
        let p = join(path, &name);
        let mut input = Input::default();
        if !n.is_null() {
            let f = cx.fields(
                n,
                &p,
                "an input",
                &["description", "type", "required", "default", "options"],
            )?;
            input.description = cx.opt_string(f.get("description"), &join(&p, "description"))?;
            if let Some(r) = f.get("required") {
                input.required = cx.boolean(r, &join(&p, "required"))?;
            }
            if let Some(d) = f.get("default").filter(|d| !d.is_null()) {
                input.default = Some(d.to_json());
            }
            if let Some(t) = f.get("type") {
                let tp = join(&p, "type");
                input.type_ = match cx.string(t, &tp)?.as_str() {
                    "string" => InputType::String,
                    "boolean" => InputType::Boolean,
                    "number" => InputType::Number,
                    "choice" => InputType::Choice,
                    "environment" => InputType::Environment,
                    other => {
                        return Err(cx.err(
                            t,
                            &tp,
                            format!("unknown input type `{other}`; use one of: string, boolean, number, choice, environment"),
                        ));
                    }
                };
            }
            if let Some(o) = f.get("options") {
                input.options = cx.string_list(o, &join(&p, "options"))?;
            }
        }
        out.insert(name, input);
    }
    Ok(out)
}

pub(crate) fn parse_env(cx: &Ctx<'_>, node: &Node, path: &str) -> Result<Env, Error> {
    match &node.kind {
        Kind::Str(s) => Ok(Env::Expr(s.clone())),
        Kind::Null | Kind::Map(_) => cx.string_map(node, path).map(Env::Map),
        _ => Err(cx.err(
            node,
            path,
            format!("expected a map of variables or a `${{{{ }}}}` expression, found {}; write `NAME: value` lines", node.type_name()),
        )),
    }
}

fn parse_defaults(cx: &Ctx<'_>, node: &Node, path: &str) -> Result<Option<Defaults>, Error> {
    if node.is_null() {
        return Ok(None);
    }
    let f = cx.fields(node, path, "`defaults`", &["run"])?;
    let mut d = Defaults::default();
    if let Some(run) = f.get("run").filter(|n| !n.is_null()) {
        let p = join(path, "run");
        let rf = cx.fields(run, &p, "`defaults.run`", &["shell", "working-directory"])?;
        d.run = Some(RunDefaults {
            shell: cx.opt_string(rf.get("shell"), &join(&p, "shell"))?,
            working_directory: cx
                .opt_string(rf.get("working-directory"), &join(&p, "working-directory"))?,
        });
    }
    Ok(Some(d))
}

fn parse_concurrency(cx: &Ctx<'_>, node: &Node, path: &str) -> Result<Option<Concurrency>, Error> {
    match &node.kind {
        Kind::Null => Ok(None),
        Kind::Map(_) => {
            let f = cx.fields(node, path, "`concurrency`", &["group", "cancel-in-progress"])?;
            let group = match f.get("group") {
                Some(g) => cx.string(g, &join(path, "group"))?,
                None => return Err(cx.err(node, path, "missing `group`; add `group: <name>`")),
            };
            let cancel_in_progress = match f.get("cancel-in-progress") {
                Some(c) => Some(cx.bool_or_expr(c, &join(path, "cancel-in-progress"))?),
                None => None,
            };
            Ok(Some(Concurrency { group, cancel_in_progress }))
        }
        _ => Ok(Some(Concurrency { group: cx.string(node, path)?, cancel_in_progress: None })),
    }
}

fn parse_permissions(cx: &Ctx<'_>, node: &Node, path: &str) -> Result<Permissions, Error> {
    match &node.kind {
        Kind::Map(_) | Kind::Null => cx.string_map(node, path).map(Permissions::Map),
        _ => cx.string(node, path).map(Permissions::All),
    }
}

fn parse_job(cx: &Ctx<'_>, node: &Node, path: &str, id: &str) -> Result<Job, Error> {
    if node.is_null() {
        return Err(cx.err(node, path, format!("job `{id}` is empty; add `runs-on` and `steps`")));
    }
    let f = cx.fields(node, path, "a job", JOB_KEYS)?;
    let p = |k: &str| join(path, k);
    let mut job = Job { name: cx.opt_string(f.get("name"), &p("name"))?, ..Job::default() };
    if let Some(n) = f.get("needs") {
        job.needs = cx.string_list(n, &p("needs"))?;
        job.needs_pos = match &n.kind {
            Kind::Seq(items) => items.iter().map(|i| (i.line, i.col)).collect(),
            _ => vec![(n.line, n.col); job.needs.len()],
        };
    }
    job.if_ = cx.opt_string(f.get("if"), &p("if"))?;
    if let Some(n) = f.get("runs-on") {
        job.runs_on = parse_runs_on(cx, n, &p("runs-on"))?;
    }
    if let Some(n) = f.get("environment") {
        job.environment = parse_environment(cx, n, &p("environment"))?;
    }
    if let Some(n) = f.get("concurrency") {
        job.concurrency = parse_concurrency(cx, n, &p("concurrency"))?;
    }
    if let Some(n) = f.get("outputs") {
        job.outputs = cx.string_map(n, &p("outputs"))?;
    }
    if let Some(n) = f.get("env") {
        job.env = parse_env(cx, n, &p("env"))?;
    }
    if let Some(n) = f.get("defaults") {
        job.defaults = parse_defaults(cx, n, &p("defaults"))?;
    }
    if let Some(n) = f.get("steps") {
        job.steps = Some(parse_steps(cx, n, &p("steps"), &format!("job `{id}`"))?);
    }
    if let Some(n) = f.get("timeout-minutes") {
        job.timeout_minutes = Some(cx.number_or_expr(n, &p("timeout-minutes"))?);
    }
    if let Some(n) = f.get("cancel-timeout-minutes") {
        job.cancel_timeout_minutes = Some(cx.number_or_expr(n, &p("cancel-timeout-minutes"))?);
    }
    if let Some(n) = f.get("strategy") {
        job.strategy = parse_strategy(cx, n, &p("strategy"))?;
    }
    if let Some(n) = f.get("continue-on-error") {
        job.continue_on_error = Some(cx.bool_or_expr(n, &p("continue-on-error"))?);
    }
    if let Some(n) = f.get("container").filter(|n| !n.is_null()) {
        job.container = Some(parse_container(cx, n, &p("container"))?);
    }
    if let Some(n) = f.get("services").filter(|n| !n.is_null()) {
        let sp = p("services");
        for (name, _, s) in cx.map(n, &sp)? {
            let c = parse_container(cx, s, &join(&sp, &name))?;
            job.services.insert(name, c);
        }
    }
    job.uses = cx.opt_string(f.get("uses"), &p("uses"))?;
    job.uses_pos = f.get("uses").map_or((0, 0), |n| (n.line, n.col));
    if let Some(n) = f.get("with").filter(|n| !n.is_null()) {
        for (k, _, v) in cx.map(n, &p("with"))? {
            job.with.insert(k, v.to_json());
        }
    }
    if let Some(n) = f.get("secrets") {
        job.secrets = match &n.kind {
            Kind::Null => None,
            Kind::Str(s) if s == "inherit" => Some(JobSecrets::Inherit),
            Kind::Map(_) => Some(JobSecrets::Map(cx.string_map(n, &p("secrets"))?)),
            _ => {
                return Err(cx.err(
                    n,
                    &p("secrets"),
                    "expected `inherit` or a map of secrets; change the value",
                ));
            }
        };
    }
    if let Some(n) = f.get("permissions") {
        job.permissions = Some(parse_permissions(cx, n, &p("permissions"))?);
    }
    Ok(job)
}

fn parse_runs_on(cx: &Ctx<'_>, node: &Node, path: &str) -> Result<Option<RunsOn>, Error> {
    match &node.kind {
        Kind::Null => Ok(None),
        Kind::Map(_) => {
            let f = cx.fields(node, path, "`runs-on`", &["group", "labels"])?;
            let group = cx.opt_string(f.get("group"), &join(path, "group"))?;
            let labels = match f.get("labels") {
                Some(l) => cx.string_list(l, &join(path, "labels"))?,
                None => Vec::new(),
            };
            Ok(Some(RunsOn::Group { group, labels }))
        }
        _ => cx.string_list(node, path).map(|l| Some(RunsOn::Labels(l))),
    }
}

fn parse_environment(cx: &Ctx<'_>, node: &Node, path: &str) -> Result<Option<Environment>, Error> {
    match &node.kind {
        Kind::Null => Ok(None),
        Kind::Map(_) => {
            let f = cx.fields(node, path, "`environment`", &["name", "url", "deployment"])?;
            // `deployment: false` (GitHub, 2025): no deployment record on the server; nothing
            // for a runner to do, but the value must be a boolean or an expression.
            if let Some(d) = f.get("deployment") {
                cx.bool_or_expr(d, &join(path, "deployment"))?;
            }
            let name = match f.get("name") {
                Some(n) => cx.string(n, &join(path, "name"))?,
                None => {
                    return Err(cx.err(node, path, "missing `name`; add `name: <environment>`"));
                }
            };
            Ok(Some(Environment { name, url: cx.opt_string(f.get("url"), &join(path, "url"))? }))
        }
        _ => Ok(Some(Environment { name: cx.string(node, path)?, url: None })),
    }
}

fn parse_strategy(cx: &Ctx<'_>, node: &Node, path: &str) -> Result<Option<Strategy>, Error> {
    if node.is_null() {
        return Ok(None);
    }
    let f = cx.fields(node, path, "`strategy`", &["matrix", "fail-fast", "max-parallel"])?;
    let mut s = Strategy::default();
    if let Some(m) = f.get("matrix") {
        let mp = join(path, "matrix");
        match &m.kind {
            Kind::Null => {}
            Kind::Map(_) | Kind::Str(_) => s.matrix = Some(m.to_json()),
            _ => {
                return Err(cx.err(
                    m,
                    &mp,
                    format!("expected a map or a `${{{{ fromJSON(...) }}}}` expression, found {}; write `key: [values]`", m.type_name()),
                ));
            }
        }
    }
    if let Some(n) = f.get("fail-fast") {
        s.fail_fast = Some(cx.bool_or_expr(n, &join(path, "fail-fast"))?);
    }
    if let Some(n) = f.get("max-parallel") {
        s.max_parallel = Some(cx.number_or_expr(n, &join(path, "max-parallel"))?);
    }
    Ok(Some(s))
}

fn parse_container(cx: &Ctx<'_>, node: &Node, path: &str) -> Result<Container, Error> {
    match &node.kind {
        Kind::Map(_) => {
            let f = cx.fields(
                node,
                path,
                "a container",
                &["image", "credentials", "env", "ports", "volumes", "options", "cmd"],
            )?;
            let p = |k: &str| join(path, k);
            let mut c = Container {
                image: cx.opt_string(f.get("image"), &p("image"))?.unwrap_or_default(),
                ..Container::default()
            };
            if let Some(cr) = f.get("credentials").filter(|n| !n.is_null()) {
                let cp = p("credentials");
                let cf = cx.fields(cr, &cp, "`credentials`", &["username", "password"])?;
                c.credentials = Some(Credentials {
                    username: cx.opt_string(cf.get("username"), &join(&cp, "username"))?,
                    password: cx.opt_string(cf.get("password"), &join(&cp, "password"))?,
                });
            }
            if let Some(n) = f.get("env") {
                c.env = parse_env(cx, n, &p("env"))?;
            }
            if let Some(n) = f.get("ports") {
                c.ports = cx.string_list(n, &p("ports"))?;
            }
            if let Some(n) = f.get("volumes") {
                c.volumes = cx.string_list(n, &p("volumes"))?;
            }
            c.options = cx.opt_string(f.get("options"), &p("options"))?;
            if let Some(n) = f.get("cmd") {
                c.cmd = cx.string_list(n, &p("cmd"))?;
            }
            Ok(c)
        }
        _ => Ok(Container { image: cx.string(node, path)?, ..Container::default() }),
    }
}

/// Parses a `steps` list; `owner` names the job or action for messages (e.g. "job `build`").
pub(crate) fn parse_steps(
    cx: &Ctx<'_>,
    node: &Node,
    path: &str,
    owner: &str,
) -> Result<Vec<Step>, Error> {
    let items = match &node.kind {
        Kind::Seq(items) => items,
        Kind::Null => return Ok(Vec::new()),
        _ => {
            return Err(cx.err(
                node,
                path,
                format!("expected a list of steps, found {}; write each step as `- run: ...` or `- uses: ...`", node.type_name()),
            ));
        }
    };
    items
        .iter()
        .enumerate()
        .map(|(i, s)| parse_step(cx, s, &format!("{path}[{i}]"), owner, i))
        .collect()
}

fn parse_step(
    cx: &Ctx<'_>,
    node: &Node,
    path: &str,
    owner: &str,
    index: usize,
) -> Result<Step, Error> {
    if !matches!(node.kind, Kind::Map(_)) {
        return Err(cx.err(
            node,
            path,
            format!(
                "step {index} of {owner} is {} instead of a map; write it as `- run: ...` or `- uses: ...`",
                node.type_name()
            ),
        ));
    }
    let f = cx.fields(node, path, "a step", STEP_KEYS)?;
    let p = |k: &str| join(path, k);
    let mut s = Step { line: node.line, ..Step::default() };
    s.id = cx.opt_string(f.get("id"), &p("id"))?;
    s.if_ = cx.opt_string(f.get("if"), &p("if"))?;
    s.name = cx.opt_string(f.get("name"), &p("name"))?;
    s.uses = cx.opt_string(f.get("uses"), &p("uses"))?;
    s.uses_pos = f.get("uses").map_or((0, 0), |n| (n.line, n.col));
    s.run = cx.opt_string(f.get("run"), &p("run"))?;
    s.shell = cx.opt_string(f.get("shell"), &p("shell"))?;
    s.working_directory = cx.opt_string(f.get("working-directory"), &p("working-directory"))?;
    if let Some(n) = f.get("env") {
        s.env = parse_env(cx, n, &p("env"))?;
    }
    if let Some(n) = f.get("with") {
        s.with = cx.string_map(n, &p("with"))?;
    }
    if let Some(n) = f.get("continue-on-error") {
        s.continue_on_error = Some(cx.bool_or_expr(n, &p("continue-on-error"))?);
    }
    if let Some(n) = f.get("timeout-minutes") {
        s.timeout_minutes = Some(cx.number_or_expr(n, &p("timeout-minutes"))?);
    }
    let label = match &s.name {
        Some(n) => format!("step {index} ({n:?}) of {owner}"),
        None => format!("step {index} of {owner}"),
    };
    match (&s.run, &s.uses) {
        (Some(_), Some(_)) => {
            Err(cx.err(node, path, format!("{label} has both `run` and `uses`; keep only one")))
        }
        (None, None) => Err(cx.err(
            node,
            path,
            format!("{label} has neither `run` nor `uses`; add one of them"),
        )),
        _ => Ok(s),
    }
}
