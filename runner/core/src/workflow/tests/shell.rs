//! Shell templates and script extensions.

use expect_test::{Expect, expect};

use super::super::shell_command;

fn check(shell: Option<&str>, bash: bool, expect: Expect) {
    let actual = match shell_command(shell, bash) {
        Ok(s) => format!("{:?} {} {:?}\n", s.argv, s.extension, s.command("/tmp/s")),
        Err(e) => format!("error: {e}\n"),
    };
    expect.assert_eq(&actual);
}

#[test]
fn unset_with_bash() {
    check(
        None,
        true,
        expect![[r#"
        ["bash", "-e", "{0}"] .sh ["bash", "-e", "/tmp/s"]
    "#]],
    );
}

#[test]
fn unset_without_bash() {
    check(
        None,
        false,
        expect![[r#"
        ["sh", "-e", "{0}"] .sh ["sh", "-e", "/tmp/s"]
    "#]],
    );
}

#[test]
fn empty_is_unset() {
    check(
        Some(""),
        true,
        expect![[r#"
        ["bash", "-e", "{0}"] .sh ["bash", "-e", "/tmp/s"]
    "#]],
    );
}

#[test]
fn bash() {
    check(
        Some("bash"),
        false,
        expect![[r#"
        ["bash", "--noprofile", "--norc", "-e", "-o", "pipefail", "{0}"] .sh ["bash", "--noprofile", "--norc", "-e", "-o", "pipefail", "/tmp/s"]
    "#]],
    );
}

#[test]
fn sh() {
    check(
        Some("sh"),
        true,
        expect![[r#"
        ["sh", "-e", "{0}"] .sh ["sh", "-e", "/tmp/s"]
    "#]],
    );
}

#[test]
fn python() {
    check(
        Some("python"),
        true,
        expect![[r#"
        ["python", "{0}"] .py ["python", "/tmp/s"]
    "#]],
    );
}

#[test]
fn pwsh() {
    check(
        Some("pwsh"),
        true,
        expect![[r#"
        ["pwsh", "-command", ". '{0}'"] .ps1 ["pwsh", "-command", ". '/tmp/s'"]
    "#]],
    );
}

#[test]
fn powershell() {
    check(
        Some("powershell"),
        true,
        expect![[r#"
        ["powershell", "-command", ". '{0}'"] .ps1 ["powershell", "-command", ". '/tmp/s'"]
    "#]],
    );
}

#[test]
fn cmd() {
    check(
        Some("cmd"),
        true,
        expect![[r#"
        ["cmd", "/D", "/E:ON", "/V:OFF", "/S", "/C", "\"CALL \"{0}\"\""] .cmd ["cmd", "/D", "/E:ON", "/V:OFF", "/S", "/C", "\"CALL \"/tmp/s\"\""]
    "#]],
    );
}

#[test]
fn custom_node() {
    check(
        Some("node {0}"),
        true,
        expect![[r#"
        ["node", "{0}"] .js ["node", "/tmp/s"]
    "#]],
    );
}

#[test]
fn custom_python3() {
    check(
        Some("python3 -u {0}"),
        true,
        expect![[r#"
        ["python3", "-u", "{0}"] .py ["python3", "-u", "/tmp/s"]
    "#]],
    );
}

#[test]
fn custom_bash_flags() {
    check(
        Some("bash -x {0}"),
        true,
        expect![[r#"
        ["bash", "-x", "{0}"] .sh ["bash", "-x", "/tmp/s"]
    "#]],
    );
}

#[test]
fn custom_perl() {
    check(
        Some("perl {0}"),
        true,
        expect![[r#"
        ["perl", "{0}"] .sh ["perl", "/tmp/s"]
    "#]],
    );
}

#[test]
fn custom_quoted() {
    check(
        Some("sh -c 'cat \"{0}\"'"),
        true,
        expect![[r#"
        ["sh", "-c", "cat \"{0}\""] .sh ["sh", "-c", "cat \"/tmp/s\""]
    "#]],
    );
}

#[test]
fn custom_cp() {
    check(
        Some("cp {0} action.yml"),
        true,
        expect![[r#"
        ["cp", "{0}", "action.yml"] .sh ["cp", "/tmp/s", "action.yml"]
    "#]],
    );
}

#[test]
fn custom_without_placeholder() {
    check(
        Some("node"),
        true,
        expect![[r#"
        error: custom shell `node` has no `{0}` placeholder for the script path; write e.g. `node {0}` or use bash, sh, python, pwsh, powershell or cmd
    "#]],
    );
}

#[test]
fn custom_unclosed_quote() {
    check(
        Some("sh -c '{0}"),
        true,
        expect![[r#"
        error: shell `sh -c '{0}`: unclosed `'`; close the quote
    "#]],
    );
}

#[test]
fn trimmed() {
    check(
        Some("  sh  "),
        true,
        expect![[r#"
        ["sh", "-e", "{0}"] .sh ["sh", "-e", "/tmp/s"]
    "#]],
    );
}
