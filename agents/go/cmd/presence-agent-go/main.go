// Command presence-agent-go keeps one agent id online at a presenced
// server until it gets SIGINT or SIGTERM, then says BYE.
//
//	presence-agent-go --addr 127.0.0.1:7443 --ca presenced-dev/tls/cert.pem \
//	    --server-name localhost --id laptop-42 --token-file laptop-42.token
//
// Give it either its provisioned token (--token-file, or --token HEX) or the
// fleet key (--fleet-key FILE) to compute the token from.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"os"
	"os/signal"
	"syscall"
	"time"

	agent "presenced.dev/agent"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "presence-agent-go:", err)
		os.Exit(1)
	}
}

func run() error {
	var (
		addr       = flag.String("addr", "127.0.0.1:7443", "server host:port")
		ca         = flag.String("ca", "", "PEM file of the CA that signed the server certificate (default: system roots)")
		serverName = flag.String("server-name", "localhost", "TLS server name (SNI and verification)")
		id         = flag.String("id", "", "agent id (required)")
		tokenFile  = flag.String("token-file", "", "file holding this agent's token as 64 hex characters")
		tokenHex   = flag.String("token", "", "this agent's token as 64 hex characters")
		fleetKey   = flag.String("fleet-key", "", "fleet key file, to compute the token from")
		base       = flag.Duration("backoff-base", agent.DefaultBackoffBase, "reconnect backoff base")
		backoffCap = flag.Duration("backoff-cap", agent.DefaultBackoffCap, "reconnect backoff cap")
		verbose    = flag.Bool("v", false, "log every heartbeat")
	)
	flag.Parse()
	if *id == "" {
		return errors.New("--id is required")
	}
	cfg := agent.Config{Addr: *addr, ServerName: *serverName, ID: *id, BackoffBase: *base, BackoffCap: *backoffCap, Logf: log.Printf}
	switch {
	case *tokenFile != "":
		t, err := agent.LoadToken(*tokenFile)
		if err != nil {
			return err
		}
		cfg.Token = t[:]
	case *tokenHex != "":
		t, err := agent.ParseHex32(*tokenHex)
		if err != nil {
			return fmt.Errorf("--token: %w", err)
		}
		cfg.Token = t[:]
	case *fleetKey != "":
		k, err := agent.LoadFleetKey(*fleetKey)
		if err != nil {
			return err
		}
		cfg.FleetKey = k[:]
	default:
		return errors.New("one of --token-file, --token or --fleet-key is required")
	}
	if *ca != "" {
		pool, err := agent.LoadCAPool(*ca)
		if err != nil {
			return err
		}
		cfg.RootCAs = pool
	}
	cfg.OnEvent = func(e agent.Event) {
		switch e.Kind {
		case agent.EventConnected:
			log.Printf("connected to %s (TLS resumed: %v)", *addr, e.DidResume)
		case agent.EventWelcome:
			log.Printf("online as %s: session %016x, heartbeat every %v", *id, e.SessionID, e.Interval)
		case agent.EventHeartbeatAck:
			if *verbose {
				log.Printf("heartbeat %d acknowledged", e.Seq)
			}
		case agent.EventServerError:
			log.Printf("server ERROR %d %s: %s", uint16(e.Code), e.Code, e.Message)
		case agent.EventReconnect:
			log.Printf("server asked to reconnect; reconnecting in %v", e.Delay.Round(time.Millisecond))
		case agent.EventDisconnected:
			log.Printf("disconnected: %v", e.Err)
		case agent.EventBye:
			log.Printf("sent BYE")
		}
	}
	a, err := agent.New(cfg)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := a.Run(ctx); err != nil {
		return err
	}
	return nil
}
