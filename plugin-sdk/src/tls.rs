//! Mutual TLS configuration from PEM files, for both ends of a TCP connection (rule 12).

use anyhow::Context;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::server::TlsFiles;

fn read(path: &std::path::Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading the {what} {}", path.display()))
}

/// Server side: our identity, and client certificates required, signed by the CA.
pub fn server_config(files: &TlsFiles) -> anyhow::Result<ServerTlsConfig> {
    let identity = Identity::from_pem(read(&files.cert, "certificate")?, read(&files.key, "key")?);
    Ok(ServerTlsConfig::new()
        .identity(identity)
        .client_ca_root(Certificate::from_pem(read(&files.ca, "CA certificate")?))
        .client_auth_optional(false))
}

/// Client side: the server must present a certificate for `domain` signed by the CA; we
/// present ours.
pub fn client_config(files: &TlsFiles, domain: &str) -> anyhow::Result<ClientTlsConfig> {
    let identity = Identity::from_pem(read(&files.cert, "certificate")?, read(&files.key, "key")?);
    Ok(ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&files.ca, "CA certificate")?))
        .identity(identity)
        .domain_name(domain))
}
