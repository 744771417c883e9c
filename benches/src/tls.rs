//! TLS for the load generator's pklock connections (`pklock-bench --tls`):
//! the rustls client configuration, trusting the CA file given, and the name
//! the server's certificate is checked against. Sessions are sans-IO, driven
//! by the same loops as plain connections (see [`super::conn`]).

use std::fmt;
use std::net::{IpAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;

use rustls::client::Resumption;
use rustls::{ClientConfig, ClientConnection, StreamOwned};
use rustls_pki_types::ServerName;

use super::BenchError;

/// How to speak TLS to the server under test.
#[derive(Clone)]
pub struct TlsClient {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsClient")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl TlsClient {
    /// Trusts the certificates in the PEM file `ca_file`; checks the server's
    /// certificate against `name` (a DNS name or an IP address); offers only
    /// the key exchange `group` (`x25519`, `secp256r1`, `secp384r1`) when
    /// one is named, else the groups of [`pklock::tls::provider`] in its
    /// order (the server takes the client's first).
    ///
    /// Session resumption is off, as it is on the server: every connection
    /// makes a full handshake, which is what a flood of new clients costs.
    pub fn new(ca_file: &Path, name: &str, group: Option<&str>) -> Result<TlsClient, BenchError> {
        let roots = pklock::tls::read_roots(ca_file).map_err(|e| format!("--ca {e}"))?;
        let name = match name.parse::<IpAddr>() {
            Ok(ip) => ServerName::IpAddress(ip.into()),
            Err(_) => ServerName::try_from(name.to_string())
                .map_err(|e| format!("--tls-name {name:?}: {e}"))?,
        };
        let mut provider = pklock::tls::provider();
        if let Some(group) = group {
            provider
                .kx_groups
                .retain(|g| format!("{:?}", g.name()).eq_ignore_ascii_case(group));
            if provider.kx_groups.is_empty() {
                return Err(format!(
                    "--tls-group {group:?}: expected x25519, secp256r1 or secp384r1"
                ));
            }
        }
        let mut config = ClientConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.resumption = Resumption::disabled();
        Ok(TlsClient {
            config: Arc::new(config),
            name,
        })
    }

    /// A new client session, its handshake not yet started.
    pub fn session(&self) -> Result<ClientConnection, BenchError> {
        ClientConnection::new(self.config.clone(), self.name.clone())
            .map_err(|e| format!("TLS: {e}"))
    }

    /// `stream` wrapped for blocking use: the handshake is made on the
    /// first read or write.
    pub fn blocking(
        &self,
        stream: TcpStream,
    ) -> Result<StreamOwned<ClientConnection, TcpStream>, BenchError> {
        Ok(StreamOwned::new(self.session()?, stream))
    }
}
