//! End-to-end tests of the state machine with fake daemons and REAL sockets:
//! TCP loopback connections are handed over and must keep working.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::process::Child;
use std::thread;
use std::time::Duration;

use super::machine::*;
use super::manifest::*;
use super::spawn;
use super::wire;
use crate::presence::owner::owner_shard;

const IO_TIMEOUT: Duration = Duration::from_secs(10);

fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn tls(i: u64) -> TlsState {
    TlsState {
        suite: suite::TLS13_AES_256_GCM_SHA384,
        rx_secret: vec![i as u8; 48],
        tx_secret: vec![!(i as u8); 48],
        rx_seq: i,
        tx_seq: i + 1,
    }
}

/// `n` loopback connections: (listener, clients, server sides), client i
/// paired with server i.
fn tcp_setup(n: usize) -> (TcpListener, Vec<TcpStream>, Vec<TcpStream>) {
    raise_nofile();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    // Accept as we go: std listens with a backlog of 128, and a SYN beyond
    // it is retried only after a second.
    let mut clients = Vec::with_capacity(n);
    let mut by_peer = HashMap::new();
    for _ in 0..n {
        clients.push(TcpStream::connect(addr).unwrap());
        let (s, peer) = l.accept().unwrap();
        by_peer.insert(peer, s);
    }
    let servers = clients
        .iter()
        .map(|c| {
            c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            let s = by_peer.remove(&c.local_addr().unwrap()).unwrap();
            s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            s
        })
        .collect();
    (l, clients, servers)
}

/// Write through `a`, read through `b`, both ways.
fn assert_pipe(client: &mut TcpStream, server: &mut TcpStream, tag: usize) {
    let msg = format!("ping-{tag:05}");
    client.write_all(msg.as_bytes()).unwrap();
    let mut buf = vec![0u8; msg.len()];
    server.read_exact(&mut buf).unwrap();
    assert_eq!(buf, msg.as_bytes());
    server.write_all(b"pong").unwrap();
    let mut buf = [0u8; 4];
    client.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong");
}

fn agents(shards: usize, n: usize) -> Vec<Vec<PresenceRecordHandoff>> {
    let mut out = vec![Vec::new(); shards];
    for i in 0..n {
        let agent = format!("agent-{i}");
        let shard = owner_shard(agent.as_bytes(), shards);
        let grace = i % 3 == 1;
        out[shard].push(PresenceRecordHandoff {
            agent,
            state: if grace { "grace" } else { "online" }.into(),
            since_ms: 1000 + i as u64,
            last_seen_ms: 2000 + i as u64,
            session: i as u64,
            grace_remaining_ms: grace.then_some(30_000),
            offline_reason: None,
            conn: None,
        });
    }
    out
}

fn global() -> GlobalState {
    GlobalState {
        events: (5..15)
            .map(|seq| EventHandoff {
                seq,
                ts_ms: seq * 10,
                agent: format!("agent-{seq}"),
                state: "online".into(),
                reason: "hello".into(),
            })
            .collect(),
        next_event_seq: 15,
        ticket_keys: TicketKeys {
            keys: vec![vec![7; 80], vec![8; 80]],
        },
    }
}

// ------------------------------------------------------------ fake source

struct FakeSource {
    manifest: Manifest,
    listener: Option<TcpListener>,
    /// Per shard: the daemon's own server-side sockets.
    shards: Vec<Vec<(ConnHandoff, TcpStream)>>,
    records: Vec<Vec<PresenceRecordHandoff>>,
    global: GlobalState,
    calls: Vec<String>,
    resumed: Option<String>,
    finished: bool,
    child: Option<Child>,
}

impl FakeSource {
    fn new(shards: usize, listener: TcpListener, servers: Vec<TcpStream>, n_agents: usize) -> Self {
        let mut per: Vec<Vec<(ConnHandoff, TcpStream)>> = (0..shards).map(|_| Vec::new()).collect();
        for (i, s) in servers.into_iter().enumerate() {
            let shard = i % shards;
            let c = ConnHandoff {
                shard: shard as u16,
                key: 0,
                gen: 0,
                agent: Some(format!("agent-{i}")),
                session_id: i as u64,
                last_seen_age_ms: 10 * i as u64,
                accepted_age_ms: 60_000,
                phase: phase::SESSION,
                tls: tls(i as u64),
                rx_pending: vec![0x17, 0x03, 0x03, (i % 256) as u8],
                rx_plain: vec![],
                tx_pending: vec![],
            };
            per[shard].push((c, s));
        }
        let records = agents(shards, n_agents);
        let g = global();
        let manifest = Manifest {
            protocol: PROTOCOL,
            from_version: "test".into(),
            from_pid: std::process::id(),
            listen: listener.local_addr().unwrap().to_string(),
            shards,
            config_path: "/etc/presenced/presenced.toml".into(),
            // Each shard also has one connection it cannot carry.
            connections_total: per.iter().map(|s| s.len() as u64 + 1).sum(),
            agents_total: n_agents as u64,
            next_event_seq: g.next_event_seq,
        };
        FakeSource {
            manifest,
            listener: Some(listener),
            shards: per,
            records,
            global: g,
            calls: Vec::new(),
            resumed: None,
            finished: false,
            child: None,
        }
    }
}

impl Source for FakeSource {
    type Error = std::io::Error;
    fn prepare(&mut self) -> Result<(), std::io::Error> {
        self.calls.push("prepare".into());
        Ok(())
    }
    fn manifest(&mut self) -> Manifest {
        self.manifest.clone()
    }
    fn listeners(&mut self) -> Result<Vec<OwnedFd>, std::io::Error> {
        let l = self
            .listener
            .as_ref()
            .ok_or_else(|| std::io::Error::other("no listener"))?;
        (0..self.manifest.shards)
            .map(|_| l.try_clone().map(OwnedFd::from))
            .collect()
    }
    fn quiesce_shard(&mut self, shard: usize) -> Result<ShardSnapshot, std::io::Error> {
        self.calls.push(format!("quiesce {shard}"));
        let conns = self.shards[shard]
            .iter()
            .map(|(c, s)| Ok((c.clone(), OwnedFd::from(s.try_clone()?).into())))
            .collect::<Result<_, std::io::Error>>()?;
        Ok(ShardSnapshot {
            conns,
            records: self.records[shard].clone(),
            uncarried: 1,
        })
    }
    fn global_state(&mut self) -> Result<GlobalState, std::io::Error> {
        Ok(self.global.clone())
    }
    fn stop_target(&mut self) {
        self.calls.push("stop_target".into());
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    fn resume_all(&mut self, reason: &str) {
        self.calls.push("resume_all".into());
        self.resumed = Some(reason.to_string());
    }
    fn finish(&mut self) {
        self.calls.push("finish".into());
        // Plain close, no shutdown(): the target holds the same sockets.
        self.shards.clear();
        self.listener = None;
        self.finished = true;
    }
}

// ------------------------------------------------------------ fake target

#[derive(Default)]
struct FakeTarget {
    /// (shards, listen) the "config" expects; None accepts any manifest.
    expect: Option<(usize, String)>,
    listeners: Vec<OwnedFd>,
    conns: Vec<(ConnHandoff, OwnedFd)>,
    records: Vec<PresenceRecordHandoff>,
    global: Option<GlobalState>,
    fail_adopt_shard: Option<usize>,
    ready_delay: Option<Duration>,
    notify: bool,
    committed: bool,
    /// `commit` fails (after the source sent Commit).
    fail_commit: bool,
}

impl Target for FakeTarget {
    type Error = std::io::Error;
    fn check_manifest(&mut self, m: &Manifest) -> Result<(), std::io::Error> {
        match &self.expect {
            Some((shards, listen)) => m
                .check_local(*shards, listen)
                .map_err(std::io::Error::other),
            None => Ok(()),
        }
    }
    fn adopt_listeners(&mut self, l: Vec<OwnedFd>) -> Result<(), std::io::Error> {
        self.listeners = l;
        Ok(())
    }
    fn adopt_shard(
        &mut self,
        shard: usize,
        conns: Vec<(ConnHandoff, OwnedFd)>,
        records: Vec<PresenceRecordHandoff>,
    ) -> Result<(), std::io::Error> {
        if self.fail_adopt_shard == Some(shard) {
            return Err(std::io::Error::other("slab full"));
        }
        self.conns.extend(conns);
        self.records.extend(records);
        Ok(())
    }
    fn adopt_global(&mut self, g: GlobalState) -> Result<(), std::io::Error> {
        self.global = Some(g);
        Ok(())
    }
    fn ready(&mut self) -> Result<(), std::io::Error> {
        if let Some(d) = self.ready_delay {
            thread::sleep(d);
        }
        Ok(())
    }
    fn commit(&mut self) -> Result<(), std::io::Error> {
        if self.fail_commit {
            return Err(std::io::Error::other("cannot serve"));
        }
        if self.notify {
            spawn::notify_takeover("took over").map_err(std::io::Error::other)?;
        }
        self.committed = true;
        Ok(())
    }
}

fn run_pair(
    mut src: FakeSource,
    mut tgt: FakeTarget,
    timeout: Duration,
) -> (
    FakeSource,
    Result<SourceOutcome, UpgradeError>,
    FakeTarget,
    Result<TargetOutcome, UpgradeError>,
) {
    let (a, b) = UnixStream::pair().unwrap();
    let t = thread::spawn(move || {
        let r = run_target(b, &mut tgt, timeout);
        (tgt, r)
    });
    let r = run_source(a, &mut src, timeout);
    let (tgt, tr) = t.join().unwrap();
    (src, r, tgt, tr)
}

// ------------------------------------------------------------ tests

#[test]
fn handover_300_connections_survive() {
    const N: usize = 300;
    let shards = 2;
    let (listener, mut clients, servers) = tcp_setup(N);
    let addr = listener.local_addr().unwrap();
    let src = FakeSource::new(shards, listener, servers, 500);
    let expect_records = src.records.concat();
    let tgt = FakeTarget {
        expect: Some((shards, addr.to_string())),
        ..Default::default()
    };
    let (src, r, tgt, tr) = run_pair(src, tgt, Duration::from_secs(20));
    let out = r.unwrap();
    let tout = tr.unwrap();

    assert_eq!(out.connections, N as u64);
    assert_eq!(out.records, 500);
    assert_eq!(out.events, 10);
    assert_eq!(out.uncarried, shards as u64);
    assert_eq!(out.target_pid, std::process::id());
    assert_eq!(
        out.transitions,
        vec![
            UpgradeStep::Prepare,
            UpgradeStep::Listeners,
            UpgradeStep::Quiesce(0),
            UpgradeStep::Transfer(0),
            UpgradeStep::Quiesce(1),
            UpgradeStep::Transfer(1),
            UpgradeStep::Global,
            UpgradeStep::Confirm,
            UpgradeStep::Commit,
            UpgradeStep::Exit
        ]
    );
    assert_eq!(tout.connections, N as u64);
    assert!(src.finished && src.resumed.is_none());
    assert!(!src.calls.contains(&"stop_target".to_string()));
    assert!(tgt.committed);
    assert_eq!(tgt.listeners.len(), shards);
    assert_eq!(tgt.global.as_ref().unwrap(), &global());
    let mut got_records = tgt.records.clone();
    got_records.sort_by(|a, b| a.agent.cmp(&b.agent));
    let mut want = expect_records;
    want.sort_by(|a, b| a.agent.cmp(&b.agent));
    assert_eq!(got_records, want);

    // The source closed its copies in finish(); every connection must still
    // work through the fd the TARGET received.
    assert_eq!(tgt.conns.len(), N);
    let mut seen = vec![false; N];
    for (c, fd) in tgt.conns {
        let i = c.session_id as usize;
        assert!(!seen[i]);
        seen[i] = true;
        assert_eq!(c.tls, tls(i as u64));
        assert_eq!(c.rx_pending[3], (i % 256) as u8);
        let mut server = TcpStream::from(fd);
        server.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        assert_pipe(&mut clients[i], &mut server, i);
    }

    // The listener survived too: a new connection is accepted by the target.
    let mut fresh = TcpStream::connect(addr).unwrap();
    fresh.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let l = TcpListener::from(tgt.listeners.into_iter().next().unwrap());
    let (mut s, _) = l.accept().unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    assert_pipe(&mut fresh, &mut s, 9999);
}

/// After a failed hand-over the source must still own working connections.
fn assert_source_still_serves(src: &mut FakeSource, clients: &mut [TcpStream]) {
    assert!(!src.finished);
    for shard in &mut src.shards {
        for (c, s) in shard.iter_mut() {
            let i = c.session_id as usize;
            assert_pipe(&mut clients[i], s, i);
        }
    }
}

#[test]
fn target_fails_adopting_shard_1_source_resumes() {
    let (listener, mut clients, servers) = tcp_setup(40);
    let src = FakeSource::new(3, listener, servers, 30);
    let tgt = FakeTarget {
        fail_adopt_shard: Some(1),
        ..Default::default()
    };
    let (mut src, r, tgt, tr) = run_pair(src, tgt, Duration::from_secs(10));
    let e = r.unwrap_err();
    assert_eq!(e.step, UpgradeStep::Transfer(1));
    assert!(matches!(e.kind, FailKind::TargetFailed(_)), "{e}");
    let reason = src.resumed.clone().unwrap();
    assert!(reason.contains("adopt shard 1"), "{reason}");
    assert!(reason.contains("slab full"), "{reason}");
    assert_eq!(
        src.calls,
        [
            "prepare",
            "quiesce 0",
            "quiesce 1",
            "stop_target",
            "resume_all"
        ]
    );
    let te = tr.unwrap_err();
    assert_eq!(te.step, UpgradeStep::Transfer(1));
    assert!(!tgt.committed);
    // The target got shard 0 and drops it (plain close) when it exits.
    drop(tgt);
    assert_source_still_serves(&mut src, &mut clients);
}

#[test]
fn target_dies_mid_transfer_source_resumes() {
    let (listener, mut clients, servers) = tcp_setup(300);
    let mut src = FakeSource::new(2, listener, servers, 10);
    let (a, b) = UnixStream::pair().unwrap();
    // A target that acks the first two steps, takes one batch of
    // connections, then dies.
    let t = thread::spawn(move || {
        let (m, _): (Msg, _) = wire::recv(&b).unwrap();
        assert!(matches!(m, Msg::Manifest { .. }));
        wire::send(
            &b,
            &Msg::Ack {
                step: UpgradeStep::Prepare,
                items: 0,
            },
            &[],
        )
        .unwrap();
        let (m, fds): (Msg, _) = wire::recv(&b).unwrap();
        assert!(matches!(m, Msg::Listeners { count: 2, .. }));
        assert_eq!(fds.len(), 2);
        wire::send(
            &b,
            &Msg::Ack {
                step: UpgradeStep::Listeners,
                items: 2,
            },
            &[],
        )
        .unwrap();
        let (m, fds): (Msg, _) = wire::recv(&b).unwrap();
        assert!(matches!(
            m,
            Msg::Conns {
                shard: 0,
                batch: 0,
                ..
            }
        ));
        assert_eq!(fds.len(), wire::SCM_MAX_FD.min(150));
        drop(fds);
        drop(b);
    });
    let e = run_source(a, &mut src, Duration::from_secs(10)).unwrap_err();
    t.join().unwrap();
    assert_eq!(e.step, UpgradeStep::Transfer(0));
    assert!(
        matches!(e.kind, FailKind::Wire(ref w) if w.is_closed()),
        "{e}"
    );
    assert!(src.resumed.as_ref().unwrap().contains("transfer shard 0"));
    assert!(src.calls.contains(&"stop_target".into()));
    assert_source_still_serves(&mut src, &mut clients);
}

#[test]
fn failure_after_commit_never_resumes() {
    let (listener, _clients, servers) = tcp_setup(10);
    let src = FakeSource::new(2, listener, servers, 10);
    let tgt = FakeTarget {
        fail_commit: true,
        ..Default::default()
    };
    let (src, r, _tgt, tr) = run_pair(src, tgt, Duration::from_secs(10));
    let e = r.unwrap_err();
    assert_eq!(e.step, UpgradeStep::Commit);
    assert!(e.committed, "{e}");
    assert!(tr.is_err());
    // Neither thawed nor MAINPID=<old> (resume_all), nor the target killed:
    // released like a finished hand-over.
    assert!(
        src.resumed.is_none(),
        "resumed after commit: {:?}",
        src.calls
    );
    assert!(
        !src.calls.iter().any(|c| c == "stop_target"),
        "{:?}",
        src.calls
    );
    assert!(src.finished);
}

#[test]
fn target_never_confirms_source_times_out_and_resumes() {
    let (listener, mut clients, servers) = tcp_setup(10);
    let src = FakeSource::new(2, listener, servers, 10);
    let tgt = FakeTarget {
        ready_delay: Some(Duration::from_millis(1500)),
        ..Default::default()
    };
    let (mut src, r, tgt, tr) = run_pair(src, tgt, Duration::from_millis(400));
    let e = r.unwrap_err();
    assert_eq!(e.step, UpgradeStep::Confirm);
    assert!(
        matches!(e.kind, FailKind::Wire(wire::WireError::Timeout { .. })),
        "{e}"
    );
    assert!(src.resumed.as_ref().unwrap().contains("confirm"));
    // The target learns it was aborted and never commits.
    let te = tr.unwrap_err();
    assert!(
        matches!(te.kind, FailKind::SourceAborted(_) | FailKind::Wire(_)),
        "{te}"
    );
    assert!(!tgt.committed);
    drop(tgt);
    assert_source_still_serves(&mut src, &mut clients);
}

#[test]
fn shard_count_mismatch_refused_before_any_quiesce() {
    let (listener, mut clients, servers) = tcp_setup(4);
    let addr = listener.local_addr().unwrap().to_string();
    let src = FakeSource::new(2, listener, servers, 4);
    let tgt = FakeTarget {
        expect: Some((3, addr)),
        ..Default::default()
    };
    let (mut src, r, _tgt, tr) = run_pair(src, tgt, Duration::from_secs(10));
    let e = r.unwrap_err();
    assert_eq!(e.step, UpgradeStep::Prepare);
    let reason = src.resumed.clone().unwrap();
    assert!(
        reason.contains("check manifest") && reason.contains("shard count mismatch"),
        "{reason}"
    );
    assert_eq!(src.calls, ["prepare", "stop_target", "resume_all"]);
    assert!(tr.is_err());
    assert_source_still_serves(&mut src, &mut clients);
}

#[test]
fn listen_mismatch_refused() {
    let (listener, _clients, servers) = tcp_setup(2);
    let src = FakeSource::new(1, listener, servers, 0);
    let tgt = FakeTarget {
        expect: Some((1, "127.0.0.1:1".into())),
        ..Default::default()
    };
    let (src, r, _, _) = run_pair(src, tgt, Duration::from_secs(10));
    assert_eq!(r.unwrap_err().step, UpgradeStep::Prepare);
    assert!(src.resumed.unwrap().contains("listen address mismatch"));
}

#[test]
fn source_refuses_to_send_unknown_protocol() {
    let (listener, _clients, servers) = tcp_setup(2);
    let mut src = FakeSource::new(1, listener, servers, 0);
    src.manifest.protocol = 99;
    let (src, r, _, tr) = run_pair(src, FakeTarget::default(), Duration::from_secs(5));
    let e = r.unwrap_err();
    assert_eq!(e.step, UpgradeStep::Prepare);
    assert!(e.to_string().contains("protocol 99"), "{e}");
    assert!(src.resumed.is_some());
    assert!(matches!(tr.unwrap_err().kind, FailKind::SourceAborted(_)));
}

#[test]
fn target_refuses_protocol_99() {
    let (a, b) = UnixStream::pair().unwrap();
    let t =
        thread::spawn(move || run_target(b, &mut FakeTarget::default(), Duration::from_secs(5)));
    let m = Manifest {
        protocol: 99,
        from_version: "future".into(),
        from_pid: 1,
        listen: "127.0.0.1:7443".into(),
        shards: 1,
        config_path: "x".into(),
        connections_total: 0,
        agents_total: 0,
        next_event_seq: 1,
    };
    wire::send(
        &a,
        &Msg::Manifest {
            step: UpgradeStep::Prepare,
            manifest: m,
        },
        &[],
    )
    .unwrap();
    let reply: Msg = wire::recv_no_fds(&a, None).unwrap();
    match reply {
        Msg::Fail { step, reason } => {
            assert_eq!(step, UpgradeStep::Prepare);
            assert!(reason.contains("protocol 99 is not supported"), "{reason}");
        }
        m => panic!("expected fail, got {m:?}"),
    }
    let e = t.join().unwrap().unwrap_err();
    assert!(matches!(
        e.kind,
        FailKind::Check(ManifestError::Protocol { got: 99, .. })
    ));
}

#[test]
fn source_checks_manifest_totals() {
    let (listener, mut clients, servers) = tcp_setup(6);
    let mut src = FakeSource::new(2, listener, servers, 6);
    src.manifest.connections_total += 1; // a shard produced fewer than announced
    let (mut src, r, tgt, _) = run_pair(src, FakeTarget::default(), Duration::from_secs(5));
    let e = r.unwrap_err();
    assert_eq!(e.step, UpgradeStep::Global);
    assert!(
        e.to_string()
            .contains("connections (carried + uncarried): announced 9, got 8"),
        "{e}"
    );
    assert!(!tgt.committed);
    drop(tgt);
    assert_source_still_serves(&mut src, &mut clients);
}

#[test]
fn target_checks_shard_counts() {
    // A broken source announces 5 connections for shard 0 and sends none.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let (a, b) = UnixStream::pair().unwrap();
    let t =
        thread::spawn(move || run_target(b, &mut FakeTarget::default(), Duration::from_secs(5)));
    let m = Manifest {
        protocol: PROTOCOL,
        from_version: "t".into(),
        from_pid: 1,
        listen: l.local_addr().unwrap().to_string(),
        shards: 1,
        config_path: "x".into(),
        connections_total: 5,
        agents_total: 0,
        next_event_seq: 1,
    };
    wire::send(
        &a,
        &Msg::Manifest {
            step: UpgradeStep::Prepare,
            manifest: m,
        },
        &[],
    )
    .unwrap();
    assert!(matches!(
        wire::recv_no_fds::<Msg>(&a, None).unwrap(),
        Msg::Ack { .. }
    ));
    let fd = l.try_clone().unwrap();
    wire::send(
        &a,
        &Msg::Listeners {
            step: UpgradeStep::Listeners,
            first: 0,
            count: 1,
        },
        &[std::os::fd::AsFd::as_fd(&fd)],
    )
    .unwrap();
    assert!(matches!(
        wire::recv_no_fds::<Msg>(&a, None).unwrap(),
        Msg::Ack { items: 1, .. }
    ));
    let done = Msg::ShardDone {
        step: UpgradeStep::Transfer(0),
        shard: 0,
        conns: 5,
        records: 0,
        batches: 0,
        uncarried: 0,
    };
    wire::send(&a, &done, &[]).unwrap();
    match wire::recv_no_fds::<Msg>(&a, None).unwrap() {
        Msg::Fail { step, reason } => {
            assert_eq!(step, UpgradeStep::Transfer(0));
            assert!(
                reason.contains("connections: announced 5, got 0"),
                "{reason}"
            );
        }
        m => panic!("expected fail, got {m:?}"),
    }
    assert!(t.join().unwrap().is_err());
}

#[test]
fn target_rejects_a_non_listening_socket_as_listener() {
    let (a, b) = UnixStream::pair().unwrap();
    let t =
        thread::spawn(move || run_target(b, &mut FakeTarget::default(), Duration::from_secs(5)));
    let m = Manifest {
        protocol: PROTOCOL,
        from_version: "t".into(),
        from_pid: 1,
        listen: "127.0.0.1:7443".into(),
        shards: 1,
        config_path: "x".into(),
        connections_total: 0,
        agents_total: 0,
        next_event_seq: 1,
    };
    wire::send(
        &a,
        &Msg::Manifest {
            step: UpgradeStep::Prepare,
            manifest: m,
        },
        &[],
    )
    .unwrap();
    let _ack: Msg = wire::recv_no_fds(&a, None).unwrap();
    let (p, _q) = UnixStream::pair().unwrap();
    wire::send(
        &a,
        &Msg::Listeners {
            step: UpgradeStep::Listeners,
            first: 0,
            count: 1,
        },
        &[std::os::fd::AsFd::as_fd(&p)],
    )
    .unwrap();
    match wire::recv_no_fds::<Msg>(&a, None).unwrap() {
        Msg::Fail { reason, .. } => {
            assert!(reason.contains("listener 0: not listening"), "{reason}")
        }
        m => panic!("expected fail, got {m:?}"),
    }
    assert!(t.join().unwrap().is_err());
}

// The same hand-over between two real processes (spawn, inherited socket,
// live agents, MAINPID on a notify socket) is tested end to end with the
// daemon binary in tests/upgrade.rs.
