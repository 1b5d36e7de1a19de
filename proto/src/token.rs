//! Fleet key handling and agent tokens: token = HMAC-SHA256(fleet_key, id).

use std::path::{Path, PathBuf};

use ring::hmac;
use thiserror::Error;

use crate::frame::TOKEN_LEN;

#[derive(Debug, Error)]
pub enum FleetKeyError {
    #[error("cannot read fleet key {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("fleet key {path}: {reason} (expected 64 hex characters on one line)")]
    Format {
        path: PathBuf,
        reason: KeyFormatError,
    },
}

/// Why a fleet key's text is not a key.
#[derive(Debug, Error)]
pub enum KeyFormatError {
    #[error("found {0} characters")]
    Length(usize),
    #[error("not hex: {0}")]
    NotHex(#[from] hex::FromHexError),
}

/// The 32-byte fleet key shared by the daemon and every agent.
#[derive(Clone)]
pub struct FleetKey {
    key: hmac::Key,
    raw: [u8; 32],
}

impl std::fmt::Debug for FleetKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FleetKey(..)")
    }
}

impl FleetKey {
    pub fn from_bytes(raw: [u8; 32]) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, &raw),
            raw,
        }
    }

    /// Parse the file format: 64 hex characters, optionally followed by a newline.
    pub fn parse(text: &str) -> Result<Self, KeyFormatError> {
        let line = text.strip_suffix('\n').unwrap_or(text);
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.len() != 64 {
            return Err(KeyFormatError::Length(line.len()));
        }
        let mut raw = [0u8; 32];
        hex::decode_to_slice(line, &mut raw)?;
        Ok(Self::from_bytes(raw))
    }

    pub fn load(path: &Path) -> Result<Self, FleetKeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| FleetKeyError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|reason| FleetKeyError::Format {
            path: path.to_owned(),
            reason,
        })
    }

    /// A fresh random key.
    pub fn generate() -> Self {
        Self::from_bytes(rand::random())
    }

    /// The file contents for this key: 64 hex characters and a newline.
    pub fn to_file_text(&self) -> String {
        format!("{}\n", hex::encode(self.raw))
    }

    /// The token an agent with this id presents in HELLO.
    pub fn token(&self, id: &[u8]) -> [u8; TOKEN_LEN] {
        let tag = hmac::sign(&self.key, id);
        let mut out = [0u8; TOKEN_LEN];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// Check a presented token in constant time.
    pub fn verify(&self, id: &[u8], token: &[u8; TOKEN_LEN]) -> bool {
        hmac::verify(&self.key, id, token).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc4231_case_2_shape_and_verify() {
        let k = FleetKey::parse(&format!("{}\n", "ab".repeat(32))).unwrap();
        let t = k.token(b"agent-1");
        assert!(k.verify(b"agent-1", &t));
        assert!(!k.verify(b"agent-2", &t));
        let mut bad = t;
        bad[31] ^= 1;
        assert!(!k.verify(b"agent-1", &bad));
    }

    #[test]
    fn known_vector() {
        // HMAC-SHA256(key = 32 x 0x0b, "Hi There") computed independently with openssl.
        let k = FleetKey::from_bytes([0x0b; 32]);
        assert_eq!(
            hex::encode(k.token(b"Hi There")),
            "198a607eb44bfbc69903a0f1cf2bbdc5ba0aa3f3d9ae3c1c7a3b1696a0b68cf7"
        );
    }

    #[test]
    fn rejects_bad_files() {
        assert!(FleetKey::parse("abc").is_err());
        assert!(FleetKey::parse(&"zz".repeat(32)).is_err());
        assert!(FleetKey::parse(&"00".repeat(32)).is_ok());
    }
}
