//! Mutation testing of the conformance suite: the test plugin started with each
//! `--violate RULE` (one deliberate breach of a MUST of the protocol per mutant) must fail
//! the suite, and the case that catches it must name the rule (`broke §…`). A rule is not
//! held until its mutant is caught.
//!
//! The full suite runs against every mutant (in-process, the plugin started by the suite as
//! `--command` would, so the faults tier runs too), several mutants at a time; a JUnit file
//! is written per mutant. The table of mutants, their catching case and the wall time is
//! printed.
#![allow(clippy::print_stdout)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_plugin_sdk::conformance::{ManagedPlugin, Outcome, SuiteConfig, run_suite};
use kiln_plugin_test::Violation;

/// Mutants run at the same time (most of a suite run is waiting: sleeps, grace periods).
const PARALLEL: usize = 7;

struct Caught {
    violation: Violation,
    failed: Vec<String>,
    line: Option<String>,
    junit_names_rule: bool,
    took: Duration,
}

async fn run_mutant(violation: Violation, dir: &std::path::Path) -> Caught {
    let started = Instant::now();
    let argv = vec![
        env!("CARGO_BIN_EXE_kiln-plugin-test").to_owned(),
        "--violate".to_owned(),
        violation.name(),
        "--root".to_owned(),
        dir.join("envs").to_string_lossy().into_owned(),
    ];
    let log = dir.join("plugin.log");
    let (plugin, backend) = ManagedPlugin::start(argv, Some(log), Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("starting the mutant {}: {e}", violation.name()));
    let mut config = SuiteConfig::new();
    config.endpoint = Some(plugin.endpoint());
    config.case_timeout = Duration::from_secs(120);
    let report = run_suite(backend, &config, Some(&plugin)).await;
    plugin.shutdown().await;
    let junit = report.render_junit();
    std::fs::write(dir.join("junit.xml"), &junit).unwrap();
    let want = violation.caught_by();
    let failed: Vec<String> = report
        .cases
        .iter()
        .filter(|c| matches!(c.outcome, Outcome::Fail(_)))
        .map(|c| c.name.clone())
        .collect();
    let text = report.render_text();
    let line = text.lines().find(|l| l.starts_with("FAIL") && l.contains(want)).map(str::to_owned);
    Caught {
        violation,
        failed,
        line,
        junit_names_rule: junit
            .contains(&format!("name=\"{}\"", want.rsplit('/').next().unwrap_or(want)))
            && junit.contains("broke §"),
        took: started.elapsed(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_suite_catches_every_mutant() {
    let started = Instant::now();
    let root = tempfile::tempdir().unwrap();
    // Popped from the end: the slowest mutant (8 MiB of output held back) starts first.
    let mut all = Violation::all();
    all.sort_by_key(|v| *v == Violation::BufferOutput);
    let queue = Arc::new(Mutex::new(all));
    let results = Arc::new(Mutex::new(Vec::new()));
    let mut workers = Vec::new();
    for _ in 0..PARALLEL {
        let queue = Arc::clone(&queue);
        let results = Arc::clone(&results);
        let root = root.path().to_path_buf();
        workers.push(async move {
            loop {
                let Some(v) = queue.lock().unwrap().pop() else { break };
                let dir = root.join(v.name());
                std::fs::create_dir_all(&dir).unwrap();
                let caught = run_mutant(v, &dir).await;
                results.lock().unwrap().push(caught);
            }
        });
    }
    // One task: the suite's future is not Send, and the mutants are separate processes.
    futures::future::join_all(workers).await;
    let mut results = std::mem::take(&mut *results.lock().unwrap());
    results.sort_by_key(|c| c.violation.name());
    let mut table = String::new();
    let mut missed = Vec::new();
    for c in &results {
        let want = c.violation.caught_by();
        let ok = c.line.as_deref().is_some_and(|l| l.contains("broke §")) && c.junit_names_rule;
        table.push_str(&format!(
            "{:<28} {} {:<42} {:>2} failed  {:>5.1} s  {}\n",
            c.violation.name(),
            if ok { "caught by" } else { "MISSED by" },
            want,
            c.failed.len(),
            c.took.as_secs_f64(),
            c.line
                .as_deref()
                .map(|l| l
                    .split("broke ")
                    .nth(1)
                    .unwrap_or("")
                    .chars()
                    .take(60)
                    .collect::<String>())
                .unwrap_or_default()
        ));
        if !ok {
            missed.push(format!("{} (failed cases: {:?})", c.violation.name(), c.failed));
        }
    }
    println!("{table}\n{} mutants in {:.1} s", results.len(), started.elapsed().as_secs_f64());
    assert_eq!(results.len(), Violation::all().len());
    assert!(
        missed.is_empty(),
        "mutants the suite did not catch by their rule:\n{}\n{table}",
        missed.join("\n")
    );
}
