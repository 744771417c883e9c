//! One TLS connection speaking raw frames, for the tests of the TLS
//! listeners: a rustls client over a blocking socket, trusting one CA and
//! presenting a client certificate if given one.

use std::io::{self, ErrorKind};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;

use pklock::frame;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use serde_json::{Value, json};

use super::PATIENCE;
use super::pki::Pair;

pub struct TlsPeer {
    pub stream: StreamOwned<ClientConnection, TcpStream>,
}

/// A client configuration trusting `ca_file`, presenting `client` if given.
pub fn client_config(ca_file: &Path, client: Option<&Pair>) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = ClientConfig::builder_with_provider(Arc::new(pklock::tls::provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    Arc::new(match client {
        Some(pair) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(&pair.cert_file)
                    .unwrap()
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_file(&pair.key_file).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    })
}

impl TlsPeer {
    /// Connects to `addr` as `localhost` and completes the handshake.
    pub fn connect(addr: SocketAddr, config: Arc<ClientConfig>) -> io::Result<TlsPeer> {
        let socket = TcpStream::connect(addr)?;
        socket.set_nodelay(true)?;
        socket.set_read_timeout(Some(PATIENCE))?;
        let name = ServerName::try_from("localhost").unwrap();
        let session = ClientConnection::new(config, name).map_err(io::Error::other)?;
        let mut stream = StreamOwned::new(session, socket);
        while stream.conn.is_handshaking() {
            stream.conn.complete_io(&mut stream.sock)?;
        }
        Ok(TlsPeer { stream })
    }

    pub fn send(&mut self, message: Value) -> io::Result<()> {
        frame::write_blocking(&mut self.stream, message.to_string().as_bytes())
    }

    pub fn recv(&mut self) -> io::Result<Value> {
        let body = frame::read_blocking(&mut self.stream, 64 << 20)?;
        serde_json::from_slice(&body).map_err(io::Error::other)
    }

    /// Sends an RPC and returns the whole reply.
    pub fn call(&mut self, command: &str, parameters: Value) -> io::Result<Value> {
        self.send(json!({"command": command, "id": 1, "parameters": parameters}))?;
        self.recv()
    }

    /// `hello`, with a token if given; the reply's `result`.
    pub fn hello(&mut self, auth: Option<&str>) -> io::Result<Value> {
        let mut parameters = json!({"client": "tls-test"});
        if let Some(token) = auth {
            parameters["auth"] = json!(token);
        }
        Ok(self.call("hello", parameters)?["result"].clone())
    }

    /// Whether the server closed the connection, after any messages.
    pub fn closed(&mut self) -> bool {
        loop {
            match frame::read_blocking(&mut self.stream, 64 << 20) {
                Ok(_) => {}
                Err(e) => {
                    return matches!(
                        e.kind(),
                        ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset
                    );
                }
            }
        }
    }
}
