//! Measures the per-step overhead of the docker plugin: `true` run N times through the
//! plugin over gRPC (a running `kiln plugin docker --listen unix://SOCK`), with a staged
//! script and five collected env files as the runner sends them, against `docker exec` of the
//! CLI. Usage: `exec_overhead SOCK IMAGE [N]`.

use std::time::{Duration, Instant};

use futures::StreamExt;
use kiln_plugin_sdk::client::{Endpoint, connect};
use kiln_plugin_sdk::{
    Backend, EnvironmentRequest, ExecEvent, ExecRequest, Owner, RemoveRequest, StagedFile,
};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (sock, image) =
        (args.get(1).cloned().unwrap_or_default(), args.get(2).cloned().unwrap_or_default());
    let n: u32 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(50);
    let endpoint = Endpoint::parse(&format!("unix://{sock}"), None, false)?;
    let b = connect(&endpoint, "docker", Duration::from_secs(10)).await?;
    let id = format!("overhead-{}", std::process::id());
    let mut options = serde_json::Map::new();
    options.insert("image".into(), image.clone().into());
    let t = Instant::now();
    let env = b
        .create_environment(EnvironmentRequest {
            environment_id: id.clone(),
            owner: Owner {
                runner_id: "overhead".into(),
                boot_id: "b".into(),
                job_id: "j".into(),
                expires_at_unix_ms: i64::MAX,
                ..Owner::default()
            },
            label: "x".into(),
            options,
            ..EnvironmentRequest::default()
        })
        .await?;
    let create = t.elapsed();
    let rf = env.paths.runner_files.clone();
    let mut plain = Vec::new();
    let mut staged = Vec::new();
    for i in 0..n {
        for with_files in [false, true] {
            let mut req = ExecRequest {
                exec_id: format!("e{i}-{with_files}"),
                environment_id: id.clone(),
                container_id: env.primary_container_id.clone(),
                argv: vec!["true".into()],
                env: vec![kiln_plugin_sdk::EnvVar::new("PATH", "/usr/bin:/bin")],
                ..ExecRequest::default()
            };
            if with_files {
                let dir = format!("{rf}/steps/{i}");
                req.argv = vec!["sh".into(), format!("{dir}/step.sh")];
                req.files.push(StagedFile {
                    path: format!("{dir}/step.sh"),
                    content: "true\n".into(),
                    mode: 0o755,
                });
                for f in ["env", "output", "path", "state", "summary"] {
                    let p = format!("{dir}/{f}");
                    req.files.push(StagedFile { path: p.clone(), content: "".into(), mode: 0 });
                    req.collect.push(p);
                }
            }
            let t = Instant::now();
            let mut s = b.exec(req).await?;
            while let Some(ev) = s.next().await {
                if let ExecEvent::Exited(x) = ev? {
                    assert!(x.status.success());
                }
            }
            if with_files { staged.push(t.elapsed()) } else { plain.push(t.elapsed()) }
        }
    }
    let name = format!("kiln_{id}_primary");
    let mut cli = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        let ok =
            std::process::Command::new("docker").args(["exec", &name, "true"]).status()?.success();
        assert!(ok);
        cli.push(t.elapsed());
    }
    let t = Instant::now();
    b.remove(RemoveRequest { environment_id: id, container_id: None, grace: Duration::ZERO })
        .await?;
    let remove = t.elapsed();
    let stats = |v: &mut Vec<Duration>| {
        v.sort();
        format!("median {:?}, p90 {:?}", v[v.len() / 2], v[v.len() * 9 / 10])
    };
    let report = format!(
        "environment create {create:?}, remove {remove:?}\n\
         plugin exec `true`:                    {}\n\
         plugin exec script + 5 env files:      {}\n\
         docker exec CLI `true`:                {}\n",
        stats(&mut plain),
        stats(&mut staged),
        stats(&mut cli)
    );
    std::io::Write::write_all(&mut std::io::stderr(), report.as_bytes())?;
    Ok(())
}
