//! TLS for the listeners of `[tls]`: the rustls server configuration built
//! from the certificate, key and client-CA files (again on each reload), and
//! the principal a verified client certificate names. No sockets here.

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::ring;
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::config::TlsConfig;

/// The longest principal a certificate may name.
const MAX_PRINCIPAL_BYTES: usize = 256;

/// Builds the server's TLS configuration from the files `config` names;
/// the error names the file at fault and what is wrong with it.
pub fn server_config(config: &TlsConfig) -> Result<Arc<ServerConfig>, String> {
    let provider = Arc::new(provider());
    let certs = read_certificates(&config.cert_file).map_err(|e| format!("tls.cert_file {e}"))?;
    let key = PrivateKeyDer::from_pem_file(&config.key_file).map_err(|e| {
        format!(
            "tls.key_file {}: no usable private key ({e})",
            config.key_file.display()
        )
    })?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let builder = match &config.client_ca_file {
        Some(path) => {
            let roots = read_roots(path).map_err(|e| format!("tls.client_ca_file {e}"))?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("tls.client_ca_file {}: {e}", path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut server = builder.with_single_cert(certs, key).map_err(|e| {
        let why = match e {
            rustls::Error::InconsistentKeys(_) => {
                "the key does not match the certificate (the first one in cert_file)".to_string()
            }
            other => other.to_string(),
        };
        format!(
            "tls.cert_file {} and tls.key_file {}: {why}",
            config.cert_file.display(),
            config.key_file.display()
        )
    })?;
    // A lock lives as long as its connection, so connections are few and
    // long: resumption would save little and cost memory per client.
    server.session_storage = Arc::new(NoServerSessionStorage {});
    server.send_tls13_tickets = 0;
    Ok(Arc::new(server))
}

/// rustls's *ring* provider: it builds with a C compiler alone (aws-lc-rs
/// wants more), at the cost of no post-quantum key exchange, which rustls
/// marks by deprecating it.
///
/// Key exchange prefers X25519, then P-256, then P-384 (the provider's own
/// order puts P-384 first). A client sends its key share for its first
/// group and a TLS 1.3 server takes the client's order, so this order is
/// what pklock's own clients cost a server: a handshake over P-384 takes
/// about 4.5 times the server CPU of one over X25519 (*ring*'s P-384 is
/// generic big-number code; see benches/README.md, "TLS against plain").
#[allow(deprecated)]
pub fn provider() -> rustls::crypto::CryptoProvider {
    let mut provider = ring::default_provider();
    provider.kx_groups = vec![
        ring::kx_group::X25519,
        ring::kx_group::SECP256R1,
        ring::kx_group::SECP384R1,
    ];
    provider
}

/// The PEM certificates in `path`, at least one; the error names the file.
pub fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

/// The CA certificates in `path`, as roots to verify a peer against.
pub fn read_roots(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in read_certificates(path)? {
        roots
            .add(cert)
            .map_err(|e| format!("{}: not a usable CA certificate ({e})", path.display()))?;
    }
    Ok(roots)
}

/// The principal a client certificate names: its subject's common name, or
/// failing that its first DNS, email or URI subject alternative name.
pub fn principal_of(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = X509Certificate::from_der(cert.as_ref()).ok()?;
    let common_name = parsed
        .subject()
        .iter_common_name()
        .find_map(|cn| cn.as_str().ok())
        .map(str::to_string);
    let alternative = || {
        let sans = parsed.subject_alternative_name().ok()??;
        sans.value.general_names.iter().find_map(|name| match name {
            GeneralName::DNSName(s) | GeneralName::RFC822Name(s) | GeneralName::URI(s) => {
                Some(s.to_string())
            }
            _ => None,
        })
    };
    common_name
        .filter(|name| !name.is_empty())
        .or_else(alternative)
        .filter(|name| !name.is_empty() && name.len() <= MAX_PRINCIPAL_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::NamedGroup;

    #[test]
    fn key_exchange_prefers_x25519_and_keeps_every_group() {
        let groups: Vec<NamedGroup> = provider().kx_groups.iter().map(|g| g.name()).collect();
        assert_eq!(
            groups,
            [
                NamedGroup::X25519,
                NamedGroup::secp256r1,
                NamedGroup::secp384r1
            ]
        );
    }
}
