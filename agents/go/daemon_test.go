package agent

// Harness for end-to-end tests against the real presenced binary: a fresh
// `presenced dev-init` directory, a test config bound to 127.0.0.1 (port 0
// unless a test needs a fixed one), `presenced serve` as a child process
// killed when the test ends, and a client for its control socket
// (docs/control-socket.md: one request line, JSON lines back).

import (
	"bufio"
	"context"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// repoRoot is the workspace root, relative to agents/go.
var repoRoot = filepath.Join("..", "..")

var buildOnce sync.Once

// presencedBin locates the daemon: $PRESENCED_BIN as is, else
// target/debug/presenced of the workspace ($CARGO_TARGET_DIR if set), built
// with cargo first when it is missing or older than its sources.
func presencedBin(t *testing.T) string {
	t.Helper()
	if p := os.Getenv("PRESENCED_BIN"); p != "" {
		return p
	}
	target := filepath.Join(repoRoot, "target")
	if d := os.Getenv("CARGO_TARGET_DIR"); d != "" {
		target = d
	}
	bin, err := filepath.Abs(filepath.Join(target, "debug", "presenced"))
	if err != nil {
		t.Fatal(err)
	}
	buildOnce.Do(func() {
		if !stale(bin) {
			return
		}
		t.Logf("building %s with cargo", bin)
		ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, "cargo", "build", "-p", "presenced", "--bin", "presenced")
		cmd.Dir = repoRoot
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("cargo build -p presenced: %v\n%s", err, out)
		}
	})
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("presenced binary: %v (set PRESENCED_BIN or run cargo build -p presenced)", err)
	}
	return bin
}

// stale reports whether bin is missing or older than a daemon source file.
func stale(bin string) bool {
	st, err := os.Stat(bin)
	if err != nil {
		return true
	}
	newer := false
	for _, dir := range []string{"daemon/src", "proto/src"} {
		_ = filepath.Walk(filepath.Join(repoRoot, dir), func(_ string, info os.FileInfo, err error) error {
			if err == nil && info.ModTime().After(st.ModTime()) {
				newer = true
			}
			return nil
		})
	}
	return newer
}

// daemonOpts are the test daemon's settings; short so that tests are quick.
type daemonOpts struct {
	listen            string // default 127.0.0.1:0
	heartbeatInterval string // default 200ms
	offlineGrace      string // default 60s
}

type daemon struct {
	t       *testing.T
	bin     string
	dir     string
	addr    string
	control string
	ca      string
	cmd     *exec.Cmd
	exited  chan struct{}
	pids    []int // processes to kill at the end (upgrade successors)
}

func startDaemon(t *testing.T, o daemonOpts) *daemon {
	t.Helper()
	if o.listen == "" {
		o.listen = "127.0.0.1:0"
	}
	if o.heartbeatInterval == "" {
		o.heartbeatInterval = "200ms"
	}
	if o.offlineGrace == "" {
		o.offlineGrace = "60s"
	}
	bin := presencedBin(t)
	dir := t.TempDir()
	if out, err := exec.Command(bin, "dev-init", dir).CombinedOutput(); err != nil {
		t.Fatalf("presenced dev-init: %v\n%s", err, out)
	}
	config := fmt.Sprintf(`[server]
listen = %q
shards = 2
control_socket = "control.sock"

[tls]
cert = "tls/cert.pem"
key = "tls/key.pem"

[auth]
fleet_key = "fleet.key"

[presence]
heartbeat_interval = %q
miss_limit = 3
offline_grace = %q
hello_timeout = "10s"

[state]
dir = "state"
restart_grace = "120s"
`, o.listen, o.heartbeatInterval, o.offlineGrace)
	if err := os.WriteFile(filepath.Join(dir, "presenced.toml"), []byte(config), 0o600); err != nil {
		t.Fatal(err)
	}
	d := &daemon{t: t, bin: bin, dir: dir, control: filepath.Join(dir, "control.sock"),
		ca: filepath.Join(dir, "tls", "cert.pem")}
	t.Cleanup(d.killAll)
	d.spawn()
	return d
}

// spawn starts `presenced serve` and waits until `stats` reports the
// bound address.
func (d *daemon) spawn() {
	d.t.Helper()
	logf, err := os.OpenFile(filepath.Join(d.dir, "presenced.log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		d.t.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command(d.bin, "serve", "--config", filepath.Join(d.dir, "presenced.toml"))
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = append(os.Environ(), "RUST_LOG=info,presenced=debug")
	if err := cmd.Start(); err != nil {
		d.t.Fatal(err)
	}
	d.cmd = cmd
	exited := make(chan struct{})
	d.exited = exited
	go func() { _ = cmd.Wait(); close(exited) }()
	deadline := time.Now().Add(20 * time.Second)
	for {
		select {
		case <-exited:
			d.t.Fatalf("presenced exited early:\n%s", d.logText())
		default:
		}
		var s struct {
			Listen string `json:"listen"`
		}
		if err := d.tryControlJSON("stats", &s); err == nil && s.Listen != "" {
			d.addr = s.Listen
			return
		}
		if time.Now().After(deadline) {
			d.t.Fatalf("presenced not ready in 20s:\n%s", d.logText())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (d *daemon) logText() string {
	b, _ := os.ReadFile(filepath.Join(d.dir, "presenced.log"))
	return string(b)
}

// stop sends SIGTERM and waits (bounded) for the process to exit.
func (d *daemon) stop() {
	d.t.Helper()
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.exited:
	case <-time.After(10 * time.Second):
		_ = d.cmd.Process.Kill()
		d.t.Fatal("presenced did not stop within 10s of SIGTERM")
	}
}

func (d *daemon) killAll() {
	if d.cmd != nil && d.cmd.Process != nil {
		_ = d.cmd.Process.Kill()
		<-d.exited
	}
	for _, pid := range d.pids {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	if d.t.Failed() {
		d.t.Logf("presenced log:\n%s", d.logText())
	}
}

// tryControl sends one request line and returns everything the daemon
// wrote until it closed.
func (d *daemon) tryControl(req string, limit time.Duration) (string, error) {
	c, err := net.DialTimeout("unix", d.control, 5*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(limit))
	if _, err := c.Write([]byte(req + "\n")); err != nil {
		return "", err
	}
	var sb strings.Builder
	buf := make([]byte, 64<<10)
	for {
		n, err := c.Read(buf)
		sb.Write(buf[:n])
		if err != nil {
			if sb.Len() > 0 {
				return sb.String(), nil
			}
			return "", err
		}
	}
}

func (d *daemon) tryControlJSON(req string, v interface{}) error {
	text, err := d.tryControl(req, 10*time.Second)
	if err != nil {
		return err
	}
	return json.Unmarshal([]byte(strings.TrimSpace(text)), v)
}

func (d *daemon) controlJSON(req string, v interface{}) {
	d.t.Helper()
	if err := d.tryControlJSON(req, v); err != nil {
		d.t.Fatalf("control %q: %v", req, err)
	}
}

// agentRecord is the reply to `agent <id>`.
type agentRecord struct {
	Agent         string  `json:"agent"`
	State         string  `json:"state"`
	Session       uint64  `json:"session"`
	Shard         *int    `json:"shard"`
	OfflineReason *string `json:"offline_reason"`
	Error         string  `json:"error"`
}

func (d *daemon) agentRecord(id string) agentRecord {
	d.t.Helper()
	var r agentRecord
	d.controlJSON("agent "+id, &r)
	return r
}

type stats struct {
	PID                    int               `json:"pid"`
	HeartbeatsTotal        uint64            `json:"heartbeats_total"`
	HandshakesTotal        uint64            `json:"handshakes_total"`
	HandshakesResumedTotal uint64            `json:"handshakes_resumed_total"`
	ByesTotal              uint64            `json:"byes_total"`
	ErrorsSent             map[string]uint64 `json:"errors_sent"`
}

func (d *daemon) stats() stats {
	d.t.Helper()
	var s stats
	d.controlJSON("stats", &s)
	return s
}

// fleetKey reads the dev-init fleet key.
func (d *daemon) fleetKey() []byte {
	d.t.Helper()
	k, err := LoadFleetKey(filepath.Join(d.dir, "fleet.key"))
	if err != nil {
		d.t.Fatal(err)
	}
	return k[:]
}

// provisionedToken runs `presenced token` as an operator would to
// provision an agent, and returns the token it printed.
func (d *daemon) provisionedToken(id string) []byte {
	d.t.Helper()
	out, err := exec.Command(d.bin, "token", "--fleet-key", filepath.Join(d.dir, "fleet.key"), id).Output()
	if err != nil {
		d.t.Fatalf("presenced token: %v", err)
	}
	tok, err := hex.DecodeString(strings.TrimSpace(string(out)))
	if err != nil || len(tok) != TokenLen {
		d.t.Fatalf("presenced token printed %q", out)
	}
	return tok
}

// event is one line of the `events` stream.
type event struct {
	Seq    uint64 `json:"seq"`
	Agent  string `json:"agent"`
	State  string `json:"state"`
	Reason string `json:"reason"`
}

// eventStream is an `events` subscription.
type eventStream struct {
	c net.Conn
	r *bufio.Reader
}

func (d *daemon) events() *eventStream {
	d.t.Helper()
	c, err := net.DialTimeout("unix", d.control, 5*time.Second)
	if err != nil {
		d.t.Fatal(err)
	}
	d.t.Cleanup(func() { c.Close() })
	if _, err := c.Write([]byte("events\n")); err != nil {
		d.t.Fatal(err)
	}
	// The subscription is registered once the daemon has read the line; a
	// `stats` round trip on the same control shard orders it.
	d.stats()
	return &eventStream{c: c, r: bufio.NewReader(c)}
}

// next returns the next event for agent id within limit.
func (s *eventStream) next(t *testing.T, id string, limit time.Duration) event {
	t.Helper()
	_ = s.c.SetReadDeadline(time.Now().Add(limit))
	for {
		line, err := s.r.ReadString('\n')
		if err != nil {
			t.Fatalf("no event for %s within %v: %v", id, limit, err)
		}
		var e event
		if err := json.Unmarshal([]byte(line), &e); err != nil {
			t.Fatalf("event line %q: %v", line, err)
		}
		if e.Agent == id {
			return e
		}
	}
}

// none asserts that no event for id arrives within window.
func (s *eventStream) none(t *testing.T, id string, window time.Duration) {
	t.Helper()
	_ = s.c.SetReadDeadline(time.Now().Add(window))
	for {
		line, err := s.r.ReadString('\n')
		if err != nil {
			return
		}
		var e event
		if json.Unmarshal([]byte(line), &e) == nil && e.Agent == id {
			t.Fatalf("unexpected event %s", strings.TrimSpace(line))
		}
	}
}
