//! One QEMU process: the images the plugin knows, a VM's options, its command line, the
//! accelerator probe, and stopping a VM (never by PID alone: the process must still be the
//! QEMU of that VM's state directory).

use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_plugin_sdk::{Error, Result};

/// The image used when a label names none.
pub(crate) const DEFAULT_IMAGE: &str = "debian-bookworm";
/// The guest port the agent listens on.
pub(crate) const GUEST_AGENT_PORT: u16 = 7000;
/// The guest port dockerd listens on (mutual TLS).
pub(crate) const GUEST_DOCKER_PORT: u16 = 2376;
/// The kernel command line: the image's init, the serial console, reboot (= exit, with
/// `-no-reboot`) a second after a panic (e.g. when the agent exits), `eth0` as the NIC's name
/// (the initramfs's udev would rename it).
const KERNEL_CMDLINE: &str =
    "console=ttyS0 root=/dev/vda rw init=/sbin/kiln-init panic=1 net.ifnames=0 quiet";

/// A base image: a directory with `disk.qcow2`, `vmlinuz` and `initrd.img`.
#[derive(Debug, Clone)]
pub(crate) struct Image {
    pub(crate) name: String,
    pub(crate) dir: PathBuf,
}

impl Image {
    pub(crate) fn disk(&self) -> PathBuf {
        self.dir.join("disk.qcow2")
    }
    pub(crate) fn kernel(&self) -> PathBuf {
        self.dir.join("vmlinuz")
    }
    pub(crate) fn initrd(&self) -> PathBuf {
        self.dir.join("initrd.img")
    }
}

/// The images in `dir` (subdirectories, or symlinks to them, holding a `disk.qcow2`).
pub(crate) fn known_images(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.path().join("disk.qcow2").is_file())
                .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Finds image `name` in `dir`; the error lists the known ones and says how to build one.
pub(crate) fn find_image(dir: &Path, name: &str, field: &str) -> Result<Image> {
    let valid = !name.is_empty()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && !name.starts_with('.');
    let image = Image { name: name.to_owned(), dir: dir.join(name) };
    if valid && image.disk().is_file() && image.kernel().is_file() && image.initrd().is_file() {
        return Ok(image);
    }
    let known = known_images(dir);
    let known = if known.is_empty() { "none".to_owned() } else { known.join(", ") };
    Err(Error::invalid_argument(format!(
        "unknown VM image {name:?}: the images in {} are: {known} (build debian-bookworm with \
         plugins/qemu/images/build.sh, or point --image-dir at the images)",
        dir.display()
    ))
    .field(field))
}

/// The accelerator in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Accel {
    Kvm,
    Tcg,
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// How long the KVM probe's test boot may take before KVM counts as unusable (nested KVM on
/// some hosts hangs instead of failing).
const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(15);

/// Decides the accelerator: KVM when `/dev/kvm` opens and a real test boot of `kernel` (no
/// root: the kernel panics and, with `-no-reboot`, QEMU exits) finishes in time; TCG otherwise.
pub(crate) async fn probe_accel(qemu: &Path, kernel: Option<&Path>) -> (Accel, String) {
    let opened = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm");
    if let Err(e) = opened {
        return (Accel::Tcg, format!("/dev/kvm cannot be opened ({e})"));
    }
    let Some(kernel) = kernel else {
        return (Accel::Tcg, "no image to test-boot KVM with".to_owned());
    };
    let mut cmd = tokio::process::Command::new(qemu);
    cmd.args(["-accel", "kvm", "-cpu", "host", "-machine", "q35", "-m", "256", "-display", "none"])
        .args(["-nodefaults", "-no-reboot", "-serial", "stdio", "-kernel"])
        .arg(kernel)
        .args(["-append", "console=ttyS0 panic=-1"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return (Accel::Tcg, format!("starting the KVM probe: {e}")),
    };
    match tokio::time::timeout(KVM_PROBE_TIMEOUT, child.wait_with_output()).await {
        Ok(Ok(out)) if String::from_utf8_lossy(&out.stdout).contains("Kernel panic") => {
            (Accel::Kvm, "a test boot under KVM worked".to_owned())
        }
        Ok(Ok(out)) => (
            Accel::Tcg,
            format!(
                "the KVM test boot failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ),
        Ok(Err(e)) => (Accel::Tcg, format!("the KVM test boot failed: {e}")),
        Err(_) => (
            Accel::Tcg,
            format!("the KVM test boot hung for {}s (nested KVM?)", KVM_PROBE_TIMEOUT.as_secs()),
        ),
    }
}

/// What one VM is started with.
pub(crate) struct Launch<'a> {
    pub(crate) name: &'a str,
    pub(crate) image: &'a Image,
    pub(crate) accel: Accel,
    pub(crate) cpus: u32,
    pub(crate) memory_mb: u32,
    pub(crate) dir: &'a Path,
    pub(crate) agent_port: u16,
    pub(crate) docker_port: u16,
}

impl Launch<'_> {
    pub(crate) fn overlay(dir: &Path) -> PathBuf {
        dir.join("overlay.qcow2")
    }
    pub(crate) fn config_drive(dir: &Path) -> PathBuf {
        dir.join("config.img")
    }
    pub(crate) fn console(dir: &Path) -> PathBuf {
        dir.join("console.log")
    }
    pub(crate) fn pidfile(dir: &Path) -> PathBuf {
        dir.join("qemu.pid")
    }

    /// QEMU's arguments: no display, serial console to a file, the overlay and the
    /// read-only config drive as virtio disks, user-mode networking whose only forwards are
    /// the agent's and dockerd's ports, bound to 127.0.0.1.
    pub(crate) fn args(&self) -> Vec<String> {
        let d = |p: PathBuf| p.to_string_lossy().into_owned();
        let mut net =
            format!("user,id=n0,hostfwd=tcp:127.0.0.1:{}-:{GUEST_AGENT_PORT}", self.agent_port);
        if self.docker_port != 0 {
            net.push_str(&format!(
                ",hostfwd=tcp:127.0.0.1:{}-:{GUEST_DOCKER_PORT}",
                self.docker_port
            ));
        }
        let mut args = vec!["-name".to_owned(), format!("kiln-{}", self.name)];
        match self.accel {
            Accel::Kvm => args.extend(["-accel", "kvm", "-cpu", "host"].map(String::from)),
            Accel::Tcg => {
                args.extend(["-accel", "tcg,thread=multi", "-cpu", "max"].map(String::from))
            }
        }
        args.extend(
            ["-machine", "q35", "-display", "none", "-nodefaults", "-no-reboot", "-no-user-config"]
                .map(String::from),
        );
        args.extend([
            "-m".into(),
            self.memory_mb.to_string(),
            "-smp".into(),
            self.cpus.to_string(),
        ]);
        args.extend(["-serial".into(), format!("file:{}", d(Self::console(self.dir)))]);
        args.extend(["-pidfile".into(), d(Self::pidfile(self.dir))]);
        args.extend([
            "-kernel".into(),
            d(self.image.kernel()),
            "-initrd".into(),
            d(self.image.initrd()),
        ]);
        args.extend(["-append".into(), KERNEL_CMDLINE.into()]);
        args.extend([
            "-drive".into(),
            format!("file={},if=virtio,format=qcow2,discard=unmap", d(Self::overlay(self.dir))),
            "-drive".into(),
            format!("file={},if=virtio,format=raw,readonly=on", d(Self::config_drive(self.dir))),
            "-netdev".into(),
            net,
            "-device".into(),
            "virtio-net-pci,netdev=n0,romfile=".into(),
        ]);
        args
    }
}

/// The pid of the QEMU of state directory `dir`, if it still runs: the pid file's process
/// must be a QEMU whose command line names this directory's overlay.
pub(crate) fn running_pid(dir: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(Launch::pidfile(dir)).ok()?.trim().parse().ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let overlay = Launch::overlay(dir);
    let needle = overlay.to_string_lossy();
    let cmdline = String::from_utf8_lossy(&cmdline);
    // A zombie has an empty command line: it is gone.
    (cmdline.contains(needle.as_ref())).then_some(pid)
}

/// Stops the QEMU of `dir`: SIGTERM (QEMU exits at once; the disk is thrown away, so there
/// is nothing for the guest to flush), then SIGKILL after `grace`. Returns whether one ran.
pub(crate) async fn stop(dir: &Path, grace: Duration) -> bool {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let Some(pid) = running_pid(dir) else { return false };
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    let deadline = tokio::time::Instant::now() + grace.max(Duration::from_millis(500));
    while tokio::time::Instant::now() < deadline {
        if running_pid(dir).is_none() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if running_pid(dir) == Some(pid) {
        tracing::warn!(pid, dir = %dir.display(), "qemu ignored SIGTERM: killing it");
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        for _ in 0..100 {
            if running_pid(dir).is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    true
}

/// The last `lines` lines of a VM's console log (for errors).
pub(crate) fn console_tail(dir: &Path, lines: usize) -> String {
    let text = std::fs::read(Launch::console(dir)).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    let tail = all[all.len().saturating_sub(lines)..].join("\n");
    if tail.trim().is_empty() { "(the console log is empty)".to_owned() } else { tail }
}

/// Finds `program` on PATH (or as given, when it has a slash).
pub(crate) fn which(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return Path::new(program).is_file().then(|| PathBuf::from(program));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(program)).find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_image_lists_the_known_ones_and_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("debian-bookworm");
        std::fs::create_dir(&img).unwrap();
        for f in ["disk.qcow2", "vmlinuz", "initrd.img"] {
            std::fs::write(img.join(f), "").unwrap();
        }
        assert!(find_image(dir.path(), "debian-bookworm", "options.image").is_ok());
        for bad in ["nope", "../x", ""] {
            let e = find_image(dir.path(), bad, "options.image").unwrap_err();
            assert_eq!(e.field.as_deref(), Some("options.image"));
            assert!(e.message.contains("debian-bookworm"), "{}", e.message);
            assert!(e.message.contains(&dir.path().display().to_string()), "{}", e.message);
        }
    }

    #[test]
    fn forwards_are_bound_to_loopback_only() {
        let image = Image { name: "i".into(), dir: "/img/i".into() };
        let launch = Launch {
            name: "e",
            image: &image,
            accel: Accel::Tcg,
            cpus: 2,
            memory_mb: 1024,
            dir: Path::new("/state/e"),
            agent_port: 40001,
            docker_port: 40002,
        };
        let args = launch.args();
        let net = args.iter().find(|a| a.starts_with("user,")).unwrap();
        assert_eq!(
            net,
            "user,id=n0,hostfwd=tcp:127.0.0.1:40001-:7000,hostfwd=tcp:127.0.0.1:40002-:2376"
        );
    }
}
