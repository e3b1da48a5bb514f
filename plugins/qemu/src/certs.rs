//! Per-VM mutual-TLS material, minted by the plugin with rcgen: a CA that exists only for one
//! VM (its key is never written anywhere), a server certificate for the guest (the agent and
//! dockerd present it; names `kiln-agent`, `localhost`, `127.0.0.1`), and a client
//! certificate for the plugin and the docker plugin. The guest gets the CA certificate and its
//! server pair on the config drive; the plugin keeps the client pair in the VM's state
//! directory. A certificate of one VM is worthless against another.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// The name the agent's certificate carries (the plugin checks it; the port is loopback).
pub(crate) const AGENT_NAME: &str = "kiln-agent";

/// The PEM files of one VM.
pub(crate) struct VmCerts {
    pub(crate) ca: String,
    pub(crate) server_cert: String,
    pub(crate) server_key: String,
    pub(crate) client_cert: String,
    pub(crate) client_key: String,
}

fn leaf(
    issuer: &Issuer<'_, KeyPair>,
    name: &str,
    names: &[&str],
    usage: ExtendedKeyUsagePurpose,
) -> Result<(String, String), rcgen::Error> {
    let mut params =
        CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Mints the certificates of the VM of environment `env_id`.
pub(crate) fn mint(env_id: &str) -> Result<VmCerts, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, format!("kiln qemu CA {env_id}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate()?;
    let ca = params.self_signed(&key)?.pem();
    let issuer = Issuer::new(params, key);
    let (server_cert, server_key) = leaf(
        &issuer,
        AGENT_NAME,
        &[AGENT_NAME, "localhost", "127.0.0.1"],
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let (client_cert, client_key) = leaf(
        &issuer,
        "kiln qemu plugin",
        &["kiln-qemu-plugin"],
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    Ok(VmCerts { ca, server_cert, server_key, client_cert, client_key })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_vm_gets_its_own_ca_and_two_leaves() {
        let a = super::mint("e1").unwrap();
        let b = super::mint("e2").unwrap();
        assert_ne!(a.ca, b.ca);
        for pem in [&a.ca, &a.server_cert, &a.client_cert] {
            assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
        }
        assert!(a.server_key.contains("PRIVATE KEY"));
    }
}
