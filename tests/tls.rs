//! Real TLS handshakes over 127.0.0.1 against `server::tls::server_config`, with certificates
//! from `dev::certs`: protocol versions, cipher suites, ALPN, resumption, mTLS acceptance with
//! `peer_identity`, and the alert a client sees for each kind of rejected client certificate.
//! Also the operator-facing `TlsError` messages for broken files.
//!
//! Both ends are tokio-rustls; the full proxy server is not involved.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ekm_proxy::dev::certs::{Authority, IssuedCert, Validity, self_signed_client};
use ekm_proxy::server::tls::{
    ClientAuth, PeerIdentity, RejectHook, RejectReason, TlsError, TlsSettings,
    missing_client_certificate, peer_identity, server_config,
};
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::sign::CertifiedKey;
use rustls::{
    AlertDescription, CipherSuite, ClientConfig, HandshakeKind, ProtocolVersion, ServerConfig,
    SignatureScheme, SupportedProtocolVersion,
};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];
const KMS_CLIENT: &str = "cks.kms.eu-west-1.amazonaws.com";
const VERSIONS: [&SupportedProtocolVersion; 2] = [&rustls::version::TLS13, &rustls::version::TLS12];
const TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Fixtures

/// A dev CA, a server certificate for localhost/127.0.0.1 and the files the settings point at.
struct Pki {
    dir: tempfile::TempDir,
    ca: Authority,
    settings: TlsSettings,
}

impl Pki {
    fn new(client_auth: Option<Vec<String>>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::new("test CA").unwrap();
        let server = ca.issue_server(&["localhost", "127.0.0.1"]).unwrap();
        let cert_chain = write(
            dir.path(),
            "server.pem",
            &format!("{}{}", server.cert_pem, ca.cert_pem()),
        );
        let private_key = write(dir.path(), "server-key.pem", &server.key_pem);
        let client_auth = match client_auth {
            None => ClientAuth::None,
            Some(allowed_subjects) => ClientAuth::Required {
                ca_bundle: write(dir.path(), "ca.pem", &ca.cert_pem()),
                allowed_subjects,
            },
        };
        Self {
            dir,
            ca,
            settings: TlsSettings {
                cert_chain,
                private_key,
                client_auth,
            },
        }
    }
}

fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Collects the verifier's rejection reasons.
fn recording_hook() -> (RejectHook, Arc<Mutex<Vec<RejectReason>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    (
        Arc::new(move |reason| sink.lock().unwrap().push(reason)),
        seen,
    )
}

// ---------------------------------------------------------------------------------------------
// Server side: accept, record what the handshake produced, echo bytes back.

#[derive(Debug)]
struct ServerSide {
    identity: Option<PeerIdentity>,
    kind: Option<HandshakeKind>,
}

async fn start_server(
    config: Arc<ServerConfig>,
) -> (SocketAddr, mpsc::UnboundedReceiver<io::Result<ServerSide>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match acceptor.accept(tcp).await {
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                    Ok(mut stream) => {
                        let (_, conn) = stream.get_ref();
                        let side = ServerSide {
                            identity: peer_identity(conn),
                            kind: conn.handshake_kind(),
                        };
                        let _ = tx.send(Ok(side));
                        let mut buf = [0u8; 64];
                        while let Ok(n) = stream.read(&mut buf).await {
                            if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        }
    });
    (addr, rx)
}

async fn next_server_result(
    rx: &mut mpsc::UnboundedReceiver<io::Result<ServerSide>>,
) -> io::Result<ServerSide> {
    tokio::time::timeout(TIMEOUT, rx.recv())
        .await
        .expect("server result in time")
        .expect("server alive")
}

// ---------------------------------------------------------------------------------------------
// Client side

/// What the client negotiated.
#[derive(Debug)]
struct Negotiated {
    version: ProtocolVersion,
    suite: CipherSuite,
    alpn: Option<Vec<u8>>,
}

#[derive(Clone, Copy)]
enum ClientCert<'a> {
    None,
    Issued(&'a IssuedCert),
    /// A chain whose leaf is not DER at all, signed for with a valid key.
    Garbage,
}

fn client_config(
    ca: &Authority,
    version: &'static SupportedProtocolVersion,
    cert: ClientCert<'_>,
    alpn: &[&[u8]],
) -> Arc<ClientConfig> {
    client_config_with(provider(), ca, version, cert, alpn)
}

fn client_config_with(
    provider: Arc<CryptoProvider>,
    ca: &Authority,
    version: &'static SupportedProtocolVersion,
    cert: ClientCert<'_>,
    alpn: &[&[u8]],
) -> Arc<ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).unwrap())
        .unwrap();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match cert {
        ClientCert::None => builder.with_no_client_auth(),
        ClientCert::Issued(issued) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap(),
            )
            .unwrap(),
        ClientCert::Garbage => {
            let key = ca
                .issue_client("garbage", Validity::Current)
                .unwrap()
                .key_pem;
            let signing_key = provider
                .key_provider
                .load_private_key(PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap())
                .unwrap();
            let certified = CertifiedKey::new(
                vec![CertificateDer::from(b"not a certificate".to_vec())],
                signing_key,
            );
            builder.with_client_cert_resolver(Arc::new(GarbageCert(Arc::new(certified))))
        }
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

#[derive(Debug)]
struct GarbageCert(Arc<CertifiedKey>);

impl ResolvesClientCert for GarbageCert {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// Handshakes, then sends a byte and reads the echo: with TLS 1.3 the client finishes its side
/// of the handshake before the server has judged its certificate, so a rejection shows up only
/// on that first read.
async fn connect_and_ping(addr: SocketAddr, config: Arc<ClientConfig>) -> io::Result<Negotiated> {
    let run = async {
        let tcp = TcpStream::connect(addr).await?;
        let connector = tokio_rustls::TlsConnector::from(config);
        let mut stream = connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await?;
        stream.write_all(b"x").await?;
        stream.flush().await?;
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await?;
        assert_eq!(&byte, b"x");
        let (_, conn) = stream.get_ref();
        Ok(Negotiated {
            version: conn.protocol_version().unwrap(),
            suite: conn.negotiated_cipher_suite().unwrap().suite(),
            alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
        })
    };
    tokio::time::timeout(TIMEOUT, run)
        .await
        .expect("client finished in time")
}

/// The alert the client received, if the error is one.
fn received_alert(err: &io::Error) -> Option<AlertDescription> {
    match err.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(alert) => Some(*alert),
        _ => None,
    }
}

fn wire_version(version: &SupportedProtocolVersion) -> ProtocolVersion {
    version.version
}

// ---------------------------------------------------------------------------------------------
// Without client authentication

#[tokio::test]
async fn tls12_and_tls13_negotiate_aes256_gcm_and_alpn() {
    let pki = Pki::new(None);
    let (addr, mut results) = start_server(server_config(&pki.settings, ALPN, None).unwrap()).await;

    for version in VERSIONS {
        let got = connect_and_ping(
            addr,
            client_config(&pki.ca, version, ClientCert::None, ALPN),
        )
        .await
        .unwrap();
        assert_eq!(got.version, wire_version(version));
        let expected_suite = if got.version == ProtocolVersion::TLSv1_3 {
            CipherSuite::TLS13_AES_256_GCM_SHA384
        } else {
            CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
        };
        assert_eq!(got.suite, expected_suite);
        assert_eq!(got.alpn.as_deref(), Some(&b"h2"[..]));
        let server = next_server_result(&mut results).await.unwrap();
        assert_eq!(server.identity, None, "no client certificate without mTLS");

        // A client that speaks only HTTP/1.1 gets HTTP/1.1.
        let got = connect_and_ping(
            addr,
            client_config(&pki.ca, version, ClientCert::None, &[b"http/1.1"]),
        )
        .await
        .unwrap();
        assert_eq!(got.alpn.as_deref(), Some(&b"http/1.1"[..]));
        next_server_result(&mut results).await.unwrap();
    }
}

#[tokio::test]
async fn server_prefers_its_own_suite_order() {
    // A client that lists AES-128 first still gets AES-256-GCM (an XKS-listed suite).
    let pki = Pki::new(None);
    let (addr, mut results) = start_server(server_config(&pki.settings, ALPN, None).unwrap()).await;
    let mut client_provider = rustls::crypto::ring::default_provider();
    client_provider.cipher_suites.sort_by_key(|s| {
        !matches!(
            s.suite(),
            CipherSuite::TLS13_AES_128_GCM_SHA256
                | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        )
    });
    for version in VERSIONS {
        let config = client_config_with(
            Arc::new(client_provider.clone()),
            &pki.ca,
            version,
            ClientCert::None,
            ALPN,
        );
        let got = connect_and_ping(addr, config).await.unwrap();
        assert!(
            matches!(
                got.suite,
                CipherSuite::TLS13_AES_256_GCM_SHA384
                    | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
            ),
            "{got:?}"
        );
        next_server_result(&mut results).await.unwrap();
    }
}

#[tokio::test]
async fn reconnecting_clients_resume_their_session() {
    let pki = Pki::new(Some(vec![KMS_CLIENT.to_owned()]));
    let (addr, mut results) = start_server(server_config(&pki.settings, ALPN, None).unwrap()).await;
    let client = pki.ca.issue_client(KMS_CLIENT, Validity::Current).unwrap();
    for version in VERSIONS {
        // One config = one client session cache, as a long-lived client would have.
        let config = client_config(&pki.ca, version, ClientCert::Issued(&client), ALPN);
        connect_and_ping(addr, config.clone()).await.unwrap();
        let first = next_server_result(&mut results).await.unwrap();
        assert_eq!(first.kind, Some(HandshakeKind::Full));
        connect_and_ping(addr, config).await.unwrap();
        let second = next_server_result(&mut results).await.unwrap();
        assert_eq!(second.kind, Some(HandshakeKind::Resumed), "{version:?}");
        // The resumed session still carries the client's identity.
        assert_eq!(second.identity, first.identity);
        assert!(second.identity.is_some());
    }
}

// ---------------------------------------------------------------------------------------------
// mTLS

#[tokio::test]
async fn mtls_accepts_the_allowed_client_and_reports_its_identity() {
    let pki = Pki::new(Some(vec![
        "someone-else.example".to_owned(),
        KMS_CLIENT.to_owned(),
    ]));
    let (hook, rejects) = recording_hook();
    let (addr, mut results) =
        start_server(server_config(&pki.settings, ALPN, Some(hook)).unwrap()).await;
    let client = pki.ca.issue_client(KMS_CLIENT, Validity::Current).unwrap();
    let client_der = CertificateDer::from_pem_slice(client.cert_pem.as_bytes()).unwrap();

    for version in VERSIONS {
        let got = connect_and_ping(
            addr,
            client_config(&pki.ca, version, ClientCert::Issued(&client), ALPN),
        )
        .await
        .unwrap();
        assert_eq!(got.version, wire_version(version));
        let server = next_server_result(&mut results).await.unwrap();
        assert_eq!(
            server.identity,
            Some(PeerIdentity {
                subject_cn: Some(KMS_CLIENT.to_owned()),
                dns_names: vec![KMS_CLIENT.to_owned()],
                sha256_fingerprint: hex::encode(Sha256::digest(&client_der)),
                chain: vec![client_der.clone().into_owned()],
            })
        );
    }
    assert!(rejects.lock().unwrap().is_empty());
}

#[tokio::test]
async fn mtls_without_subject_list_accepts_any_client_of_the_ca() {
    let pki = Pki::new(Some(Vec::new()));
    let (addr, mut results) = start_server(server_config(&pki.settings, ALPN, None).unwrap()).await;
    let client = pki.ca.issue_client("anyone", Validity::Current).unwrap();
    connect_and_ping(
        addr,
        client_config(
            &pki.ca,
            &rustls::version::TLS13,
            ClientCert::Issued(&client),
            ALPN,
        ),
    )
    .await
    .unwrap();
    let server = next_server_result(&mut results).await.unwrap();
    assert_eq!(
        server.identity.unwrap().subject_cn.as_deref(),
        Some("anyone")
    );
}

#[tokio::test]
async fn mtls_rejections_abort_the_handshake_with_handshake_failure() {
    let pki = Pki::new(Some(vec![KMS_CLIENT.to_owned()]));
    let (hook, rejects) = recording_hook();
    let (addr, mut results) =
        start_server(server_config(&pki.settings, ALPN, Some(hook)).unwrap()).await;

    let other_ca = Authority::new("another CA").unwrap();
    let expired = pki.ca.issue_client(KMS_CLIENT, Validity::Expired).unwrap();
    let not_yet_valid = pki
        .ca
        .issue_client(KMS_CLIENT, Validity::NotYetValid)
        .unwrap();
    let self_signed = self_signed_client(KMS_CLIENT).unwrap();
    let foreign = other_ca
        .issue_client(KMS_CLIENT, Validity::Current)
        .unwrap();
    let wrong_subject = pki
        .ca
        .issue_client("cks.kms.attacker.example", Validity::Current)
        .unwrap();

    // (case, client certificate, reason the server reports, alert the client receives)
    let cases: Vec<(&str, ClientCert<'_>, RejectReason, AlertDescription)> = vec![
        // The one case rustls decides before any verifier runs: see server::tls::client_auth.
        (
            "no certificate",
            ClientCert::None,
            RejectReason::NoCertificate,
            AlertDescription::CertificateRequired,
        ),
        (
            "expired",
            ClientCert::Issued(&expired),
            RejectReason::Expired,
            AlertDescription::HandshakeFailure,
        ),
        (
            "not yet valid",
            ClientCert::Issued(&not_yet_valid),
            RejectReason::NotYetValid,
            AlertDescription::HandshakeFailure,
        ),
        (
            "self-signed",
            ClientCert::Issued(&self_signed),
            RejectReason::UnknownIssuer,
            AlertDescription::HandshakeFailure,
        ),
        (
            "other CA",
            ClientCert::Issued(&foreign),
            RejectReason::UnknownIssuer,
            AlertDescription::HandshakeFailure,
        ),
        (
            "wrong subject",
            ClientCert::Issued(&wrong_subject),
            RejectReason::SubjectNotAllowed,
            AlertDescription::HandshakeFailure,
        ),
        (
            "unparsable",
            ClientCert::Garbage,
            RejectReason::BadEncoding,
            AlertDescription::HandshakeFailure,
        ),
    ];

    for version in VERSIONS {
        for &(name, cert, reason, alert) in &cases {
            rejects.lock().unwrap().clear();
            let err = connect_and_ping(addr, client_config(&pki.ca, version, cert, ALPN))
                .await
                .expect_err(name);
            assert_eq!(
                received_alert(&err),
                Some(alert),
                "{name} over {version:?}: client error {err}"
            );

            let server_err = next_server_result(&mut results).await.expect_err(name);
            if reason == RejectReason::NoCertificate {
                assert!(
                    missing_client_certificate(&server_err),
                    "{name}: {server_err}"
                );
                assert!(
                    rejects.lock().unwrap().is_empty(),
                    "the verifier never sees an empty chain"
                );
            } else {
                assert!(
                    !missing_client_certificate(&server_err),
                    "{name}: {server_err}"
                );
                assert_eq!(
                    *rejects.lock().unwrap(),
                    vec![reason],
                    "{name} over {version:?}"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Configuration errors name the file and the problem

fn config_error(settings: &TlsSettings) -> String {
    let err: TlsError = server_config(settings, ALPN, None).expect_err("config must be rejected");
    err.to_string()
}

#[test]
fn missing_file_is_named() {
    let pki = Pki::new(None);
    let mut settings = pki.settings.clone();
    settings.cert_chain = pki.dir.path().join("nope.pem");
    let msg = config_error(&settings);
    assert!(
        msg.contains("cannot read certificate chain file") && msg.contains("nope.pem"),
        "{msg}"
    );

    let mut settings = pki.settings.clone();
    settings.private_key = pki.dir.path().join("missing-key.pem");
    let msg = config_error(&settings);
    assert!(
        msg.contains("cannot read private key file") && msg.contains("missing-key.pem"),
        "{msg}"
    );
}

#[test]
fn key_not_matching_the_certificate_is_reported_with_both_files() {
    let pki = Pki::new(None);
    let other = pki.ca.issue_server(&["localhost"]).unwrap();
    let mut settings = pki.settings.clone();
    settings.private_key = write(pki.dir.path(), "other-key.pem", &other.key_pem);
    let msg = config_error(&settings);
    assert!(msg.contains("does not match the certificate"), "{msg}");
    assert!(
        msg.contains("other-key.pem") && msg.contains("server.pem"),
        "{msg}"
    );
    assert!(
        !msg.contains("PRIVATE KEY-----"),
        "no key material in errors: {msg}"
    );
}

#[test]
fn files_without_the_expected_content_are_explained() {
    let pki = Pki::new(Some(Vec::new()));
    let dir = pki.dir.path();

    let mut settings = pki.settings.clone();
    settings.cert_chain = write(dir, "empty-chain.pem", "");
    assert!(config_error(&settings).contains("contains no PEM CERTIFICATE block"));

    let mut settings = pki.settings.clone();
    settings.private_key = pki.settings.cert_chain.clone();
    assert!(config_error(&settings).contains("contains no private key"));

    let mut settings = pki.settings.clone();
    settings.private_key = write(
        dir,
        "encrypted.pem",
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
    );
    assert!(config_error(&settings).contains("ENCRYPTED PRIVATE KEY"));

    let mut settings = pki.settings.clone();
    let key = std::fs::read_to_string(&pki.settings.private_key).unwrap();
    settings.private_key = write(dir, "truncated.pem", &key[..key.len() / 2]);
    let msg = config_error(&settings);
    assert!(
        msg.contains("not valid PEM") && !msg.contains(&key[40..60]),
        "{msg}"
    );

    let mut settings = pki.settings.clone();
    settings.client_auth = ClientAuth::Required {
        ca_bundle: write(dir, "empty-ca.pem", "# nothing here\n"),
        allowed_subjects: Vec::new(),
    };
    let msg = config_error(&settings);
    assert!(
        msg.contains("CA bundle")
            && msg.contains("empty-ca.pem")
            && msg.contains("no certificates"),
        "{msg}"
    );

    let mut settings = pki.settings.clone();
    settings.client_auth = ClientAuth::Required {
        ca_bundle: write(dir, "ca-again.pem", &pki.ca.cert_pem()),
        allowed_subjects: vec![String::new()],
    };
    assert!(config_error(&settings).contains("allowed_subjects contains an empty name"));
}
