//! Agent ids (and node ids) as NATS KV keys.
//!
//! Byte-wise encoding: `[A-Za-z0-9_-]` stay as they are, every other byte
//! becomes `=XX` (upper-case hex). `host.01@x` -> `host=2E01=40x`. The result
//! is a single NATS subject token (no `.`, `*`, `>` or whitespace), so it is
//! a valid KV key and a valid last token of `presence.events.<encoded id>`.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("encoded key `{key}`: bad escape at byte {at}")]
    BadEscape { key: String, at: usize },
    #[error("encoded key `{key}`: byte 0x{byte:02X} at {at} is not allowed unescaped")]
    BadByte { key: String, at: usize, byte: u8 },
}

fn plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

/// Encodes an id for use as a KV key / subject token.
pub fn encode_id(id: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(id.len() + 8);
    for &b in id {
        if plain(b) {
            out.push(b as char);
        } else {
            out.push('=');
            out.push(HEX[(b >> 4) as usize] as char);
            out.push(HEX[(b & 0x0f) as usize] as char);
        }
    }
    out
}

/// Decodes a key produced by [`encode_id`].
pub fn decode_id(key: &str) -> Result<Vec<u8>, KeyError> {
    let bytes = key.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'=' {
            let hex = bytes.get(i + 1..i + 3).ok_or_else(|| KeyError::BadEscape {
                key: key.to_string(),
                at: i,
            })?;
            let digit = |c: u8| match c {
                b'0'..=b'9' => Some(c - b'0'),
                b'A'..=b'F' => Some(c - b'A' + 10),
                _ => None,
            };
            match (digit(hex[0]), digit(hex[1])) {
                (Some(h), Some(l)) => out.push(h << 4 | l),
                _ => {
                    return Err(KeyError::BadEscape {
                        key: key.to_string(),
                        at: i,
                    })
                }
            }
            i += 3;
        } else if plain(b) {
            out.push(b);
            i += 1;
        } else {
            return Err(KeyError::BadByte {
                key: key.to_string(),
                at: i,
                byte: b,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_from_the_issue() {
        assert_eq!(encode_id(b"host.01@x"), "host=2E01=40x");
        assert_eq!(decode_id("host=2E01=40x").unwrap(), b"host.01@x");
    }

    #[test]
    fn round_trip_every_byte() {
        let all: Vec<u8> = (0..=255u8).collect();
        let enc = encode_id(&all);
        assert!(enc
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'='));
        assert_eq!(decode_id(&enc).unwrap(), all);
    }

    #[test]
    fn rejects_bad_keys() {
        assert!(decode_id("a=2").is_err());
        assert!(decode_id("a=zz").is_err());
        assert!(decode_id("a=2e").is_err(), "lower-case hex is not produced");
        assert!(decode_id("a.b").is_err());
    }
}
