//! Test helpers: a self-signed certificate, configs, and an in-memory
//! handshake between a rustls client and [`Handshake`].

use std::io::{Read, Write};
use std::sync::{Arc, OnceLock};

use rustls::crypto::{ring as provider, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, SupportedCipherSuite};

use super::handshake::{prepare_config, Established, Handshake, HandshakeError, Progress};
use presence_proto::ALPN;

pub struct TestPki {
    pub cert: CertificateDer<'static>,
    pub key: Vec<u8>,
    pub cert_pem: String,
}

pub fn pki() -> &'static TestPki {
    static PKI: OnceLock<TestPki> = OnceLock::new();
    PKI.get_or_init(|| {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
            .expect("self-signed certificate");
        TestPki {
            cert: ck.cert.der().clone(),
            key: ck.key_pair.serialize_der(),
            cert_pem: ck.cert.pem(),
        }
    })
}

pub const ALL_SUITES: [SupportedCipherSuite; 3] = [
    provider::cipher_suite::TLS13_AES_128_GCM_SHA256,
    provider::cipher_suite::TLS13_AES_256_GCM_SHA384,
    provider::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
];

fn provider_with(suites: &[SupportedCipherSuite]) -> Arc<CryptoProvider> {
    Arc::new(CryptoProvider {
        cipher_suites: suites.to_vec(),
        ..provider::default_provider()
    })
}

/// A TLS 1.3 server config as the daemon builds it, before preparation.
pub fn base_server_config(suites: &[SupportedCipherSuite]) -> ServerConfig {
    let pki = pki();
    let mut cfg = ServerConfig::builder_with_provider(provider_with(suites))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_no_client_auth()
        .with_single_cert(
            vec![pki.cert.clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.key.clone())),
        )
        .expect("server certificate");
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    cfg
}

pub fn server_config(suites: &[SupportedCipherSuite]) -> Arc<ServerConfig> {
    prepare_config(base_server_config(suites))
}

pub fn client_config(suites: &[SupportedCipherSuite]) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(pki().cert.clone()).expect("root");
    let mut cfg = ClientConfig::builder_with_provider(provider_with(suites))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Arc::new(cfg)
}

pub fn new_client(cfg: Arc<ClientConfig>) -> ClientConnection {
    ClientConnection::new(cfg, ServerName::try_from("localhost").expect("name")).expect("client")
}

/// Everything the client wants to send.
pub fn client_output(client: &mut ClientConnection) -> Vec<u8> {
    let mut v = Vec::new();
    while client.wants_write() {
        client.write_tls(&mut v).expect("write_tls to a Vec");
    }
    v
}

/// Give server bytes to the client; returns the plaintext it yields and
/// whether it saw close_notify, or the client's error.
pub fn client_input(
    client: &mut ClientConnection,
    mut bytes: &[u8],
) -> Result<(Vec<u8>, bool), rustls::Error> {
    let mut plain = Vec::new();
    let mut eof = false;
    while !bytes.is_empty() {
        client.read_tls(&mut bytes).expect("read_tls from a slice");
        client.process_new_packets()?;
        loop {
            let mut buf = [0u8; 4096];
            match client.reader().read(&mut buf) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => plain.extend_from_slice(&buf[..n]),
                Err(_) => break,
            }
        }
    }
    Ok((plain, eof))
}

/// Run a handshake in memory. `before_finished` runs on the client once it
/// has processed the server's Finished, before its own last flight is
/// collected (so what it writes travels together with the client Finished).
/// `chunk` limits how many bytes the server is fed at a time.
pub fn handshake_with(
    server: Arc<ServerConfig>,
    client_cfg: Arc<ClientConfig>,
    chunk: usize,
    before_finished: impl FnOnce(&mut ClientConnection),
) -> Result<(Box<Established>, ClientConnection), HandshakeError> {
    let mut client = new_client(client_cfg);
    let mut hs = Handshake::new(server)?;
    let mut hook = Some(before_finished);
    for _ in 0..1000 {
        if !client.is_handshaking() {
            if let Some(f) = hook.take() {
                f(&mut client);
            }
        }
        let c2s = client_output(&mut client);
        let mut out = Vec::new();
        let mut progress = None;
        if c2s.is_empty() {
            progress = Some(hs.step(&mut out)?);
        }
        let mut fed = 0;
        while fed < c2s.len() {
            let end = (fed + chunk.max(1)).min(c2s.len());
            hs.feed(&c2s[fed..end]);
            fed = end;
            match hs.step(&mut out)? {
                Progress::Done(mut e) => {
                    // What was not fed yet belongs to the record layer.
                    e.leftover.extend_from_slice(&c2s[fed..]);
                    progress = Some(Progress::Done(e));
                    break;
                }
                p => progress = Some(p),
            }
        }
        client_input(&mut client, &out).expect("client accepts the server flight");
        if let Some(Progress::Done(e)) = progress {
            return Ok((e, client));
        }
    }
    panic!("handshake did not finish");
}

pub fn handshake(suite: SupportedCipherSuite) -> (Box<Established>, ClientConnection) {
    handshake_with(
        server_config(&[suite]),
        client_config(&[suite]),
        usize::MAX,
        |_| {},
    )
    .expect("handshake")
}

/// Client writes `data` (plaintext) and returns the TLS bytes.
pub fn client_send(client: &mut ClientConnection, data: &[u8]) -> Vec<u8> {
    let mut wire = Vec::new();
    for piece in data.chunks(16 * 1024) {
        client.writer().write_all(piece).expect("buffered write");
        wire.extend(client_output(client));
    }
    if data.is_empty() {
        wire.extend(client_output(client));
    }
    wire
}

/// A small deterministic PRNG (xorshift64*).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// Up to `max - 1` random bytes.
    pub fn upto(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max);
        self.bytes(n)
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}
