//! Client TLS for `https://` upstreams: system roots, a host's own CA, or
//! (explicitly) no verification.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};

use super::cert::parse_chain;

/// How a host's `https://` upstreams are verified.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TlsProfile {
    SystemRoots,
    /// SHA-256 of the CA PEM, standing for the PEM itself.
    CustomCa([u8; 32]),
    Insecure,
}

/// Builds each profile's config once and shares it.
#[derive(Default)]
pub struct ClientConfigs {
    system: OnceLock<Arc<ClientConfig>>,
    custom: Mutex<HashMap<[u8; 32], Arc<ClientConfig>>>,
    insecure: OnceLock<Arc<ClientConfig>>,
}

fn finish(mut cfg: ClientConfig) -> Arc<ClientConfig> {
    // Upstreams speak HTTP/1.1 to us: WebSocket upgrades need it.
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

impl ClientConfigs {
    pub fn profile(ca_pem: &str, insecure: bool) -> TlsProfile {
        if insecure {
            TlsProfile::Insecure
        } else if ca_pem.trim().is_empty() {
            TlsProfile::SystemRoots
        } else {
            TlsProfile::CustomCa(Sha256::digest(ca_pem.as_bytes()).into())
        }
    }

    /// The config for a host's settings (`ca_pem` was validated at the API).
    pub fn get(&self, ca_pem: &str, insecure: bool) -> Arc<ClientConfig> {
        match Self::profile(ca_pem, insecure) {
            TlsProfile::SystemRoots => self.system.get_or_init(system_roots).clone(),
            TlsProfile::Insecure => self
                .insecure
                .get_or_init(|| {
                    finish(
                        ClientConfig::builder()
                            .dangerous()
                            .with_custom_certificate_verifier(Arc::new(NoVerification))
                            .with_no_client_auth(),
                    )
                })
                .clone(),
            TlsProfile::CustomCa(hash) => {
                let mut map = self.custom.lock().expect("configs lock");
                map.entry(hash)
                    .or_insert_with(|| {
                        let mut roots = RootCertStore::empty();
                        let certs = parse_chain(ca_pem).unwrap_or_default();
                        let (added, ignored) = roots.add_parsable_certificates(certs);
                        tracing::debug!(added, ignored, "custom upstream CA loaded");
                        finish(
                            ClientConfig::builder()
                                .with_root_certificates(roots)
                                .with_no_client_auth(),
                        )
                    })
                    .clone()
            }
        }
    }
}

/// Checks a CA bundle given at the API.
pub fn validate_ca_pem(pem: &str) -> Result<(), String> {
    let certs = parse_chain(pem)?;
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err("no usable CA certificate in the PEM".into());
    }
    Ok(())
}

fn system_roots() -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    let loaded = rustls_native_certs::load_native_certs();
    for e in &loaded.errors {
        tracing::warn!(error = %e, "could not load a system CA certificate");
    }
    let (added, _) = roots.add_parsable_certificates(loaded.certs);
    tracing::debug!(added, "loaded system CA roots for https upstreams");
    finish(
        ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// `upstream_insecure_skip_verify`: accepts any certificate. Signatures are
/// still checked so the handshake itself is sound; only identity is not.
#[derive(Debug)]
struct NoVerification;

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
