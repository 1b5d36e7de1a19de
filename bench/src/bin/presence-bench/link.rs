//! One agent's connection to a target: presenced (the client library),
//! nats-server (INFO, TLS upgrade, CONNECT, PING/PONG) or mosquitto
//! (MQTT 3.1.1 CONNECT/CONNACK, PINGREQ/PINGRESP). Only the handful of
//! packets a presence agent needs are encoded here.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use presence_client::protocol::TOKEN_LEN;
use presence_client::{Connection, FleetKey};
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::wire::TargetKind;

/// Everything shared by the agents of one worker.
pub struct LinkCtx {
    pub target: TargetKind,
    pub addr: SocketAddr,
    pub server_name: ServerName<'static>,
    pub server_name_str: String,
    pub tls: Arc<ClientConfig>,
    pub fleet_key: Option<FleetKey>,
    /// MQTT keepalive, seconds.
    pub mqtt_keepalive_s: u16,
}

/// Timings of one successful connect.
pub struct ConnectTimes {
    /// TCP connect + TLS handshake.
    pub tls: Duration,
    /// Up to the protocol's welcome.
    pub full: Duration,
}

pub enum Link {
    Presenced(Box<Connection>),
    Nats(Box<TlsStream<TcpStream>>, LineBuf),
    Mqtt(Box<TlsStream<TcpStream>>),
}

/// Bytes read from a NATS connection that do not yet form a whole line.
#[derive(Default)]
pub struct LineBuf {
    buf: Vec<u8>,
}

const NATS_LINE_MAX: usize = 64 * 1024;

async fn tcp_connect(addr: SocketAddr, source: Option<IpAddr>) -> Result<TcpStream> {
    let tcp = match source {
        None => TcpStream::connect(addr).await?,
        Some(ip) => {
            let sock = if ip.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            sock.bind(SocketAddr::new(ip, 0))
                .with_context(|| format!("bind {ip}"))?;
            sock.connect(addr).await?
        }
    };
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

impl Link {
    /// Connect agent `id` from `source` and complete the protocol's opening.
    pub async fn connect(
        ctx: &LinkCtx,
        tls: &Arc<ClientConfig>,
        id: &str,
        source: Option<IpAddr>,
    ) -> Result<(Link, ConnectTimes)> {
        let start = Instant::now();
        match ctx.target {
            TargetKind::Presenced => {
                let mut conn =
                    Connection::connect_from(ctx.addr, source, &ctx.server_name_str, tls.clone())
                        .await?;
                let tls = start.elapsed();
                let key = ctx
                    .fleet_key
                    .as_ref()
                    .ok_or_else(|| anyhow!("no fleet key for presenced"))?;
                let token: [u8; TOKEN_LEN] = key.token(id.as_bytes());
                conn.hello(id.as_bytes(), &token).await?;
                let full = start.elapsed();
                Ok((Link::Presenced(Box::new(conn)), ConnectTimes { tls, full }))
            }
            TargetKind::Nats => {
                let mut tcp = tcp_connect(ctx.addr, source).await?;
                // nats-server 2.9 sends INFO in plaintext, then the client
                // upgrades to TLS. INFO is the only thing it sends first.
                let mut lb = LineBuf::default();
                let info = read_line_plain(&mut tcp, &mut lb).await?;
                if !info.starts_with(b"INFO ") {
                    bail!(
                        "nats: expected INFO, got {:?}",
                        String::from_utf8_lossy(&info)
                    );
                }
                if !lb.buf.is_empty() {
                    bail!("nats: unexpected bytes after INFO");
                }
                let mut tls_stream = TlsConnector::from(tls.clone())
                    .connect(ctx.server_name.clone(), tcp)
                    .await
                    .context("nats TLS handshake")?;
                let tls = start.elapsed();
                let connect = format!(
                    "CONNECT {{\"verbose\":false,\"pedantic\":false,\"tls_required\":true,\"name\":\"{id}\",\"lang\":\"rust\",\"version\":\"0.1.0\"}}\r\nPING\r\n"
                );
                tls_stream.write_all(connect.as_bytes()).await?;
                tls_stream.flush().await?;
                nats_wait_pong(&mut tls_stream, &mut lb).await?;
                let full = start.elapsed();
                Ok((
                    Link::Nats(Box::new(tls_stream), lb),
                    ConnectTimes { tls, full },
                ))
            }
            TargetKind::Mqtt => {
                let tcp = tcp_connect(ctx.addr, source).await?;
                let mut s = TlsConnector::from(tls.clone())
                    .connect(ctx.server_name.clone(), tcp)
                    .await
                    .context("mqtt TLS handshake")?;
                let tls = start.elapsed();
                let pkt = mqtt_connect_packet(id, ctx.mqtt_keepalive_s)?;
                s.write_all(&pkt).await?;
                s.flush().await?;
                let mut ack = [0u8; 4];
                s.read_exact(&mut ack).await.context("mqtt CONNACK")?;
                if ack[0] != 0x20 || ack[1] != 0x02 {
                    bail!("mqtt: expected CONNACK, got {ack:02x?}");
                }
                if ack[3] != 0 {
                    bail!("mqtt: CONNACK return code {}", ack[3]);
                }
                let full = start.elapsed();
                Ok((Link::Mqtt(Box::new(s)), ConnectTimes { tls, full }))
            }
        }
    }

    /// One heartbeat round trip.
    pub async fn heartbeat(&mut self, seq: u32) -> Result<Duration> {
        let start = Instant::now();
        match self {
            Link::Presenced(c) => Ok(c.heartbeat(seq).await?),
            Link::Nats(s, lb) => {
                s.write_all(b"PING\r\n").await?;
                s.flush().await?;
                nats_wait_pong(s, lb).await?;
                Ok(start.elapsed())
            }
            Link::Mqtt(s) => {
                s.write_all(&[0xC0, 0x00]).await?;
                s.flush().await?;
                let mut resp = [0u8; 2];
                s.read_exact(&mut resp).await?;
                if resp != [0xD0, 0x00] {
                    bail!("mqtt: expected PINGRESP, got {resp:02x?}");
                }
                Ok(start.elapsed())
            }
        }
    }

    /// Drop the connection like a network failure: TCP reset, no goodbye.
    pub fn abort(mut self) {
        let tcp: &TcpStream = match &mut self {
            Link::Presenced(c) => c.tls_stream_mut().get_ref().0,
            Link::Nats(s, _) | Link::Mqtt(s) => s.get_ref().0,
        };
        let _ = socket2::SockRef::from(tcp).set_linger(Some(Duration::ZERO));
        drop(self);
    }

    /// Say goodbye the protocol's way and close.
    pub async fn close(self) {
        match self {
            Link::Presenced(mut c) => {
                let _ = c.bye().await;
                let _ = c.close().await;
            }
            Link::Nats(mut s, _) => {
                let _ = s.shutdown().await;
            }
            Link::Mqtt(mut s) => {
                let _ = s.write_all(&[0xE0, 0x00]).await;
                let _ = s.shutdown().await;
            }
        }
    }
}

/// Read one `\r\n`-terminated line from the plaintext socket (before TLS).
/// Reads byte-sized chunks so nothing after the line is consumed.
async fn read_line_plain(tcp: &mut TcpStream, lb: &mut LineBuf) -> Result<Vec<u8>> {
    let mut byte = [0u8; 1];
    loop {
        if lb.buf.ends_with(b"\r\n") {
            let mut line = std::mem::take(&mut lb.buf);
            line.truncate(line.len() - 2);
            return Ok(line);
        }
        if lb.buf.len() > NATS_LINE_MAX {
            bail!("nats: line longer than {NATS_LINE_MAX} bytes");
        }
        let n = tcp.read(&mut byte).await?;
        if n == 0 {
            bail!("nats: server closed before INFO");
        }
        lb.buf.push(byte[0]);
    }
}

/// Read lines until PONG, answering PINGs and skipping INFO/+OK.
async fn nats_wait_pong(s: &mut TlsStream<TcpStream>, lb: &mut LineBuf) -> Result<()> {
    let mut chunk = [0u8; 512];
    loop {
        while let Some(pos) = lb.buf.windows(2).position(|w| w == b"\r\n") {
            let is_pong = lb.buf.starts_with(b"PONG") && pos == 4;
            let is_ping = lb.buf.starts_with(b"PING") && pos == 4;
            let is_err = lb.buf.starts_with(b"-ERR");
            if is_err {
                let text = String::from_utf8_lossy(&lb.buf[..pos]).into_owned();
                bail!("nats: {text}");
            }
            lb.buf.drain(..pos + 2);
            if is_pong {
                return Ok(());
            }
            if is_ping {
                s.write_all(b"PONG\r\n").await?;
                s.flush().await?;
            }
        }
        if lb.buf.len() > NATS_LINE_MAX {
            bail!("nats: line longer than {NATS_LINE_MAX} bytes");
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            bail!("nats: server closed the connection");
        }
        lb.buf.extend_from_slice(&chunk[..n]);
    }
}

/// MQTT 3.1.1 CONNECT with clean session and the given keepalive.
pub fn mqtt_connect_packet(client_id: &str, keepalive_s: u16) -> Result<Vec<u8>> {
    let id = client_id.as_bytes();
    let id_len = u16::try_from(id.len()).map_err(|_| anyhow!("mqtt client id too long"))?;
    let mut var = Vec::with_capacity(12 + id.len());
    var.extend_from_slice(&[0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02]);
    var.extend_from_slice(&keepalive_s.to_be_bytes());
    var.extend_from_slice(&id_len.to_be_bytes());
    var.extend_from_slice(id);
    let mut pkt = vec![0x10];
    let mut len = var.len();
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        pkt.push(b);
        if len == 0 {
            break;
        }
    }
    pkt.extend_from_slice(&var);
    Ok(pkt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mqtt_connect_encoding() {
        let p = mqtt_connect_packet("a1", 60).unwrap();
        assert_eq!(
            p,
            vec![0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 2, b'a', b'1']
        );
        let long = "x".repeat(200);
        let p = mqtt_connect_packet(&long, 60).unwrap();
        // 12 + 200 = 212 = 0xD4 -> varint 0xD4 0x01
        assert_eq!(&p[..3], &[0x10, 0xD4, 0x01]);
        assert_eq!(p.len(), 3 + 212);
    }
}
