//! TLS for PostgreSQL connections through rustls, with libpq's `sslmode`
//! semantics (tokio-postgres itself knows only disable/prefer/require and
//! never verifies a certificate by itself):
//!
//! - `disable`: plain TCP;
//! - `require`: encrypted, any server certificate accepted;
//! - `verify-ca`: the certificate must chain to `ca_file`;
//! - `verify-full`: and be valid for the host name (or IP) connected to.
//!
//! A client certificate (`cert_file`/`key_file`) is sent when configured.

use std::path::Path;
use std::sync::Arc;

use eps_core::config::{PostgresTlsConfig, SslMode};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::error::StoreError;

/// The connector for the configured mode; `None` for `disable`.
pub fn make_tls(config: &PostgresTlsConfig) -> Result<Option<MakeRustlsConnect>, StoreError> {
    if config.mode == SslMode::Disable {
        return Ok(None);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let algorithms = provider.signature_verification_algorithms;
    let verifier: Arc<dyn ServerCertVerifier> = match config.mode {
        SslMode::Disable => unreachable!("handled above"),
        SslMode::Require => Arc::new(AnyCertificate { algorithms }),
        SslMode::VerifyCa | SslMode::VerifyFull => {
            let ca = config.ca_file.as_deref().ok_or_else(|| {
                StoreError::Invalid(
                    "postgres.tls.ca_file is required for verify-ca and verify-full".into(),
                )
            })?;
            let mut roots = RootCertStore::empty();
            for cert in read_certs("postgres.tls.ca_file", ca)? {
                roots
                    .add(cert)
                    .map_err(|e| StoreError::Invalid(format!("postgres.tls.ca_file: {e}")))?;
            }
            let webpki =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| StoreError::Invalid(format!("postgres.tls.ca_file: {e}")))?;
            if config.mode == SslMode::VerifyFull {
                webpki
            } else {
                Arc::new(ChainOnly { inner: webpki })
            }
        }
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Invalid(format!("postgres.tls: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let client = match (&config.cert_file, &config.key_file) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(
                read_certs("postgres.tls.cert_file", cert)?,
                read_key("postgres.tls.key_file", key)?,
            )
            .map_err(|e| StoreError::Invalid(format!("postgres.tls.cert_file: {e}")))?,
        _ => builder.with_no_client_auth(),
    };
    Ok(Some(MakeRustlsConnect::new(client)))
}

fn read_certs(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, StoreError> {
    let pem = std::fs::read(path)
        .map_err(|e| StoreError::Invalid(format!("{key}: cannot read {}: {e}", path.display())))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| StoreError::Invalid(format!("{key}: {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(StoreError::Invalid(format!(
            "{key}: no certificate in {}",
            path.display()
        )));
    }
    Ok(certs)
}

fn read_key(key: &str, path: &Path) -> Result<PrivateKeyDer<'static>, StoreError> {
    let pem = std::fs::read(path)
        .map_err(|e| StoreError::Invalid(format!("{key}: cannot read {}: {e}", path.display())))?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| StoreError::Invalid(format!("{key}: {}: {e}", path.display())))?
        .ok_or_else(|| StoreError::Invalid(format!("{key}: no private key in {}", path.display())))
}

/// `require`: encryption without authenticating the server (still checks
/// that the handshake is signed by the certificate presented).
#[derive(Debug)]
struct AnyCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
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
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to the CA; the name is not checked.
#[derive(Debug)]
struct ChainOnly {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
