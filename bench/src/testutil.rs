//! In-process TLS test server (tokio-rustls) speaking raw frames, for unit
//! tests that must not depend on the real daemon.

use std::net::SocketAddr;
use std::sync::Arc;

use presence_proto::{Frame, FrameDecoder, ALPN};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::tls::ClientTls;

/// A self-signed ECDSA P-256 certificate for localhost and 127.0.0.1.
pub struct TestCert {
    ck: rcgen::CertifiedKey,
}

impl TestCert {
    pub fn generate() -> Self {
        let ck = rcgen::generate_simple_self_signed(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
        ])
        .expect("rcgen");
        Self { ck }
    }
    pub fn cert_pem(&self) -> String {
        self.ck.cert.pem()
    }
    pub fn key_pem(&self) -> String {
        self.ck.key_pair.serialize_pem()
    }
    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.ck.cert.der().clone()
    }
    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.ck.key_pair.serialize_der()))
    }
}

/// Accepts TLS connections and hands each to the test as a [`ServerConn`].
pub struct TestServer {
    addr: SocketAddr,
    cert: CertificateDer<'static>,
    accepted: mpsc::UnboundedReceiver<ServerConn>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with_versions(&[&rustls::version::TLS13]).await
    }

    pub async fn start_with_versions(
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Self {
        let cert = TestCert::generate();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert_der()], cert.key_der())
            .unwrap();
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(cfg));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, accepted) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, peer)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    if let Ok(stream) = acceptor.accept(tcp).await {
                        let _ = tx.send(ServerConn {
                            stream,
                            decoder: FrameDecoder::new(),
                            peer,
                        });
                    }
                });
            }
        });
        Self {
            addr,
            cert: cert.cert_der(),
            accepted,
            task,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.cert.clone()
    }

    pub fn client_config(&self) -> Arc<ClientConfig> {
        ClientTls::from_ca_der([self.cert_der()])
            .unwrap()
            .build()
            .unwrap()
    }

    /// The next accepted (handshaken) connection.
    pub async fn accept(&mut self) -> ServerConn {
        tokio::time::timeout(std::time::Duration::from_secs(10), self.accepted.recv())
            .await
            .expect("no connection within 10 s")
            .expect("accept loop ended")
    }
}

/// Server side of one test connection.
pub struct ServerConn {
    stream: TlsStream<TcpStream>,
    decoder: FrameDecoder,
    pub peer: SocketAddr,
}

impl ServerConn {
    pub fn alpn(&self) -> Option<Vec<u8>> {
        self.stream.get_ref().1.alpn_protocol().map(|a| a.to_vec())
    }

    pub async fn send_raw(&mut self, b: &[u8]) {
        self.stream.write_all(b).await.unwrap();
        self.stream.flush().await.unwrap();
    }

    pub async fn send(&mut self, f: &Frame) {
        self.send_raw(&f.to_bytes()).await;
    }

    /// Next frame from the client; None on EOF or error.
    pub async fn recv(&mut self) -> Option<Frame> {
        let mut buf = [0u8; 1024];
        loop {
            if let Some(f) = self.decoder.next_frame().expect("client sent garbage") {
                return Some(f);
            }
            match self.stream.read(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.decoder.extend(&buf[..n]),
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.stream.shutdown().await;
    }
}
