package agent

// The real daemon sends RECONNECT only to connections it cannot hand over
// during an upgrade (a KeyUpdate in flight), which a test cannot provoke
// with Go's TLS stack. So RECONNECT, dead-connection detection and the
// reactions to each ERROR code are tested against a small real TLS 1.3
// server in the test, speaking protocol v1 with this package's codec.

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"math/big"
	mrand "math/rand"
	"net"
	"strings"
	"sync"
	"testing"
	"time"
)

// peer is the server side of one accepted connection.
type peer struct {
	t    *testing.T
	conn *tls.Conn
	dec  Decoder
	buf  []byte
}

// read returns the next frame from the agent, or nil at EOF/close.
func (p *peer) read(limit time.Duration) (Frame, error) {
	_ = p.conn.SetReadDeadline(time.Now().Add(limit))
	for {
		f, err := p.dec.Next()
		if err != nil || f != nil {
			return f, err
		}
		n, err := p.conn.Read(p.buf)
		_, _ = p.dec.Write(p.buf[:n])
		if err != nil && n == 0 {
			return nil, err
		}
	}
}

func (p *peer) send(f Frame) {
	b, err := Encode(f)
	if err != nil {
		p.t.Error(err)
		return
	}
	_ = p.conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if _, err := p.conn.Write(b); err != nil {
		p.t.Logf("fake server write: %v", err)
	}
}

// expectHello reads the agent's HELLO.
func (p *peer) expectHello() Hello {
	f, err := p.read(5 * time.Second)
	h, ok := f.(Hello)
	if !ok {
		p.t.Errorf("first frame %#v (%v), want HELLO", f, err)
	}
	return h
}

// fakeServer accepts TLS 1.3 connections with ALPN presence/1 and hands
// each, with its index, to handle.
type fakeServer struct {
	ln     net.Listener
	pool   *x509.CertPool
	wg     sync.WaitGroup
	mu     sync.Mutex
	accept []time.Time
	resume []bool
}

func newFakeServer(t *testing.T, handle func(i int, p *peer)) *fakeServer {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "localhost"},
		DNSNames:              []string{"localhost"},
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1)},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		BasicConstraintsValid: true,
		IsCA:                  true,
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	s := &fakeServer{pool: x509.NewCertPool()}
	s.pool.AddCert(cert)
	cfg := &tls.Config{
		MinVersion:   tls.VersionTLS13,
		NextProtos:   []string{ALPN},
		Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}},
	}
	s.ln, err = tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for i := 0; ; i++ {
			c, err := s.ln.Accept()
			if err != nil {
				return
			}
			tc := c.(*tls.Conn)
			_ = tc.SetDeadline(time.Now().Add(5 * time.Second))
			if err := tc.Handshake(); err != nil {
				c.Close()
				i--
				continue
			}
			_ = tc.SetDeadline(time.Time{})
			s.mu.Lock()
			s.accept = append(s.accept, time.Now())
			s.resume = append(s.resume, tc.ConnectionState().DidResume)
			s.mu.Unlock()
			s.wg.Add(1)
			go func(i int) {
				defer s.wg.Done()
				defer tc.Close()
				handle(i, &peer{t: t, conn: tc, buf: make([]byte, 4096)})
			}(i)
		}
	}()
	t.Cleanup(func() {
		s.ln.Close()
		s.wg.Wait()
	})
	return s
}

func (s *fakeServer) connections() ([]time.Time, []bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]time.Time(nil), s.accept...), append([]bool(nil), s.resume...)
}

func (s *fakeServer) agent(t *testing.T, rec *recorder) *Agent {
	t.Helper()
	a, err := New(Config{
		Addr:        s.ln.Addr().String(),
		ServerName:  "localhost",
		RootCAs:     s.pool,
		ID:          "fake-01",
		FleetKey:    make([]byte, FleetKeyLen),
		BackoffBase: 40 * time.Millisecond,
		BackoffCap:  160 * time.Millisecond,
		HealthyAcks: 1,
		OnEvent:     rec.on,
		Logf:        t.Logf,
	})
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// RECONNECT: the agent closes without BYE, waits the asked delay (no
// backoff on top) and reconnects, resuming its TLS session.
func TestReconnectIsObeyed(t *testing.T) {
	const delay = 300 * time.Millisecond
	closed := make(chan time.Time, 1)
	s := newFakeServer(t, func(i int, p *peer) {
		h := p.expectHello()
		if h.Token != Token(make([]byte, FleetKeyLen), "fake-01") {
			t.Error("wrong token")
		}
		p.send(Welcome{HeartbeatIntervalMs: 60000, SessionID: uint64(i + 1)})
		if i > 0 {
			f, _ := p.read(10 * time.Second)
			if _, ok := f.(Bye); !ok {
				t.Errorf("connection %d: got %#v, want BYE", i, f)
			}
			return
		}
		p.send(Reconnect{MinDelayMs: uint32(delay / time.Millisecond), MaxDelayMs: uint32(delay / time.Millisecond)})
		f, err := p.read(5 * time.Second)
		closed <- time.Now()
		if f != nil {
			t.Errorf("after RECONNECT the agent sent %#v, want a close", f)
		}
		if !strings.Contains(errString(err), "EOF") {
			t.Errorf("after RECONNECT: %v, want EOF (close_notify)", err)
		}
	})
	rec := newRecorder()
	run := start(t, s.agent(t, rec), 30*time.Second)
	if e := rec.wait(t, EventReconnect, 5*time.Second); e.Delay != delay {
		t.Errorf("reconnect delay %v, want %v", e.Delay, delay)
	}
	w := rec.wait(t, EventWelcome, 5*time.Second)
	if w.SessionID != 2 {
		t.Fatalf("second WELCOME has session %d", w.SessionID)
	}
	at, resumed := s.connections()
	gap := at[1].Sub(<-closed)
	if gap < delay-20*time.Millisecond || gap > delay+time.Second {
		t.Errorf("reconnected %v after the close, want about %v", gap, delay)
	}
	if !resumed[1] {
		t.Error("the reconnect did not resume the TLS session")
	}
	if err := run.stop(t); err != nil {
		t.Fatal(err)
	}
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

// No ACK within two intervals of a HEARTBEAT: the connection is dead, the
// agent closes it and reconnects.
func TestMissingAcksMeanADeadConnection(t *testing.T) {
	s := newFakeServer(t, func(i int, p *peer) {
		p.expectHello()
		p.send(Welcome{HeartbeatIntervalMs: 100, SessionID: 1})
		for {
			f, err := p.read(5 * time.Second)
			if err != nil {
				return
			}
			if hb, ok := f.(Heartbeat); ok && i > 0 {
				p.send(HeartbeatAck{Seq: hb.Seq})
			}
		}
	})
	rec := newRecorder()
	run := start(t, s.agent(t, rec), 30*time.Second)
	sent := rec.wait(t, EventHeartbeatSent, 5*time.Second)
	e := rec.wait(t, EventDisconnected, 5*time.Second)
	if !strings.Contains(e.Err.Error(), "HEARTBEAT_ACK") {
		t.Errorf("disconnected: %v", e.Err)
	}
	if took := e.Time.Sub(sent.Time); took < 190*time.Millisecond || took > 2*time.Second {
		t.Errorf("declared dead %v after the first HEARTBEAT, want 2 intervals (200ms)", took)
	}
	rec.wait(t, EventHeartbeatAck, 5*time.Second)
	if err := run.stop(t); err != nil {
		t.Fatal(err)
	}
}

// ERROR 2, 3 and 5 stop the agent; 1, 4, 6, 7 and unknown codes make it
// reconnect with backoff.
func TestErrorCodes(t *testing.T) {
	for _, code := range []ErrorCode{1, 2, 3, 4, 5, 6, 7, 4242} {
		code := code
		t.Run(code.String(), func(t *testing.T) {
			s := newFakeServer(t, func(i int, p *peer) {
				p.expectHello()
				if i == 0 {
					p.send(Error{Code: code, Message: "test"})
					return
				}
				p.send(Welcome{HeartbeatIntervalMs: 60000, SessionID: 2})
				_, _ = p.read(10 * time.Second)
			})
			rec := newRecorder()
			run := start(t, s.agent(t, rec), 30*time.Second)
			e := rec.wait(t, EventServerError, 5*time.Second)
			if e.Code != code || e.Message != "test" {
				t.Errorf("event %+v", e)
			}
			fatal := code == CodeAuthenticationFailed || code == CodeUnsupportedVersion || code == CodeSuperseded
			if fatal {
				err := run.result(t, 5*time.Second)
				var se *ServerError
				if !errors.As(err, &se) || se.Code != code || !se.Fatal() {
					t.Fatalf("Run returned %v", err)
				}
				time.Sleep(200 * time.Millisecond)
				if at, _ := s.connections(); len(at) != 1 {
					t.Errorf("%d connections after a fatal ERROR, want 1", len(at))
				}
				return
			}
			if b := rec.wait(t, EventBackoff, 5*time.Second); b.Delay > 40*time.Millisecond {
				t.Errorf("first backoff %v, want at most the base 40ms", b.Delay)
			}
			rec.wait(t, EventWelcome, 5*time.Second)
			if err := run.stop(t); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// Failed attempts back off exponentially with full jitter up to the cap;
// a healthy session resets the attempt counter; cancelling during a
// backoff returns at once.
func TestBackoffGrowsAndResets(t *testing.T) {
	const failures = 6
	s := newFakeServer(t, func(i int, p *peer) {
		p.expectHello()
		if i < failures || i == failures+1 {
			return // close right after HELLO: a failure
		}
		// Connection `failures`: a healthy session (one ACK), then EOF.
		p.send(Welcome{HeartbeatIntervalMs: 50, SessionID: 1})
		f, _ := p.read(5 * time.Second)
		if hb, ok := f.(Heartbeat); ok {
			p.send(HeartbeatAck{Seq: hb.Seq})
		}
		if i > failures+1 {
			_, _ = p.read(10 * time.Second)
		}
	})
	rec := newRecorder()
	run := start(t, s.agent(t, rec), 30*time.Second)
	base, cap := 40*time.Millisecond, 160*time.Millisecond
	for i := 0; i < failures; i++ {
		b := rec.wait(t, EventBackoff, 5*time.Second)
		upper := base << uint(i)
		if upper > cap {
			upper = cap
		}
		if b.Delay < 0 || b.Delay > upper {
			t.Errorf("backoff %d: %v, want within [0, %v]", i, b.Delay, upper)
		}
	}
	rec.wait(t, EventHeartbeatAck, 5*time.Second)
	// The session was healthy: the next failure backs off from the base.
	if b := rec.wait(t, EventBackoff, 5*time.Second); b.Delay > base {
		t.Errorf("backoff after a healthy session %v, want at most %v", b.Delay, base)
	}
	rec.wait(t, EventWelcome, 5*time.Second)
	if err := run.stop(t); err != nil {
		t.Fatal(err)
	}
}

func TestCancelDuringBackoffReturnsAtOnce(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close() // nothing listens: every attempt fails
	rec := newRecorder()
	a, err := New(Config{Addr: addr, ID: "x", FleetKey: make([]byte, 32), BackoffBase: time.Hour,
		BackoffCap: time.Hour, OnEvent: rec.on})
	if err != nil {
		t.Fatal(err)
	}
	run := start(t, a, 30*time.Second)
	rec.wait(t, EventDisconnected, 5*time.Second)
	rec.wait(t, EventBackoff, 5*time.Second)
	began := time.Now()
	if err := run.stop(t); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(began); took > time.Second {
		t.Errorf("Run took %v to return after cancel", took)
	}
}

func TestBackoffDelayBounds(t *testing.T) {
	rng := mrand.New(mrand.NewSource(1))
	base, cap := time.Second, 5*time.Minute
	for attempt := 0; attempt < 100; attempt++ {
		upper := cap
		if attempt < 9 {
			upper = base << uint(attempt)
		}
		var max time.Duration
		for i := 0; i < 200; i++ {
			d := BackoffDelay(rng, base, cap, attempt)
			if d < 0 || d > upper {
				t.Fatalf("attempt %d: %v outside [0, %v]", attempt, d, upper)
			}
			if d > max {
				max = d
			}
		}
		if max < upper/2 {
			t.Errorf("attempt %d: largest of 200 delays %v, want jitter up to %v", attempt, max, upper)
		}
	}
	for i := 0; i < 200; i++ {
		d := ReconnectDelay(rng, Reconnect{MinDelayMs: 100, MaxDelayMs: 2000})
		if d < 100*time.Millisecond || d > 2*time.Second {
			t.Fatalf("RECONNECT 100..2000 ms gave %v", d)
		}
	}
	if d := ReconnectDelay(rng, Reconnect{MinDelayMs: 7, MaxDelayMs: 7}); d != 7*time.Millisecond {
		t.Errorf("RECONNECT 7..7 ms gave %v", d)
	}
}
