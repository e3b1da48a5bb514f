//! `shell:` of a run step → the command line template and the script file extension.

use super::error::Error;

/// How to run a script: `argv` with `{0}` standing for the script path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShellSpec {
    /// The program (first word), e.g. `bash`, `pwsh`, `node`.
    pub program: String,
    /// The full command template; one or more entries contain `{0}`.
    pub argv: Vec<String>,
    /// Script file extension including the dot (`.sh`, `.py`, `.ps1`, `.cmd`, `.js`).
    pub extension: &'static str,
}

impl ShellSpec {
    /// The command with `{0}` replaced by the script path.
    pub fn command(&self, script: &str) -> Vec<String> {
        self.argv.iter().map(|a| a.replace("{0}", script)).collect()
    }
}

/// The shell for a run step.
///
/// `shell` is the step's (or default's) `shell:`; `None` or empty means unset, which runs
/// `bash -e {0}` when `bash_available`, else `sh -e {0}` (GitHub's Linux behaviour; the
/// executor decides whether bash exists). An explicit `bash` gets
/// `bash --noprofile --norc -e -o pipefail {0}`. Any other value is a custom template that
/// must contain `{0}`, split into words as `sh` does (`kiln_plugin_sdk::words`, as act does).
pub fn shell_command(shell: Option<&str>, bash_available: bool) -> Result<ShellSpec, Error> {
    let shell = shell.map(str::trim).unwrap_or("");
    let template = match shell {
        "" if bash_available => "bash -e {0}",
        "" => "sh -e {0}",
        "bash" => "bash --noprofile --norc -e -o pipefail {0}",
        "sh" => "sh -e {0}",
        "python" => "python {0}",
        "pwsh" => "pwsh -command \". '{0}'\"",
        "powershell" => "powershell -command \". '{0}'\"",
        "cmd" => "cmd /D /E:ON /V:OFF /S /C \"CALL \"{0}\"\"",
        custom => {
            if !custom.contains("{0}") {
                return Err(Error::msg(format!(
                    "custom shell `{custom}` has no `{{0}}` placeholder for the script path; write e.g. `{custom} {{0}}` or use bash, sh, python, pwsh, powershell or cmd"
                )));
            }
            custom
        }
    };
    let argv = if shell == "cmd" {
        // cmd parses its own quoting: keep the /C argument verbatim.
        ["cmd", "/D", "/E:ON", "/V:OFF", "/S", "/C", "\"CALL \"{0}\"\""].map(String::from).to_vec()
    } else {
        kiln_plugin_sdk::words::split_command(template)
            .map_err(|m| Error::msg(format!("shell `{shell}`: {m}")))?
    };
    let program = argv.first().cloned().unwrap_or_default();
    if program.is_empty() {
        return Err(Error::msg(
            "empty shell; use bash, sh, python, pwsh, powershell, cmd or a template with `{0}`",
        ));
    }
    Ok(ShellSpec { extension: extension_for(&program), program, argv })
}

fn extension_for(program: &str) -> &'static str {
    let base = program.rsplit(['/', '\\']).next().unwrap_or(program).to_ascii_lowercase();
    let base = base.strip_suffix(".exe").unwrap_or(&base);
    let stem = base.trim_end_matches(|c: char| c.is_ascii_digit() || c == '.');
    match stem {
        "python" => ".py",
        "pwsh" | "powershell" => ".ps1",
        "cmd" => ".cmd",
        "node" => ".js",
        _ => ".sh",
    }
}
