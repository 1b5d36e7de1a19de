package agent

import (
	"context"
	crand "crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"net"
	"os"
	"time"
)

// Defaults for Config fields left zero.
const (
	DefaultDialTimeout    = 10 * time.Second
	DefaultWelcomeTimeout = 15 * time.Second
	DefaultWriteTimeout   = 10 * time.Second
	DefaultByeTimeout     = 2 * time.Second
	DefaultBackoffBase    = time.Second
	DefaultBackoffCap     = 5 * time.Minute
	DefaultHealthyAcks    = 3
)

// Config says where to connect and who the agent is. Addr, ID and one of
// Token or FleetKey are required; everything else has a default.
type Config struct {
	// Addr is the server's host:port.
	Addr string
	// ServerName is used for SNI and certificate verification. Default:
	// the host part of Addr. A dev-init setup needs "localhost".
	ServerName string
	// RootCAs verifies the server certificate. Nil: the system roots.
	// See LoadCAPool for a PEM file (in a dev-init setup, DIR/tls/cert.pem).
	RootCAs *x509.CertPool

	// ID is the agent id: 1..=128 bytes of [A-Za-z0-9._:@-], stable
	// across reconnects.
	ID string
	// Token is the agent's provisioned HELLO token (32 bytes). Preferred:
	// an agent that holds only its own token cannot impersonate others.
	Token []byte
	// FleetKey (32 bytes) is used to compute the token when Token is nil.
	FleetKey []byte

	// TLSConfig, if set, is cloned and used as the base TLS configuration
	// (for example for client certificates or a custom verifier). The
	// agent always sets TLS 1.3 only, ALPN presence/1, ServerName,
	// RootCAs (if set here) and the session cache.
	TLSConfig *tls.Config
	// SessionCache keeps TLS session tickets so that reconnects resume
	// (cheaper for the server). Default: a small LRU cache per Agent.
	SessionCache tls.ClientSessionCache

	// DialTimeout bounds TCP connect plus TLS handshake.
	DialTimeout time.Duration
	// WelcomeTimeout bounds the wait for WELCOME after HELLO.
	WelcomeTimeout time.Duration
	// WriteTimeout bounds each write to the server.
	WriteTimeout time.Duration
	// ByeTimeout bounds the wait for the server to close after BYE.
	ByeTimeout time.Duration
	// BackoffBase and BackoffCap shape the reconnect delay after a
	// failure: uniform(0, min(cap, base * 2^attempt)).
	BackoffBase time.Duration
	BackoffCap  time.Duration
	// HealthyAcks is the number of HEARTBEAT_ACKs after which a session
	// counts as healthy and the backoff attempt counter is reset.
	HealthyAcks int

	// OnEvent, if set, is called synchronously from Run for everything
	// that happens. It must not block for long.
	OnEvent func(Event)
	// Logf, if set, receives human-readable log lines.
	Logf func(format string, args ...interface{})
}

// EventKind says what an Event reports.
type EventKind int

// The kinds of Event.
const (
	// EventConnected: TLS is up (DidResume says whether a session ticket
	// was used) and HELLO has been sent.
	EventConnected EventKind = iota
	// EventWelcome: the session is established (SessionID, Interval).
	EventWelcome
	// EventHeartbeatSent: a HEARTBEAT went out (Seq).
	EventHeartbeatSent
	// EventHeartbeatAck: the server acknowledged Seq.
	EventHeartbeatAck
	// EventServerError: the server sent ERROR (Code, Message).
	EventServerError
	// EventReconnect: the server sent RECONNECT; the agent closes and
	// reconnects after Delay.
	EventReconnect
	// EventDisconnected: the connection ended or could not be set up (Err).
	EventDisconnected
	// EventBackoff: the agent waits Delay before the next attempt.
	EventBackoff
	// EventBye: BYE was sent because the context was cancelled.
	EventBye
)

func (k EventKind) String() string {
	return [...]string{"connected", "welcome", "heartbeat_sent", "heartbeat_ack", "server_error",
		"reconnect", "disconnected", "backoff", "bye"}[k]
}

// Event is one thing that happened to the agent.
type Event struct {
	Kind      EventKind
	Time      time.Time
	DidResume bool
	SessionID uint64
	Interval  time.Duration
	Seq       uint32
	Code      ErrorCode
	Message   string
	Delay     time.Duration
	Err       error
}

// ServerError is an ERROR frame from the server. Run returns it when the
// code means that retrying cannot help (authentication_failed,
// unsupported_version, superseded: protocol.md section 7).
type ServerError struct {
	Code    ErrorCode
	Message string
}

func (e *ServerError) Error() string {
	return fmt.Sprintf("server sent ERROR %d %s: %s", uint16(e.Code), e.Code, e.Message)
}

// Fatal reports whether the agent must stop instead of reconnecting.
func (e *ServerError) Fatal() bool {
	switch e.Code {
	case CodeAuthenticationFailed, CodeUnsupportedVersion, CodeSuperseded:
		return true
	}
	return false
}

// ErrServerViolation wraps frames the server should never send.
var ErrServerViolation = errors.New("server broke the protocol")

// LoadCAPool reads PEM certificates (trust anchors) from a file.
func LoadCAPool(path string) (*x509.CertPool, error) {
	pem, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("cannot read CA file %s: %w", path, err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("CA file %s: no PEM certificate found", path)
	}
	return pool, nil
}

// Agent runs one agent id against one server. Create it with New and run
// it with Run; an Agent is not meant for concurrent Runs.
type Agent struct {
	cfg   Config
	token [TokenLen]byte
	tls   *tls.Config
	rng   *rand.Rand
}

// New checks cfg, fills in defaults and computes the token if needed.
func New(cfg Config) (*Agent, error) {
	if err := ValidateID(cfg.ID); err != nil {
		return nil, fmt.Errorf("agent id %q: %w", cfg.ID, err)
	}
	if cfg.Addr == "" {
		return nil, errors.New("no server address")
	}
	a := &Agent{cfg: cfg}
	switch {
	case cfg.Token != nil:
		if len(cfg.Token) != TokenLen {
			return nil, fmt.Errorf("token is %d bytes, expected %d", len(cfg.Token), TokenLen)
		}
		copy(a.token[:], cfg.Token)
	case cfg.FleetKey != nil:
		if len(cfg.FleetKey) != FleetKeyLen {
			return nil, fmt.Errorf("fleet key is %d bytes, expected %d", len(cfg.FleetKey), FleetKeyLen)
		}
		a.token = Token(cfg.FleetKey, cfg.ID)
	default:
		return nil, errors.New("neither a token nor a fleet key")
	}
	c := &a.cfg
	setDefault(&c.DialTimeout, DefaultDialTimeout)
	setDefault(&c.WelcomeTimeout, DefaultWelcomeTimeout)
	setDefault(&c.WriteTimeout, DefaultWriteTimeout)
	setDefault(&c.ByeTimeout, DefaultByeTimeout)
	setDefault(&c.BackoffBase, DefaultBackoffBase)
	setDefault(&c.BackoffCap, DefaultBackoffCap)
	if c.HealthyAcks <= 0 {
		c.HealthyAcks = DefaultHealthyAcks
	}
	if c.ServerName == "" {
		host, _, err := net.SplitHostPort(c.Addr)
		if err != nil {
			return nil, fmt.Errorf("server address %q: %w", c.Addr, err)
		}
		c.ServerName = host
	}
	if c.SessionCache == nil {
		c.SessionCache = tls.NewLRUClientSessionCache(4)
	}
	base := &tls.Config{}
	if c.TLSConfig != nil {
		base = c.TLSConfig.Clone()
	}
	base.MinVersion = tls.VersionTLS13
	base.MaxVersion = tls.VersionTLS13
	base.NextProtos = []string{ALPN}
	base.ServerName = c.ServerName
	if c.RootCAs != nil {
		base.RootCAs = c.RootCAs
	}
	base.ClientSessionCache = c.SessionCache
	a.tls = base
	var seed [8]byte
	if _, err := crand.Read(seed[:]); err != nil {
		return nil, fmt.Errorf("seeding jitter: %w", err)
	}
	a.rng = rand.New(rand.NewSource(int64(binary.LittleEndian.Uint64(seed[:]))))
	return a, nil
}

func setDefault(d *time.Duration, v time.Duration) {
	if *d <= 0 {
		*d = v
	}
}

// TokenBytes returns the token the agent sends in HELLO.
func (a *Agent) TokenBytes() [TokenLen]byte { return a.token }

func (a *Agent) event(e Event) {
	if a.cfg.OnEvent != nil {
		e.Time = time.Now()
		a.cfg.OnEvent(e)
	}
}

func (a *Agent) logf(format string, args ...interface{}) {
	if a.cfg.Logf != nil {
		a.cfg.Logf(format, args...)
	}
}

// BackoffDelay is the full-jitter exponential backoff of protocol.md
// section 7: uniform(0, min(cap, base * 2^attempt)).
func BackoffDelay(rng *rand.Rand, base, cap time.Duration, attempt int) time.Duration {
	upper := cap
	if attempt < 62 && base <= cap>>uint(attempt) {
		upper = base << uint(attempt)
	}
	if upper <= 0 {
		return 0
	}
	return time.Duration(rng.Int63n(int64(upper) + 1))
}

// ReconnectDelay is the delay a RECONNECT asks for: uniform in
// [min, max] milliseconds.
func ReconnectDelay(rng *rand.Rand, r Reconnect) time.Duration {
	span := int64(r.MaxDelayMs) - int64(r.MinDelayMs)
	ms := int64(r.MinDelayMs)
	if span > 0 {
		ms += rng.Int63n(span + 1)
	}
	return time.Duration(ms) * time.Millisecond
}

// outcome is how one connection ended.
type outcome struct {
	stopped   bool          // ctx cancelled (BYE sent if a session existed)
	fatal     error         // stop and return this
	reconnect bool          // the server asked: wait delay, no backoff
	delay     time.Duration // for reconnect
	healthy   bool          // the session got HealthyAcks ACKs
	err       error         // why it ended
}

// Run connects and keeps the agent online until ctx is cancelled, then
// sends BYE and returns nil. It returns early only with a *ServerError whose
// Fatal() is true (the agent must not reconnect by itself).
func (a *Agent) Run(ctx context.Context) error {
	attempt := 0
	var delay time.Duration
	for {
		if delay > 0 {
			a.event(Event{Kind: EventBackoff, Delay: delay})
			t := time.NewTimer(delay)
			select {
			case <-ctx.Done():
				t.Stop()
				return nil
			case <-t.C:
			}
		}
		if ctx.Err() != nil {
			return nil
		}
		o := a.connectOnce(ctx)
		if o.stopped {
			return nil
		}
		if o.err != nil {
			a.event(Event{Kind: EventDisconnected, Err: o.err})
		}
		if o.fatal != nil {
			return o.fatal
		}
		if o.healthy {
			attempt = 0
		}
		if o.reconnect {
			// Obey RECONNECT: its own delay, no backoff on top.
			delay = o.delay
			continue
		}
		delay = BackoffDelay(a.rng, a.cfg.BackoffBase, a.cfg.BackoffCap, attempt)
		if attempt < 62 {
			attempt++
		}
		a.logf("agent %s: %v; reconnecting in %v", a.cfg.ID, o.err, delay.Round(time.Millisecond))
	}
}

// readResult is one frame, or the error that ended reading.
type readResult struct {
	frame Frame
	err   error
}

// sent is a HEARTBEAT waiting for its ACK.
type sent struct {
	seq uint32
	at  time.Time
}

// maxOutstanding bounds the heartbeats waiting for an ACK. The connection
// is declared dead long before (2 intervals), this only bounds memory.
const maxOutstanding = 16

func (a *Agent) connectOnce(ctx context.Context) outcome {
	dctx, cancel := context.WithTimeout(ctx, a.cfg.DialTimeout)
	defer cancel()
	d := net.Dialer{}
	raw, err := d.DialContext(dctx, "tcp", a.cfg.Addr)
	if err != nil {
		if ctx.Err() != nil {
			return outcome{stopped: true}
		}
		return outcome{err: fmt.Errorf("connect %s: %w", a.cfg.Addr, err)}
	}
	if tcp, ok := raw.(*net.TCPConn); ok {
		_ = tcp.SetNoDelay(true)
	}
	conn := tls.Client(raw, a.tls)
	if err := conn.HandshakeContext(dctx); err != nil {
		conn.Close()
		if ctx.Err() != nil {
			return outcome{stopped: true}
		}
		return outcome{err: fmt.Errorf("TLS handshake with %s: %w", a.cfg.Addr, err)}
	}
	st := conn.ConnectionState()
	if st.NegotiatedProtocol != ALPN {
		conn.Close()
		return outcome{err: fmt.Errorf("%w: ALPN %q negotiated, expected %q", ErrServerViolation, st.NegotiatedProtocol, ALPN)}
	}
	hello, err := Encode(Hello{Version: Version, ID: a.cfg.ID, Token: a.token})
	if err != nil {
		conn.Close()
		return outcome{fatal: err, err: err}
	}
	if err := a.write(conn, hello); err != nil {
		conn.Close()
		return outcome{err: fmt.Errorf("sending HELLO: %w", err)}
	}
	a.event(Event{Kind: EventConnected, DidResume: st.DidResume})
	return a.session(ctx, conn)
}

func (a *Agent) write(conn *tls.Conn, b []byte) error {
	if err := conn.SetWriteDeadline(time.Now().Add(a.cfg.WriteTimeout)); err != nil {
		return err
	}
	_, err := conn.Write(b)
	return err
}

// timer is a one-shot deadline that can be set, moved and cleared.
type timer struct{ t *time.Timer }

func (d *timer) set(after time.Duration) {
	d.stop()
	d.t = time.NewTimer(after)
}

func (d *timer) stop() {
	if d.t != nil {
		d.t.Stop()
		d.t = nil
	}
}

func (d *timer) c() <-chan time.Time {
	if d.t == nil {
		return nil
	}
	return d.t.C
}

// session runs an established connection (HELLO sent) until it ends.
func (a *Agent) session(ctx context.Context, conn *tls.Conn) outcome {
	frames := make(chan readResult, 16)
	done := make(chan struct{})
	readerDone := make(chan struct{})
	go a.readLoop(conn, frames, done, readerDone)
	closeConn := func() {
		conn.Close()
		close(done)
		<-readerDone
	}

	var (
		welcomed    bool
		interval    time.Duration
		seq         uint32
		acks        int
		outstanding []sent
		welcomeT    timer
		heartbeatT  timer
		deadT       timer
		o           outcome
	)
	welcomeT.set(a.cfg.WelcomeTimeout)
	defer welcomeT.stop()
	defer heartbeatT.stop()
	defer deadT.stop()

	// fail ends the session: close (with close_notify) and report.
	fail := func(err error) outcome {
		_ = conn.SetWriteDeadline(time.Now().Add(a.cfg.WriteTimeout))
		_ = conn.CloseWrite()
		closeConn()
		o.err = err
		return o
	}

	for {
		select {
		case <-ctx.Done():
			a.bye(conn, frames)
			closeConn()
			o.stopped = true
			return o

		case <-welcomeT.c():
			return fail(fmt.Errorf("no WELCOME within %v", a.cfg.WelcomeTimeout))

		case <-heartbeatT.c():
			if len(outstanding) >= maxOutstanding {
				return fail(errors.New("too many heartbeats without ACK"))
			}
			seq++
			b, _ := Encode(Heartbeat{Seq: seq})
			if err := a.write(conn, b); err != nil {
				return fail(fmt.Errorf("sending HEARTBEAT: %w", err))
			}
			now := time.Now()
			if len(outstanding) == 0 {
				deadT.set(2 * interval)
			}
			outstanding = append(outstanding, sent{seq: seq, at: now})
			heartbeatT.set(interval)
			a.event(Event{Kind: EventHeartbeatSent, Seq: seq})

		case <-deadT.c():
			return fail(fmt.Errorf("no HEARTBEAT_ACK within %v of HEARTBEAT %d: connection presumed dead",
				2*interval, outstanding[0].seq))

		case r, ok := <-frames:
			if !ok {
				return fail(errors.New("reader stopped"))
			}
			if r.err != nil {
				if errors.Is(r.err, io.EOF) {
					return fail(errors.New("server closed the connection"))
				}
				return fail(r.err)
			}
			switch f := r.frame.(type) {
			case Welcome:
				if welcomed {
					return fail(fmt.Errorf("%w: second WELCOME", ErrServerViolation))
				}
				if f.HeartbeatIntervalMs == 0 {
					return fail(fmt.Errorf("%w: WELCOME with heartbeat interval 0", ErrServerViolation))
				}
				welcomed = true
				welcomeT.stop()
				interval = time.Duration(f.HeartbeatIntervalMs) * time.Millisecond
				heartbeatT.set(interval)
				a.event(Event{Kind: EventWelcome, SessionID: f.SessionID, Interval: interval})

			case HeartbeatAck:
				if !welcomed {
					return fail(fmt.Errorf("%w: HEARTBEAT_ACK before WELCOME", ErrServerViolation))
				}
				// ACKs come in order: this one settles every older seq too.
				i := 0
				for i < len(outstanding) && outstanding[i].seq != f.Seq {
					i++
				}
				if i == len(outstanding) {
					a.logf("agent %s: ACK for seq %d that is not outstanding", a.cfg.ID, f.Seq)
					continue
				}
				outstanding = append(outstanding[:0], outstanding[i+1:]...)
				if len(outstanding) == 0 {
					deadT.stop()
				} else {
					deadT.set(time.Until(outstanding[0].at.Add(2 * interval)))
				}
				acks++
				if acks == a.cfg.HealthyAcks {
					o.healthy = true
				}
				a.event(Event{Kind: EventHeartbeatAck, Seq: f.Seq})

			case Reconnect:
				o.reconnect = true
				o.delay = ReconnectDelay(a.rng, f)
				a.event(Event{Kind: EventReconnect, Delay: o.delay})
				return fail(fmt.Errorf("server asked to reconnect in %d..%d ms", f.MinDelayMs, f.MaxDelayMs))

			case Error:
				a.event(Event{Kind: EventServerError, Code: f.Code, Message: f.Message})
				se := &ServerError{Code: f.Code, Message: f.Message}
				switch {
				case se.Fatal():
					o.fatal = se
				case f.Code == CodeMalformedFrame:
					a.logf("agent %s: BUG: the server says this agent sent a malformed frame: %s", a.cfg.ID, f.Message)
				}
				return fail(se)

			default:
				return fail(fmt.Errorf("%w: %s is not a frame a server sends", ErrServerViolation, r.frame.Type()))
			}
		}
	}
}

// readLoop decodes frames from conn until an error, handing them over on
// frames (bounded) until done is closed.
func (a *Agent) readLoop(conn *tls.Conn, frames chan<- readResult, done <-chan struct{}, finished chan<- struct{}) {
	defer close(finished)
	defer close(frames)
	send := func(r readResult) bool {
		select {
		case frames <- r:
			return true
		case <-done:
			return false
		}
	}
	var dec Decoder
	buf := make([]byte, 4096)
	for {
		n, err := conn.Read(buf)
		if n > 0 {
			_, _ = dec.Write(buf[:n])
			for {
				f, derr := dec.Next()
				if derr != nil {
					send(readResult{err: fmt.Errorf("%w: %v", ErrServerViolation, derr)})
					return
				}
				if f == nil {
					break
				}
				if !send(readResult{frame: f}) {
					return
				}
			}
		}
		if err != nil {
			send(readResult{err: err})
			return
		}
	}
}

// bye sends BYE and close_notify, then waits (bounded) for the server to
// close, so that the BYE has been processed when Run returns.
func (a *Agent) bye(conn *tls.Conn, frames <-chan readResult) {
	b, _ := Encode(Bye{})
	if err := a.write(conn, b); err != nil {
		a.logf("agent %s: sending BYE: %v", a.cfg.ID, err)
		return
	}
	a.event(Event{Kind: EventBye})
	_ = conn.CloseWrite()
	t := time.NewTimer(a.cfg.ByeTimeout)
	defer t.Stop()
	for {
		select {
		case r, ok := <-frames:
			if !ok || r.err != nil {
				return
			}
		case <-t.C:
			return
		}
	}
}
