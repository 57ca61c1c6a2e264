//! TCP with mutual TLS: the verified certificate subject is the identity the policy names,
//! and every peer that cannot prove who it is (no certificate, another CA, expired, not TLS,
//! silent) is refused, counted and audited while the broker serves everyone else; a client
//! refuses a broker whose certificate is from another CA or for another name.

#![allow(clippy::unwrap_used)]

mod common;

use bytes::Bytes;
use common::pki::{CLIENT_A, CLIENT_B, Files, Pki};
use common::{TempDir, WAIT};
use daemoneye_eventbus::broker::{Broker, BrokerConfig, TlsListen};
use daemoneye_eventbus::client::{
    Client, ClientOptions, ConnectError, RpcErrorKind, ServeOptions, SubscribeError,
};
use daemoneye_eventbus::transport::TransportError;
use daemoneye_eventbus::{Endpoint, Topic};
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn dir(tag: &str) -> TempDir {
    let d = TempDir(std::env::temp_dir().join(format!("eb-tls-{tag}-{}", std::process::id())));
    std::fs::create_dir_all(&d.0).unwrap();
    d
}

/// A broker on `tls://127.0.0.1:0` with `broker`'s certificate and the PKI's CA for clients.
async fn broker(pki: &Pki, broker: &Files, mut config: BrokerConfig) -> (Broker, Endpoint) {
    let listen = TlsListen {
        listen: "127.0.0.1:0".into(),
        cert: broker.cert.clone(),
        key: broker.key.clone(),
        client_ca: pki.ca.clone(),
    };
    let endpoint = listen.endpoint().unwrap();
    config.tls = Some(listen);
    let b = Broker::start_on(config, &[endpoint]).await.unwrap();
    let ep = b.endpoints()[0].clone();
    (b, ep)
}

async fn connect(ep: &Endpoint, name: &str, files: &Files) -> Result<Client, ConnectError> {
    let mut o = ClientOptions::named(name);
    o.reconnect.enabled = false;
    o.tls = Some(files.client());
    Client::connect(ep, o).await
}

/// `from` publishes on `topic`, and `to` receives it.
async fn published(
    from: &Client,
    to: &mut daemoneye_eventbus::client::Subscription,
    topic: &str,
) -> daemoneye_eventbus::Message {
    from.publish(&Topic::new(topic).unwrap(), "x")
        .await
        .unwrap();
    let m = tokio::time::timeout(WAIT, to.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m.topic().as_str(), topic);
    m
}

/// Rules naming the two good clients by subject.
fn policy(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("acl.toml");
    std::fs::write(
        &path,
        format!(
            "version = 1\n\
             [[rule]]\ntls_subject = \"{CLIENT_A}\"\npublish = [\"events.a.#\"]\nreply = [\"control.collector.a\"]\n\
             [[rule]]\ntls_subject = \"{CLIENT_B}\"\nsubscribe = [\"events.#\"]\nrequest = [\"control.collector.a\"]\n"
        ),
    )
    .unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verified_subject_is_the_identity_the_policy_names() {
    let d = dir("subject");
    let pki = Pki::new(&d.0);
    let config = BrokerConfig {
        acl_file: Some(policy(&d.0)),
        ..BrokerConfig::default()
    };
    let (broker, ep) = broker(&pki, &pki.broker, config).await;
    let a = connect(&ep, "a", &pki.client_a).await.unwrap();
    let b = connect(&ep, "b", &pki.client_b).await.unwrap();
    // Each gets what its subject is granted, and nothing else.
    let mut events = b.subscribe(["events.#"]).await.unwrap();
    assert!(matches!(
        a.subscribe(["events.#"]).await,
        Err(SubscribeError::Refused { .. })
    ));
    let _service = a
        .serve(
            ["control.collector.a"],
            ServeOptions::default(),
            |m| async move { Ok(Bytes::from([b"re: ".as_slice(), m.payload()].concat())) },
        )
        .await
        .unwrap();
    let topic = Topic::new("control.collector.a").unwrap();
    let reply = b.request(&topic, "status", WAIT).await.unwrap();
    assert_eq!(reply.payload().as_ref(), b"re: status");
    let refused = a.request(&topic, "status", WAIT).await.unwrap_err();
    assert_eq!(refused.kind, RpcErrorKind::Refused, "{refused}");
    let m = published(&a, &mut events, "events.a.seen").await;
    assert_eq!(m.header().source.as_str(), "a");
    // The broker shows who they are.
    let stats = broker.stats();
    let conn = |subject: &str| {
        stats
            .connections
            .iter()
            .find(|c| c.tls_subject.as_deref() == Some(subject))
            .cloned()
            .unwrap_or_else(|| panic!("no connection of {subject}: {stats:?}"))
    };
    let (ca, cb) = (conn(CLIENT_A), conn(CLIENT_B));
    assert_eq!((ca.name.as_str(), cb.name.as_str()), ("a", "b"));
    assert!(
        ca.peer.starts_with("tls 127.0.0.1:") && ca.peer.ends_with(&format!("({CLIENT_A})")),
        "{}",
        ca.peer
    );
    // a's subscription and request were denied.
    assert_eq!(ca.denied, 2, "{ca:?}");
    assert_eq!(cb.denied, 0, "{cb:?}");
    a.close().await;
    b.close().await;
    broker.shutdown().await;
}

/// Connects over TLS without a client certificate, and reads what the broker says.
async fn without_a_certificate(ep: &Endpoint, ca: &Path) -> std::io::Result<usize> {
    use rustls::pki_types::pem::PemObject;
    let Endpoint::Tls(addr) = ep else {
        unreachable!()
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        #[allow(deprecated)]
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", addr.port))
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await?;
    // Whatever the client sends, the broker answers with an alert.
    tls.write_all(b"hello").await?;
    let mut buf = Vec::new();
    tls.read_to_end(&mut buf).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_that_cannot_prove_who_they_are_are_refused_and_counted() {
    let d = dir("refused");
    let pki = Pki::new(&d.0);
    let audit = d.0.join("audit.log");
    let config = BrokerConfig {
        handshake_timeout_ms: 300,
        audit_log: Some(audit.clone()),
        acl_file: Some(policy(&d.0)),
        ..BrokerConfig::default()
    };
    let (broker, ep) = broker(&pki, &pki.broker, config).await;
    // A silent peer holds nobody up while it waits for its deadline.
    let mut silent = tokio::net::TcpStream::connect(("127.0.0.1", port(&ep)))
        .await
        .unwrap();
    let good = connect(&ep, "good", &pki.client_b).await.unwrap();
    let mut events = good.subscribe(["events.#"]).await.unwrap();

    // No certificate: TLS 1.3 lets the handshake finish on the client's side; the broker's
    // alert ends the connection.
    let none = without_a_certificate(&ep, &pki.ca).await;
    assert!(
        none.as_ref()
            .is_err_and(|e| e.to_string().contains("CertificateRequired")),
        "{none:?}"
    );
    for (files, alert) in [
        (&pki.client_other_ca, "UnknownCA"),
        (&pki.client_expired, "CertificateExpired"),
    ] {
        match connect(&ep, "x", files).await {
            Err(e @ ConnectError::TlsRefused(_)) => {
                let msg = e.to_string();
                assert!(msg.contains(alert), "{msg}");
                assert!(msg.contains("chains to the broker's client CA"), "{msg}");
            }
            other => panic!("{} was let in: {:?}", files.cert.display(), other.err()),
        }
    }
    // Not TLS at all: a plain client's hello.
    let mut plain = tokio::net::TcpStream::connect(("127.0.0.1", port(&ep)))
        .await
        .unwrap();
    plain.write_all(b"EVBS\x01\x00hello").await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(WAIT, plain.read_to_end(&mut buf))
        .await
        .unwrap();
    // The silent one is closed at the handshake deadline.
    let mut byte = [0u8; 1];
    let closed = tokio::time::timeout(WAIT, silent.read(&mut byte)).await;
    assert!(matches!(closed, Ok(Ok(0) | Err(_))), "{closed:?}");

    let stats = broker.stats();
    assert_eq!(stats.tls_refused, 5, "{stats:?}");
    assert_eq!(stats.refused_connections, 5, "{stats:?}");
    assert_eq!(
        stats.refused_by_identity.get("tls 127.0.0.1"),
        Some(&5),
        "{stats:?}"
    );
    // Everyone else was served throughout.
    let a = connect(&ep, "a", &pki.client_a).await.unwrap();
    published(&a, &mut events, "events.a.after").await;
    // Each refusal is in the audit trail with its reason.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let trail = std::fs::read_to_string(&audit).unwrap_or_default();
        let refusals = trail
            .lines()
            .filter(|l| l.contains("\"connection_refused\"") && l.contains("\"transport\":\"Tls\""))
            .count();
        if refusals == 5 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{refusals} refusals in the trail:\n{trail}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    a.close().await;
    good.close().await;
    broker.shutdown().await;
}

fn port(ep: &Endpoint) -> u16 {
    match ep {
        Endpoint::Tls(a) => a.port,
        other => panic!("{other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_refuses_a_broker_it_cannot_verify() {
    let d = dir("server");
    let pki = Pki::new(&d.0);
    for (files, why) in [
        (&pki.broker_other_name, "not valid for name"),
        (&pki.broker_other_ca, "UnknownIssuer"),
    ] {
        let (broker, ep) = broker(&pki, files, BrokerConfig::default()).await;
        match connect(&ep, "a", &pki.client_a).await {
            Err(ConnectError::Transport(e @ TransportError::Handshake { .. })) => {
                assert!(e.to_string().contains(why), "{e}");
            }
            other => panic!("connected to {}: {:?}", files.cert.display(), other.err()),
        }
        assert_eq!(broker.stats().active_connections, 0);
        broker.shutdown().await;
    }
    // A tls:// endpoint without certificates says what it needs.
    let (broker, ep) = broker(&pki, &pki.broker, BrokerConfig::default()).await;
    let mut o = ClientOptions::named("bare");
    o.reconnect.enabled = false;
    let err = Client::connect(&ep, o).await.unwrap_err();
    assert!(err.to_string().contains("--tls-cert"), "{err}");
    broker.shutdown().await;
}

/// Bad TLS settings stop the broker at start with the file named, before it listens.
#[tokio::test]
async fn bad_tls_files_are_named() {
    let d = dir("files");
    let pki = Pki::new(&d.0);
    let garbage = d.0.join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    let cases = [
        (
            Files {
                cert: d.0.join("missing.pem"),
                ..pki.broker.clone()
            },
            "missing.pem",
        ),
        (
            Files {
                cert: garbage.clone(),
                ..pki.broker.clone()
            },
            "holds no PEM certificate",
        ),
        (
            Files {
                key: pki.client_a.key.clone(),
                ..pki.broker.clone()
            },
            "client-a.key",
        ),
    ];
    for (files, says) in cases {
        let listen = TlsListen {
            listen: "127.0.0.1:0".into(),
            cert: files.cert.clone(),
            key: files.key.clone(),
            client_ca: pki.ca.clone(),
        };
        let ep = listen.endpoint().unwrap();
        let config = BrokerConfig {
            tls: Some(listen),
            ..BrokerConfig::default()
        };
        let err = Broker::start_on(config, &[ep]).await.unwrap_err();
        assert!(err.to_string().contains(says), "{err}");
    }
    // A tls:// endpoint without broker.tls.
    let ep = Endpoint::parse("tls://127.0.0.1:0").unwrap();
    let err = Broker::start_on(BrokerConfig::default(), &[ep])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("needs TLS settings"), "{err}");
    let bad = BrokerConfig {
        tls: Some(TlsListen {
            listen: "no port".into(),
            cert: pki.broker.cert.clone(),
            key: pki.broker.key.clone(),
            client_ca: pki.ca.clone(),
        }),
        ..BrokerConfig::default()
    };
    assert!(bad.validate().is_err());
}

/// Network peers that open connections and never finish a handshake hold no
/// `max_connections` slot: local clients keep connecting; past 64 handshakes in progress, a
/// further connection is closed at once and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_handshakes_never_lock_local_clients_out() {
    let d = dir("pending");
    let pki = Pki::new(&d.0);
    let listen = TlsListen {
        listen: "127.0.0.1:0".into(),
        cert: pki.broker.cert.clone(),
        key: pki.broker.key.clone(),
        client_ca: pki.ca.clone(),
    };
    let unix = Endpoint::Unix(d.0.join("bus.sock"));
    let config = common::open(BrokerConfig {
        max_connections: 4,
        // Far beyond this test: what is refused is refused for the handshakes in progress.
        handshake_timeout_ms: 60_000,
        tls: Some(listen.clone()),
        ..BrokerConfig::default()
    });
    let broker = Broker::start_on(config, &[unix.clone(), listen.endpoint().unwrap()])
        .await
        .unwrap();
    let tls_port = port(&broker.endpoints()[1]);
    let mut silent = Vec::new();
    for _ in 0..65 {
        silent.push(
            tokio::net::TcpStream::connect(("127.0.0.1", tls_port))
                .await
                .unwrap(),
        );
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    while broker.stats().tls_refused < 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            broker.stats()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(broker.stats().tls_refused, 1);
    // Every local slot is free.
    let mut locals = Vec::new();
    for i in 0..4 {
        let mut o = ClientOptions::named(format!("local{i}"));
        o.reconnect.enabled = false;
        locals.push(Client::connect(&unix, o).await.unwrap());
    }
    // And a network peer with a certificate gets in once the silent ones are gone.
    drop(silent);
    drop(locals);
    let deadline = tokio::time::Instant::now() + WAIT;
    let a = loop {
        match connect(&broker.endpoints()[1], "a", &pki.client_a).await {
            Ok(a) => break a,
            Err(e) => {
                assert!(tokio::time::Instant::now() < deadline, "{e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    a.close().await;
    broker.shutdown().await;
}
