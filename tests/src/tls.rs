//! TLS for the tests: certificates made at test time with rcgen (a test CA,
//! intermediates, leaves for any names), clients that trust a given CA and
//! report what the server presented (leaf fingerprint, ALPN), and
//! HTTPS/h2/`wss://` helpers over those clients.
//!
//! Fingerprints are written as the node writes them
//! (`fingerprint_sha256`: upper-case hex pairs joined by `:`), so a served
//! leaf can be compared with the API's record directly.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::Request;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{AlertDescription, ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Response as WsResponse;
use tokio_tungstenite::WebSocketStream;

use crate::client::{self, HttpResponse, IO_TIMEOUT};

/// A client's TLS connection to the node (or any server).
pub type TlsClientStream = tokio_rustls::client::TlsStream<TcpStream>;
/// A WebSocket over TLS (`wss://`).
pub type WssClient = WebSocketStream<TlsClientStream>;

/// The ring provider, explicitly (no process-wide default is installed).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// SHA-256 of a DER certificate, as the node's `fingerprint_sha256` writes it.
pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A certificate authority made at test time.
pub struct TestCa {
    pub name: String,
    /// The CA certificate, PEM.
    pub pem: String,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, made at test time.
pub struct Leaf {
    /// The leaf alone, PEM.
    pub cert_pem: String,
    /// Its private key, PKCS#8 PEM.
    pub key_pem: String,
    /// The leaf, DER.
    pub der: Vec<u8>,
    /// The private key, PKCS#8 DER.
    pub key_der: Vec<u8>,
    /// [`fingerprint`] of `der`.
    pub fingerprint: String,
}

impl Leaf {
    /// The leaf followed by `issuers`' certificates (an upload's chain).
    pub fn chain(&self, issuers: &[&TestCa]) -> String {
        let mut pem = self.cert_pem.clone();
        for ca in issuers {
            pem.push_str(&ca.pem);
        }
        pem
    }
}

fn ca_params(name: &str) -> Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(p)
}

impl TestCa {
    /// A self-signed root CA.
    pub fn new(name: &str) -> Result<Self> {
        let issuer = CertifiedIssuer::self_signed(ca_params(name)?, KeyPair::generate()?)?;
        Ok(Self {
            name: name.to_owned(),
            pem: issuer.pem(),
            issuer,
        })
    }

    /// An intermediate CA issued by this one.
    pub fn intermediate(&self, name: &str) -> Result<TestCa> {
        let issuer =
            CertifiedIssuer::signed_by(ca_params(name)?, KeyPair::generate()?, &self.issuer)?;
        Ok(TestCa {
            name: name.to_owned(),
            pem: issuer.pem(),
            issuer,
        })
    }

    /// A leaf for `names` (DNS names, `*.wildcards` and IP literals become
    /// subjectAltNames), valid from long ago to far ahead.
    pub fn leaf(&self, names: &[&str]) -> Result<Leaf> {
        self.leaf_with(names, None)
    }

    /// A leaf for `names` valid from `not_before` to `not_after`.
    pub fn leaf_valid(
        &self,
        names: &[&str],
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Leaf> {
        self.leaf_with(names, Some((not_before, not_after)))
    }

    /// A leaf with the common name `cn` and no subjectAltName at all.
    pub fn leaf_without_san(&self, cn: &str) -> Result<Leaf> {
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.distinguished_name.push(DnType::CommonName, cn);
        self.sign(p)
    }

    fn leaf_with(
        &self,
        names: &[&str],
        valid: Option<(OffsetDateTime, OffsetDateTime)>,
    ) -> Result<Leaf> {
        let mut p =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        if let Some(first) = names.first() {
            p.distinguished_name.push(DnType::CommonName, *first);
        }
        if let Some((from, to)) = valid {
            p.not_before = from;
            p.not_after = to;
        }
        self.sign(p)
    }

    fn sign(&self, p: CertificateParams) -> Result<Leaf> {
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &self.issuer)?;
        Ok(Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
            key_der: key.serialize_der(),
            fingerprint: fingerprint(cert.der()),
        })
    }
}

/// A client configuration that trusts exactly the CA certificates in
/// `ca_pems` and offers the ALPN protocols `alpn` (none if empty).
pub fn client_config(ca_pems: &[&str], alpn: &[&str]) -> Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    for pem in ca_pems {
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            roots
                .add(cert.context("CA PEM")?)
                .context("adding a CA certificate to the client's roots")?;
        }
    }
    ensure!(!roots.is_empty(), "client_config: no CA certificate given");
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(Arc::new(config))
}

/// The name a client asks for: a DNS name is sent as SNI; an IP literal
/// sends no SNI at all (as browsers do) and is checked against IP SANs.
fn server_name(name: &str) -> Result<ServerName<'static>> {
    if let Ok(ip) = name.trim_matches(['[', ']']).parse::<IpAddr>() {
        return Ok(ServerName::IpAddress(ip.into()));
    }
    ServerName::try_from(name.to_owned()).with_context(|| format!("{name:?} as a TLS server name"))
}

/// TCP connect to `addr` and a full TLS handshake for `name` (see
/// [`server_name`]: IP literals send no SNI), verified with `config`.
pub async fn tls_connect(
    addr: SocketAddr,
    name: &str,
    config: &Arc<ClientConfig>,
) -> Result<TlsClientStream> {
    let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
        .await
        .with_context(|| format!("connecting to {addr} timed out"))?
        .with_context(|| format!("connecting to {addr}"))?;
    tcp.set_nodelay(true)?;
    let connector = tokio_rustls::TlsConnector::from(config.clone());
    let stream = tokio::time::timeout(IO_TIMEOUT, connector.connect(server_name(name)?, tcp))
        .await
        .with_context(|| format!("TLS handshake with {addr} for {name:?} timed out"))?
        .with_context(|| format!("TLS handshake with {addr} for {name:?}"))?;
    Ok(stream)
}

/// The fingerprint of the leaf the server presented.
pub fn peer_fingerprint(stream: &TlsClientStream) -> Result<String> {
    let (_, conn) = stream.get_ref();
    let leaf = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .context("the server presented no certificate")?;
    Ok(fingerprint(leaf.as_ref()))
}

/// The ALPN protocol the server chose, if any.
pub fn negotiated_alpn(stream: &TlsClientStream) -> Option<String> {
    let (_, conn) = stream.get_ref();
    conn.alpn_protocol()
        .map(|p| String::from_utf8_lossy(p).into_owned())
}

/// The TLS alert the peer sent, if that is what `err` (from
/// [`tls_connect`] or a helper using it) comes down to.
pub fn received_alert(err: &anyhow::Error) -> Option<AlertDescription> {
    err.chain().find_map(|cause| {
        let tls = cause.downcast_ref::<rustls::Error>().or_else(|| {
            cause
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        })?;
        match tls {
            rustls::Error::AlertReceived(alert) => Some(*alert),
            _ => None,
        }
    })
}

/// The fingerprint of the certificate the node at `addr` serves for `name`
/// on a fresh handshake.
pub async fn served_fingerprint(
    addr: SocketAddr,
    name: &str,
    config: &Arc<ClientConfig>,
) -> Result<String> {
    let stream = tls_connect(addr, name, config).await?;
    peer_fingerprint(&stream)
}

/// Waits until a fresh handshake for `name` gets the leaf `fingerprint`
/// (the node swaps its certificate table shortly after a store change).
pub async fn wait_served(
    addr: SocketAddr,
    name: &str,
    config: &Arc<ClientConfig>,
    fingerprint: &str,
) -> Result<()> {
    crate::eventually(Duration::from_secs(10), || async move {
        let got = served_fingerprint(addr, name, config).await?;
        ensure!(
            got == fingerprint,
            "{name}: served {got}, waiting for {fingerprint}"
        );
        Ok(())
    })
    .await
}

/// An HTTP/1.1 connection over TLS; requests sent on it share the
/// connection. Returns the sender, the served leaf's fingerprint and the
/// negotiated ALPN protocol.
pub async fn https1_connect(
    addr: SocketAddr,
    name: &str,
    config: &Arc<ClientConfig>,
) -> Result<(
    hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    String,
    Option<String>,
)> {
    let tls = tls_connect(addr, name, config).await?;
    let fp = peer_fingerprint(&tls)?;
    let alpn = negotiated_alpn(&tls);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .context("HTTP/1.1 handshake over TLS")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok((sender, fp, alpn))
}

/// Sends `GET path` with `Host: host` on an HTTP/1.1 connection and reads
/// the whole response.
pub async fn http1_get(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    host: &str,
    path: &str,
) -> Result<HttpResponse> {
    let req = client::build_request(http::Method::GET, host, path, &[], Bytes::new())?;
    tokio::time::timeout(IO_TIMEOUT, async {
        sender.ready().await.context("connection not ready")?;
        HttpResponse::read(sender.send_request(req).await?).await
    })
    .await
    .context("HTTPS request did not complete in time")?
}

/// `GET https://name{path}` on a new connection (HTTP/1.1, `Host: name`);
/// returns the response and the served leaf's fingerprint.
pub async fn https_get(
    addr: SocketAddr,
    name: &str,
    config: &Arc<ClientConfig>,
    path: &str,
) -> Result<(HttpResponse, String)> {
    let (mut sender, fp, _) = https1_connect(addr, name, config).await?;
    let resp = http1_get(&mut sender, name, path).await?;
    Ok((resp, fp))
}

/// An h2 connection over TLS (ALPN must have chosen `h2`).
pub async fn h2_connect(
    addr: SocketAddr,
    name: &str,
    config: &Arc<ClientConfig>,
) -> Result<(hyper::client::conn::http2::SendRequest<Full<Bytes>>, String)> {
    let tls = tls_connect(addr, name, config).await?;
    let fp = peer_fingerprint(&tls)?;
    let alpn = negotiated_alpn(&tls);
    ensure!(
        alpn.as_deref() == Some("h2"),
        "ALPN chose {alpn:?}, not h2 (offered {:?})",
        config
            .alpn_protocols
            .iter()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect::<Vec<_>>()
    );
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .context("h2 handshake over TLS")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok((sender, fp))
}

/// `GET https://authority{path}` on an h2 connection.
pub async fn h2_get(
    sender: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    authority: &str,
    path: &str,
) -> Result<HttpResponse> {
    let req = Request::builder()
        .uri(format!("https://{authority}{path}"))
        .body(Full::new(Bytes::new()))?;
    tokio::time::timeout(IO_TIMEOUT, async {
        sender.ready().await.context("h2 connection not ready")?;
        HttpResponse::read(sender.send_request(req).await?).await
    })
    .await
    .context("h2 request did not complete in time")?
}

/// Opens `wss://name{path}` through the node's HTTPS listener at `addr`
/// (`config` should offer `http/1.1` or nothing by ALPN). Returns the
/// socket, the 101 and the served leaf's fingerprint.
pub async fn wss_connect(
    addr: SocketAddr,
    name: &str,
    config: &Arc<ClientConfig>,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(WssClient, WsResponse, String)> {
    let mut req = format!("wss://{name}{path}").into_client_request()?;
    for (n, v) in headers {
        req.headers_mut().append(
            HeaderName::from_bytes(n.as_bytes())?,
            HeaderValue::from_str(v)?,
        );
    }
    let tls = tls_connect(addr, name, config).await?;
    let fp = peer_fingerprint(&tls)?;
    let (ws, resp) = tokio::time::timeout(
        IO_TIMEOUT,
        tokio_tungstenite::client_async_with_config(req, tls, Some(client::ws_config())),
    )
    .await
    .context("WebSocket handshake over TLS timed out")?
    .with_context(|| format!("WebSocket handshake with wss://{name}{path} via {addr}"))?;
    Ok((ws, resp, fp))
}

/// A server configuration presenting `leaf` (with `chain` after it).
pub fn server_config(leaf: &Leaf, chain: &[&TestCa]) -> Result<Arc<rustls::ServerConfig>> {
    let certs = CertificateDer::pem_slice_iter(leaf.chain(chain).as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("chain PEM: {e}"))?;
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes())
        .map_err(|e| anyhow!("key PEM: {e}"))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Expects `result` to have failed with the TLS alert `want` from the peer.
pub fn expect_alert<T>(result: Result<T>, want: AlertDescription, what: &str) -> Result<()> {
    match result {
        Ok(_) => bail!("{what}: the handshake succeeded; expected the alert {want:?}"),
        Err(err) => match received_alert(&err) {
            Some(alert) if alert == want => Ok(()),
            Some(other) => bail!("{what}: got the alert {other:?}, expected {want:?}: {err:#}"),
            None => bail!("{what}: failed without the alert {want:?}: {err:#}"),
        },
    }
}

/// A plain-TCP front for clients that cannot speak TLS themselves (kosoku,
/// the Autobahn client, has no `wss://`): every connection accepted on
/// `addr` is carried over a new TLS connection to `target` for `name`
/// (an IP literal sends no SNI), verified with `config`. Byte-transparent
/// both ways, half-closes included, so a WebSocket client talking to `addr`
/// is talking `wss://` to `target`.
pub struct TlsShim {
    pub addr: SocketAddr,
    handshakes: Arc<std::sync::atomic::AtomicUsize>,
    failures: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl TlsShim {
    pub async fn start(
        target: SocketAddr,
        name: &str,
        config: Arc<ClientConfig>,
    ) -> Result<TlsShim> {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let (listener, addr) = crate::backends::bind().await?;
        let handshakes = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(AtomicUsize::new(0));
        let (ok, failed) = (handshakes.clone(), failures.clone());
        let name = name.to_owned();
        let task = crate::backends::accept_loop(listener, move |mut plain| {
            let (config, name, ok, failed) =
                (config.clone(), name.clone(), ok.clone(), failed.clone());
            async move {
                match tls_connect(target, &name, &config).await {
                    Ok(mut tls) => {
                        ok.fetch_add(1, Ordering::SeqCst);
                        let _ = tokio::io::copy_bidirectional(&mut plain, &mut tls).await;
                    }
                    Err(_) => {
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        });
        Ok(TlsShim {
            addr,
            handshakes,
            failures,
            task,
        })
    }

    /// TLS handshakes with the target that succeeded.
    pub fn handshakes(&self) -> usize {
        self.handshakes.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// TLS handshakes with the target that failed.
    pub fn failures(&self) -> usize {
        self.failures.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for TlsShim {
    fn drop(&mut self) {
        self.task.abort();
    }
}
