//! Building the rustls server configuration: TLS 1.3 only, ALPN `presence/1`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::ring as provider;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;

use presence_proto::ALPN;

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("certificate file {path}: {reason}")]
    Cert { path: PathBuf, reason: String },
    #[error("private key file {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("certificate file {path}: not valid now (valid from {not_before} to {not_after})")]
    NotValidNow {
        path: PathBuf,
        not_before: String,
        not_after: String,
    },
    #[error("certificate {cert} and key {key} cannot be used together: {source}")]
    Config {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
}

/// The crypto provider used for every TLS object in the process.
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(provider::default_provider())
}

/// Read a PEM certificate chain (leaf first).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |reason: String| TlsError::Cert {
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no CERTIFICATE block found".into()));
    }
    Ok(certs)
}

/// Read a PEM private key (PKCS#8, SEC1 or PKCS#1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Key {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// The leaf certificate must be within its validity period now. Returns its
/// `notAfter` as Unix seconds.
pub fn check_validity(path: &Path, leaf: &CertificateDer<'_>) -> Result<i64, TlsError> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(leaf.as_ref()).map_err(|e| TlsError::Cert {
            path: path.to_owned(),
            reason: format!("cannot parse the leaf certificate: {e}"),
        })?;
    let validity = parsed.validity();
    if validity.is_valid() {
        Ok(validity.not_after.timestamp())
    } else {
        Err(TlsError::NotValidNow {
            path: path.to_owned(),
            not_before: validity.not_before.to_string(),
            not_after: validity.not_after.to_string(),
        })
    }
}

/// A server configuration from the certificate chain and key files:
/// parsed, key matching the leaf certificate, leaf valid now. Session
/// tickets come from `ticketer` (the same one across reloads, so tickets
/// issued before a certificate renewal still resume).
pub fn server_config(
    cert: &Path,
    key: &Path,
    ticketer: &Arc<crate::tls::tickets::PersistentTicketer>,
) -> Result<Arc<ServerConfig>, TlsError> {
    server_config_with_expiry(cert, key, ticketer).map(|(cfg, _)| cfg)
}

/// [`server_config`], and the leaf certificate's `notAfter` (Unix seconds)
/// of the very chain it serves (reported as `tls_cert_not_after_ms`).
pub fn server_config_with_expiry(
    cert: &Path,
    key: &Path,
    ticketer: &Arc<crate::tls::tickets::PersistentTicketer>,
) -> Result<(Arc<ServerConfig>, i64), TlsError> {
    let certs = load_certs(cert)?;
    let not_after = check_validity(cert, &certs[0])?;
    let private_key = load_key(key)?;
    let config_err = |source| TlsError::Config {
        cert: cert.to_owned(),
        key: key.to_owned(),
        source,
    };
    let mut cfg = ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_err)?
        .with_no_client_auth()
        .with_single_cert(certs, private_key)
        .map_err(config_err)?;
    // A client offering ALPN without presence/1 is refused by rustls
    // (no_application_protocol alert); one offering none is accepted.
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    crate::tls::tickets::install(&mut cfg, ticketer.clone());
    // Secret capture for the lean record layer (see lean::handshake).
    Ok((crate::tls::handshake::prepare_config(cfg), not_after))
}
