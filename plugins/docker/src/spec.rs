//! From a protocol `ContainerSpec` to a Docker create body: volumes, ports and `docker run`
//! options parsed and checked against the plugin's policy before anything is created.

use std::collections::HashMap;

use bollard::models::{HealthConfig, HostConfig, PortBinding};
use kiln_plugin_sdk::{ContainerSpec, Error, Result};

/// Options allowed without `--allow-option`: resource limits, health checks, names, env.
const DEFAULT_OPTIONS: &[&str] = &[
    "cpus",
    "memory",
    "memory-swap",
    "memory-reservation",
    "shm-size",
    "health-cmd",
    "health-interval",
    "health-timeout",
    "health-retries",
    "health-start-period",
    "no-healthcheck",
    "hostname",
    "add-host",
    "env",
    "user",
    "workdir",
    "tmpfs",
    "ulimit",
    "cap-drop",
    "init",
    "label",
    "pids-limit",
];

/// Options the plugin understands at all (the rest are INVALID_ARGUMENT).
const KNOWN_OPTIONS: &[&str] =
    &["privileged", "cap-add", "security-opt", "device", "pid", "ipc", "volume", "entrypoint"];

/// What the policy and parser produce for one container.
#[derive(Debug, Default)]
pub(crate) struct Parsed {
    pub(crate) host: HostConfig,
    pub(crate) exposed: Vec<String>,
    pub(crate) env: Vec<String>,
    pub(crate) healthcheck: Option<HealthConfig>,
    pub(crate) hostname: Option<String>,
    pub(crate) user: Option<String>,
    pub(crate) working_dir: Option<String>,
    pub(crate) entrypoint: Option<Vec<String>>,
    pub(crate) labels: HashMap<String, String>,
    /// Named volumes to create, scoped to the environment: (docker name, workflow name).
    pub(crate) named_volumes: Vec<String>,
}

/// The plugin's policy.
pub(crate) struct Policy<'a> {
    pub(crate) valid_volumes: &'a [String],
    pub(crate) allowed_options: &'a [String],
}

impl Policy<'_> {
    pub(crate) fn volume_allowed(&self, host_path: &str) -> bool {
        self.valid_volumes.iter().any(|g| {
            glob::Pattern::new(g).is_ok_and(|p| {
                p.matches_with(
                    host_path,
                    glob::MatchOptions { require_literal_separator: false, ..Default::default() },
                )
            })
        })
    }

    fn option_allowed(&self, name: &str) -> bool {
        DEFAULT_OPTIONS.contains(&name) || self.allowed_options.iter().any(|o| o == name)
    }
}

/// Checks and translates `spec.volumes`, `spec.ports` and `spec.options`.
pub(crate) fn parse(env_id: &str, spec: &ContainerSpec, policy: &Policy<'_>) -> Result<Parsed> {
    let mut p = Parsed::default();
    let mut binds = Vec::new();
    for (i, v) in spec.volumes.iter().enumerate() {
        volume(env_id, v, &format!("spec.volumes[{i}]"), policy, &mut binds, &mut p)?;
    }
    let mut bindings: HashMap<String, Option<Vec<PortBinding>>> = HashMap::new();
    for (i, port) in spec.ports.iter().enumerate() {
        let (container_port, binding) = parse_port(port)
            .map_err(|m| Error::invalid_argument(m).field(format!("spec.ports[{i}]")))?;
        p.exposed.push(container_port.clone());
        bindings
            .entry(container_port)
            .or_insert_with(|| Some(Vec::new()))
            .get_or_insert_default()
            .push(binding);
    }
    if !bindings.is_empty() {
        p.host.port_bindings = Some(bindings);
    }
    let words =
        split_words(&spec.options).map_err(|m| Error::invalid_argument(m).field("spec.options"))?;
    let mut it = words.into_iter().peekable();
    let mut health = HealthConfig::default();
    let mut has_health = false;
    while let Some(word) = it.next() {
        let Some(flag) = word.strip_prefix('-') else {
            return Err(Error::invalid_argument(format!(
                "option {word:?} is not a flag: spec.options takes `docker run` flags such as \
                 --cpus 2 --memory 1g"
            ))
            .field("spec.options"));
        };
        let (name, inline) = match flag.strip_prefix('-') {
            Some(long) => match long.split_once('=') {
                Some((n, v)) => (n.to_owned(), Some(v.to_owned())),
                None => (long.to_owned(), None),
            },
            None => {
                let name = match flag {
                    "e" => "env",
                    "u" => "user",
                    "w" => "workdir",
                    "m" => "memory",
                    "h" => "hostname",
                    "v" => "volume",
                    "l" => "label",
                    other => {
                        return Err(Error::invalid_argument(format!(
                            "option -{other} is not supported by the docker plugin"
                        ))
                        .field("spec.options"));
                    }
                };
                (name.to_owned(), None)
            }
        };
        let field = format!("spec.options --{name}");
        if !DEFAULT_OPTIONS.contains(&name.as_str()) && !KNOWN_OPTIONS.contains(&name.as_str()) {
            return Err(Error::invalid_argument(format!(
                "option --{name} is not supported by the docker plugin"
            ))
            .field(field));
        }
        if !policy.option_allowed(&name) {
            return Err(Error::permission_denied(format!(
                "option --{name} is refused by the docker plugin's policy; an operator may allow \
                 it with --allow-option {name}"
            ))
            .field(field));
        }
        let flag_only = ["privileged", "init", "no-healthcheck"].contains(&name.as_str());
        let value = if flag_only {
            inline.unwrap_or_else(|| "true".to_owned())
        } else {
            match inline.or_else(|| it.next()) {
                Some(v) => v,
                None => {
                    return Err(Error::invalid_argument(format!("option --{name} needs a value"))
                        .field(field));
                }
            }
        };
        let bad = |what: &str| {
            Error::invalid_argument(format!("option --{name} {value:?}: {what}"))
                .field(field.clone())
        };
        let h = &mut p.host;
        match name.as_str() {
            "cpus" => {
                let cpus: f64 = value.parse().map_err(|_| bad("expected a number of CPUs"))?;
                h.nano_cpus = Some((cpus * 1e9) as i64);
            }
            "memory" => {
                h.memory =
                    Some(parse_bytes(&value).ok_or_else(|| bad("expected a size like 512m"))?)
            }
            "memory-swap" => {
                h.memory_swap = Some(if value == "-1" {
                    -1
                } else {
                    parse_bytes(&value).ok_or_else(|| bad("expected a size"))?
                })
            }
            "memory-reservation" => {
                h.memory_reservation =
                    Some(parse_bytes(&value).ok_or_else(|| bad("expected a size"))?)
            }
            "shm-size" => {
                h.shm_size = Some(parse_bytes(&value).ok_or_else(|| bad("expected a size"))?)
            }
            "pids-limit" => {
                h.pids_limit = Some(value.parse().map_err(|_| bad("expected a number"))?)
            }
            "health-cmd" => {
                has_health = true;
                health.test = Some(vec!["CMD-SHELL".to_owned(), value]);
            }
            "health-interval" => {
                has_health = true;
                health.interval = Some(
                    parse_duration_ns(&value).ok_or_else(|| bad("expected a duration like 10s"))?,
                );
            }
            "health-timeout" => {
                has_health = true;
                health.timeout = Some(
                    parse_duration_ns(&value).ok_or_else(|| bad("expected a duration like 5s"))?,
                );
            }
            "health-start-period" => {
                has_health = true;
                health.start_period =
                    Some(parse_duration_ns(&value).ok_or_else(|| bad("expected a duration"))?);
            }
            "health-retries" => {
                has_health = true;
                health.retries = Some(value.parse().map_err(|_| bad("expected a number"))?);
            }
            "no-healthcheck" => {
                has_health = true;
                health.test = Some(vec!["NONE".to_owned()]);
            }
            "hostname" => p.hostname = Some(value),
            "add-host" => h.extra_hosts.get_or_insert_default().push(value),
            "env" => p.env.push(value),
            "user" => p.user = Some(value),
            "workdir" => p.working_dir = Some(value),
            "tmpfs" => {
                let (path, opts) = value.split_once(':').unwrap_or((&value, ""));
                h.tmpfs.get_or_insert_default().insert(path.to_owned(), opts.to_owned());
            }
            "ulimit" => {
                let (n, lim) =
                    value.split_once('=').ok_or_else(|| bad("expected NAME=SOFT[:HARD]"))?;
                let (soft, hard) = lim.split_once(':').unwrap_or((lim, lim));
                h.ulimits.get_or_insert_default().push(bollard::models::ResourcesUlimits {
                    name: Some(n.to_owned()),
                    soft: Some(soft.parse().map_err(|_| bad("expected a number"))?),
                    hard: Some(hard.parse().map_err(|_| bad("expected a number"))?),
                });
            }
            "cap-drop" => h.cap_drop.get_or_insert_default().push(value),
            "cap-add" => h.cap_add.get_or_insert_default().push(value),
            "init" => h.init = Some(value != "false"),
            "privileged" => h.privileged = Some(value != "false"),
            "security-opt" => h.security_opt.get_or_insert_default().push(value),
            "device" => h.devices.get_or_insert_default().push(bollard::models::DeviceMapping {
                path_on_host: Some(value.split(':').next().unwrap_or_default().to_owned()),
                path_in_container: Some(
                    value
                        .split(':')
                        .nth(1)
                        .unwrap_or(value.split(':').next().unwrap_or_default())
                        .to_owned(),
                ),
                cgroup_permissions: Some("rwm".to_owned()),
            }),
            "pid" => h.pid_mode = Some(value),
            "ipc" => h.ipc_mode = Some(value),
            "label" => {
                let (k, v) = value.split_once('=').unwrap_or((&value, ""));
                if k.starts_with(crate::labels::PREFIX) {
                    return Err(bad("labels under dev.kiln. are the plugin's own"));
                }
                p.labels.insert(k.to_owned(), v.to_owned());
            }
            "volume" => volume(env_id, &value, &field, policy, &mut binds, &mut p)?,
            "entrypoint" => p.entrypoint = Some(vec![value]),
            _ => return Err(bad("not supported")),
        }
    }
    if has_health {
        p.healthcheck = Some(health);
    }
    if !binds.is_empty() {
        p.host.binds = Some(binds);
    }
    Ok(p)
}

/// One volume in docker syntax: `/host:/path[:opts]`, `name:/path[:opts]` or `/path`.
fn volume(
    env_id: &str,
    v: &str,
    field: &str,
    policy: &Policy<'_>,
    binds: &mut Vec<String>,
    p: &mut Parsed,
) -> Result<()> {
    let parts: Vec<&str> = v.split(':').collect();
    let bad =
        |m: &str| Error::invalid_argument(format!("volume {v:?}: {m}")).field(field.to_owned());
    match parts.as_slice() {
        [path] if path.starts_with('/') => {
            // An anonymous volume: removed with its container.
            binds.push((*path).to_owned());
            Ok(())
        }
        [src, dst] | [src, dst, _] => {
            if !dst.starts_with('/') {
                return Err(bad("the container path must be absolute"));
            }
            let opts = parts.get(2).map(|o| format!(":{o}")).unwrap_or_default();
            if src.starts_with('/') {
                let clean = std::path::Path::new(src);
                if clean.components().any(|c| c == std::path::Component::ParentDir) {
                    return Err(bad("'..' is not allowed in a host path"));
                }
                if !policy.volume_allowed(src) {
                    return Err(Error::permission_denied(format!(
                        "volume {v:?}: the host path {src} is not allowed by the docker plugin's \
                         policy; an operator may allow it with --valid-volume GLOB"
                    ))
                    .field(field.to_owned()));
                }
                binds.push(format!("{src}:{dst}{opts}"));
            } else {
                if src.is_empty()
                    || !src.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
                {
                    return Err(bad("a volume name is [A-Za-z0-9_.-]"));
                }
                let scoped = crate::labels::scoped_volume(env_id, src);
                binds.push(format!("{scoped}:{dst}{opts}"));
                p.named_volumes.push(scoped);
            }
            Ok(())
        }
        _ => Err(bad("expected /host:/path, name:/path or /path")),
    }
}

/// `8080`, `8080:80`, `127.0.0.1:8080:80/tcp`, `127.0.0.1::80` → ("80/tcp", binding).
fn parse_port(s: &str) -> std::result::Result<(String, PortBinding), String> {
    let (spec, proto) = match s.rsplit_once('/') {
        Some((a, p)) if ["tcp", "udp", "sctp"].contains(&p) => (a, p),
        Some(_) => return Err(format!("port {s:?}: the protocol must be tcp, udp or sctp")),
        None => (s, "tcp"),
    };
    let parts: Vec<&str> = spec.split(':').collect();
    let (ip, host, container) = match parts.as_slice() {
        [c] => ("", "", *c),
        [h, c] => ("", *h, *c),
        [ip, h, c] => (*ip, *h, *c),
        _ => return Err(format!("port {s:?}: expected [IP:][HOST:]CONTAINER[/PROTO]")),
    };
    let num = |x: &str| x.parse::<u16>().is_ok_and(|n| n > 0);
    if !num(container) || (!host.is_empty() && !num(host)) {
        return Err(format!("port {s:?}: ports are numbers from 1 to 65535"));
    }
    Ok((
        format!("{container}/{proto}"),
        PortBinding {
            host_ip: (!ip.is_empty()).then(|| ip.to_owned()),
            host_port: Some(host.to_owned()),
        },
    ))
}

/// `512m`, `1g`, `1024` → bytes.
fn parse_bytes(s: &str) -> Option<i64> {
    let s = s.trim().to_ascii_lowercase();
    let s = s.strip_suffix('b').unwrap_or(&s);
    let (num, mult) = match s.chars().last()? {
        'k' => (&s[..s.len() - 1], 1i64 << 10),
        'm' => (&s[..s.len() - 1], 1 << 20),
        'g' => (&s[..s.len() - 1], 1 << 30),
        't' => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    let n: f64 = num.parse().ok()?;
    Some((n * mult as f64) as i64)
}

/// Go durations (`10s`, `1m30s`, `500ms`) → nanoseconds.
pub(crate) fn parse_duration_ns(s: &str) -> Option<i64> {
    let mut total = 0f64;
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let n: f64 = rest[..end].parse().ok()?;
        rest = &rest[end..];
        let unit_end = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let mult = match &rest[..unit_end] {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" | "" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        total += n * mult;
        rest = &rest[unit_end..];
    }
    Some(total as i64)
}

/// Splits an options string like a POSIX shell would (quotes and backslashes, no expansion).
pub(crate) fn split_words(s: &str) -> std::result::Result<Vec<String>, String> {
    kiln_plugin_sdk::words::split_command(s).map_err(|e| format!("options: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy<'a>(vols: &'a [String], opts: &'a [String]) -> Policy<'a> {
        Policy { valid_volumes: vols, allowed_options: opts }
    }

    #[test]
    fn words_and_durations() {
        assert_eq!(
            split_words(r#"--health-cmd "pg_isready -U x" --cpus=2 'a b'"#).unwrap(),
            ["--health-cmd", "pg_isready -U x", "--cpus=2", "a b"]
        );
        assert_eq!(parse_duration_ns("1m30s"), Some(90_000_000_000));
        assert_eq!(parse_duration_ns("500ms"), Some(500_000_000));
        assert_eq!(parse_bytes("1g"), Some(1 << 30));
        assert_eq!(parse_port("127.0.0.1:8080:80/udp").unwrap().0, "80/udp");
        assert!(parse_port("x:80").is_err());
    }

    #[test]
    fn policy_refuses_before_creating() {
        let spec = ContainerSpec {
            volumes: vec!["cache:/cache".into(), "/srv/data:/data:ro".into()],
            options: "--cpus 1 --health-cmd 'true' --health-interval 2s".into(),
            ports: vec!["8080:80".into()],
            ..ContainerSpec::default()
        };
        let vols = vec!["/srv/**".to_owned()];
        let p = parse("e", &spec, &policy(&vols, &[])).unwrap();
        assert_eq!(p.named_volumes, ["kiln_e_v_cache"]);
        assert_eq!(p.host.binds.as_ref().unwrap()[1], "/srv/data:/data:ro");
        assert_eq!(p.healthcheck.unwrap().interval, Some(2_000_000_000));
        let err = parse("e", &spec, &policy(&[], &[])).unwrap_err();
        assert_eq!(err.code, kiln_plugin_sdk::Code::PermissionDenied);
        assert_eq!(err.field.as_deref(), Some("spec.volumes[1]"));
        let priv_spec =
            ContainerSpec { options: "--privileged".into(), ..ContainerSpec::default() };
        let err = parse("e", &priv_spec, &policy(&[], &[])).unwrap_err();
        assert_eq!(err.code, kiln_plugin_sdk::Code::PermissionDenied);
        assert!(err.message.contains("--allow-option privileged"), "{err}");
        assert!(parse("e", &priv_spec, &policy(&[], &["privileged".into()])).is_ok());
        let bad = ContainerSpec { options: "--frobnicate 1".into(), ..ContainerSpec::default() };
        assert_eq!(
            parse("e", &bad, &policy(&[], &[])).unwrap_err().code,
            kiln_plugin_sdk::Code::InvalidArgument
        );
    }
}
