//! `eventbus tls`: the subject a policy names for a certificate, and a development PKI (a CA,
//! a broker certificate and client certificates) for trying mutual TLS and benchmarking it.

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use std::path::{Path, PathBuf};

/// What `dev-pki` wrote.
pub(crate) struct DevPki {
    pub(crate) ca: PathBuf,
    pub(crate) broker_cert: PathBuf,
    pub(crate) broker_key: PathBuf,
    /// Per client name: certificate and key.
    pub(crate) clients: Vec<(String, PathBuf, PathBuf)>,
}

/// Certificates of the development PKI are valid from an hour ago for this long.
const VALID_DAYS: i64 = 90;

fn validity(params: &mut CertificateParams) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(VALID_DAYS);
}

/// Writes `contents` to `path`, readable by its owner only when `secret`.
fn write(path: &Path, contents: &str, secret: bool) -> Result<()> {
    let mut open = std::fs::OpenOptions::new();
    open.write(true).create_new(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        open.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut f = open
        .open(path)
        .with_context(|| format!("creating {} (it must not exist yet)", path.display()))?;
    std::io::Write::write_all(&mut f, contents.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// Makes a CA, a broker certificate for `localhost`, 127.0.0.1, ::1 and `hosts`, and one
/// client certificate per name in `clients` (subject `CN=NAME, O=daemoneye-eventbus dev`),
/// in `dir` (created private if missing).
pub(crate) fn dev_pki(dir: &Path, hosts: &[String], clients: &[String]) -> Result<DevPki> {
    for name in clients {
        let ok = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c);
        if name.is_empty() || !name.chars().all(ok) {
            anyhow::bail!("client name {name:?}: use letters, digits, '-', '_' and '.'");
        }
    }
    create_private_dir(dir)?;
    let e = |what: &str| format!("making the {what}");
    let mut ca = CertificateParams::new(Vec::<String>::new()).context(e("CA"))?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.distinguished_name = DistinguishedName::new();
    ca.distinguished_name
        .push(DnType::CommonName, "daemoneye-eventbus dev CA");
    validity(&mut ca);
    let ca_key = KeyPair::generate().context(e("CA key"))?;
    let ca_key_pem = ca_key.serialize_pem();
    let issuer = CertifiedIssuer::self_signed(ca, ca_key).context(e("CA"))?;
    let ca_path = dir.join("ca.pem");
    write(&ca_path, &issuer.pem(), false)?;
    write(&dir.join("ca.key"), &ca_key_pem, true)?;

    let leaf = |sans: Vec<String>, cn: &str, usage, file: &str| -> Result<(PathBuf, PathBuf)> {
        let mut p = CertificateParams::new(sans).context(e(file))?;
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.distinguished_name
            .push(DnType::OrganizationName, "daemoneye-eventbus dev");
        p.extended_key_usages = vec![usage];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        validity(&mut p);
        let key = KeyPair::generate().context(e(file))?;
        let cert = p.signed_by(&key, &issuer).context(e(file))?;
        let (c, k) = (
            dir.join(format!("{file}.pem")),
            dir.join(format!("{file}.key")),
        );
        write(&c, &cert.pem(), false)?;
        write(&k, &key.serialize_pem(), true)?;
        Ok((c, k))
    };
    let mut sans = vec!["localhost".to_owned(), "127.0.0.1".into(), "::1".into()];
    sans.extend(hosts.iter().cloned());
    let (broker_cert, broker_key) = leaf(
        sans,
        "broker",
        ExtendedKeyUsagePurpose::ServerAuth,
        "broker",
    )?;
    let mut made = Vec::new();
    for name in clients {
        let (c, k) = leaf(
            Vec::new(),
            name,
            ExtendedKeyUsagePurpose::ClientAuth,
            &format!("client-{name}"),
        )?;
        made.push((name.clone(), c, k));
    }
    Ok(DevPki {
        ca: ca_path,
        broker_cert,
        broker_key,
        clients: made,
    })
}

fn create_private_dir(dir: &Path) -> Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

/// `eventbus tls dev-pki`: makes the files and says how to use them.
pub(crate) fn dev_pki_command(dir: &Path, hosts: &[String], clients: &[String]) -> Result<()> {
    let pki = dev_pki(dir, hosts, clients)?;
    println!("wrote a development PKI to {}", dir.display());
    println!(
        "broker:  eventbus serve --tls-listen 0.0.0.0:4443 --tls-cert {} --tls-key {} \
         --tls-client-ca {}",
        pki.broker_cert.display(),
        pki.broker_key.display(),
        pki.ca.display()
    );
    for (name, cert, key) in &pki.clients {
        println!(
            "client {name}: --socket tls://localhost:4443 --tls-cert {} --tls-key {} --tls-ca {}  \
             (policy tls_subject = \"CN={name}, O=daemoneye-eventbus dev\")",
            cert.display(),
            key.display(),
            pki.ca.display()
        );
    }
    println!(
        "the CA key ({}) signs anything: keep it private; production brokers use your own CA",
        dir.join("ca.key").display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use daemoneye_eventbus::transport::tls::{ClientTls, ServerTls, TlsFiles, subject_of_file};

    #[test]
    fn the_development_pki_loads_on_both_ends_and_refuses_to_overwrite() {
        let dir = std::env::temp_dir().join(format!("eb-devpki-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let pki = dev_pki(&dir, &["broker.example".into()], &["procmond".into()]).unwrap();
        let (_, cert, key) = &pki.clients[0];
        ServerTls::load(&TlsFiles {
            cert: pki.broker_cert.clone(),
            key: pki.broker_key.clone(),
            ca: pki.ca.clone(),
        })
        .unwrap();
        ClientTls::load(&TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            ca: pki.ca.clone(),
        })
        .unwrap();
        assert_eq!(
            subject_of_file(cert).unwrap(),
            "CN=procmond, O=daemoneye-eventbus dev"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&dir), 0o700);
            assert_eq!(mode(&dir.join("ca.key")), 0o600);
            assert_eq!(mode(key), 0o600);
        }
        let again = dev_pki(&dir, &[], &[]).err().unwrap();
        assert!(
            format!("{again:#}").contains("must not exist yet"),
            "{again:#}"
        );
        assert!(dev_pki(&dir.join("x"), &[], &["a b".into()]).is_err());
        assert!(!dir.join("x").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
