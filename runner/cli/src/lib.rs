//! The `kiln` command line: `exec` (run a workflow locally), `plugin host|test` (serve a
//! first-party plugin), `validate`, and the daemon-mode commands (`register`,
//! `create-runner-file`, `daemon`, `one-job`, `generate-config`; see `daemon.rs`).

mod cli;
mod daemon;
mod exec;
mod logging;
mod services;
mod signals;

use std::process::ExitCode;

use clap::Parser;

pub use cli::Cli;

/// Entry point of the `kiln` binary (and of the e2e shims).
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let config_level = match &cli.command {
        cli::Command::Daemon(a) => daemon::log_level_of(a.config.as_deref()),
        cli::Command::OneJob(a) => daemon::log_level_of(a.config.as_deref()),
        _ => None,
    };
    logging::init(cli.verbose, config_level.as_deref());
    // A plugin serves its runner's requests, which wait on processes and I/O: one thread runs
    // them (blocking work goes to the blocking pool), and no idle worker threads hold memory.
    let mut builder = match cli.command {
        cli::Command::Plugin(_) => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            report_error(&e);
            ExitCode::from(2)
        }
    }
}

#[allow(clippy::print_stderr)]
fn report_error(e: &anyhow::Error) {
    eprintln!("kiln: error: {e:#}");
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        cli::Command::Exec(args) => exec::exec(*args).await,
        cli::Command::Validate(args) => exec::validate(args),
        cli::Command::Register(args) => daemon::register(args).await,
        cli::Command::CreateRunnerFile(args) => daemon::create_runner_file(args),
        cli::Command::Daemon(args) => daemon::daemon(args).await,
        cli::Command::OneJob(args) => daemon::one_job(args).await,
        cli::Command::GenerateConfig => daemon::generate_config(),
        cli::Command::CacheServer(args) => services::cache_server(args).await,
        cli::Command::Plugin(p) => match p {
            cli::PluginCommand::Host(args) => {
                kiln_plugin_host::run(args).await?;
                Ok(ExitCode::SUCCESS)
            }
            cli::PluginCommand::Test(args) => {
                kiln_plugin_test::run(args).await?;
                Ok(ExitCode::SUCCESS)
            }
            cli::PluginCommand::Docker(args) => {
                kiln_plugin_docker::run(args).await?;
                Ok(ExitCode::SUCCESS)
            }
            cli::PluginCommand::Lxc(args) => {
                kiln_plugin_lxc::run(args).await?;
                Ok(ExitCode::SUCCESS)
            }
            cli::PluginCommand::Qemu(args) => {
                kiln_plugin_qemu::run(args).await?;
                Ok(ExitCode::SUCCESS)
            }
        },
    }
}

/// When a docker plugin is configured next to kiln's embedded host plugin, the host plugin
/// delegates `container:`, `services:` and docker steps to it (`--delegate docker`), and a
/// managed docker plugin may mount the host plugin's environment directories
/// (`--valid-volume ROOT/*`), where the delegated containers find the job's workspace and
/// runner files. A host plugin with another command is left as configured.
pub(crate) fn wire_delegation(
    specs: &mut std::collections::BTreeMap<String, kiln_runner::backends::PluginSpec>,
) -> anyhow::Result<()> {
    use kiln_runner::backends::PluginSpec;
    wire_qemu(specs)?;
    if !specs.contains_key("docker") {
        return Ok(());
    }
    wire_lxc_delegation(specs)?;
    let PluginSpec::Managed { command: embedded, .. } = kiln_runner::backends::embedded_host()?
    else {
        return Ok(());
    };
    // The embedded host plugin, possibly with `--root DIR` (config `host.workdir_parent`).
    let configured_root = match specs.get_mut("host") {
        Some(PluginSpec::Managed { command, .. })
            if command.starts_with(&embedded)
                && (command.len() == embedded.len()
                    || (command.len() == embedded.len() + 2
                        && command[embedded.len()] == "--root")) =>
        {
            let root = command.get(embedded.len() + 1).map(std::path::PathBuf::from);
            command.extend(["--delegate".to_owned(), "docker".to_owned()]);
            root
        }
        _ => return Ok(()),
    };
    if let Some(PluginSpec::Managed { command, .. }) = specs.get_mut("docker") {
        let root =
            configured_root.unwrap_or_else(|| kiln_plugin_host::HostConfig::default_root("host"));
        let root = std::fs::canonicalize(&root).unwrap_or(root);
        command.extend(["--valid-volume".to_owned(), format!("{}/*", root.display())]);
    }
    Ok(())
}

/// Like [`wire_delegation`] for kiln's embedded lxc plugin: `--delegate docker`, and the
/// managed docker plugin may mount the job containers' work directories (`--valid-volume
/// ROOT/*`, ROOT being the lxc plugin's `--root`).
fn wire_lxc_delegation(
    specs: &mut std::collections::BTreeMap<String, kiln_runner::backends::PluginSpec>,
) -> anyhow::Result<()> {
    use kiln_runner::backends::PluginSpec;
    let PluginSpec::Managed { command: embedded, .. } =
        kiln_runner::backends::embedded_plugin("lxc")?
    else {
        return Ok(());
    };
    let root = match specs.get_mut("lxc") {
        Some(PluginSpec::Managed { command, .. }) if command.starts_with(&embedded) => {
            if !command.iter().any(|a| a == "--delegate" || a.starts_with("--delegate=")) {
                command.extend(["--delegate".to_owned(), "docker".to_owned()]);
            }
            let given = command.iter().enumerate().find_map(|(i, a)| {
                a.strip_prefix("--root=")
                    .map(str::to_owned)
                    .or_else(|| (a == "--root").then(|| command.get(i + 1).cloned()).flatten())
            });
            std::path::PathBuf::from(given.unwrap_or_else(|| kiln_plugin_lxc::DEFAULT_ROOT.into()))
        }
        _ => return Ok(()),
    };
    let root = std::fs::canonicalize(&root).unwrap_or(root);
    if let Some(PluginSpec::Managed { command, .. }) = specs.get_mut("docker") {
        command.extend(["--valid-volume".to_owned(), format!("{}/*", root.display())]);
    }
    Ok(())
}

/// When a plugin named `qemu` is configured, its VMs' container layers are delegated to the
/// docker plugin with each VM's own engine (`docker_host` on a loopback port): kiln starts its
/// docker plugin if none is configured, and lets a managed docker plugin use those engines,
/// mount the agent's directories in the guest, and copy the host's images into a guest
/// (`--copy-missing-images`: no registry is needed).
fn wire_qemu(
    specs: &mut std::collections::BTreeMap<String, kiln_runner::backends::PluginSpec>,
) -> anyhow::Result<()> {
    use kiln_runner::backends::PluginSpec;
    match specs.get("qemu") {
        None => return Ok(()),
        // A qemu plugin without containers needs no docker plugin.
        Some(PluginSpec::Managed { command, .. })
            if command.windows(2).any(|w| w[0] == "--delegate" && w[1] == "none") =>
        {
            return Ok(());
        }
        Some(_) => {}
    }
    if !specs.contains_key("docker") {
        specs.insert("docker".to_owned(), kiln_runner::backends::embedded_plugin("docker")?);
    }
    if let Some(PluginSpec::Managed { command, .. }) = specs.get_mut("docker") {
        command.extend(
            [
                "--allow-docker-host",
                "tcp://127.0.0.1:*",
                "--valid-volume",
                "/var/lib/kiln/env/*",
                "--copy-missing-images",
            ]
            .map(str::to_owned),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use kiln_runner::backends::{PluginSpec, embedded_host, embedded_plugin};

    fn command(specs: &BTreeMap<String, PluginSpec>, name: &str) -> Vec<String> {
        match &specs[name] {
            PluginSpec::Managed { command, .. } => command.clone(),
            PluginSpec::Standalone { .. } => Vec::new(),
        }
    }

    #[test]
    fn the_embedded_host_plugin_delegates_to_a_configured_docker_plugin() {
        let mut specs = BTreeMap::from([
            ("host".to_owned(), embedded_host().unwrap()),
            ("docker".to_owned(), embedded_plugin("docker").unwrap()),
        ]);
        super::wire_delegation(&mut specs).unwrap();
        assert!(command(&specs, "host").ends_with(&["--delegate".into(), "docker".into()]));
        let docker = command(&specs, "docker");
        assert_eq!(docker[docker.len() - 2], "--valid-volume");
        assert!(docker[docker.len() - 1].ends_with("/*"), "{docker:?}");

        // No docker plugin: nothing to delegate to.
        let mut specs = BTreeMap::from([("host".to_owned(), embedded_host().unwrap())]);
        super::wire_delegation(&mut specs).unwrap();
        assert_eq!(
            command(&specs, "host"),
            command(&BTreeMap::from([("host".to_owned(), embedded_host().unwrap())]), "host")
        );

        // A host plugin with its own command is left as configured.
        let custom = PluginSpec::Managed { command: vec!["my-host".into()], env: BTreeMap::new() };
        let mut specs = BTreeMap::from([
            ("host".to_owned(), custom),
            ("docker".to_owned(), embedded_plugin("docker").unwrap()),
        ]);
        super::wire_delegation(&mut specs).unwrap();
        assert_eq!(command(&specs, "host"), vec!["my-host".to_owned()]);
        assert_eq!(
            command(&specs, "docker"),
            command(
                &BTreeMap::from([("docker".to_owned(), embedded_plugin("docker").unwrap())]),
                "docker"
            )
        );
    }

    #[test]
    fn the_embedded_lxc_plugin_delegates_to_a_configured_docker_plugin() {
        let mut lxc = embedded_plugin("lxc").unwrap();
        if let PluginSpec::Managed { command, .. } = &mut lxc {
            command.extend(["--root".to_owned(), "/nonexistent/kiln-lxc".to_owned()]);
        }
        let mut specs = BTreeMap::from([
            ("lxc".to_owned(), lxc),
            ("docker".to_owned(), embedded_plugin("docker").unwrap()),
        ]);
        super::wire_delegation(&mut specs).unwrap();
        assert!(command(&specs, "lxc").ends_with(&["--delegate".into(), "docker".into()]));
        let docker = command(&specs, "docker");
        assert_eq!(docker[docker.len() - 2..], ["--valid-volume", "/nonexistent/kiln-lxc/*"]);
    }

    #[test]
    fn a_qemu_plugin_gets_a_docker_plugin_for_the_containers_in_its_vms() {
        let qemu =
            PluginSpec::Managed { command: vec!["kiln-plugin-qemu".into()], env: BTreeMap::new() };
        let mut specs = BTreeMap::from([
            ("host".to_owned(), embedded_host().unwrap()),
            ("qemu".to_owned(), qemu),
        ]);
        super::wire_delegation(&mut specs).unwrap();
        let docker = command(&specs, "docker");
        for flag in [
            "--allow-docker-host",
            "tcp://127.0.0.1:*",
            "--valid-volume",
            "/var/lib/kiln/env/*",
            "--copy-missing-images",
        ] {
            assert!(docker.iter().any(|a| a == flag), "{flag} missing from {docker:?}");
        }

        // Without containers (--delegate none), no docker plugin.
        let qemu = PluginSpec::Managed {
            command: vec!["kiln-plugin-qemu".into(), "--delegate".into(), "none".into()],
            env: BTreeMap::new(),
        };
        let mut specs = BTreeMap::from([("qemu".to_owned(), qemu)]);
        super::wire_delegation(&mut specs).unwrap();
        assert!(!specs.contains_key("docker"));
    }
}
