//! Every workflow and action of act's offline test corpus parses (and validates), except the
//! cases designed to fail.

use std::path::{Path, PathBuf};

use expect_test::expect;

use super::super::{parse_action, parse_workflow, validate};

/// Where the act test corpus is; the one place to change when the crate moves.
fn corpus_dir() -> PathBuf {
    match std::env::var_os("KILN_ACT_TESTDATA") {
        Some(dir) => PathBuf::from(dir),
        None => {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/conformance/act-testdata")
        }
    }
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    out.retain(|p| p.is_file() && p.extension().is_some_and(|e| e == "yml" || e == "yaml"));
    out.sort();
    out
}

fn all_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            all_files(&p, out);
        } else {
            out.push(p);
        }
    }
}

#[test]
fn act_testdata_corpus() {
    let root = corpus_dir();
    if !root.join("cases.tsv").is_file() {
        // A prerequisite outside the repository: a failure under KILN_REQUIRE_ACT_TESTDATA=1
        // (CI), else recorded as not run for tests/run's list (ARCHITECTURE.md, "Test
        // prerequisites").
        let problem = format!("corpus not found at {}; set KILN_ACT_TESTDATA", root.display());
        let required = std::env::var("KILN_REQUIRE_ACT_TESTDATA").is_ok_and(|v| v == "1");
        assert!(!required, "KILN_REQUIRE_ACT_TESTDATA=1 but {problem}");
        if let Some(dir) = std::env::var_os("KILN_SKIPPED_DIR") {
            let _ = std::fs::create_dir_all(&dir);
            let _ = std::fs::write(
                Path::new(&dir).join("act_testdata_corpus"),
                format!("act-testdata: {problem}\n"),
            );
        }
        return;
    }
    // Workflows: yml files directly in each case dir (and nested case dirs such as
    // steps-context/outcome), plus .github/workflows. Actions: every action.yml/action.yaml.
    let mut workflows = yaml_files(&root.join(".github/workflows"));
    let mut files = Vec::new();
    all_files(&root, &mut files);
    let mut actions = Vec::new();
    for f in files {
        let name = f.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let rel = f.strip_prefix(&root).unwrap_or(&f);
        if name == "action.yml" || name == "action.yaml" {
            actions.push(f.clone());
        } else if (name.ends_with(".yml") || name.ends_with(".yaml")) && !rel.starts_with(".github")
        {
            workflows.push(f.clone());
        }
    }
    workflows.sort();
    actions.sort();
    let mut report = String::new();
    for f in &workflows {
        let rel = f.strip_prefix(&root).unwrap_or(f).display().to_string();
        let text = std::fs::read_to_string(f).unwrap();
        let line = match parse_workflow(&text, &rel) {
            Err(e) => format!("parse error: {e}"),
            Ok(wf) => match validate(&wf) {
                Ok(()) => "ok".to_string(),
                Err(errs) => {
                    format!(
                        "invalid: {}",
                        errs.iter().map(|e| e.to_string()).collect::<Vec<_>>().join(" | ")
                    )
                }
            },
        };
        report.push_str(&format!("{rel}: {line}\n"));
    }
    for f in &actions {
        let rel = f.strip_prefix(&root).unwrap_or(f).display().to_string();
        let text = std::fs::read_to_string(f).unwrap();
        let line = match parse_action(&text, &rel) {
            Err(e) => format!("parse error: {e}"),
            Ok(_) => "ok".to_string(),
        };
        report.push_str(&format!("{rel}: {line}\n"));
    }
    // Cases expected to pass upstream must parse and validate cleanly, actions included.
    let tsv = std::fs::read_to_string(root.join("cases.tsv")).unwrap();
    for row in tsv.lines().skip(1) {
        let cols: Vec<&str> = row.split('\t').collect();
        if cols.get(3) != Some(&"pass") {
            continue;
        }
        let prefix = format!("{}/", cols[0]);
        for line in report.lines().filter(|l| l.starts_with(&prefix)) {
            assert!(line.ends_with(": ok"), "case {} is expected to pass: {line}", cols[0]);
        }
    }
    expect![[r#"
        .github/workflows/local-reusable-and-dispatch.yml: ok
        act-composite-env-test/push.yml: ok
        checkout/push.yml: ok
        commands/push.yml: ok
        composite-fail-with-output/push.yml: ok
        defaults-run/main.yaml: ok
        dir with spaces/push.yml: ok
        do-not-leak-step-env-in-composite/push.yml: ok
        ensure-post-steps/push.yml: ok
        env-and-path/push.yaml: ok
        environment-files/push.yaml: ok
        environment-files-parser-bug/push.yaml: ok
        environment-variables/push.yml: ok
        evalenv/push.yml: ok
        evalmatrix/push.yml: ok
        evalmatrix-merge-array/push.yml: ok
        evalmatrix-merge-map/push.yml: ok
        evalmatrixneeds/push.yml: ok
        evalmatrixneeds2/push.yml: ok
        if-env-act/push.yml: ok
        if-expressions/push.yml: ok
        input-from-cli/input.yml: ok
        inputs-via-env-context/push.yml: ok
        issue-1195/push.yml: ok
        issue-1595/missing.yml: invalid: issue-1595/missing.yml:7:12: jobs.second.needs: job `second` needs `first`, which does not exist; fix the name or add the job
        issue-1595/no-event.yml: invalid: issue-1595/no-event.yml:1: on: missing `on`; add the events that trigger the workflow, e.g. `on: push`
        issue-1595/no-first.yml: invalid: issue-1595/no-first.yml:7:12: jobs.second.needs: job `second` needs `first`, which does not exist; fix the name or add the job
        job-needs-context-contains-result/push.yml: ok
        job-nil-step/push.yml: parse error: job-nil-step/push.yml:6:6: jobs.test.steps[0]: step 0 of job `test` is null instead of a map; write it as `- run: ...` or `- uses: ...`
        job-status-check/push.yml: ok
        local-action-js/push.yml: ok
        mask-values/push.yml: ok
        matrix/push.yml: ok
        matrix-exitcode/push.yml: ok
        matrix-include-exclude/push.yml: ok
        matrix-with-user-inclusions/push.yml: ok
        nix-prepend-path/push.yml: ok
        non-existent-action/push.yml: ok
        outputs/push.yml: ok
        post-step-failure-is-job-failure/push.yml: ok
        pull-request/main.yaml: ok
        runs-on/push.yml: ok
        services-empty-image/push.yaml: ok
        set-env-new-env-file-per-step/push.yml: ok
        set-env-step-env-override/push.yml: ok
        steps-context/conclusion/push.yml: ok
        steps-context/outcome/push.yml: ok
        uses-and-run-in-one-step/push.yml: parse error: uses-and-run-in-one-step/push.yml:8:9: jobs.test.steps[0]: step 0 ("Test") of job `test` has both `run` and `uses`; keep only one
        uses-composite/push.yml: ok
        uses-composite-check-for-input-collision/push.yml: ok
        uses-composite-check-for-input-shadowing/push.yml: ok
        uses-composite-with-error/push.yml: ok
        uses-composite-with-pre-and-post-steps/push.yml: ok
        uses-github-empty/push.yml: parse error: uses-github-empty/push.yml:7:7: jobs.test.steps[0]: step 0 ("empty") of job `test` has neither `run` nor `uses`; add one of them
        uses-github-noref/push.yml: invalid: uses-github-noref/push.yml:7:13: jobs.test.steps[0].uses: invalid `uses: actions/checkout`; expected `{owner}/{repo}[/path]@{ref}`, `./local/path`, `$/path` or `docker://image`
        uses-github-root/push.yml: ok
        uses-workflow-defaults/workflow_dispatch.yml: ok
        workdir/push.yml: ok
        workflow_call_inputs/workflow_call_inputs.yml: ok
        workflow_dispatch/workflow_dispatch.yml: ok
        workflow_dispatch-scalar/workflow_dispatch.yml: ok
        workflow_dispatch-scalar-composite-action/workflow_dispatch.yml: ok
        workflow_dispatch_no_inputs_mapping/workflow_dispatch.yml: ok
        act-composite-env-test/action1/action.yml: ok
        act-composite-env-test/action2/action.yml: ok
        actions/composite-fail-with-output/action.yml: ok
        actions/node12/action.yml: ok
        actions/node16/action.yml: ok
        actions/node20/action.yml: ok
        ensure-post-steps/action-composite/action.yml: ok
        ensure-post-steps/action-post/action.yml: ok
        inputs-via-env-context/action/action.yml: ok
        mask-values/composite/action.yml: ok
        post-step-failure-is-job-failure/post-step-failure/action.yml: ok
        uses-composite/composite_action/action.yml: ok
        uses-composite-check-for-input-collision/action-with-pre-and-post/action.yml: ok
        uses-composite-check-for-input-collision/composite_action/action.yml: ok
        uses-composite-check-for-input-shadowing/action-with-pre-and-post/action.yml: ok
        uses-composite-check-for-input-shadowing/composite_action/action.yml: ok
        uses-composite-with-error/composite_action2/action.yml: ok
        uses-composite-with-pre-and-post-steps/action-with-pre-and-post/action.yml: ok
        uses-composite-with-pre-and-post-steps/composite_action/action.yml: ok
        uses-composite-with-pre-and-post-steps/last-action/action.yml: ok
    "#]].assert_eq(&report);
}
