//! The suite's result: one entry per case, rendered as text for people and JUnit XML for CI.

use std::fmt::Write as _;
use std::time::Duration;

use crate::backend::{Capabilities, LayerSupport};

use super::Tier;

/// How a case ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Everything it checked held.
    Pass,
    /// Something did not hold; the message says what was expected and what was observed.
    Fail(String),
    /// Not run, and why (e.g. "feature stdin not declared").
    Skip(String),
}

/// The result of one case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaseResult {
    /// `tier/area/what`.
    pub name: String,
    /// Its tier.
    pub tier: Tier,
    /// The sections of the protocol spec it checks (`§2.3 §7.2`); a failure names them.
    pub rule: &'static str,
    /// How it ended.
    pub outcome: Outcome,
    /// Wall time, cleanup included.
    pub duration: Duration,
}

/// The result of a suite run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Every case that was considered, in run order.
    pub cases: Vec<CaseResult>,
    /// What the plugin declared (default when the handshake failed).
    pub plugin: Capabilities,
}

impl Report {
    /// True when no case failed.
    pub fn passed(&self) -> bool {
        !self.cases.iter().any(|c| matches!(c.outcome, Outcome::Fail(_)))
    }

    /// Numbers of passed, failed and skipped cases.
    pub fn counts(&self) -> (usize, usize, usize) {
        let mut counts = (0, 0, 0);
        for c in &self.cases {
            match c.outcome {
                Outcome::Pass => counts.0 += 1,
                Outcome::Fail(_) => counts.1 += 1,
                Outcome::Skip(_) => counts.2 += 1,
            }
        }
        counts
    }

    /// The plugin's identity and capabilities, one item per line.
    pub fn render_plugin(&self) -> String {
        let p = &self.plugin;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "plugin: {} {} (protocol {}, instance {})",
            or_dash(&p.plugin_name),
            or_dash(&p.plugin_version),
            p.protocol_version,
            or_dash(&p.instance_id)
        );
        let platform = match (p.os.as_str(), p.arch.as_str()) {
            ("", "") => "per label".to_owned(),
            (os, arch) => format!("{}/{}", or_dash(os), or_dash(arch)),
        };
        let _ = writeln!(out, "platform: {platform}, max message {} bytes", p.max_message_bytes);
        for (name, layer) in [
            ("environment", &p.environment),
            ("job container", &p.job_container),
            ("service containers", &p.service_containers),
            ("step containers", &p.step_containers),
        ] {
            let _ = writeln!(out, "layer {name}: {}", layer_text(layer));
        }
        let f = p.features;
        let features = [
            ("stdin", f.stdin),
            ("tty", f.tty),
            ("local_copy", f.local_copy),
            ("image_build", f.image_build),
            ("exec_files", f.exec_files),
            ("exec_timeout", f.exec_timeout),
            ("health", f.health),
        ];
        let on: Vec<_> = features.iter().filter(|f| f.1).map(|f| f.0).collect();
        let off: Vec<_> = features.iter().filter(|f| !f.1).map(|f| f.0).collect();
        let _ = writeln!(
            out,
            "features: {} (not declared: {})",
            if on.is_empty() { "none".to_owned() } else { on.join(", ") },
            if off.is_empty() { "none".to_owned() } else { off.join(", ") }
        );
        out
    }

    /// The human-readable report: the plugin at the top, one line per case, the summary line
    /// `N passed, M failed, K skipped` at the end.
    pub fn render_text(&self) -> String {
        let mut out = self.render_plugin();
        out.push('\n');
        let width = self.cases.iter().map(|c| c.name.len()).max().unwrap_or(0);
        for c in &self.cases {
            let failed;
            let (word, reason) = match &c.outcome {
                Outcome::Pass => ("PASS", None),
                Outcome::Fail(m) => {
                    failed = format!("broke {}: {m}", c.rule);
                    ("FAIL", Some(&failed))
                }
                Outcome::Skip(m) => ("SKIP", Some(m)),
            };
            let mut line = format!("{word}  {:<width$}  {:>8}", c.name, duration_text(c.duration));
            if let Some(reason) = reason {
                let mut lines = reason.lines();
                line.push_str("  ");
                line.push_str(lines.next().unwrap_or(""));
                for more in lines {
                    line.push_str("\n        ");
                    line.push_str(more);
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        let (passed, failed, skipped) = self.counts();
        let _ = writeln!(out, "\n{passed} passed, {failed} failed, {skipped} skipped");
        out
    }

    /// JUnit XML: one `<testsuite>` per tier, one `<testcase>` per case (classname
    /// `tier.area`, name `what`), with `<failure>` or `<skipped>`.
    pub fn render_junit(&self) -> String {
        let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        let (passed, failed, skipped) = self.counts();
        let total: Duration = self.cases.iter().map(|c| c.duration).sum();
        let _ = writeln!(
            out,
            "<testsuites name=\"kiln-conformance\" tests=\"{}\" failures=\"{failed}\" \
             skipped=\"{skipped}\" errors=\"0\" time=\"{:.3}\">",
            passed + failed + skipped,
            total.as_secs_f64()
        );
        for tier in Tier::ALL {
            let cases: Vec<_> = self.cases.iter().filter(|c| c.tier == tier).collect();
            if cases.is_empty() {
                continue;
            }
            let failures = cases.iter().filter(|c| matches!(c.outcome, Outcome::Fail(_))).count();
            let skips = cases.iter().filter(|c| matches!(c.outcome, Outcome::Skip(_))).count();
            let time: Duration = cases.iter().map(|c| c.duration).sum();
            let _ = writeln!(
                out,
                "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{failures}\" skipped=\"{skips}\" \
                 errors=\"0\" time=\"{:.3}\">",
                tier.name(),
                cases.len(),
                time.as_secs_f64()
            );
            let _ = writeln!(out, "    <properties>");
            for (k, v) in [
                ("plugin.name", self.plugin.plugin_name.as_str()),
                ("plugin.version", self.plugin.plugin_version.as_str()),
                ("plugin.instance_id", self.plugin.instance_id.as_str()),
            ] {
                let _ = writeln!(out, "      <property name=\"{k}\" value=\"{}\"/>", xml_escape(v));
            }
            let _ = writeln!(out, "    </properties>");
            for c in cases {
                let (class, name) = match c.name.rsplit_once('/') {
                    Some((class, name)) => (class.replace('/', "."), name),
                    None => (tier.name().to_owned(), c.name.as_str()),
                };
                let head = format!(
                    "    <testcase classname=\"{}\" name=\"{}\" time=\"{:.3}\"",
                    xml_escape(&class),
                    xml_escape(name),
                    c.duration.as_secs_f64()
                );
                match &c.outcome {
                    Outcome::Pass => {
                        let _ = writeln!(out, "{head}/>");
                    }
                    Outcome::Fail(m) => {
                        let m = format!("broke {}: {m}", c.rule);
                        let first = m.lines().next().unwrap_or("");
                        let _ = writeln!(
                            out,
                            "{head}>\n      <failure message=\"{}\">{}</failure>\n    </testcase>",
                            xml_escape(first),
                            xml_escape(&m)
                        );
                    }
                    Outcome::Skip(m) => {
                        let _ = writeln!(
                            out,
                            "{head}>\n      <skipped message=\"{}\"/>\n    </testcase>",
                            xml_escape(m)
                        );
                    }
                }
            }
            let _ = writeln!(out, "  </testsuite>");
        }
        out.push_str("</testsuites>\n");
        out
    }
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

fn layer_text(layer: &LayerSupport) -> String {
    match layer {
        LayerSupport::Native => "native".to_owned(),
        LayerSupport::Delegated { backend } => format!("delegated to {backend}"),
        LayerSupport::Unsupported(d) if d.is_empty() => "unsupported".to_owned(),
        LayerSupport::Unsupported(d) => format!("unsupported ({d})"),
    }
}

fn duration_text(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{} ms", d.as_millis())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

/// Escapes text for XML attributes and content, dropping characters XML 1.0 cannot carry.
fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\n' | '\t' | '\r' => out.push(c),
            c if (c as u32) < 0x20 => out.push('?'),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        let case = |name: &str, tier, outcome| CaseResult {
            name: name.to_owned(),
            tier,
            rule: "§5.11",
            outcome,
            duration: Duration::from_millis(1500),
        };
        Report {
            cases: vec![
                case("protocol/capabilities/negotiate", Tier::Protocol, Outcome::Pass),
                case(
                    "semantics/exec/stdin",
                    Tier::Semantics,
                    Outcome::Skip("feature stdin not declared".into()),
                ),
                case(
                    "semantics/copy/traversal",
                    Tier::Semantics,
                    Outcome::Fail("expected <INVALID_ARGUMENT> & \"more\"\nsecond line".into()),
                ),
            ],
            plugin: Capabilities {
                plugin_name: "fake".into(),
                plugin_version: "1.0".into(),
                protocol_version: 1,
                instance_id: "abc".into(),
                environment: LayerSupport::Native,
                ..Default::default()
            },
        }
    }

    #[test]
    fn text_report() {
        let r = report();
        assert!(!r.passed());
        let text = r.render_text();
        assert!(text.starts_with("plugin: fake 1.0 (protocol 1, instance abc)\n"), "{text}");
        assert!(text.contains("layer environment: native"));
        assert!(text.contains("SKIP  semantics/exec/stdin"));
        assert!(text.contains("feature stdin not declared"));
        assert!(text.contains("\n        second line\n"), "{text}");
        assert!(text.contains("broke §5.11: expected <INVALID_ARGUMENT>"), "{text}");
        assert!(text.ends_with("\n1 passed, 1 failed, 1 skipped\n"), "{text}");
    }

    #[test]
    fn junit_report() {
        let xml = report().render_junit();
        assert!(xml.contains("<testsuites name=\"kiln-conformance\" tests=\"3\" failures=\"1\""));
        assert!(xml.contains("classname=\"semantics.copy\" name=\"traversal\""));
        assert!(xml.contains("&lt;INVALID_ARGUMENT&gt; &amp; &quot;more&quot;"));
        assert!(xml.contains("<skipped message=\"feature stdin not declared\"/>"));
        assert_eq!(xml.matches("<testsuite ").count(), 2);
        assert_eq!(xml_escape("a\u{1}b"), "a?b");
    }
}
