//! Helpers for the e2e tests: a temporary repository with a workflow, the real `kiln` binary
//! (through the `e2e-kiln` shim) run in it with a private state directory, and assertions.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The `kiln` binary under test.
pub(crate) fn kiln_bin() -> &'static str {
    env!("CARGO_BIN_EXE_e2e-kiln")
}

/// The `kiln-conformance` binary under test.
pub(crate) fn conformance_bin() -> &'static str {
    env!("CARGO_BIN_EXE_e2e-conformance")
}

/// The repository root (for examples/).
pub(crate) fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A temporary git repository with workflows in `.github/workflows/`, and a private state dir.
pub(crate) struct Repo {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) state: tempfile::TempDir,
}

impl Repo {
    /// A repository holding one workflow file `name` with `yaml`.
    pub(crate) fn with_workflow(name: &str, yaml: &str) -> Repo {
        let dir = tempfile::tempdir().expect("temp dir");
        let wf = dir.path().join(".github/workflows");
        std::fs::create_dir_all(&wf).expect("mkdir");
        std::fs::write(wf.join(name), yaml).expect("write workflow");
        let git = |args: &[&str]| {
            let ok = Command::new("git")
                .current_dir(dir.path())
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .expect("git")
                .success();
            assert!(ok, "git {args:?}");
        };
        git(&["init", "-q", "-b", "main"]);
        git(&["remote", "add", "origin", "https://example.com/acme/widgets.git"]);
        git(&["add", "-A"]);
        git(&["-c", "user.name=e2e", "-c", "user.email=e2e@localhost", "commit", "-qm", "init"]);
        Repo { dir, state: tempfile::tempdir().expect("state dir") }
    }

    /// A new repository with one workflow that shares `previous`'s state directory: the next
    /// run of the same runner (same runner id).
    pub(crate) fn next_run(previous: Repo, name: &str, yaml: &str) -> Repo {
        let repo = Repo { dir: tempfile::tempdir().expect("temp dir"), state: previous.state };
        let wf = repo.path().join(".github/workflows");
        std::fs::create_dir_all(&wf).expect("mkdir");
        std::fs::write(wf.join(name), yaml).expect("write workflow");
        repo
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `kiln` with the repository as working directory and a private state directory.
    pub(crate) fn kiln(&self) -> Command {
        let mut cmd = Command::new(kiln_bin());
        cmd.current_dir(self.path())
            .env("XDG_STATE_HOME", self.state.path())
            .env("KILN_LOG", "warn")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `kiln exec ARGS…` to the end.
    pub(crate) fn exec(&self, args: &[&str]) -> Run {
        let out = self.kiln().arg("exec").args(args).output().expect("running kiln");
        Run::from(out)
    }
}

/// The result of a kiln run.
pub(crate) struct Run {
    pub(crate) code: Option<i32>,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl From<Output> for Run {
    fn from(out: Output) -> Run {
        Run {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

impl Run {
    /// Panics with the whole output unless the exit code is `code`.
    pub(crate) fn assert_code(&self, code: i32) -> &Run {
        assert_eq!(self.code, Some(code), "unexpected exit code\n{}", self.show());
        self
    }

    /// Panics unless stdout contains every one of `needles`.
    pub(crate) fn assert_stdout(&self, needles: &[&str]) -> &Run {
        for n in needles {
            assert!(self.stdout.contains(n), "stdout lacks {n:?}\n{}", self.show());
        }
        self
    }

    /// Panics if stdout contains any of `needles`.
    pub(crate) fn assert_no_stdout(&self, needles: &[&str]) -> &Run {
        for n in needles {
            assert!(!self.stdout.contains(n), "stdout has {n:?}\n{}", self.show());
        }
        self
    }

    pub(crate) fn show(&self) -> String {
        format!("--- stdout\n{}\n--- stderr\n{}", self.stdout, self.stderr)
    }
}

/// Processes whose command line contains `marker` (from /proc), excluding zombies.
pub(crate) fn processes_with(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return found };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().filter(|p| p.bytes().all(|b| b.is_ascii_digit())) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let zombie = state.rsplit(") ").next().is_some_and(|s| s.starts_with('Z'));
        if cmdline.contains(marker) && !zombie {
            found.push(format!("{pid}: {cmdline}"));
        }
    }
    found
}

/// Waits up to `secs` for `f` to hold.
pub(crate) fn wait_for(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while std::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    f()
}

/// Whether a test's prerequisite is there. When it is not (`problem` says why): with
/// `KILN_REQUIRE_<PREREQUISITE>=1` (CI) the test fails; otherwise the test is recorded as not
/// run — a line in `$KILN_SKIPPED_DIR/<test>`, which `tests/run` lists at the end of the run —
/// and printed, and the caller returns early.
pub(crate) fn prerequisite(test: &str, prerequisite: &str, problem: Option<String>) -> bool {
    let Some(problem) = problem else { return true };
    let var = format!("KILN_REQUIRE_{}", prerequisite.to_uppercase().replace('-', "_"));
    let required = std::env::var(&var).is_ok_and(|v| v == "1");
    assert!(!required, "{test}: {var}=1 but {problem}");
    record_skip(test, prerequisite, &problem);
    false
}

/// Records a test that did not run (see [`prerequisite`]).
pub(crate) fn record_skip(test: &str, prerequisite: &str, problem: &str) {
    println!("skipping {test}: {problem}");
    if let Some(dir) = std::env::var_os("KILN_SKIPPED_DIR") {
        let line = format!("{prerequisite}: {problem}\n");
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::write(Path::new(&dir).join(test), line);
    }
}
