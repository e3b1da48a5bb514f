//! The LXC command-line tools: preflight, a job container's config, start, the init's pid,
//! stop and destroy.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use kiln_plugin_sdk::{Error, Result};

use crate::Network;

/// Where Debian's lxc-templates package puts the templates.
pub(crate) const TEMPLATES: &str = "/usr/share/lxc/templates";
/// Where debootstrap keeps a script per release it can build.
pub(crate) const DEBOOTSTRAP_SCRIPTS: &str = "/usr/share/debootstrap/scripts";
/// The common config of Debian containers (cgroup devices, mounts, seccomp, capabilities).
const COMMON_CONF: &str = "/usr/share/lxc/config/debian.common.conf";
/// The tools every job needs.
const TOOLS: &[&str] = &["lxc-start", "lxc-attach", "lxc-stop", "lxc-info", "lxc-create"];

/// The first `tool` on PATH.
pub(crate) fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path).map(|d| d.join(tool)).find(|p| p.is_file())
}

/// Checks that LXC is installed and usable: the tools, the common config, root.
pub(crate) fn preflight() -> anyhow::Result<()> {
    let missing: Vec<&str> = TOOLS.iter().copied().filter(|t| which(t).is_none()).collect();
    if !missing.is_empty() || !Path::new(COMMON_CONF).is_file() {
        anyhow::bail!(
            "LXC is not installed ({} not found): install Debian's lxc package (apt-get install \
             --no-install-recommends lxc lxc-templates debootstrap rsync distro-info)",
            if missing.is_empty() { COMMON_CONF.to_owned() } else { missing.join(", ") }
        );
    }
    if !nix::unistd::geteuid().is_root() {
        anyhow::bail!(
            "the lxc backend runs privileged LXC containers and must run as root (it runs as uid \
             {})",
            nix::unistd::geteuid()
        );
    }
    Ok(())
}

/// The config of a job container: an overlay of the base's rootfs, its work directory
/// bind-mounted at the same path, [`crate::image::INIT_PATH`] as PID 1, and the network.
pub(crate) fn config(
    id: &str,
    base: &Path,
    dir: &Path,
    work: &Path,
    network: &Network,
    agent_exe: Option<&Path>,
) -> String {
    let mut c = String::new();
    let _ = writeln!(c, "# kiln job container {id}; written by kiln-plugin-lxc");
    let _ = writeln!(c, "lxc.include = {COMMON_CONF}");
    let _ = writeln!(c, "lxc.arch = {}", crate::go_arch());
    let _ = writeln!(c, "lxc.uts.name = {id}");
    let _ = writeln!(
        c,
        "lxc.rootfs.path = overlay:{}:{}",
        base.join("rootfs").display(),
        dir.join("delta0").display()
    );
    let _ = writeln!(c, "lxc.init.cmd = /{}", crate::image::INIT_PATH);
    let _ = writeln!(c, "lxc.signal.halt = SIGTERM");
    let _ = writeln!(c, "lxc.tty.max = 0");
    let _ = writeln!(c, "lxc.pty.max = 64");
    let _ = writeln!(c, "lxc.console.path = none");
    let _ = writeln!(c, "lxc.apparmor.profile = unconfined");
    let rel = work.strip_prefix("/").unwrap_or(work);
    let _ = writeln!(
        c,
        "lxc.mount.entry = {} {} none bind,create=dir 0 0",
        work.display(),
        rel.display()
    );
    if let Some(exe) = agent_exe {
        let at = crate::env::AGENT_EXE.trim_start_matches('/');
        let _ =
            writeln!(c, "lxc.mount.entry = {} {at} none bind,ro,create=file 0 0", exe.display());
    }
    match network {
        Network::None => {
            let _ = writeln!(c, "lxc.net.0.type = empty");
        }
        Network::Bridge(bridge) => {
            let _ = writeln!(c, "lxc.net.0.type = veth");
            let _ = writeln!(c, "lxc.net.0.link = {bridge}");
            let _ = writeln!(c, "lxc.net.0.flags = up");
        }
    }
    let _ = writeln!(c, "lxc.log.file = {}", dir.join("lxc.log").display());
    let _ = writeln!(c, "lxc.log.level = WARN");
    c
}

/// Runs an LXC tool on the container `name` of `lxcpath`; its stdout, or its stderr in the
/// error.
pub(crate) async fn tool(
    program: &str,
    lxcpath: &Path,
    name: &str,
    args: &[&str],
) -> Result<String> {
    let out = tokio::process::Command::new(program)
        .arg("-P")
        .arg(lxcpath)
        .args(["-n", name])
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| Error::unavailable(format!("cannot run {program}: {e}")))?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    Err(Error::unavailable(format!(
        "{program} {name} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    )))
}

/// Starts the container `name` (daemonized) and returns the host pid of its init.
pub(crate) async fn start(lxcpath: &Path, name: &str, dir: &Path) -> Result<i32> {
    if let Err(e) = tool("lxc-start", lxcpath, name, &[]).await {
        let log = crate::image::tail(&dir.join("lxc.log"), 10);
        return Err(Error::unavailable(format!("{}; lxc.log:\n{log}", e.message)));
    }
    init_pid(lxcpath, name).await?.ok_or_else(|| {
        let log = crate::image::tail(&dir.join("lxc.log"), 10);
        Error::unavailable(format!(
            "container {name} stopped right after it started; lxc.log:\n{log}"
        ))
    })
}

/// The host pid of the container's init, `None` when it is not running.
pub(crate) async fn init_pid(lxcpath: &Path, name: &str) -> Result<Option<i32>> {
    let out = tool("lxc-info", lxcpath, name, &["-p", "-H"]).await?;
    Ok(out.trim().parse::<i32>().ok().filter(|p| *p > 1))
}

/// Stops the container `name` at once (`lxc-stop -k`: its init is killed, and with it every
/// process of its PID namespace). Succeeds when it is not running.
pub(crate) async fn stop(lxcpath: &Path, name: &str) -> Result<()> {
    if matches!(init_pid(lxcpath, name).await, Ok(None)) {
        return Ok(());
    }
    match tool("lxc-stop", lxcpath, name, &["-k"]).await {
        Ok(_) => Ok(()),
        Err(e) if matches!(init_pid(lxcpath, name).await, Ok(None)) => {
            tracing::debug!(container = name, error = %e.message, "lxc-stop failed, but it is stopped");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_container_config() {
        let c = config(
            "kiln-job-1",
            Path::new("/var/cache/kiln/lxc/debian-bookworm-0123456789ab"),
            Path::new("/var/lib/kiln/lxc/kiln-job-1"),
            Path::new("/var/lib/kiln/lxc/kiln-job-1/job"),
            &Network::Bridge("br-kiln".into()),
            Some(Path::new("/usr/bin/kiln")),
        );
        expect_test::expect![[r#"
            # kiln job container kiln-job-1; written by kiln-plugin-lxc
            lxc.include = /usr/share/lxc/config/debian.common.conf
            lxc.arch = amd64
            lxc.uts.name = kiln-job-1
            lxc.rootfs.path = overlay:/var/cache/kiln/lxc/debian-bookworm-0123456789ab/rootfs:/var/lib/kiln/lxc/kiln-job-1/delta0
            lxc.init.cmd = /sbin/kiln-init
            lxc.signal.halt = SIGTERM
            lxc.tty.max = 0
            lxc.pty.max = 64
            lxc.console.path = none
            lxc.apparmor.profile = unconfined
            lxc.mount.entry = /var/lib/kiln/lxc/kiln-job-1/job var/lib/kiln/lxc/kiln-job-1/job none bind,create=dir 0 0
            lxc.mount.entry = /usr/bin/kiln usr/local/libexec/kiln-agent none bind,ro,create=file 0 0
            lxc.net.0.type = veth
            lxc.net.0.link = br-kiln
            lxc.net.0.flags = up
            lxc.log.file = /var/lib/kiln/lxc/kiln-job-1/lxc.log
            lxc.log.level = WARN
        "#]]
        .assert_eq(&c);
    }
}
