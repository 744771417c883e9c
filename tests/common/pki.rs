//! Certificates for the TLS tests, made with rcgen into a test's directory:
//! a CA, server certificates for `localhost` and 127.0.0.1, client
//! certificates by common name, and the bad ones the error paths need.

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, date_time_ymd,
};

/// A certificate authority that signs into `dir`.
pub struct Ca {
    dir: PathBuf,
    name: String,
    issuer: Issuer<'static, KeyPair>,
    /// The CA's own certificate, PEM, as clients and servers trust it.
    pub cert_file: PathBuf,
}

/// A certificate and its key, as PEM files.
pub struct Pair {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl Ca {
    /// A new CA named `name`, its certificate in `dir/<name>-ca.crt`.
    pub fn new(dir: &Path, name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).unwrap();
        let cert_file = dir.join(format!("{name}-ca.crt"));
        fs::write(&cert_file, cert.pem()).unwrap();
        Ca {
            dir: dir.to_path_buf(),
            name: name.to_string(),
            issuer: Issuer::new(params, key),
            cert_file,
        }
    }

    fn sign(&self, file_stem: &str, mut params: CertificateParams) -> Pair {
        let key = KeyPair::generate().unwrap();
        params.is_ca = IsCa::NoCa;
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let stem = format!("{}-{file_stem}", self.name);
        let pair = Pair {
            cert_file: self.dir.join(format!("{stem}.crt")),
            key_file: self.dir.join(format!("{stem}.key")),
        };
        fs::write(&pair.cert_file, cert.pem()).unwrap();
        fs::write(&pair.key_file, key.serialize_pem()).unwrap();
        pair
    }

    /// A server certificate valid for `localhost` and 127.0.0.1.
    pub fn server(&self, file_stem: &str) -> Pair {
        self.server_for(file_stem, &["localhost", "127.0.0.1"])
    }

    /// A server certificate valid for `names` (DNS names or IP addresses).
    pub fn server_for(&self, file_stem: &str, names: &[&str]) -> Pair {
        let mut params = server_params(names);
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().copied().unwrap_or("server"),
        );
        self.sign(file_stem, params)
    }

    /// A server certificate for `localhost` and 127.0.0.1 that expired in
    /// 2021.
    pub fn expired_server(&self, file_stem: &str) -> Pair {
        let mut params = server_params(&["localhost", "127.0.0.1"]);
        params.not_before = date_time_ymd(2020, 1, 1);
        params.not_after = date_time_ymd(2021, 1, 1);
        self.sign(file_stem, params)
    }

    /// A client certificate with subject CN `common_name`.
    pub fn client(&self, common_name: &str) -> Pair {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(&format!("client-{common_name}"), params)
    }

    /// A client certificate without a CN, whose only name is the DNS SAN
    /// `name`.
    pub fn client_with_san(&self, name: &str) -> Pair {
        let mut params = CertificateParams::new(vec![name.to_string()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(&format!("client-san-{name}"), params)
    }
}

fn server_params(names: &[&str]) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = names
        .iter()
        .map(|name| match name.parse() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName((*name).try_into().unwrap()),
        })
        .collect();
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params
}
