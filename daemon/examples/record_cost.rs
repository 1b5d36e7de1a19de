//! Per-record cost of the lean TLS 1.3 record layer: sealing and opening an
//! 11-byte HEARTBEAT record, with the AEAD key and IV derived from the
//! traffic secret on every record (what each connection keeps is only the
//! secret, see `lean::record`). A measurement, not a test:
//!
//! `cargo run --release -p presenced --example record_cost`

use std::time::{Duration, Instant};

use presenced::tls::record::{LeanSession, Suite};

const N: u32 = 50_000;

fn main() -> anyhow::Result<()> {
    for suite in [
        Suite::Aes128GcmSha256,
        Suite::Aes256GcmSha384,
        Suite::Chacha20Poly1305Sha256,
    ] {
        let len = suite.hash_len();
        let (c2s, s2c) = (vec![7u8; len], vec![9u8; len]);
        let mut server = LeanSession::new(suite, &c2s, 0, &s2c, 0)?;
        let mut client = LeanSession::new(suite, &s2c, 0, &c2s, 0)?;
        let heartbeat = [3u8, 0, 4, 0, 0, 0, 1, 0, 0, 0, 0];
        let mut wire = Vec::with_capacity(64);
        let t = Instant::now();
        for _ in 0..N {
            wire.clear();
            server.seal_app_data(&heartbeat, &mut wire)?;
        }
        let seal = t.elapsed() / N;
        let mut records: Vec<Vec<u8>> = Vec::with_capacity(N as usize);
        for _ in 0..N {
            let mut w = Vec::with_capacity(64);
            client.seal_app_data(&heartbeat, &mut w)?;
            records.push(w);
        }
        let mut out = Vec::new();
        let t = Instant::now();
        for r in &mut records {
            server.read_record(r, &mut out)?;
        }
        let open: Duration = t.elapsed() / N;
        println!("{suite:?}: seal {seal:?}/record, open {open:?}/record");
    }
    Ok(())
}
