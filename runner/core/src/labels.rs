//! Label configurations: which backend (and with which options) a `runs-on` label runs on.
//!
//! String form, as in Forgejo Runner and on the `-P` command line: `name:host`,
//! `name:docker://image`, `name:<backend>[:<args>]` (any backend configured as a plugin), and
//! `name:<backend>://<args>` (Forgejo Runner's `lxc://debian:bookworm`: the same as
//! `name:lxc:debian:bookworm`).
//! The structured form of the config file (`{name, backend, options}`) builds the same type.

use std::fmt;

use anyhow::bail;

/// Where jobs with one `runs-on` label run.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelConfig {
    /// The label name (`ubuntu-latest`).
    pub name: String,
    /// The backend (plugin) name (`host`, `docker`, `qemu`).
    pub backend: String,
    /// Options for `CreateExecutionEnvironment` (for docker: `{"image": "…"}`).
    pub options: serde_json::Map<String, serde_json::Value>,
}

impl fmt::Display for LabelConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, self.backend)?;
        if let Some(image) = self.options.get("image").and_then(|v| v.as_str()) {
            write!(f, "://{image}")?;
        } else if let Some(args) = self.options.get("args").and_then(|v| v.as_str()) {
            // Forgejo Runner writes LXC labels as a URL: `lxc://debian:bookworm`.
            let sep = if self.backend == "lxc" { "://" } else { ":" };
            write!(f, "{sep}{args}")?;
        }
        Ok(())
    }
}

/// The backend name of a label whose jobs are skipped (`-P label=` or `-P label=skip`), as act
/// skips jobs whose platform maps to nothing.
pub const SKIP: &str = "skip";

/// Parses `name:spec` (the config file and `register --labels` form).
pub fn parse_label(s: &str) -> anyhow::Result<LabelConfig> {
    let Some((name, spec)) = s.split_once(':') else {
        // A bare name: the default backend is decided by the caller (host for kiln exec).
        check_name(s, s)?;
        return Ok(LabelConfig {
            name: s.to_owned(),
            backend: String::new(),
            options: Default::default(),
        });
    };
    check_name(name, s)?;
    parse_spec(name, spec, s)
}

/// Parses `name=spec` (the `-P` form), where spec is `host`, `docker://image`, `-self-hosted`
/// (act's spelling of host) or `<backend>[:<args>]`.
pub fn parse_platform(s: &str) -> anyhow::Result<LabelConfig> {
    let Some((name, spec)) = s.split_once('=') else {
        bail!(
            "-P {s:?}: expected label=backend, e.g. ubuntu-latest=host or ubuntu-latest=docker://debian:12"
        );
    };
    check_name(name, s)?;
    parse_spec(name, spec, s)
}

fn check_name(name: &str, whole: &str) -> anyhow::Result<()> {
    if name.is_empty() || name.trim() != name || name.contains(char::is_whitespace) {
        bail!("label {whole:?}: the name must be non-empty and contain no spaces");
    }
    Ok(())
}

fn parse_spec(name: &str, spec: &str, whole: &str) -> anyhow::Result<LabelConfig> {
    let mut options = serde_json::Map::new();
    let backend = if spec.is_empty() || spec == SKIP {
        SKIP.to_owned()
    } else if spec == "-self-hosted" || spec == "host" {
        "host".to_owned()
    } else if let Some(image) = spec.strip_prefix("docker://") {
        if image.is_empty() {
            bail!("label {whole:?}: docker:// needs an image, e.g. {name}:docker://debian:12");
        }
        options.insert("image".into(), image.into());
        "docker".to_owned()
    } else {
        let (backend, args) = spec.split_once(':').unwrap_or((spec, ""));
        let args = args.strip_prefix("//").unwrap_or(args);
        if backend.is_empty()
            || !backend.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            bail!(
                "label {whole:?}: unknown backend {backend:?}; use host, docker://IMAGE or the name \
                 of a configured plugin"
            );
        }
        if !args.is_empty() {
            options.insert("args".into(), args.into());
        }
        if backend == "docker" && !args.is_empty() {
            options.insert("image".into(), args.into());
        }
        backend.to_owned()
    };
    Ok(LabelConfig { name: name.to_owned(), backend, options })
}

/// Picks the configuration for a job's `runs-on` labels: the first label that is configured.
pub fn pick<'a>(labels: &'a [LabelConfig], runs_on: &[String]) -> Option<&'a LabelConfig> {
    runs_on.iter().find_map(|want| labels.iter().find(|l| &l.name == want))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn show(r: anyhow::Result<LabelConfig>) -> String {
        match r {
            Ok(l) => {
                format!("{} -> {} {}", l.name, l.backend, serde_json::Value::Object(l.options))
            }
            Err(e) => format!("error: {e}"),
        }
    }

    #[test]
    fn labels() {
        let cases = [
            ("ubuntu-latest:docker://node:20", "ubuntu-latest -> docker {\"image\":\"node:20\"}"),
            ("linux:host", "linux -> host {}"),
            ("vm:qemu:debian-12", "vm -> qemu {\"args\":\"debian-12\"}"),
            ("vm:lxc://debian:bookworm", "vm -> lxc {\"args\":\"debian:bookworm\"}"),
            ("bare", "bare ->  {}"),
            (
                "x:docker://",
                "error: label \"x:docker://\": docker:// needs an image, e.g. x:docker://debian:12",
            ),
            (
                " x:host",
                "error: label \" x:host\": the name must be non-empty and contain no spaces",
            ),
            (
                "x:b@d",
                "error: label \"x:b@d\": unknown backend \"b@d\"; use host, docker://IMAGE or the name of a configured plugin",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(show(parse_label(input)), want, "{input}");
        }
        assert_eq!(show(parse_platform("ubuntu-latest=-self-hosted")), "ubuntu-latest -> host {}");
        assert_eq!(show(parse_platform("a=docker://img")), "a -> docker {\"image\":\"img\"}");
        assert!(parse_platform("nolabel").is_err());
        assert_eq!(show(parse_platform("old=")), "old -> skip {}");
        for s in ["vm:lxc://debian:bookworm", "vm:lxc:debian:bookworm"] {
            assert_eq!(parse_label(s).unwrap().to_string(), "vm:lxc://debian:bookworm", "{s}");
        }
        assert_eq!(parse_label("vm:qemu:debian-12").unwrap().to_string(), "vm:qemu:debian-12");
    }

    #[test]
    fn picks_first_configured() {
        let labels = vec![parse_label("a:host").unwrap(), parse_label("b:docker://x").unwrap()];
        let got = pick(&labels, &["zzz".into(), "b".into(), "a".into()]).unwrap();
        assert_eq!(got.name, "b");
        assert!(pick(&labels, &["q".into()]).is_none());
    }
}
