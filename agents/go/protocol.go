// Package agent is a presence agent for presenced: it holds one TLS 1.3
// connection to the daemon, says HELLO, heartbeats, obeys RECONNECT, backs
// off with jitter after failures and says BYE when it stops.
//
// It is written from docs/protocol.md (wire protocol v1) and uses the Go
// standard library only. This file is the frame codec (protocol.md sections
// 2 and 4); token.go holds the fleet key and token code (section 3) and
// agent.go the connection loop (sections 1, 5 and 7).
package agent

import (
	"encoding/binary"
	"fmt"
	"unicode/utf8"
)

// Protocol constants (docs/protocol.md sections 1 to 4).
const (
	// Version is the protocol version sent in HELLO.
	Version = 1
	// ALPN is the only application protocol the server accepts.
	ALPN = "presence/1"
	// HeaderLen is the frame header: type (1 byte) and length (2 bytes).
	HeaderLen = 3
	// MaxPayload is the largest payload a frame may carry.
	MaxPayload = 1024
	// TokenLen is the length of a HELLO token (HMAC-SHA256).
	TokenLen = 32
	// MaxIDLen is the longest agent id, in bytes.
	MaxIDLen = 128
	// MaxErrorMessage is the longest ERROR message, in bytes.
	MaxErrorMessage = 256
)

// FrameType is the first byte of a frame.
type FrameType uint8

// The frame types of protocol v1.
const (
	TypeHello        FrameType = 0x01
	TypeWelcome      FrameType = 0x02
	TypeHeartbeat    FrameType = 0x03
	TypeHeartbeatAck FrameType = 0x04
	TypeBye          FrameType = 0x05
	TypeReconnect    FrameType = 0x06
	TypeError        FrameType = 0x07
)

// String is the type's name as protocol.md spells it.
func (t FrameType) String() string {
	switch t {
	case TypeHello:
		return "HELLO"
	case TypeWelcome:
		return "WELCOME"
	case TypeHeartbeat:
		return "HEARTBEAT"
	case TypeHeartbeatAck:
		return "HEARTBEAT_ACK"
	case TypeBye:
		return "BYE"
	case TypeReconnect:
		return "RECONNECT"
	case TypeError:
		return "ERROR"
	}
	return fmt.Sprintf("0x%02x", uint8(t))
}

// ErrorCode is the code of an ERROR frame (protocol.md 4.7).
type ErrorCode uint16

// The ERROR codes of protocol v1.
const (
	CodeMalformedFrame       ErrorCode = 1
	CodeAuthenticationFailed ErrorCode = 2
	CodeUnsupportedVersion   ErrorCode = 3
	CodeHelloTimeout         ErrorCode = 4
	CodeSuperseded           ErrorCode = 5
	CodeOverloaded           ErrorCode = 6
	CodeShuttingDown         ErrorCode = 7
)

// ErrorCodes lists the known codes in numeric order.
var ErrorCodes = []ErrorCode{
	CodeMalformedFrame, CodeAuthenticationFailed, CodeUnsupportedVersion,
	CodeHelloTimeout, CodeSuperseded, CodeOverloaded, CodeShuttingDown,
}

// Known reports whether the code is one of protocol v1's.
func (c ErrorCode) Known() bool { return c >= CodeMalformedFrame && c <= CodeShuttingDown }

// String is the code's name from protocol.md 4.7, or "unknown_N".
func (c ErrorCode) String() string {
	switch c {
	case CodeMalformedFrame:
		return "malformed_frame"
	case CodeAuthenticationFailed:
		return "authentication_failed"
	case CodeUnsupportedVersion:
		return "unsupported_version"
	case CodeHelloTimeout:
		return "hello_timeout"
	case CodeSuperseded:
		return "superseded"
	case CodeOverloaded:
		return "overloaded"
	case CodeShuttingDown:
		return "shutting_down"
	}
	return fmt.Sprintf("unknown_%d", uint16(c))
}

// Frame is one of Hello, Welcome, Heartbeat, HeartbeatAck, Bye, Reconnect
// and Error.
type Frame interface {
	Type() FrameType
	// appendPayload appends the payload (without header) to dst.
	appendPayload(dst []byte) ([]byte, error)
}

// Hello is the agent's first frame (protocol.md 4.1).
type Hello struct {
	Version uint8
	ID      string
	Token   [TokenLen]byte
}

// Welcome is the server's answer to an accepted HELLO (4.2).
type Welcome struct {
	HeartbeatIntervalMs uint32
	SessionID           uint64
}

// Heartbeat is sent by the agent every heartbeat interval (4.3).
type Heartbeat struct{ Seq uint32 }

// HeartbeatAck echoes a Heartbeat's seq (4.4).
type HeartbeatAck struct{ Seq uint32 }

// Bye is the agent shutting down on purpose (4.5).
type Bye struct{}

// Reconnect asks the agent to close and reconnect after a random delay in
// [MinDelayMs, MaxDelayMs] (4.6).
type Reconnect struct {
	MinDelayMs uint32
	MaxDelayMs uint32
}

// Error is sent by the server before it closes the connection (4.7).
type Error struct {
	Code    ErrorCode
	Message string
}

func (Hello) Type() FrameType        { return TypeHello }
func (Welcome) Type() FrameType      { return TypeWelcome }
func (Heartbeat) Type() FrameType    { return TypeHeartbeat }
func (HeartbeatAck) Type() FrameType { return TypeHeartbeatAck }
func (Bye) Type() FrameType          { return TypeBye }
func (Reconnect) Type() FrameType    { return TypeReconnect }
func (Error) Type() FrameType        { return TypeError }

func (f Hello) appendPayload(dst []byte) ([]byte, error) {
	if err := ValidateID(f.ID); err != nil {
		return dst, err
	}
	dst = append(dst, f.Version, byte(len(f.ID)))
	dst = append(dst, f.ID...)
	return append(dst, f.Token[:]...), nil
}

func (f Welcome) appendPayload(dst []byte) ([]byte, error) {
	dst = binary.BigEndian.AppendUint32(dst, f.HeartbeatIntervalMs)
	return binary.BigEndian.AppendUint64(dst, f.SessionID), nil
}

func (f Heartbeat) appendPayload(dst []byte) ([]byte, error) {
	return binary.BigEndian.AppendUint32(dst, f.Seq), nil
}

func (f HeartbeatAck) appendPayload(dst []byte) ([]byte, error) {
	return binary.BigEndian.AppendUint32(dst, f.Seq), nil
}

func (Bye) appendPayload(dst []byte) ([]byte, error) { return dst, nil }

func (f Reconnect) appendPayload(dst []byte) ([]byte, error) {
	if f.MinDelayMs > f.MaxDelayMs {
		return dst, &ProtocolError{Kind: KindBadReconnectRange,
			Detail: fmt.Sprintf("RECONNECT min_delay_ms %d is greater than max_delay_ms %d", f.MinDelayMs, f.MaxDelayMs)}
	}
	dst = binary.BigEndian.AppendUint32(dst, f.MinDelayMs)
	return binary.BigEndian.AppendUint32(dst, f.MaxDelayMs), nil
}

// appendPayload cuts a message longer than MaxErrorMessage bytes at a UTF-8
// character boundary, as the server does.
func (f Error) appendPayload(dst []byte) ([]byte, error) {
	if !utf8.ValidString(f.Message) {
		return dst, &ProtocolError{Kind: KindBadErrorMessage, Detail: "ERROR message is not valid UTF-8"}
	}
	msg := f.Message
	if len(msg) > MaxErrorMessage {
		end := MaxErrorMessage
		for end > 0 && !utf8.RuneStart(msg[end]) {
			end--
		}
		msg = msg[:end]
	}
	dst = binary.BigEndian.AppendUint16(dst, uint16(f.Code))
	return append(dst, msg...), nil
}

// AppendFrame appends f's encoding (header and payload) to dst. It fails
// only for frames that cannot be encoded: a HELLO with an invalid id, a
// RECONNECT with min > max, an ERROR message that is not UTF-8.
func AppendFrame(dst []byte, f Frame) ([]byte, error) {
	start := len(dst)
	dst = append(dst, byte(f.Type()), 0, 0)
	dst, err := f.appendPayload(dst)
	if err != nil {
		return dst[:start], err
	}
	binary.BigEndian.PutUint16(dst[start+1:], uint16(len(dst)-start-HeaderLen))
	return dst, nil
}

// Encode returns f's encoding.
func Encode(f Frame) ([]byte, error) { return AppendFrame(make([]byte, 0, 16), f) }

// ErrorKind classifies a ProtocolError. The names are those of
// proto/testdata/frames.json.
type ErrorKind string

// The ways bytes can fail to decode.
const (
	KindUnknownType        ErrorKind = "unknown_type"
	KindOversized          ErrorKind = "oversized"
	KindBadLength          ErrorKind = "bad_length"
	KindUnsupportedVersion ErrorKind = "unsupported_version"
	KindBadIDLength        ErrorKind = "bad_id_length"
	KindBadIDChar          ErrorKind = "bad_id_char"
	KindBadReconnectRange  ErrorKind = "bad_reconnect_range"
	KindBadErrorMessage    ErrorKind = "bad_error_message"
)

// ProtocolError is why bytes could not be decoded into a frame (or a frame
// could not be encoded). After a decoding error the stream is unusable.
type ProtocolError struct {
	Kind   ErrorKind
	Detail string
}

func (e *ProtocolError) Error() string { return e.Detail }

// ServerCode is the ERROR code a server answers when an agent's bytes fail
// to decode this way: unsupported_version for a HELLO version, else
// malformed_frame (protocol.md 4.1 and 5.1).
func (e *ProtocolError) ServerCode() ErrorCode {
	if e.Kind == KindUnsupportedVersion {
		return CodeUnsupportedVersion
	}
	return CodeMalformedFrame
}

func badLength(t FrameType, got int, expected string) error {
	return &ProtocolError{Kind: KindBadLength,
		Detail: fmt.Sprintf("%s payload is %d bytes, expected %s", t, got, expected)}
}

// IsIDByte reports whether b may appear in an agent id: [A-Za-z0-9._:@-].
func IsIDByte(b byte) bool {
	return b >= 'a' && b <= 'z' || b >= 'A' && b <= 'Z' || b >= '0' && b <= '9' ||
		b == '.' || b == '_' || b == ':' || b == '@' || b == '-'
}

// ValidateID checks an agent id: 1..=128 bytes of [A-Za-z0-9._:@-].
func ValidateID(id string) error {
	if len(id) == 0 || len(id) > MaxIDLen {
		return &ProtocolError{Kind: KindBadIDLength,
			Detail: fmt.Sprintf("agent id is %d bytes; it must be 1..=%d", len(id), MaxIDLen)}
	}
	for i := 0; i < len(id); i++ {
		if !IsIDByte(id[i]) {
			return &ProtocolError{Kind: KindBadIDChar,
				Detail: fmt.Sprintf("agent id contains byte 0x%02x; allowed are [A-Za-z0-9._:@-]", id[i])}
		}
	}
	return nil
}

// ParsePayload decodes one frame's payload given its type byte.
func ParsePayload(t FrameType, p []byte) (Frame, error) {
	be := binary.BigEndian
	switch t {
	case TypeHello:
		// Order of checks (protocol.md 4.1): room for version and id_len,
		// then the version, then the layout, then the id.
		if len(p) < 2 {
			return nil, badLength(t, len(p), "2 + id_len + 32")
		}
		if p[0] != Version {
			return nil, &ProtocolError{Kind: KindUnsupportedVersion,
				Detail: fmt.Sprintf("protocol version %d is not supported; this agent speaks %d", p[0], Version)}
		}
		idLen := int(p[1])
		if len(p) != 2+idLen+TokenLen {
			return nil, badLength(t, len(p), "2 + id_len + 32")
		}
		id := string(p[2 : 2+idLen])
		if err := ValidateID(id); err != nil {
			return nil, err
		}
		h := Hello{Version: p[0], ID: id}
		copy(h.Token[:], p[2+idLen:])
		return h, nil
	case TypeWelcome:
		if len(p) != 12 {
			return nil, badLength(t, len(p), "12")
		}
		return Welcome{HeartbeatIntervalMs: be.Uint32(p), SessionID: be.Uint64(p[4:])}, nil
	case TypeHeartbeat:
		if len(p) != 4 {
			return nil, badLength(t, len(p), "4")
		}
		return Heartbeat{Seq: be.Uint32(p)}, nil
	case TypeHeartbeatAck:
		if len(p) != 4 {
			return nil, badLength(t, len(p), "4")
		}
		return HeartbeatAck{Seq: be.Uint32(p)}, nil
	case TypeBye:
		if len(p) != 0 {
			return nil, badLength(t, len(p), "0")
		}
		return Bye{}, nil
	case TypeReconnect:
		if len(p) != 8 {
			return nil, badLength(t, len(p), "8")
		}
		r := Reconnect{MinDelayMs: be.Uint32(p), MaxDelayMs: be.Uint32(p[4:])}
		if r.MinDelayMs > r.MaxDelayMs {
			return nil, &ProtocolError{Kind: KindBadReconnectRange,
				Detail: fmt.Sprintf("RECONNECT min_delay_ms %d is greater than max_delay_ms %d", r.MinDelayMs, r.MaxDelayMs)}
		}
		return r, nil
	case TypeError:
		if len(p) < 2 {
			return nil, badLength(t, len(p), "2 + message")
		}
		msg := p[2:]
		if len(msg) > MaxErrorMessage || !utf8.Valid(msg) {
			return nil, &ProtocolError{Kind: KindBadErrorMessage,
				Detail: fmt.Sprintf("ERROR message is not valid UTF-8 or longer than %d bytes", MaxErrorMessage)}
		}
		return Error{Code: ErrorCode(be.Uint16(p)), Message: string(msg)}, nil
	}
	return nil, &ProtocolError{Kind: KindUnknownType, Detail: fmt.Sprintf("frame type 0x%02x is unknown", uint8(t))}
}

// DecodeOne decodes one frame from the front of b. It returns the frame and
// the number of bytes it took, or (nil, 0, nil) when b holds only part of a
// frame. An unknown type or an oversized length is reported as soon as the
// 3-byte header is there; the type is checked first.
func DecodeOne(b []byte) (Frame, int, error) {
	if len(b) < HeaderLen {
		return nil, 0, nil
	}
	t := FrameType(b[0])
	if t < TypeHello || t > TypeError {
		return nil, 0, &ProtocolError{Kind: KindUnknownType, Detail: fmt.Sprintf("frame type 0x%02x is unknown", b[0])}
	}
	n := int(binary.BigEndian.Uint16(b[1:]))
	if n > MaxPayload {
		return nil, 0, &ProtocolError{Kind: KindOversized,
			Detail: fmt.Sprintf("frame length %d exceeds the maximum payload of %d bytes", n, MaxPayload)}
	}
	if len(b) < HeaderLen+n {
		return nil, 0, nil
	}
	f, err := ParsePayload(t, b[HeaderLen:HeaderLen+n])
	if err != nil {
		return nil, 0, err
	}
	return f, HeaderLen + n, nil
}

// Decoder decodes frames from a byte stream that arrives in arbitrary
// chunks. Between calls it keeps at most one partial frame (<= 1027 bytes)
// plus whatever was written and not yet taken with Next.
type Decoder struct {
	buf []byte
}

// Write appends received bytes. It never fails.
func (d *Decoder) Write(p []byte) (int, error) {
	d.buf = append(d.buf, p...)
	return len(p), nil
}

// Next returns the next whole frame, or (nil, nil) when more bytes are
// needed. After an error the stream is unusable.
func (d *Decoder) Next() (Frame, error) {
	f, n, err := DecodeOne(d.buf)
	if err != nil || f == nil {
		return nil, err
	}
	rest := copy(d.buf, d.buf[n:])
	d.buf = d.buf[:rest]
	if rest == 0 && cap(d.buf) > 4*(HeaderLen+MaxPayload) {
		d.buf = nil
	}
	return f, nil
}

// Pending returns the bytes of a frame that has not completed yet.
func (d *Decoder) Pending() []byte { return d.buf }
