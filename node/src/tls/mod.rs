//! TLS: terminating HTTPS/`wss://` with certificates from the store, and
//! connecting to `https://` upstreams.
//!
//! - [`seal`]: private keys are encrypted at rest with the node's data key.
//! - [`cert`]: the certificate record and upload validation.
//! - [`sni`]: which certificate answers which name; swapped atomically on
//!   every store change, so rotation needs no restart and open connections
//!   keep the certificate they started with.
//! - [`upstream`]: client configurations for `https://` upstreams.

pub mod cert;
pub mod seal;
pub mod sni;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::server::{Acceptor, ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::StartHandshake;

use sni::CertTable;

/// A TLS alert record, fatal `unrecognized_name` (RFC 6066 §3), sent in the
/// clear before any handshake keys exist (valid for TLS 1.2 and 1.3).
const UNRECOGNIZED_NAME_ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x70];
/// Time a client has to complete the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the certificate chosen before the handshake started.
#[derive(Debug)]
struct Chosen(Arc<CertifiedKey>);

impl ResolvesServerCert for Chosen {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error("no certificate for {0:?}: refused with unrecognized_name")]
    UnknownName(String),
    #[error("handshake timed out")]
    Timeout,
    #[error("handshake failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("handshake failed: {0}")]
    Tls(#[from] rustls::Error),
    /// A TLS-ALPN-01 validation handshake, answered and closed: there is
    /// no HTTP after it.
    #[error("answered an ACME TLS-ALPN-01 validation for {0:?}")]
    AcmeChallenge(String),
}

/// The ALPN protocol of TLS-ALPN-01 validation (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// Name → TLS-ALPN-01 challenge certificate (published by `acme`).
pub type AcmeChallenges = Arc<std::collections::HashMap<String, Arc<CertifiedKey>>>;

/// The HTTPS listener's TLS side.
pub struct TlsTerminator {
    base: ServerConfig,
    table: ArcSwap<CertTable>,
    acme: ArcSwap<std::collections::HashMap<String, Arc<CertifiedKey>>>,
}

impl TlsTerminator {
    pub fn new() -> Arc<Self> {
        let mut base = ServerConfig::builder()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Chosen::empty()));
        base.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(TlsTerminator {
            base,
            table: ArcSwap::from_pointee(CertTable::default()),
            acme: ArcSwap::from_pointee(Default::default()),
        })
    }

    pub fn publish(&self, table: CertTable) {
        self.table.store(Arc::new(table));
    }

    pub fn publish_acme_challenges(&self, challenges: AcmeChallenges) {
        self.acme.store(challenges);
    }

    /// Applies `f` to a copy of the table (O(1) to make) and swaps it in.
    /// One writer at a time: the store calls this under its lock.
    pub fn update(&self, f: impl FnOnce(&mut CertTable)) {
        let mut table = CertTable::clone(&self.table.load());
        f(&mut table);
        self.table.store(Arc::new(table));
    }

    /// Reads the ClientHello, picks the certificate by SNI (or, without SNI,
    /// by the address the client connected to), and completes the handshake;
    /// a name without a certificate is refused with `unrecognized_name`.
    pub async fn accept(
        &self,
        tcp: TcpStream,
        local: SocketAddr,
    ) -> Result<TlsStream<TcpStream>, AcceptError> {
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.accept_inner(tcp, local)).await {
            Ok(r) => r,
            Err(_) => Err(AcceptError::Timeout),
        }
    }

    async fn accept_inner(
        &self,
        mut tcp: TcpStream,
        local: SocketAddr,
    ) -> Result<TlsStream<TcpStream>, AcceptError> {
        let mut acceptor = Acceptor::default();
        let mut buf = vec![0u8; 4096];
        let accepted = loop {
            tcp.readable().await?;
            let n = match tcp.try_read(&mut buf) {
                Ok(0) => return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into()),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e.into()),
            };
            let mut rd = &buf[..n];
            while !rd.is_empty() {
                acceptor.read_tls(&mut rd)?;
            }
            match acceptor.accept() {
                Ok(Some(a)) => break a,
                Ok(None) => continue,
                Err((e, mut alert)) => {
                    let mut out = Vec::new();
                    let _ = alert.write_all(&mut out);
                    let _ = tcp.write_all(&out).await;
                    return Err(e.into());
                }
            }
        };
        let name = accepted
            .client_hello()
            .server_name()
            .map(str::to_string)
            .unwrap_or_else(|| match local.ip().to_canonical() {
                std::net::IpAddr::V6(v6) => format!("[{v6}]"),
                v4 => v4.to_string(),
            });
        // ACME hook (TLS-ALPN-01): a validation handshake offers only
        // `acme-tls/1` and gets the challenge certificate, then is closed.
        let acme_alpn = accepted
            .client_hello()
            .alpn()
            .is_some_and(|mut p| p.any(|p| p == ACME_TLS_ALPN));
        if acme_alpn {
            return self.answer_acme(accepted, tcp, name).await;
        }
        let Some(key) = self.table.load().resolve(&name) else {
            let _ = tcp.write_all(&UNRECOGNIZED_NAME_ALERT).await;
            let _ = tcp.shutdown().await;
            return Err(AcceptError::UnknownName(name));
        };
        let mut config = self.base.clone();
        config.cert_resolver = Arc::new(Chosen(key));
        Ok(StartHandshake::from_parts(accepted, tcp)
            .into_stream(Arc::new(config))
            .await?)
    }
}

impl TlsTerminator {
    async fn answer_acme(
        &self,
        accepted: rustls::server::Accepted,
        mut tcp: TcpStream,
        name: String,
    ) -> Result<TlsStream<TcpStream>, AcceptError> {
        let key = self
            .acme
            .load()
            .get(name.trim_end_matches('.').to_ascii_lowercase().as_str())
            .cloned();
        let Some(key) = key else {
            let _ = tcp.write_all(&UNRECOGNIZED_NAME_ALERT).await;
            let _ = tcp.shutdown().await;
            return Err(AcceptError::UnknownName(name));
        };
        let mut config = self.base.clone();
        config.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
        config.cert_resolver = Arc::new(Chosen(key));
        let mut tls = StartHandshake::from_parts(accepted, tcp)
            .into_stream(Arc::new(config))
            .await?;
        let _ = tls.shutdown().await;
        Err(AcceptError::AcmeChallenge(name))
    }
}

impl Chosen {
    /// Placeholder for the base config; replaced on every connection.
    fn empty() -> Self {
        Chosen(Arc::new(CertifiedKey::new(Vec::new(), Arc::new(NoKey))))
    }
}

#[derive(Debug)]
struct NoKey;

impl rustls::sign::SigningKey for NoKey {
    fn choose_scheme(
        &self,
        _offered: &[rustls::SignatureScheme],
    ) -> Option<Box<dyn rustls::sign::Signer>> {
        None
    }
    fn algorithm(&self) -> rustls::SignatureAlgorithm {
        rustls::SignatureAlgorithm::Anonymous
    }
}
