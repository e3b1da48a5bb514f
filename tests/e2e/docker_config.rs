//! Forgejo Runner's `container:` keys on a real engine, through the docker plugin's flags they
//! map onto: `docker_host: automount` (the engine's socket in the job container),
//! `network: host`, `privileged` and `force_pull` (against a real local registry,
//! Debian's `docker-registry`, on a loopback port).

use std::io::{Read, Write};
use std::process::{Command, Stdio};

use crate::docker::{IMAGE, assert_nothing_left, docker_ready, runner_id};
use crate::support::{Repo, kiln_bin, wait_for};

/// `kiln exec` with the job on `image` in the docker plugin started with `flags`.
fn exec_with_flags(repo: &Repo, image: &str, flags: &str) -> crate::support::Run {
    let plugin = format!("docker={} plugin docker {flags}", kiln_bin());
    repo.exec(&["-P", &format!("ubuntu-latest=docker://{image}"), "--plugin", &plugin])
}

fn job(script: &str) -> String {
    let script: String = script.lines().map(|l| format!("          {l}\n")).collect();
    format!(
        "on: push\njobs:\n  j:\n    runs-on: ubuntu-latest\n    steps:\n      - run: |\n{script}"
    )
}

#[test]
fn automount_puts_the_engines_socket_in_the_job_container() {
    if !docker_ready("automount_puts_the_engines_socket_in_the_job_container") {
        return;
    }
    let repo = Repo::with_workflow(
        "w.yml",
        &job(
            "if test -S /var/run/docker.sock; then echo \"socket-mounted-$((40 + 2))\"; else echo \"no-socket-$((40 + 2))\"; fi",
        ),
    );
    exec_with_flags(&repo, IMAGE, "--mount-docker-socket")
        .assert_code(0)
        .assert_stdout(&["socket-mounted-42"]);
    // Forgejo Runner's default (`docker_host: "-"`): no socket.
    exec_with_flags(&repo, IMAGE, "").assert_code(0).assert_stdout(&["no-socket-42"]);
    assert_nothing_left(&runner_id(&repo));
}

#[test]
fn network_host_reaches_the_hosts_loopback() {
    if !docker_ready("network_host_reaches_the_hosts_loopback") {
        return;
    }
    // A one-shot HTTP server on the host's loopback: only the host network reaches it.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(false).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut s = stream;
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let _ =
                s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 21\r\n\r\nhost-loopback-reached");
        }
    });
    let repo = Repo::with_workflow(
        "w.yml",
        &job(&format!(
            "echo | nc -w 5 127.0.0.1 {port} | grep -q host-loopback-reached && echo \"reached-$((40 + 2))\" || echo \"unreachable-$((40 + 2))\""
        )),
    );
    exec_with_flags(&repo, IMAGE, "--network host").assert_code(0).assert_stdout(&["reached-42"]);
    // A network per job (the default): the host's loopback is not the container's.
    exec_with_flags(&repo, IMAGE, "")
        .assert_code(0)
        .assert_stdout(&["unreachable-42"])
        .assert_no_stdout(&["reached-42"]);
    assert_nothing_left(&runner_id(&repo));
}

#[test]
fn privileged_job_containers_may_mount() {
    if !docker_ready("privileged_job_containers_may_mount") {
        return;
    }
    let repo = Repo::with_workflow(
        "w.yml",
        &job(
            "mkdir -p /tmp/m\nif mount -t tmpfs none /tmp/m 2>/dev/null; then echo \"mounted-tmpfs-$((40 + 2))\"; else echo \"mount-refused-$((40 + 2))\"; fi",
        ),
    );
    exec_with_flags(&repo, IMAGE, "").assert_code(0).assert_stdout(&["mount-refused-42"]);
    // Some engines cannot run privileged containers at all (an engine inside a container
    // whose capability bounding set is not full): there, kiln must get the engine's own
    // refusal of a privileged container, which shows what it asked for.
    let probe = Command::new("docker")
        .args(["run", "--rm", "--privileged", IMAGE, "true"])
        .output()
        .expect("running docker");
    let run = exec_with_flags(&repo, IMAGE, "--privileged");
    if probe.status.success() {
        run.assert_code(0).assert_stdout(&["mounted-tmpfs-42"]);
    } else {
        let refusal = String::from_utf8_lossy(&probe.stderr);
        println!(
            "this engine refuses `docker run --privileged` ({}): checking that kiln's privileged \
             container meets the same refusal",
            refusal.trim()
        );
        run.assert_code(1).assert_stdout(&["unable to apply caps"]);
    }
    assert_nothing_left(&runner_id(&repo));
}

/// A registry (Debian's docker-registry) on a free loopback port, stopped on drop.
struct Registry {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_registry() -> Option<Registry> {
    let required = std::env::var("KILN_REQUIRE_DOCKER").is_ok_and(|v| v == "1");
    let Ok(bin) = which("docker-registry") else {
        assert!(
            !required,
            "KILN_REQUIRE_DOCKER=1 but docker-registry is missing (run tests/docker/setup.sh)"
        );
        println!("skipping: docker-registry is missing (run tests/docker/setup.sh)");
        return None;
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let child = Command::new(bin)
        .arg("serve")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting docker-registry");
    let registry = Registry { child, port, _dir: dir };
    let up = wait_for(20, || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    assert!(up, "docker-registry did not listen on 127.0.0.1:{port}");
    Some(registry)
}

fn which(name: &str) -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or(())
}

fn docker(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().expect("running docker");
    assert!(out.status.success(), "docker {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Builds a one-layer variant of the test image whose `/version` says `v`, tagged `tag`.
fn build_variant(tag: &str, v: &str) -> String {
    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(
        ctx.path().join("Dockerfile"),
        format!("FROM {IMAGE}\nRUN echo {v} > /version\n"),
    )
    .unwrap();
    let out = Command::new("docker")
        .env("DOCKER_BUILDKIT", "0")
        .args(["build", "-q", "-t", tag])
        .arg(ctx.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    docker(&["image", "inspect", "--format", "{{.Id}}", tag])
}

#[test]
fn force_pull_pulls_an_image_that_is_already_present() {
    if !docker_ready("force_pull_pulls_an_image_that_is_already_present") {
        return;
    }
    let Some(registry) = start_registry() else { return };
    let image = format!("127.0.0.1:{}/kiln-e2e/pulled:1", registry.port);
    // v1 in the registry and in the engine; then v2 pushed over it, v1 kept locally.
    let v1 = build_variant(&image, "v1");
    docker(&["push", &image]);
    let v2 = build_variant(&image, "v2");
    docker(&["push", &image]);
    docker(&["tag", &v1, &image]);
    assert_ne!(v1, v2);
    let repo = Repo::with_workflow("w.yml", &job("echo \"image $(cat /version)\""));
    // Without force_pull the present image is used.
    exec_with_flags(&repo, &image, "").assert_code(0).assert_stdout(&["image v1"]);
    assert_eq!(docker(&["image", "inspect", "--format", "{{.Id}}", &image]), v1);
    // With it, the registry's image is pulled first.
    exec_with_flags(&repo, &image, "--force-pull").assert_code(0).assert_stdout(&["image v2"]);
    assert_eq!(docker(&["image", "inspect", "--format", "{{.Id}}", &image]), v2);
    assert_nothing_left(&runner_id(&repo));
    let _ = Command::new("docker").args(["image", "rm", "-f", &image, &v1, &v2]).output();
}
