//! A throwaway PKI for the TLS tests: two CAs, broker certificates, client certificates
//! (good, from the other CA, expired), written as PEM files in a directory.

#![allow(dead_code, clippy::unwrap_used)]

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use std::path::{Path, PathBuf};

/// The subject the first good client's certificate carries, as the broker reports it.
pub const CLIENT_A: &str = "CN=collector-a, O=DaemonEye";
/// The second good client's subject.
pub const CLIENT_B: &str = "CN=reader, O=DaemonEye";

/// One end's files.
#[derive(Clone, Debug)]
pub struct Files {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// Every file the tests use, under one directory.
pub struct Pki {
    /// The CA that signed the broker and the good clients.
    pub ca: PathBuf,
    /// Another CA, trusted by nobody.
    pub other_ca: PathBuf,
    /// The broker: valid for `localhost` and 127.0.0.1, client CA `ca`.
    pub broker: Files,
    /// A broker certificate from `ca` valid only for `other.example`.
    pub broker_other_name: Files,
    /// A broker certificate from `other_ca`.
    pub broker_other_ca: Files,
    /// A client certificate from `ca`, subject [`CLIENT_A`]; trusts `ca`.
    pub client_a: Files,
    /// A client certificate from `ca`, subject [`CLIENT_B`]; trusts `ca`.
    pub client_b: Files,
    /// A client certificate from `other_ca`; trusts `ca`.
    pub client_other_ca: Files,
    /// A client certificate from `ca` that expired in 2001; trusts `ca`.
    pub client_expired: Files,
}

fn ca(dir: &Path, name: &str) -> (CertifiedIssuer<'static, KeyPair>, PathBuf) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    let path = dir.join(format!("{name}.pem"));
    std::fs::write(&path, issuer.pem()).unwrap();
    (issuer, path)
}

#[derive(Clone, Copy)]
enum Role {
    Server,
    Client,
}

struct Leaf<'a> {
    name: &'a str,
    role: Role,
    sans: &'a [&'a str],
    subject: &'a [(DnType, &'a str)],
    expired: bool,
}

fn leaf(
    dir: &Path,
    issuer: &CertifiedIssuer<'static, KeyPair>,
    trust: &Path,
    spec: &Leaf<'_>,
) -> Files {
    let mut params = CertificateParams::new(
        spec.sans
            .iter()
            .map(|s| (*s).to_owned())
            .collect::<Vec<_>>(),
    )
    .unwrap();
    params.distinguished_name = DistinguishedName::new();
    for (ty, value) in spec.subject {
        params.distinguished_name.push(ty.clone(), *value);
    }
    params.extended_key_usages = vec![match spec.role {
        Role::Server => ExtendedKeyUsagePurpose::ServerAuth,
        Role::Client => ExtendedKeyUsagePurpose::ClientAuth,
    }];
    if spec.expired {
        params.not_before = rcgen::date_time_ymd(2000, 1, 1);
        params.not_after = rcgen::date_time_ymd(2001, 1, 1);
    }
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    let files = Files {
        cert: dir.join(format!("{}.pem", spec.name)),
        key: dir.join(format!("{}.key", spec.name)),
        ca: trust.to_path_buf(),
    };
    std::fs::write(&files.cert, cert.pem()).unwrap();
    std::fs::write(&files.key, key.serialize_pem()).unwrap();
    files
}

impl Pki {
    /// Makes every file in `dir` (which must exist).
    pub fn new(dir: &Path) -> Self {
        let (issuer, ca_path) = ca(dir, "ca");
        let (other, other_path) = ca(dir, "other-ca");
        let server = |name, sans, by: &CertifiedIssuer<'static, KeyPair>| {
            leaf(
                dir,
                by,
                &ca_path,
                &Leaf {
                    name,
                    role: Role::Server,
                    sans,
                    subject: &[(DnType::CommonName, "broker")],
                    expired: false,
                },
            )
        };
        let client = |name, cn, by: &CertifiedIssuer<'static, KeyPair>, expired| {
            leaf(
                dir,
                by,
                &ca_path,
                &Leaf {
                    name,
                    role: Role::Client,
                    sans: &[],
                    subject: &[
                        (DnType::CommonName, cn),
                        (DnType::OrganizationName, "DaemonEye"),
                    ],
                    expired,
                },
            )
        };
        Self {
            broker: server("broker", &["localhost", "127.0.0.1"], &issuer),
            broker_other_name: server("broker-other-name", &["other.example"], &issuer),
            broker_other_ca: server("broker-other-ca", &["localhost", "127.0.0.1"], &other),
            client_a: client("client-a", "collector-a", &issuer, false),
            client_b: client("client-b", "reader", &issuer, false),
            client_other_ca: client("client-other-ca", "collector-a", &other, false),
            client_expired: client("client-expired", "collector-a", &issuer, true),
            ca: ca_path,
            other_ca: other_path,
        }
    }
}

impl Files {
    /// As the transport takes them.
    pub fn tls(&self) -> daemoneye_eventbus::transport::tls::TlsFiles {
        daemoneye_eventbus::transport::tls::TlsFiles {
            cert: self.cert.clone(),
            key: self.key.clone(),
            ca: self.ca.clone(),
        }
    }

    /// Loaded for a client.
    pub fn client(&self) -> daemoneye_eventbus::client::ClientTls {
        daemoneye_eventbus::client::ClientTls::load(&self.tls()).unwrap()
    }
}
