//! `presenced dev-init DIR`: a working setup for a developer machine.
//!
//! Writes `presenced.toml`, `tls/cert.pem`, `tls/key.pem` (self-signed ECDSA
//! P-256 for localhost and 127.0.0.1), `fleet.key`, and configures the
//! control socket as `control.sock` inside DIR. These names are a contract.

use std::fs;
use std::path::{Path, PathBuf};

use thiserror::Error;

use presence_proto::FleetKey;

use crate::store::fs::{write_atomic, FsError, PRIVATE_FILE_MODE};

pub const CONFIG_FILE: &str = "presenced.toml";
pub const CERT_FILE: &str = "tls/cert.pem";
pub const KEY_FILE: &str = "tls/key.pem";
pub const FLEET_KEY_FILE: &str = "fleet.key";
pub const CONTROL_SOCKET_FILE: &str = "control.sock";
/// State directory (presence persistence, ticket keys) inside DIR.
pub const STATE_DIR: &str = "state";
/// Address the dev setup listens on.
pub const DEV_LISTEN: &str = "127.0.0.1:7443";

#[derive(Debug, Error)]
pub enum DevInitError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{0} already holds a presenced setup ({CONFIG_FILE} exists); use --force to overwrite"
    )]
    Exists(PathBuf),
    #[error("generating the self-signed certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("writing the setup: {0}")]
    Write(#[from] FsError),
}

/// Write one file of the setup atomically with `mode` (0600 for the
/// secrets, 0644 for the rest), through the daemon's one file helper.
fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), DevInitError> {
    Ok(write_atomic(path, contents, mode)?)
}

/// The dev config text; paths are relative to DIR.
pub fn dev_config_text(listen: &str) -> String {
    format!(
        r#"# presenced development setup, written by `presenced dev-init`.
# Every key and default is described in docs/configuration.md.

[server]
listen = "{listen}"
control_socket = "{CONTROL_SOCKET_FILE}"

[tls]
cert = "{CERT_FILE}"
key = "{KEY_FILE}"

[auth]
fleet_key = "{FLEET_KEY_FILE}"

[presence]
heartbeat_interval = "30s"
miss_limit = 3
offline_grace = "60s"

[state]
dir = "{STATE_DIR}"
"#
    )
}

/// Whether DIR already holds a setup.
pub fn is_initialised(dir: &Path) -> bool {
    dir.join(CONFIG_FILE).exists()
}

/// Write a fresh setup into `dir`.
pub fn dev_init(dir: &Path, force: bool) -> Result<(), DevInitError> {
    if is_initialised(dir) && !force {
        return Err(DevInitError::Exists(dir.to_owned()));
    }
    let tls_dir = dir.join("tls");
    fs::create_dir_all(&tls_dir).map_err(|source| DevInitError::Io {
        path: tls_dir.clone(),
        source,
    })?;
    let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "presenced dev");
    let cert = params.self_signed(&key_pair)?;
    write_file(&dir.join(CERT_FILE), cert.pem().as_bytes(), 0o644)?;
    write_file(
        &dir.join(KEY_FILE),
        key_pair.serialize_pem().as_bytes(),
        PRIVATE_FILE_MODE,
    )?;
    write_file(
        &dir.join(FLEET_KEY_FILE),
        FleetKey::generate().to_file_text().as_bytes(),
        PRIVATE_FILE_MODE,
    )?;
    write_file(
        &dir.join(CONFIG_FILE),
        dev_config_text(DEV_LISTEN).as_bytes(),
        0o644,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn writes_a_loadable_setup() {
        let d = tempfile::tempdir().unwrap();
        dev_init(d.path(), false).unwrap();
        let cfg = Config::load(&d.path().join(CONFIG_FILE)).unwrap();
        assert_eq!(
            cfg.server.control_socket,
            d.path().join(CONTROL_SOCKET_FILE)
        );
        let (ticketer, _) =
            crate::tls::tickets::PersistentTicketer::open(&d.path().join("state")).unwrap();
        crate::tls::config::server_config(&cfg.tls.cert, &cfg.tls.key, &ticketer).unwrap();
        FleetKey::load(cfg.auth.fleet_key.as_ref().unwrap()).unwrap();
        assert!(matches!(
            dev_init(d.path(), false),
            Err(DevInitError::Exists(_))
        ));
        dev_init(d.path(), true).unwrap();
    }
}
