//! Mutual TLS on TCP (rule 12), with certificates made by the test: every plugin — host, test,
//! docker (when an engine is there, see `docker.rs`) and the Python example (when python3 and
//! grpcio are there, see `python_plugin.rs`) — served with `--listen tcp://… --tls-ca
//! --tls-cert --tls-key` passes the protocol and semantics tiers over `https://localhost:PORT`
//! (the tests print each plugin's report and summary line); a client without a certificate,
//! with one from another CA, or expecting another server name, is refused; a plaintext client
//! is refused by the plugin, and plaintext `http://` endpoints and listeners need an explicit
//! insecure flag.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_plugin_sdk::client::{Endpoint, GrpcBackend, connect};
use kiln_plugin_sdk::server::TlsFiles;
use kiln_plugin_sdk::tonic::transport::{Certificate, Channel, ClientTlsConfig};
use kiln_plugin_sdk::{Backend, Capabilities, CapabilitiesRequest, Code, PROTOCOL_VERSION};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::docker::{IMAGE, assert_nothing_left, docker_ready};
use crate::python_plugin::python_missing;
use crate::support::{conformance_bin, kiln_bin, repo_root};

/// A self-signed CA: its certificate (PEM) and the issuer that signs with its key.
pub(crate) fn new_ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), Issuer::new(params, key))
}

/// A leaf certificate for `names` signed by `issuer`: (certificate PEM, key PEM).
pub(crate) fn issue(
    issuer: &Issuer<'_, KeyPair>,
    name: &str,
    names: &[&str],
    usage: ExtendedKeyUsagePurpose,
) -> (String, String) {
    let mut params =
        CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// The operator's CA with a server and a client certificate, and another CA with its own
/// client certificate, as PEM files in a private directory.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, pem: &str| std::fs::write(dir.path().join(name), pem).unwrap();
        let (ca, issuer) = new_ca("kiln e2e ca");
        write("ca.pem", &ca);
        let (cert, key) = issue(
            &issuer,
            "kiln plugin",
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        write("server.pem", &cert);
        write("server-key.pem", &key);
        let (cert, key) = issue(&issuer, "kiln runner", &[], ExtendedKeyUsagePurpose::ClientAuth);
        write("client.pem", &cert);
        write("client-key.pem", &key);
        let (other_ca, other) = new_ca("another ca");
        write("other-ca.pem", &other_ca);
        let (cert, key) = issue(&other, "intruder", &[], ExtendedKeyUsagePurpose::ClientAuth);
        write("other-client.pem", &cert);
        write("other-client-key.pem", &key);
        Pki { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn files(&self, ca: &str, cert: &str, key: &str) -> TlsFiles {
        TlsFiles { ca: self.path(ca), cert: self.path(cert), key: self.path(key) }
    }
}

/// A port nobody listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A plugin served on TCP with mutual TLS; killed when dropped.
struct Plugin {
    child: Child,
    port: u16,
    log: PathBuf,
    _root: tempfile::TempDir,
}

/// The first-party plugins' command lines (before `--listen` and the TLS flags), given a
/// private directory.
fn host(root: &Path) -> Command {
    kiln_plugin(&["host", "--root"], &root.join("envs"))
}

fn test_plugin(root: &Path) -> Command {
    kiln_plugin(&["test", "--root"], &root.join("envs"))
}

fn docker(root: &Path) -> Command {
    kiln_plugin(&["docker", "--state-dir"], &root.join("state"))
}

fn python(root: &Path) -> Command {
    let mut cmd = Command::new("python3");
    cmd.arg(repo_root().join("examples/python-plugin/plugin.py"))
        .arg("--root")
        .arg(root.join("envs"));
    cmd
}

fn kiln_plugin(args: &[&str], dir: &Path) -> Command {
    let mut cmd = Command::new(kiln_bin());
    cmd.arg("plugin").args(args).arg(dir);
    cmd
}

impl Plugin {
    /// `kiln plugin host` with mutual TLS.
    fn start(pki: &Pki) -> Plugin {
        Plugin::start_with(pki, host)
    }

    /// The plugin `command` makes, with `--listen tcp://127.0.0.1:PORT` and the server's TLS
    /// files added, once it accepts connections.
    fn start_with(pki: &Pki, command: fn(&Path) -> Command) -> Plugin {
        // The port is chosen before the plugin binds it; retry if another process took it.
        for attempt in 0..3 {
            let root = tempfile::tempdir().unwrap();
            let log = root.path().join("plugin.log");
            let port = free_port();
            let child = command(root.path())
                .args(["--listen", &format!("tcp://127.0.0.1:{port}"), "--tls-ca"])
                .arg(pki.path("ca.pem"))
                .arg("--tls-cert")
                .arg(pki.path("server.pem"))
                .arg("--tls-key")
                .arg(pki.path("server-key.pem"))
                .env("KILN_LOG", "info")
                .env("NO_COLOR", "1")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap();
            let mut plugin = Plugin { child, port, log, _root: root };
            if plugin.wait_listening() {
                return plugin;
            }
            let text = plugin.log_text();
            let in_use = text.contains("in use") || text.contains("cannot listen");
            assert!(attempt < 2 && in_use, "the plugin did not start:\n{text}");
        }
        unreachable!("the last attempt either returns or fails")
    }

    /// Waits until the port accepts connections (60 s: the Python plugin may generate its
    /// stubs first); false when the plugin exited first.
    fn wait_listening(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return true;
            }
            if self.child.try_wait().unwrap().is_some() {
                return false;
            }
            assert!(
                Instant::now() < deadline,
                "the plugin does not listen after 60 s:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn https(&self) -> String {
        format!("https://localhost:{}", self.port)
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// Connects and handshakes; any failure (connect, TLS, the call) is the error.
async fn handshake(
    backend: impl Future<Output = kiln_plugin_sdk::Result<GrpcBackend>>,
) -> kiln_plugin_sdk::Result<Capabilities> {
    let call = async {
        let backend = backend.await?;
        backend
            .capabilities(CapabilitiesRequest {
                client_name: "kiln-e2e".to_owned(),
                client_version: "0".to_owned(),
                protocol_versions: vec![PROTOCOL_VERSION],
            })
            .await
    };
    tokio::time::timeout(Duration::from_secs(20), call)
        .await
        .unwrap_or_else(|_| panic!("the handshake neither succeeded nor failed within 20 s"))
}

async fn via_sdk(endpoint: Endpoint) -> kiln_plugin_sdk::Result<Capabilities> {
    handshake(async move { connect(&endpoint, "plugin", Duration::from_secs(5)).await }).await
}

/// Asserts that a handshake was refused, printing why.
fn refused(what: &str, r: kiln_plugin_sdk::Result<Capabilities>) {
    match r {
        Ok(caps) => panic!("{what} was served: {caps:?}"),
        Err(e) => println!("{what}: refused as expected: {:?}: {e}", e.code),
    }
}

fn tls_endpoint(plugin: &Plugin, tls: TlsFiles, domain: Option<&str>) -> Endpoint {
    Endpoint::Tls { uri: plugin.https(), tls, domain: domain.map(str::to_owned) }
}

/// Runs the protocol and semantics tiers against `plugin` over `https://localhost:PORT` with
/// the operator's client certificate (the faults tier needs `--command`), plus `extra` flags;
/// asserts that nothing failed, prints the report and its summary line, returns the report.
fn conformance_over_tls(name: &str, pki: &Pki, plugin: &Plugin, extra: &[&str]) -> String {
    let out = Command::new(conformance_bin())
        .args(["--endpoint", &plugin.https(), "--tls-ca"])
        .arg(pki.path("ca.pem"))
        .arg("--tls-cert")
        .arg(pki.path("client.pem"))
        .arg("--tls-key")
        .arg(pki.path("client-key.pem"))
        .args(["--tier", "protocol,semantics"])
        .args(extra)
        .env("KILN_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("{stdout}");
    assert!(
        out.status.success(),
        "conformance of the {name} plugin over mutual TLS failed:\n{stdout}\n{}\n--- plugin log\n{}",
        String::from_utf8_lossy(&out.stderr),
        plugin.log_text()
    );
    let summary = stdout.lines().last().unwrap_or_default();
    assert!(summary.contains(" passed, 0 failed"), "{summary}");
    println!("{name} plugin over tcp with mutual tls: {summary}");
    stdout
}

/// Panics unless every one of `cases` passed in `report`.
fn assert_passed(report: &str, cases: &[&str]) {
    for case in cases {
        assert!(
            report.lines().any(|l| l.starts_with("PASS") && l.contains(case)),
            "{case} did not pass:\n{report}"
        );
    }
}

#[test]
fn conformance_passes_over_mutual_tls() {
    let pki = Pki::new();
    let plugin = Plugin::start(&pki);
    let report = conformance_over_tls("host", &pki, &plugin, &[]);
    assert_passed(&report, &["semantics/copy/round-trip"]);
}

#[test]
fn test_plugin_passes_conformance_over_mutual_tls() {
    let pki = Pki::new();
    let plugin = Plugin::start_with(&pki, test_plugin);
    let report = conformance_over_tls("test", &pki, &plugin, &[]);
    assert_passed(&report, &["semantics/copy/round-trip"]);
}

#[test]
fn docker_plugin_passes_conformance_over_mutual_tls() {
    if !docker_ready("docker_plugin_passes_conformance_over_mutual_tls") {
        return;
    }
    let pki = Pki::new();
    let plugin = Plugin::start_with(&pki, docker);
    let namespace = format!("conformance-e2e-tls-{}", std::process::id());
    let image = format!("image={IMAGE}");
    let extra = ["--namespace", &namespace, "--option", &image, "--container-image", IMAGE];
    let report = conformance_over_tls("docker", &pki, &plugin, &extra);
    assert_passed(
        &report,
        &["semantics/containers/job", "semantics/containers/service", "semantics/containers/step"],
    );
    assert_nothing_left(&namespace);
}

#[test]
fn python_plugin_passes_conformance_over_mutual_tls() {
    if !crate::support::prerequisite(
        "python_plugin_passes_conformance_over_mutual_tls",
        "python-plugin",
        python_missing(),
    ) {
        return;
    }
    let pki = Pki::new();
    let plugin = Plugin::start_with(&pki, python);
    let report = conformance_over_tls("python", &pki, &plugin, &[]);
    assert_passed(&report, &["semantics/exec/stdin", "semantics/copy/traversal"]);
}

#[test]
fn clients_without_a_valid_certificate_are_refused() {
    let pki = Pki::new();
    let plugin = Plugin::start(&pki);
    let rt = runtime();
    let good = pki.files("ca.pem", "client.pem", "client-key.pem");

    let caps = rt
        .block_on(via_sdk(tls_endpoint(&plugin, good.clone(), None)))
        .unwrap_or_else(|e| panic!("a client with a valid certificate was refused: {e}"));
    assert_eq!(caps.plugin_name, "host");

    // No client certificate at all: a TLS channel that trusts the CA but presents nothing.
    let ca = std::fs::read(pki.path("ca.pem")).unwrap();
    let uri = plugin.https();
    let r = rt.block_on(handshake(async move {
        let config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .domain_name("localhost");
        let channel = Channel::from_shared(uri)
            .map_err(|e| kiln_plugin_sdk::Error::invalid_argument(e.to_string()))?
            .tls_config(config)
            .map_err(|e| kiln_plugin_sdk::Error::invalid_argument(e.to_string()))?
            .connect()
            .await
            .map_err(|e| kiln_plugin_sdk::Error::unavailable(e.to_string()))?;
        Ok(GrpcBackend::new(channel, "no-certificate"))
    }));
    refused("a client without a certificate", r);

    // A certificate from another CA.
    let other = pki.files("ca.pem", "other-client.pem", "other-client-key.pem");
    let r = rt.block_on(via_sdk(tls_endpoint(&plugin, other, None)));
    refused("a client with a certificate from another CA", r);

    // The plugin's identity is checked: by the CA…
    let wrong_ca = pki.files("other-ca.pem", "client.pem", "client-key.pem");
    let r = rt.block_on(via_sdk(tls_endpoint(&plugin, wrong_ca, None)));
    refused("a server certificate from an untrusted CA", r);
    // …and by name.
    let r = rt.block_on(via_sdk(tls_endpoint(&plugin, good.clone(), Some("elsewhere.example"))));
    refused("a server certificate for another name", r);

    // Plaintext to the TLS port, explicitly allowed on the client side, gets nothing.
    let plain = Endpoint::parse(&format!("http://127.0.0.1:{}", plugin.port), None, true).unwrap();
    let r = rt.block_on(via_sdk(plain));
    refused("a plaintext client", r);

    // The suite itself with the other CA's certificate cannot reach the plugin.
    let out = Command::new(conformance_bin())
        .args(["--endpoint", &plugin.https(), "--tls-ca"])
        .arg(pki.path("ca.pem"))
        .arg("--tls-cert")
        .arg(pki.path("other-client.pem"))
        .arg("--tls-key")
        .arg(pki.path("other-client-key.pem"))
        .args(["--tier", "protocol", "--filter", "capabilities"])
        .env("KILN_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "kiln-conformance with another CA's certificate passed:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // The refusals did not hurt the plugin.
    let caps2 = rt
        .block_on(via_sdk(tls_endpoint(&plugin, good, None)))
        .unwrap_or_else(|e| panic!("the plugin stopped serving valid clients: {e}"));
    assert_eq!(caps2.instance_id, caps.instance_id);
}

#[test]
fn plaintext_needs_the_insecure_flag() {
    let e = Endpoint::parse("http://127.0.0.1:7443", None, false).unwrap_err();
    assert_eq!(e.code, Code::InvalidArgument, "{e}");
    assert!(e.message.contains("plaintext"), "{e}");
    assert!(matches!(
        Endpoint::parse("http://127.0.0.1:7443", None, true),
        Ok(Endpoint::Insecure(_))
    ));
    let e = Endpoint::parse("https://localhost:7443", None, false).unwrap_err();
    assert!(e.message.contains("mutual TLS"), "{e}");

    // The plugin side: tcp without the TLS files or --insecure does not start.
    let root = tempfile::tempdir().unwrap();
    let out = Command::new(kiln_bin())
        .args(["plugin", "host", "--root"])
        .arg(root.path())
        .args(["--listen", &format!("tcp://127.0.0.1:{}", free_port())])
        .env("KILN_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a plaintext tcp listener started without --insecure");
    assert!(stderr.contains("--insecure"), "{stderr}");
}
