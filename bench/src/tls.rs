//! Client TLS configuration: TLS 1.3 only, ring provider, a private CA.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use presence_proto::ALPN;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};
use thiserror::Error;

/// Why a client TLS configuration could not be built.
#[derive(Debug, Error)]
pub enum TlsError {
    /// The CA file could not be read.
    #[error("cannot read CA file {path}: {source}")]
    ReadCa {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The CA file is not valid PEM.
    #[error("CA file {path}: invalid PEM: {source}")]
    Pem {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    /// The CA file holds no `CERTIFICATE` section.
    #[error("CA file {path}: no PEM CERTIFICATE found")]
    NoCertificates { path: PathBuf },
    /// A certificate in the CA file was rejected as a trust anchor.
    #[error("CA file {path}: certificate #{index} rejected: {source}")]
    BadCertificate {
        path: PathBuf,
        index: usize,
        source: rustls::Error,
    },
    /// rustls refused the configuration (should not happen with ring + TLS 1.3).
    #[error("cannot build TLS client config: {0}")]
    Config(#[source] rustls::Error),
}

/// Which ALPN protocols the client offers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Alpn {
    /// Offer only `presence/1` (the default).
    #[default]
    Presence,
    /// Offer no ALPN extension at all.
    None,
    /// Offer exactly this list (may be empty, same as [`Alpn::None`]).
    Custom(Vec<Vec<u8>>),
}

impl Alpn {
    fn protocols(&self) -> Vec<Vec<u8>> {
        match self {
            Alpn::Presence => vec![ALPN.to_vec()],
            Alpn::None => Vec::new(),
            Alpn::Custom(list) => list.clone(),
        }
    }
}

/// Builder for an `Arc<rustls::ClientConfig>` trusting a given CA.
///
/// ```no_run
/// # fn f() -> Result<(), presence_client::TlsError> {
/// let cfg = presence_client::ClientTls::from_ca_file("cert.pem")?.build()?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ClientTls {
    roots: RootCertStore,
    alpn: Alpn,
}

impl ClientTls {
    /// Trust every certificate in the PEM file at `path` (e.g. the server's
    /// own self-signed `cert.pem`). Errors name the file.
    pub fn from_ca_file(path: impl AsRef<Path>) -> Result<Self, TlsError> {
        let path = path.as_ref();
        let pem = std::fs::read(path).map_err(|source| TlsError::ReadCa {
            path: path.to_owned(),
            source,
        })?;
        Self::from_ca_pem_named(&pem, path)
    }

    /// Trust every certificate in the given PEM text.
    pub fn from_ca_pem(pem: &[u8]) -> Result<Self, TlsError> {
        Self::from_ca_pem_named(pem, Path::new("<memory>"))
    }

    fn from_ca_pem_named(pem: &[u8], path: &Path) -> Result<Self, TlsError> {
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| TlsError::Pem {
                path: path.to_owned(),
                source,
            })?;
        if certs.is_empty() {
            return Err(TlsError::NoCertificates {
                path: path.to_owned(),
            });
        }
        Self::from_ca_certs_named(certs, path)
    }

    /// Trust the given DER certificates.
    pub fn from_ca_der(
        certs: impl IntoIterator<Item = CertificateDer<'static>>,
    ) -> Result<Self, TlsError> {
        Self::from_ca_certs_named(certs, Path::new("<memory>"))
    }

    fn from_ca_certs_named(
        certs: impl IntoIterator<Item = CertificateDer<'static>>,
        path: &Path,
    ) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        for (index, cert) in certs.into_iter().enumerate() {
            roots.add(cert).map_err(|source| TlsError::BadCertificate {
                path: path.to_owned(),
                index,
                source,
            })?;
        }
        if roots.is_empty() {
            return Err(TlsError::NoCertificates {
                path: path.to_owned(),
            });
        }
        Ok(Self {
            roots,
            alpn: Alpn::Presence,
        })
    }

    /// Choose the ALPN protocols offered (default [`Alpn::Presence`]).
    pub fn alpn(mut self, alpn: Alpn) -> Self {
        self.alpn = alpn;
        self
    }

    /// Build the TLS 1.3-only configuration using the ring provider, so no
    /// process-wide default provider needs to be installed.
    pub fn build(self) -> Result<Arc<ClientConfig>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Config)?
            .with_root_certificates(self.roots)
            .with_no_client_auth();
        cfg.alpn_protocols = self.alpn.protocols();
        Ok(Arc::new(cfg))
    }
}

/// Shorthand: a default client config (ALPN `presence/1`) trusting the CA file.
pub fn client_config(ca_path: impl AsRef<Path>) -> Result<Arc<ClientConfig>, TlsError> {
    ClientTls::from_ca_file(ca_path)?.build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TestCert;

    #[test]
    fn missing_ca_file_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope.pem");
        let err = ClientTls::from_ca_file(&path).unwrap_err();
        assert!(matches!(err, TlsError::ReadCa { .. }));
        assert!(err.to_string().contains("nope.pem"), "{err}");
    }

    #[test]
    fn empty_or_keyonly_ca_file_is_rejected_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.pem");
        std::fs::write(&path, "").unwrap();
        let err = ClientTls::from_ca_file(&path).unwrap_err();
        assert!(matches!(err, TlsError::NoCertificates { .. }), "{err}");
        assert!(err.to_string().contains("empty.pem"), "{err}");

        let cert = TestCert::generate();
        let path = dir.path().join("key.pem");
        std::fs::write(&path, cert.key_pem()).unwrap();
        let err = ClientTls::from_ca_file(&path).unwrap_err();
        assert!(matches!(err, TlsError::NoCertificates { .. }), "{err}");
    }

    #[test]
    fn garbage_ca_file_is_rejected_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("garbage.pem");
        std::fs::write(
            &path,
            "-----BEGIN CERTIFICATE-----\n!!!not base64!!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let err = ClientTls::from_ca_file(&path).unwrap_err();
        assert!(err.to_string().contains("garbage.pem"), "{err}");

        // Valid base64 but not a certificate.
        std::fs::write(
            &path,
            "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let err = ClientTls::from_ca_file(&path).unwrap_err();
        assert!(err.to_string().contains("garbage.pem"), "{err}");
    }

    #[test]
    fn good_ca_file_builds_tls13_with_requested_alpn() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cert.pem");
        let cert = TestCert::generate();
        std::fs::write(&path, cert.cert_pem()).unwrap();

        let cfg = client_config(&path).unwrap();
        assert_eq!(cfg.alpn_protocols, vec![ALPN.to_vec()]);
        let cfg = ClientTls::from_ca_file(&path)
            .unwrap()
            .alpn(Alpn::None)
            .build()
            .unwrap();
        assert!(cfg.alpn_protocols.is_empty());
        let cfg = ClientTls::from_ca_file(&path)
            .unwrap()
            .alpn(Alpn::Custom(vec![b"h2".to_vec()]))
            .build()
            .unwrap();
        assert_eq!(cfg.alpn_protocols, vec![b"h2".to_vec()]);
    }
}
