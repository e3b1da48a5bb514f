//! Workflow command parsing and the stop-commands state machine.

use expect_test::{Expect, expect};

use super::super::{CommandProcessor, parse_command};

fn parse(line: &str, expect: Expect) {
    expect.assert_eq(&format!("{:?}\n", parse_command(line)));
}

/// Feeds lines through one processor; one output line per input line.
fn run(lines: &[&str], expect: Expect) {
    let mut p = CommandProcessor::new();
    let actual: String = lines.iter().map(|l| format!("{:?}\n", p.process(l))).collect();
    expect.assert_eq(&actual);
}

#[test]
fn parse_plain_text() {
    parse(
        "hello world",
        expect![[r#"
        None
    "#]],
    );
}

#[test]
fn parse_simple() {
    parse(
        "::debug::a message",
        expect![[r#"
        Some(Command { name: "debug", properties: {}, data: "a message" })
    "#]],
    );
}

#[test]
fn parse_properties() {
    parse(
        "::error file=app.js,line=10,col=15::Missing semicolon",
        expect![[r#"
        Some(Command { name: "error", properties: {"file": "app.js", "line": "10", "col": "15"}, data: "Missing semicolon" })
    "#]],
    );
}

#[test]
fn parse_leading_whitespace_and_newline() {
    parse(
        "   ::warning::careful\r\n",
        expect![[r#"
        Some(Command { name: "warning", properties: {}, data: "careful" })
    "#]],
    );
}

#[test]
fn parse_data_escapes() {
    parse(
        "::debug::a%0Ab%0Dc%25d%3Ae%2Cf",
        expect![[r#"
        Some(Command { name: "debug", properties: {}, data: "a\nb\rc%d%3Ae%2Cf" })
    "#]],
    );
}

#[test]
fn parse_property_escapes() {
    parse(
        "::notice title=a%3Ab%2Cc%25d%0Ae::x",
        expect![[r#"
        Some(Command { name: "notice", properties: {"title": "a:b,c%d\ne"}, data: "x" })
    "#]],
    );
}

#[test]
fn parse_escape_is_single_pass() {
    parse(
        "::debug::%250A",
        expect![[r#"
        Some(Command { name: "debug", properties: {}, data: "%0A" })
    "#]],
    );
}

#[test]
fn parse_lowercase_escapes() {
    parse(
        "::debug::a%0ab",
        expect![[r#"
        Some(Command { name: "debug", properties: {}, data: "a\nb" })
    "#]],
    );
}

#[test]
fn parse_lone_percent() {
    parse(
        "::debug::100% sure %",
        expect![[r#"
        Some(Command { name: "debug", properties: {}, data: "100% sure %" })
    "#]],
    );
}

#[test]
fn parse_empty_data() {
    parse(
        "::endgroup::",
        expect![[r#"
        Some(Command { name: "endgroup", properties: {}, data: "" })
    "#]],
    );
}

#[test]
fn parse_data_with_double_colons() {
    parse(
        "::debug::a::b",
        expect![[r#"
        Some(Command { name: "debug", properties: {}, data: "a::b" })
    "#]],
    );
}

#[test]
fn parse_property_without_value_ignored() {
    parse(
        "::set-output name=,other,x=1::v",
        expect![[r#"
        Some(Command { name: "set-output", properties: {"x": "1"}, data: "v" })
    "#]],
    );
}

#[test]
fn parse_property_value_with_equals() {
    parse(
        "::set-output name=a=b::v",
        expect![[r#"
        Some(Command { name: "set-output", properties: {"name": "a=b"}, data: "v" })
    "#]],
    );
}

#[test]
fn parse_no_closing_colons() {
    parse(
        "::debug message",
        expect![[r#"
        None
    "#]],
    );
}

#[test]
fn parse_empty_name() {
    parse(
        ":::: x",
        expect![[r#"
        None
    "#]],
    );
}

#[test]
fn parse_legacy() {
    parse(
        "##[set-output name=a;other=b]value",
        expect![[r#"
        Some(Command { name: "set-output", properties: {"name": "a", "other": "b"}, data: "value" })
    "#]],
    );
}

#[test]
fn parse_legacy_escapes() {
    parse(
        "##[debug]a%3Bb%5Dc%0Ad",
        expect![[r#"
        Some(Command { name: "debug", properties: {}, data: "a;b]c\nd" })
    "#]],
    );
}

#[test]
fn parse_legacy_no_properties() {
    parse(
        "##[group]Build",
        expect![[r#"
        Some(Command { name: "group", properties: {}, data: "Build" })
    "#]],
    );
}

#[test]
fn parse_legacy_unclosed() {
    parse(
        "##[group Build",
        expect![[r#"
        None
    "#]],
    );
}

#[test]
fn every_command() {
    run(
        &[
            "plain",
            "::add-mask::secret",
            "::group::My group",
            "::endgroup::",
            "::debug::dbg",
            "::notice::n",
            "::warning file=a.rs,line=1,endLine=2,col=3,endColumn=4,title=T::w",
            "::error line=x::e",
            "::set-output name=out::val",
            "::save-state name=st::sv",
            "::set-env name=E::ev",
            "::add-path::/opt/bin",
            "::echo::on",
            "::echo::OFF",
            "::unknown-cmd::x",
            "##[warning]legacy",
        ],
        expect![[r#"
            Output("plain")
            AddMask("secret")
            Group("My group")
            EndGroup
            Debug("dbg")
            Annotation(Annotation { level: Notice, message: "n", title: None, file: None, line: None, end_line: None, col: None, end_column: None })
            Annotation(Annotation { level: Warning, message: "w", title: Some("T"), file: Some("a.rs"), line: Some(1), end_line: Some(2), col: Some(3), end_column: Some(4) })
            Annotation(Annotation { level: Error, message: "e", title: None, file: None, line: None, end_line: None, col: None, end_column: None })
            SetOutput { name: "out", value: "val" }
            SaveState { name: "st", value: "sv" }
            SetEnv { name: "E", value: "ev" }
            AddPath("/opt/bin")
            Echo(true)
            Echo(false)
            Output("::unknown-cmd::x")
            Annotation(Annotation { level: Warning, message: "legacy", title: None, file: None, line: None, end_line: None, col: None, end_column: None })
        "#]],
    );
}

#[test]
fn invalid_uses() {
    run(
        &[
            "::set-output::no name",
            "::save-state::x",
            "::set-env::x",
            "::echo::maybe",
            "::stop-commands::",
        ],
        expect![[r#"
            Invalid { line: "::set-output::no name", message: "set-output needs a `name` property; write `::set-output name=NAME::value`" }
            Invalid { line: "::save-state::x", message: "save-state needs a `name` property; write `::save-state name=NAME::value`" }
            Invalid { line: "::set-env::x", message: "set-env needs a `name` property; write `::set-env name=NAME::value`" }
            Invalid { line: "::echo::maybe", message: "echo takes `on` or `off`; write `::echo::on` or `::echo::off`" }
            Invalid { line: "::stop-commands::", message: "stop-commands needs a token; write `::stop-commands::TOKEN` and later `::TOKEN::`" }
        "#]],
    );
}

#[test]
fn stop_commands() {
    run(
        &[
            "::stop-commands::tok123",
            "::set-output name=a::ignored",
            "::debug::also ignored",
            "::tok1234::",
            "  ::tok123::  ",
            "::debug::works again",
            "::tok123::",
        ],
        expect![[r#"
            StopCommands("tok123")
            Output("::set-output name=a::ignored")
            Output("::debug::also ignored")
            Output("::tok1234::")
            ResumeCommands
            Debug("works again")
            Output("::tok123::")
        "#]],
    );
}

#[test]
fn stop_commands_nested_token_is_plain() {
    run(
        &["::stop-commands::a", "::stop-commands::b", "::b::", "::a::", "::b::"],
        expect![[r#"
        StopCommands("a")
        Output("::stop-commands::b")
        Output("::b::")
        ResumeCommands
        Output("::b::")
    "#]],
    );
}

#[test]
fn stopped_state() {
    let mut p = CommandProcessor::new();
    let before = p.stopped();
    p.process("::stop-commands::x");
    let during = p.stopped();
    p.process("::x::");
    expect![[r#"
        (
            false,
            true,
            false,
        )
    "#]]
    .assert_debug_eq(&(before, during, p.stopped()));
}

#[test]
fn trailing_newlines_removed_from_output() {
    run(
        &["text\r\n", "text\n", ""],
        expect![[r#"
        Output("text")
        Output("text")
        Output("")
    "#]],
    );
}

#[test]
fn never_panics_on_odd_lines() {
    let mut p = CommandProcessor::new();
    for line in [
        "%",
        "::%::%",
        "::a b=%2::%0",
        "##[",
        "##[]",
        "::é ü=%C3::ä%",
        "::stop-commands::é",
        "::é::",
        "  ",
        "::::::",
    ] {
        let _ = p.process(line);
        let _ = parse_command(line);
    }
}
