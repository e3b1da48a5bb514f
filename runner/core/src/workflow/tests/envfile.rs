//! GITHUB_ENV / GITHUB_OUTPUT / GITHUB_STATE / GITHUB_PATH parsing.

use expect_test::{Expect, expect};

use super::super::{parse_env_file, parse_path_file};

fn check(content: &str, expect: Expect) {
    let actual = match parse_env_file(content) {
        Ok(pairs) => pairs.iter().map(|(k, v)| format!("{k}={v:?}\n")).collect(),
        Err(e) => format!("error: {e}\n"),
    };
    expect.assert_eq(&actual);
}

#[test]
fn empty() {
    check("", expect![[""]]);
}

#[test]
fn simple_pairs() {
    check(
        "A=1\nB=two words\n",
        expect![[r#"
        A="1"
        B="two words"
    "#]],
    );
}

#[test]
fn no_trailing_newline() {
    check(
        "A=1",
        expect![[r#"
        A="1"
    "#]],
    );
}

#[test]
fn empty_value() {
    check(
        "A=\n",
        expect![[r#"
        A=""
    "#]],
    );
}

#[test]
fn value_with_equals() {
    check(
        "URL=a=b=c\n",
        expect![[r#"
        URL="a=b=c"
    "#]],
    );
}

#[test]
fn value_with_heredoc_marker_after_equals() {
    check(
        "A=x<<y\n",
        expect![[r#"
        A="x<<y"
    "#]],
    );
}

#[test]
fn empty_lines_skipped() {
    check(
        "\nA=1\n\n\nB=2\n\n",
        expect![[r#"
        A="1"
        B="2"
    "#]],
    );
}

#[test]
fn later_wins_order_kept() {
    check(
        "A=1\nB=2\nA=3\n",
        expect![[r#"
        A="1"
        B="2"
        A="3"
    "#]],
    );
}

#[test]
fn heredoc() {
    check(
        "TEXT<<EOF\nline one\nline two\nEOF\nNEXT=1\n",
        expect![[r#"
        TEXT="line one\nline two"
        NEXT="1"
    "#]],
    );
}

#[test]
fn heredoc_empty_value() {
    check(
        "A<<EOF\nEOF\n",
        expect![[r#"
        A=""
    "#]],
    );
}

#[test]
fn heredoc_with_blank_lines_inside() {
    check(
        "A<<EOF\n\nx\n\nEOF\n",
        expect![[r#"
        A="\nx\n"
    "#]],
    );
}

#[test]
fn heredoc_value_contains_equals_and_markers() {
    check(
        "A<<ghadelimiter_1\nB=2\nC<<D\nghadelimiter_1\n",
        expect![[r#"
        A="B=2\nC<<D"
    "#]],
    );
}

#[test]
fn heredoc_delimiter_must_match_whole_line() {
    check(
        "A<<EOF\nEOF \nEOFX\nEOF\n",
        expect![[r#"
        A="EOF \nEOFX"
    "#]],
    );
}

#[test]
fn heredoc_missing_delimiter() {
    check(
        "A=1\nBODY<<END\nsome\ntext\n",
        expect![[r#"
        error: line 2: no closing delimiter `END` for `BODY`; end the value with a line `END`
    "#]],
    );
}

#[test]
fn heredoc_without_delimiter_name() {
    check(
        "A<<\nx\n",
        expect![[r#"
        error: line 1: heredoc for `A` has no delimiter; write `A<<EOF`
    "#]],
    );
}

#[test]
fn heredoc_name_with_equals_after() {
    check(
        "A<<EOF=\nx\nEOF=\n",
        expect![[r#"
        A="x"
    "#]],
    );
}

#[test]
fn bom_skipped() {
    check(
        "\u{feff}A=1\n",
        expect![[r#"
        A="1"
    "#]],
    );
}

#[test]
fn crlf() {
    check(
        "A=1\r\nB<<EOF\r\nx\r\ny\r\nEOF\r\n",
        expect![[r#"
        A="1"
        B="x\ny"
    "#]],
    );
}

#[test]
fn line_without_separator() {
    check(
        "A=1\n\njust text\n",
        expect![[r#"
        error: line 3: expected `NAME=value` or `NAME<<DELIMITER`, found "just text"; fix the line
    "#]],
    );
}

#[test]
fn empty_name() {
    check(
        "=value\n",
        expect![[r#"
        error: line 1: empty name; write `NAME=value`
    "#]],
    );
}

#[test]
fn empty_heredoc_name() {
    check(
        "<<EOF\nx\nEOF\n",
        expect![[r#"
        error: line 1: empty name; write `NAME=value`
    "#]],
    );
}

#[test]
fn unicode_value() {
    check(
        "GREETING=héllo ✅\n",
        expect![[r#"
        GREETING="héllo ✅"
    "#]],
    );
}

#[test]
fn path_file() {
    let paths = parse_path_file("\u{feff}/opt/bin\r\n\n/usr/local/go/bin\n  \n/with space/bin");
    expect![[r#"
        [
            "/opt/bin",
            "/usr/local/go/bin",
            "/with space/bin",
        ]
    "#]]
    .assert_debug_eq(&paths);
}

#[test]
fn path_file_empty() {
    expect![[r#"
        []
    "#]]
    .assert_debug_eq(&parse_path_file(""));
}

#[test]
fn never_panics_on_odd_content() {
    for c in ["=", "<<", "é<<é\né", "\r", "\r\n\r\n", "a<<b=c", "\u{feff}", "x=\u{feff}"] {
        let _ = parse_env_file(c);
        let _ = parse_path_file(c);
    }
}
