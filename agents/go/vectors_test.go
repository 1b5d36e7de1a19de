package agent

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"testing"
)

// The shared conformance vectors, generated from the Rust reference code
// (proto/testdata/README.md describes the format).
var testdata = filepath.Join("..", "..", "proto", "testdata")

func loadJSON(t *testing.T, name string, v interface{}) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(testdata, name))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, v); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
}

func unhex(t *testing.T, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatalf("bad hex %q: %v", s, err)
	}
	return b
}

// jsonFrame is a frame object of frames.json.
type jsonFrame struct {
	Type                string  `json:"type"`
	Version             *uint8  `json:"version"`
	ID                  string  `json:"id"`
	Token               string  `json:"token"`
	HeartbeatIntervalMs uint32  `json:"heartbeat_interval_ms"`
	SessionID           string  `json:"session_id"`
	Seq                 uint32  `json:"seq"`
	MinDelayMs          uint32  `json:"min_delay_ms"`
	MaxDelayMs          uint32  `json:"max_delay_ms"`
	Code                *uint16 `json:"code"`
	Message             string  `json:"message"`
}

func (j jsonFrame) frame(t *testing.T) Frame {
	t.Helper()
	switch j.Type {
	case "HELLO":
		h := Hello{Version: *j.Version, ID: j.ID}
		copy(h.Token[:], unhex(t, j.Token))
		return h
	case "WELCOME":
		sid, err := strconv.ParseUint(j.SessionID, 10, 64)
		if err != nil {
			t.Fatal(err)
		}
		return Welcome{HeartbeatIntervalMs: j.HeartbeatIntervalMs, SessionID: sid}
	case "HEARTBEAT":
		return Heartbeat{Seq: j.Seq}
	case "HEARTBEAT_ACK":
		return HeartbeatAck{Seq: j.Seq}
	case "BYE":
		return Bye{}
	case "RECONNECT":
		return Reconnect{MinDelayMs: j.MinDelayMs, MaxDelayMs: j.MaxDelayMs}
	case "ERROR":
		return Error{Code: ErrorCode(*j.Code), Message: j.Message}
	}
	t.Fatalf("unknown frame type %q", j.Type)
	return nil
}

type jsonError struct {
	Kind            ErrorKind `json:"kind"`
	Message         string    `json:"message"`
	ServerErrorCode ErrorCode `json:"server_error_code"`
}

type framesFile struct {
	Constants struct {
		Version         int    `json:"version"`
		ALPN            string `json:"alpn"`
		HeaderLen       int    `json:"header_len"`
		MaxPayload      int    `json:"max_payload"`
		TokenLen        int    `json:"token_len"`
		MaxIDLen        int    `json:"max_id_len"`
		MaxErrorMessage int    `json:"max_error_message"`
		IDBytes         string `json:"id_bytes"`
	} `json:"constants"`
	Valid []struct {
		Name  string    `json:"name"`
		Hex   string    `json:"hex"`
		Frame jsonFrame `json:"frame"`
	} `json:"valid"`
	Invalid []struct {
		Name  string    `json:"name"`
		Hex   string    `json:"hex"`
		Error jsonError `json:"error"`
	} `json:"invalid"`
	Incomplete []struct {
		Name string `json:"name"`
		Hex  string `json:"hex"`
	} `json:"incomplete"`
	Streams []struct {
		Name    string      `json:"name"`
		Hex     string      `json:"hex"`
		Frames  []jsonFrame `json:"frames"`
		Error   *jsonError  `json:"error"`
		Pending string      `json:"pending"`
	} `json:"streams"`
	EncodeTruncates []struct {
		Name    string    `json:"name"`
		Frame   jsonFrame `json:"frame"`
		Hex     string    `json:"hex"`
		Decoded jsonFrame `json:"decoded"`
	} `json:"encode_truncates"`
}

func checkError(t *testing.T, name string, err error, want jsonError) {
	t.Helper()
	pe, ok := err.(*ProtocolError)
	if !ok {
		t.Errorf("%s: got %v, want a %s error", name, err, want.Kind)
		return
	}
	if pe.Kind != want.Kind || pe.ServerCode() != want.ServerErrorCode {
		t.Errorf("%s: got %s (server code %d), want %s (server code %d)",
			name, pe.Kind, pe.ServerCode(), want.Kind, want.ServerErrorCode)
	}
}

func TestFrameVectors(t *testing.T) {
	var f framesFile
	loadJSON(t, "frames.json", &f)
	c := f.Constants
	if c.Version != Version || c.ALPN != ALPN || c.HeaderLen != HeaderLen || c.MaxPayload != MaxPayload ||
		c.TokenLen != TokenLen || c.MaxIDLen != MaxIDLen || c.MaxErrorMessage != MaxErrorMessage {
		t.Errorf("constants differ: %+v", c)
	}
	for i := 0; i < 256; i++ {
		want := bytes.IndexByte([]byte(c.IDBytes), byte(i)) >= 0
		if IsIDByte(byte(i)) != want {
			t.Errorf("IsIDByte(0x%02x) = %v, want %v", i, !want, want)
		}
	}
	if len(f.Valid) == 0 || len(f.Invalid) == 0 || len(f.Streams) == 0 {
		t.Fatal("empty vectors")
	}
	seen := map[FrameType]bool{}
	for _, v := range f.Valid {
		want := unhex(t, v.Hex)
		fr := v.Frame.frame(t)
		seen[fr.Type()] = true
		got, err := Encode(fr)
		if err != nil || !bytes.Equal(got, want) {
			t.Errorf("%s: encode = %x, %v; want %x", v.Name, got, err, want)
		}
		dec, n, err := DecodeOne(want)
		if err != nil || n != len(want) || !reflect.DeepEqual(dec, fr) {
			t.Errorf("%s: decode = %#v, %d, %v; want %#v", v.Name, dec, n, err, fr)
		}
	}
	for ty := TypeHello; ty <= TypeError; ty++ {
		if !seen[ty] {
			t.Errorf("no valid vector for %s", ty)
		}
	}
	for _, v := range f.Invalid {
		fr, _, err := DecodeOne(unhex(t, v.Hex))
		if fr != nil {
			t.Errorf("%s: decoded %#v, want an error", v.Name, fr)
			continue
		}
		checkError(t, v.Name, err, v.Error)
	}
	for _, v := range f.Incomplete {
		fr, n, err := DecodeOne(unhex(t, v.Hex))
		if fr != nil || n != 0 || err != nil {
			t.Errorf("%s: got %#v, %d, %v; want: need more bytes", v.Name, fr, n, err)
		}
	}
	for _, v := range f.Streams {
		in := unhex(t, v.Hex)
		for _, chunk := range []int{1, 2, 5, len(in)} {
			var d Decoder
			var got []Frame
			var derr error
		feed:
			for at := 0; at < len(in); at += chunk {
				end := at + chunk
				if end > len(in) {
					end = len(in)
				}
				_, _ = d.Write(in[at:end])
				for {
					fr, err := d.Next()
					if err != nil {
						derr = err
						break feed
					}
					if fr == nil {
						break
					}
					got = append(got, fr)
				}
			}
			var want []Frame
			for _, jf := range v.Frames {
				want = append(want, jf.frame(t))
			}
			if !reflect.DeepEqual(got, want) {
				t.Errorf("%s (chunks of %d): frames %#v, want %#v", v.Name, chunk, got, want)
			}
			if v.Error != nil {
				checkError(t, v.Name, derr, *v.Error)
			} else if derr != nil || hex.EncodeToString(d.Pending()) != v.Pending {
				t.Errorf("%s: error %v, pending %x; want pending %s", v.Name, derr, d.Pending(), v.Pending)
			}
		}
	}
	for _, v := range f.EncodeTruncates {
		got, err := Encode(v.Frame.frame(t))
		if err != nil || hex.EncodeToString(got) != v.Hex {
			t.Errorf("%s: encode = %x, %v; want %s", v.Name, got, err, v.Hex)
		}
		dec, _, err := DecodeOne(got)
		if err != nil || !reflect.DeepEqual(dec, v.Decoded.frame(t)) {
			t.Errorf("%s: decode = %#v, %v", v.Name, dec, err)
		}
	}
}

func TestTokenVectors(t *testing.T) {
	var f struct {
		Tokens []struct {
			Name     string `json:"name"`
			FleetKey string `json:"fleet_key"`
			AgentID  string `json:"agent_id"`
			Token    string `json:"token"`
		} `json:"tokens"`
		FleetKeyFiles []struct {
			Name     string  `json:"name"`
			Text     string  `json:"text"`
			FleetKey *string `json:"fleet_key"`
		} `json:"fleet_key_files"`
	}
	loadJSON(t, "tokens.json", &f)
	if len(f.Tokens) == 0 || len(f.FleetKeyFiles) == 0 {
		t.Fatal("empty vectors")
	}
	for _, v := range f.Tokens {
		tok := Token(unhex(t, v.FleetKey), v.AgentID)
		if hex.EncodeToString(tok[:]) != v.Token {
			t.Errorf("%s: token %x, want %s", v.Name, tok, v.Token)
		}
		a, err := New(Config{Addr: "127.0.0.1:1", ID: v.AgentID, FleetKey: unhex(t, v.FleetKey)})
		if err != nil {
			t.Fatalf("%s: %v", v.Name, err)
		}
		if got := a.TokenBytes(); hex.EncodeToString(got[:]) != v.Token {
			t.Errorf("%s: agent token %x, want %s", v.Name, got, v.Token)
		}
	}
	for _, v := range f.FleetKeyFiles {
		k, err := ParseFleetKey(v.Text)
		switch {
		case v.FleetKey == nil && err == nil:
			t.Errorf("%s: %q accepted, want rejected", v.Name, v.Text)
		case v.FleetKey != nil && err != nil:
			t.Errorf("%s: %q rejected: %v", v.Name, v.Text, err)
		case v.FleetKey != nil && hex.EncodeToString(k[:]) != *v.FleetKey:
			t.Errorf("%s: key %x, want %s", v.Name, k, *v.FleetKey)
		}
	}
}

func TestErrorCodeVectors(t *testing.T) {
	var f struct {
		Codes []struct {
			Code ErrorCode `json:"code"`
			Name string    `json:"name"`
		} `json:"codes"`
	}
	loadJSON(t, "error_codes.json", &f)
	if len(f.Codes) != len(ErrorCodes) {
		t.Fatalf("%d codes in the vectors, %d here", len(f.Codes), len(ErrorCodes))
	}
	for i, c := range f.Codes {
		if ErrorCodes[i] != c.Code || c.Code.String() != c.Name || !c.Code.Known() {
			t.Errorf("code %d: %s here, %s in the vectors", c.Code, c.Code, c.Name)
		}
	}
	if ErrorCode(999).Known() {
		t.Error("999 is not a known code")
	}
}
