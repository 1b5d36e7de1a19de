package agent

// End-to-end tests: the Go agent against the real presenced binary.

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"
)

// recorder collects an agent's events on a bounded channel.
type recorder struct {
	ch chan Event
}

func newRecorder() *recorder { return &recorder{ch: make(chan Event, 4096)} }

func (r *recorder) on(e Event) {
	select {
	case r.ch <- e:
	default: // a test that stops reading does not block the agent
	}
}

// wait returns the next event of kind k within limit, skipping others.
func (r *recorder) wait(t *testing.T, k EventKind, limit time.Duration) Event {
	t.Helper()
	deadline := time.NewTimer(limit)
	defer deadline.Stop()
	for {
		select {
		case e := <-r.ch:
			if e.Kind == k {
				return e
			}
		case <-deadline.C:
			t.Fatalf("no %s event within %v", k, limit)
		}
	}
}

// runAgent starts a.Run in the background; the returned function cancels
// it and returns Run's result (bounded).
type running struct {
	cancel context.CancelFunc
	done   chan error
}

func start(t *testing.T, a *Agent, limit time.Duration) *running {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	r := &running{cancel: cancel, done: make(chan error, 1)}
	go func() { r.done <- a.Run(ctx) }()
	t.Cleanup(func() { r.stop(t) })
	return r
}

// stop cancels the agent and waits for Run to return.
func (r *running) stop(t *testing.T) error {
	t.Helper()
	r.cancel()
	return r.result(t, 10*time.Second)
}

// result waits for Run to return by itself.
func (r *running) result(t *testing.T, limit time.Duration) error {
	t.Helper()
	select {
	case err, ok := <-r.done:
		if ok {
			close(r.done)
		}
		return err
	case <-time.After(limit):
		t.Fatalf("Run did not return within %v", limit)
		return nil
	}
}

func (d *daemon) agentConfig(id string, rec *recorder) Config {
	d.t.Helper()
	pool, err := LoadCAPool(d.ca)
	if err != nil {
		d.t.Fatal(err)
	}
	return Config{
		Addr:        d.addr,
		ServerName:  "localhost",
		RootCAs:     pool,
		ID:          id,
		FleetKey:    d.fleetKey(),
		BackoffBase: 50 * time.Millisecond,
		BackoffCap:  500 * time.Millisecond,
		OnEvent:     rec.on,
		Logf:        d.t.Logf,
	}
}

// Online, heartbeats acked, BYE gives offline reason bye; then a second
// agent process with a provisioned token resumes the TLS session.
func TestDaemonOnlineHeartbeatsByeAndResumption(t *testing.T) {
	d := startDaemon(t, daemonOpts{})
	events := d.events()
	const id = "go-agent-01"
	cache := tls.NewLRUClientSessionCache(4)

	rec := newRecorder()
	cfg := d.agentConfig(id, rec)
	cfg.SessionCache = cache
	a, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	run := start(t, a, 60*time.Second)
	if c := rec.wait(t, EventConnected, 10*time.Second); c.DidResume {
		t.Error("first connection cannot resume")
	}
	w := rec.wait(t, EventWelcome, 10*time.Second)
	if w.Interval != 200*time.Millisecond {
		t.Errorf("interval %v, want the daemon's 200ms", w.Interval)
	}
	if e := events.next(t, id, 5*time.Second); e.State != "online" || e.Reason != "hello" {
		t.Errorf("event %+v, want online hello", e)
	}
	for i := uint32(1); i <= 3; i++ {
		if ack := rec.wait(t, EventHeartbeatAck, 5*time.Second); ack.Seq != i {
			t.Errorf("ACK seq %d, want %d", ack.Seq, i)
		}
	}
	r := d.agentRecord(id)
	if r.State != "online" || r.Shard == nil || r.Session != w.SessionID {
		t.Errorf("agent record %+v, want online with session %d", r, w.SessionID)
	}
	if s := d.stats(); s.HeartbeatsTotal < 3 {
		t.Errorf("daemon counted %d heartbeats", s.HeartbeatsTotal)
	}

	if err := run.stop(t); err != nil {
		t.Fatalf("Run after cancel: %v", err)
	}
	rec.wait(t, EventBye, time.Second)
	if e := events.next(t, id, 5*time.Second); e.State != "offline" || e.Reason != "bye" {
		t.Errorf("event %+v, want offline bye", e)
	}
	r = d.agentRecord(id)
	if r.State != "offline" || r.OfflineReason == nil || *r.OfflineReason != "bye" {
		t.Errorf("agent record %+v, want offline bye", r)
	}

	// The same agent again, provisioned with its token instead of the
	// fleet key, sharing the session cache: the handshake resumes.
	rec2 := newRecorder()
	cfg2 := d.agentConfig(id, rec2)
	cfg2.FleetKey = nil
	cfg2.Token = d.provisionedToken(id)
	cfg2.SessionCache = cache
	a2, err := New(cfg2)
	if err != nil {
		t.Fatal(err)
	}
	run2 := start(t, a2, 60*time.Second)
	if c := rec2.wait(t, EventConnected, 10*time.Second); !c.DidResume {
		t.Error("second connection did not resume the TLS session")
	}
	rec2.wait(t, EventWelcome, 10*time.Second)
	if e := events.next(t, id, 5*time.Second); e.State != "online" || e.Reason != "hello" {
		t.Errorf("event %+v, want online hello", e)
	}
	if s := d.stats(); s.HandshakesResumedTotal < 1 {
		t.Errorf("daemon counted %d resumed handshakes", s.HandshakesResumedTotal)
	}
	if err := run2.stop(t); err != nil {
		t.Fatal(err)
	}
	if e := events.next(t, id, 5*time.Second); e.State != "offline" || e.Reason != "bye" {
		t.Errorf("event %+v, want offline bye", e)
	}
}

// A wrong token gets ERROR 2, and the agent stops instead of retrying.
func TestDaemonWrongTokenStopsTheAgent(t *testing.T) {
	d := startDaemon(t, daemonOpts{})
	rec := newRecorder()
	cfg := d.agentConfig("go-agent-bad", rec)
	cfg.FleetKey = nil
	cfg.Token = make([]byte, TokenLen)
	a, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	run := start(t, a, 30*time.Second)
	err = run.result(t, 10*time.Second)
	var se *ServerError
	if !errors.As(err, &se) || se.Code != CodeAuthenticationFailed || !se.Fatal() {
		t.Fatalf("Run returned %v, want ERROR 2", err)
	}
	if s := d.stats(); s.ErrorsSent["authentication_failed"] != 1 || s.HandshakesTotal != 1 {
		t.Errorf("daemon sent %v after %d handshakes; want one ERROR 2, no retry", s.ErrorsSent, s.HandshakesTotal)
	}
}

// A second agent with the same id supersedes the first, which gets ERROR 5
// and stops; the id stays online through the new session.
func TestDaemonSupersededAgentStops(t *testing.T) {
	d := startDaemon(t, daemonOpts{})
	events := d.events()
	const id = "go-agent-dup"
	rec1, rec2 := newRecorder(), newRecorder()
	a1, err := New(d.agentConfig(id, rec1))
	if err != nil {
		t.Fatal(err)
	}
	run1 := start(t, a1, 30*time.Second)
	rec1.wait(t, EventWelcome, 10*time.Second)
	events.next(t, id, 5*time.Second)

	a2, err := New(d.agentConfig(id, rec2))
	if err != nil {
		t.Fatal(err)
	}
	run2 := start(t, a2, 30*time.Second)
	w2 := rec2.wait(t, EventWelcome, 10*time.Second)
	err = run1.result(t, 10*time.Second)
	var se *ServerError
	if !errors.As(err, &se) || se.Code != CodeSuperseded {
		t.Fatalf("first agent's Run returned %v, want ERROR 5", err)
	}
	rec2.wait(t, EventHeartbeatAck, 5*time.Second)
	if r := d.agentRecord(id); r.State != "online" || r.Session != w2.SessionID {
		t.Errorf("agent record %+v, want online in session %d", r, w2.SessionID)
	}
	events.none(t, id, 500*time.Millisecond)
	if err := run2.stop(t); err != nil {
		t.Fatal(err)
	}
}

// The daemon stops (ERROR 7) and starts again on the same address: the
// agent backs off, reconnects, resumes its TLS session (tickets outlive a
// restart) and the platform sees no event.
func TestDaemonRestartAgentReconnectsAndResumes(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	d := startDaemon(t, daemonOpts{listen: addr})
	const id = "go-agent-restart"
	rec := newRecorder()
	a, err := New(d.agentConfig(id, rec))
	if err != nil {
		t.Fatal(err)
	}
	run := start(t, a, 60*time.Second)
	rec.wait(t, EventWelcome, 10*time.Second)
	rec.wait(t, EventHeartbeatAck, 5*time.Second)
	d.stop()
	if e := rec.wait(t, EventServerError, 5*time.Second); e.Code != CodeShuttingDown {
		t.Errorf("ERROR %d, want 7 shutting_down", e.Code)
	}
	rec.wait(t, EventBackoff, 5*time.Second)
	d.spawn()
	events := d.events()
	c := rec.wait(t, EventConnected, 20*time.Second)
	if !c.DidResume {
		t.Error("reconnect after a daemon restart did not resume the TLS session")
	}
	rec.wait(t, EventWelcome, 10*time.Second)
	rec.wait(t, EventHeartbeatAck, 5*time.Second)
	if r := d.agentRecord(id); r.State != "online" || r.Shard == nil {
		t.Errorf("agent record %+v, want online and connected", r)
	}
	events.none(t, id, 500*time.Millisecond)
	if err := run.stop(t); err != nil {
		t.Fatal(err)
	}
	if e := events.next(t, id, 5*time.Second); e.Reason != "bye" {
		t.Errorf("event %+v, want offline bye", e)
	}
}

// A zero-drop upgrade hands the agent's connection to a new process: the
// same TLS connection keeps being acked.
func TestDaemonUpgradeKeepsTheConnection(t *testing.T) {
	d := startDaemon(t, daemonOpts{})
	const id = "go-agent-upgrade"
	rec := newRecorder()
	a, err := New(d.agentConfig(id, rec))
	if err != nil {
		t.Fatal(err)
	}
	run := start(t, a, 60*time.Second)
	rec.wait(t, EventWelcome, 10*time.Second)
	rec.wait(t, EventHeartbeatAck, 5*time.Second)
	old := d.stats().PID

	var up struct {
		OK          bool   `json:"ok"`
		NewPID      int    `json:"new_pid"`
		Connections int    `json:"connections"`
		Error       string `json:"error"`
	}
	text, err := d.tryControl("upgrade", 60*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if err := jsonUnmarshal(text, &up); err != nil {
		t.Fatal(err)
	}
	if up.NewPID != 0 {
		d.pids = append(d.pids, up.NewPID)
	}
	if !up.OK || up.Connections != 1 {
		t.Fatalf("upgrade: %s", text)
	}
	if p := d.stats().PID; p == old || p != up.NewPID {
		t.Fatalf("stats pid %d after upgrade from %d to %d", p, old, up.NewPID)
	}
	// Several ACKs from the new process, on the same connection.
	for i := 0; i < 3; i++ {
		rec.wait(t, EventHeartbeatAck, 5*time.Second)
	}
	for {
		select {
		case e := <-rec.ch:
			if e.Kind == EventConnected || e.Kind == EventDisconnected {
				t.Fatalf("the connection did not survive the upgrade: %s %v", e.Kind, e.Err)
			}
			continue
		default:
		}
		break
	}
	if s := d.stats(); s.HeartbeatsTotal < 3 {
		t.Errorf("new process counted %d heartbeats", s.HeartbeatsTotal)
	}
	if err := run.stop(t); err != nil {
		t.Fatal(err)
	}
	r := d.agentRecord(id)
	if r.State != "offline" || r.OfflineReason == nil || *r.OfflineReason != "bye" {
		t.Errorf("agent record %+v, want offline bye (BYE reached the new process)", r)
	}
}

func jsonUnmarshal(text string, v interface{}) error {
	if err := json.Unmarshal([]byte(strings.TrimSpace(text)), v); err != nil {
		return fmt.Errorf("%q: %w", text, err)
	}
	return nil
}
