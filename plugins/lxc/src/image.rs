//! Images (`DISTRO:RELEASE`) and their base containers: built once by Debian's `debian`
//! template (debootstrap), cached under the base directory by a hash of the recipe.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use kiln_plugin_sdk::{Error, Result};
use sha2::{Digest, Sha256};

/// The packages every base has, beyond the template's own: what jobs need.
pub(crate) const PACKAGES: &[&str] =
    &["bash", "git", "nodejs", "python3", "ca-certificates", "procps", "util-linux"];

/// PID 1 of every job container: reaps orphans (the `wait` of a shell reaps any child) and
/// ends on SIGTERM or SIGPWR. No init system is booted: a job needs none, and it would cost
/// seconds.
pub(crate) const INIT: &str = "#!/bin/sh\n\
# kiln: PID 1 of a job container (reaps orphans; ends on SIGTERM/SIGPWR)\n\
trap 'exit 0' TERM PWR\n\
while :; do sleep 3600 & wait; done\n";

/// Where [`INIT`] is written in the base's rootfs.
pub(crate) const INIT_PATH: &str = "sbin/kiln-init";

/// The file written last into a finished base (its recipe): a directory without it is a
/// build that did not finish.
const MARKER: &str = "kiln-base.json";

/// The distributions images can name, with the LXC template that builds them.
const DISTROS: &[(&str, &str)] = &[("debian", "debian")];

/// An image: `DISTRO:RELEASE`, as in Forgejo Runner's `lxc://debian:bookworm`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Image {
    /// The distribution (`debian`).
    pub distro: String,
    /// The release (`bookworm`).
    pub release: String,
}

impl fmt::Display for Image {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.distro, self.release)
    }
}

impl FromStr for Image {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Image, String> {
        let word = |w: &str| {
            !w.is_empty()
                && w.len() <= 32
                && w.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        };
        match s.split_once(':') {
            Some((d, r)) if word(d) && word(r) => {
                Ok(Image { distro: d.to_owned(), release: r.to_owned() })
            }
            _ => Err(format!(
                "{s:?} is not an LXC image: expected DISTRO:RELEASE in lowercase letters, digits \
                 and '-', e.g. debian:bookworm"
            )),
        }
    }
}

impl Image {
    /// The template that builds this image, or a clear error for an unknown distribution or
    /// release (debootstrap has a script for each release it can build).
    pub(crate) fn check(&self, scripts: &Path) -> Result<&'static str> {
        let Some((_, template)) = DISTROS.iter().find(|(d, _)| *d == self.distro) else {
            let known: Vec<&str> = DISTROS.iter().map(|(d, _)| *d).collect();
            return Err(Error::invalid_argument(format!(
                "lxc image {self}: unknown distribution {:?}; this plugin builds {}",
                self.distro,
                known.join(", ")
            ))
            .field("options"));
        };
        if !scripts.join(&self.release).exists() {
            let mut known: Vec<String> = std::fs::read_dir(scripts)
                .map(|d| {
                    d.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .filter(|n| n.bytes().all(|b| b.is_ascii_lowercase()))
                        .collect()
                })
                .unwrap_or_default();
            known.sort();
            let known = if known.is_empty() {
                format!("none: is debootstrap installed ({} is missing)?", scripts.display())
            } else {
                known.join(", ")
            };
            return Err(Error::invalid_argument(format!(
                "lxc image {self}: unknown {} release {:?}; debootstrap knows {known}",
                self.distro, self.release
            ))
            .field("options"));
        }
        Ok(template)
    }

    /// What the base is built from; its hash names the base.
    pub(crate) fn recipe(&self, template: &str) -> serde_json::Value {
        serde_json::json!({
            "format": 1,
            "distro": self.distro,
            "release": self.release,
            "template": template,
            "packages": PACKAGES,
            "init": INIT,
        })
    }

    /// The base container's name: `DISTRO-RELEASE-<12 hex digits of the recipe's hash>`.
    pub(crate) fn base_name(&self, template: &str) -> String {
        let bytes = serde_json::to_vec(&self.recipe(template)).unwrap_or_default();
        let hash = hex::encode(Sha256::digest(&bytes));
        format!("{}-{}-{}", self.distro, self.release, &hash[..12])
    }
}

/// The mirrors apt uses (deb822 `URIs:` lines, or one-line `deb URL suite` entries): the
/// first that is not a security mirror and the first that is; Debian's own when none is found.
pub(crate) fn apt_mirrors() -> (String, String) {
    let mut found = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut files: Vec<PathBuf> = dir.flatten().map(|e| e.path()).collect();
        files.sort();
        for f in files {
            let Ok(text) = std::fs::read_to_string(&f) else { continue };
            let ext = f.extension().and_then(|e| e.to_str()).unwrap_or_default();
            for line in text.lines() {
                let line = line.trim();
                if ext == "sources" {
                    if let Some(uris) = line.strip_prefix("URIs:") {
                        found.extend(uris.split_whitespace().map(str::to_owned));
                    }
                } else if ext == "list" {
                    found.extend(deb_line(line));
                }
            }
        }
    }
    if let Ok(text) = std::fs::read_to_string("/etc/apt/sources.list") {
        found.extend(text.lines().filter_map(|l| deb_line(l.trim())));
    }
    let http = |u: &&String| u.starts_with("http");
    let main = found.iter().filter(http).find(|u| !u.contains("security"));
    let security = found.iter().filter(http).find(|u| u.contains("security"));
    (
        main.cloned().unwrap_or_else(|| "http://deb.debian.org/debian".to_owned()),
        security.cloned().unwrap_or_else(|| "http://deb.debian.org/debian-security".to_owned()),
    )
}

fn deb_line(line: &str) -> Option<String> {
    let rest = line.strip_prefix("deb ")?;
    rest.split_whitespace().find(|w| !w.starts_with('[')).map(str::to_owned)
}

/// A finished base: its directory (an LXC container under the base directory).
pub(crate) fn finished(base_dir: &Path, name: &str) -> Option<PathBuf> {
    let dir = base_dir.join(name);
    dir.join(MARKER).is_file().then_some(dir)
}

/// Builds the base `name` of `image` under `base_dir` (blocking; the caller holds the build
/// lock). A failed build is removed and reported with the tail of its log.
pub(crate) fn build(
    base_dir: &Path,
    name: &str,
    image: &Image,
    template: &str,
    (mirror, security): (&str, &str),
) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let dir = base_dir.join(name);
    if let Some(done) = finished(base_dir, name) {
        return Ok(done);
    }
    // The template needs rsync, and debian-distro-info to name the security suite (without
    // it, apt's update fails and the packages are silently not installed).
    for (tool, package) in
        [("debootstrap", "debootstrap"), ("rsync", "rsync"), ("debian-distro-info", "distro-info")]
    {
        if crate::lxc::which(tool).is_none() {
            return Err(Error::failed_precondition(format!(
                "building the lxc image {image} needs {tool}: install Debian's {package} package \
                 (apt-get install --no-install-recommends lxc lxc-templates debootstrap rsync \
                 distro-info)"
            )));
        }
    }
    let template_file = Path::new(crate::lxc::TEMPLATES).join(format!("lxc-{template}"));
    if !template_file.is_file() {
        return Err(Error::failed_precondition(format!(
            "building the lxc image {image} needs the LXC template {}: install Debian's \
             lxc-templates package",
            template_file.display()
        )));
    }
    // What an interrupted build left.
    if dir.exists() {
        remove_base(base_dir, name);
    }
    let log = base_dir.join(format!("{name}.log"));
    let conf = base_dir.join(format!("{name}.conf"));
    let io = |what: &str, e: std::io::Error| Error::io(what.to_owned(), &e);
    std::fs::write(&conf, "lxc.net.0.type = empty\n").map_err(|e| io("writing the config", e))?;
    let log_file = std::fs::File::create(&log).map_err(|e| io("creating the build log", e))?;
    let err_file = log_file.try_clone().map_err(|e| io("opening the build log", e))?;
    tracing::info!(%image, %mirror, log = %log.display(), "building the base container (once per image)");
    let status = std::process::Command::new("lxc-create")
        .arg("-P")
        .arg(base_dir)
        .args(["-n", name, "-t", template, "-f"])
        .arg(&conf)
        .args(["--", "-r", &image.release, "--mirror", mirror, "--security-mirror", security])
        .args(["--packages", &PACKAGES.join(",")])
        .stdin(std::process::Stdio::null())
        .stdout(log_file)
        .stderr(err_file)
        .status()
        .map_err(|e| io("running lxc-create", e))?;
    let _ = std::fs::remove_file(&conf);
    let rootfs = dir.join("rootfs");
    let installed = PACKAGES.iter().all(|p| {
        // Packages the template's apt-get failed to install leave no status entry.
        *p == "util-linux" || rootfs.join("var/lib/dpkg/info").join(format!("{p}.list")).exists()
    });
    if !status.success() || !installed {
        remove_base(base_dir, name);
        let what = if status.success() {
            format!("the packages {} were not all installed", PACKAGES.join(", "))
        } else {
            format!("lxc-create -t {template} failed ({status})")
        };
        return Err(Error::failed_precondition(format!(
            "building the lxc image {image}: {what}; the last lines of {}:\n{}",
            log.display(),
            tail(&log, 20)
        )));
    }
    let init = rootfs.join(INIT_PATH);
    std::fs::write(&init, INIT).map_err(|e| io("writing the container's init", e))?;
    std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| io("making the container's init executable", e))?;
    // Downloaded packages are of no use to jobs.
    if let Ok(debs) = std::fs::read_dir(rootfs.join("var/cache/apt/archives")) {
        for d in debs.flatten() {
            if d.path().extension().is_some_and(|e| e == "deb") {
                let _ = std::fs::remove_file(d.path());
            }
        }
    }
    let recipe = serde_json::to_vec_pretty(&image.recipe(template)).unwrap_or_default();
    std::fs::write(dir.join(MARKER), recipe).map_err(|e| io("writing the base's marker", e))?;
    Ok(dir)
}

/// Deletes a base container (a failed or interrupted build).
fn remove_base(base_dir: &Path, name: &str) {
    let _ = std::process::Command::new("lxc-destroy")
        .arg("-P")
        .arg(base_dir)
        .args(["-n", name])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    let _ = std::fs::remove_dir_all(base_dir.join(name));
}

/// The last `n` lines of a file.
pub(crate) fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned());
    let text = text.unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_and_errors() {
        let scripts = tempfile::tempdir().unwrap();
        for r in ["bookworm", "trixie"] {
            std::fs::write(scripts.path().join(r), "").unwrap();
        }
        let show = |s: &str| -> String {
            match s.parse::<Image>() {
                Err(e) => format!("parse error: {e}"),
                Ok(i) => match i.check(scripts.path()) {
                    Ok(t) => format!("{i} template {t} base {}", i.base_name(t).len()),
                    Err(e) => format!("error: {}", e.message),
                },
            }
        };
        let got: Vec<String> =
            ["debian:bookworm", "debian:sid", "ubuntu:noble", "Debian:x", "debian"]
                .iter()
                .map(|s| show(s))
                .collect();
        expect_test::expect![[r#"
            debian:bookworm template debian base 28
            error: lxc image debian:sid: unknown debian release "sid"; debootstrap knows bookworm, trixie
            error: lxc image ubuntu:noble: unknown distribution "ubuntu"; this plugin builds debian
            parse error: "Debian:x" is not an LXC image: expected DISTRO:RELEASE in lowercase letters, digits and '-', e.g. debian:bookworm
            parse error: "debian" is not an LXC image: expected DISTRO:RELEASE in lowercase letters, digits and '-', e.g. debian:bookworm"#]]
        .assert_eq(&got.join("\n"));
    }

    #[test]
    fn deb_lines() {
        assert_eq!(
            deb_line("deb http://m/debian bookworm main").as_deref(),
            Some("http://m/debian")
        );
        assert_eq!(
            deb_line("deb [signed-by=/k.gpg] http://m/d bookworm main").as_deref(),
            Some("http://m/d")
        );
        assert_eq!(deb_line("# deb http://x"), None);
    }
}
