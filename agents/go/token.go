package agent

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"strings"
)

// FleetKeyLen is the length of the fleet key in bytes.
const FleetKeyLen = 32

// Token computes an agent's HELLO token: HMAC-SHA256(key = fleet key,
// message = agent id bytes) (protocol.md section 3).
func Token(fleetKey []byte, id string) [TokenLen]byte {
	m := hmac.New(sha256.New, fleetKey)
	m.Write([]byte(id))
	var t [TokenLen]byte
	copy(t[:], m.Sum(nil))
	return t
}

// ParseHex32 parses the file format shared by fleet key files and token
// files: exactly 64 hexadecimal characters (either case) on one line,
// optionally followed by one line ending (\n, \r\n or a lone \r).
func ParseHex32(text string) ([32]byte, error) {
	var out [32]byte
	line := strings.TrimSuffix(text, "\n")
	line = strings.TrimSuffix(line, "\r")
	if len(line) != 64 {
		return out, fmt.Errorf("found %d characters, expected 64 hex characters on one line", len(line))
	}
	if _, err := hex.Decode(out[:], []byte(line)); err != nil {
		return out, fmt.Errorf("not hex: %w", err)
	}
	return out, nil
}

// ParseFleetKey parses the contents of a fleet key file.
func ParseFleetKey(text string) ([FleetKeyLen]byte, error) { return ParseHex32(text) }

// LoadFleetKey reads a fleet key file.
func LoadFleetKey(path string) ([FleetKeyLen]byte, error) {
	return loadHex32(path, "fleet key")
}

// LoadToken reads a provisioned token file: the agent's token as 64 hex
// characters, as `presenced token --fleet-key FILE ID` prints it.
func LoadToken(path string) ([TokenLen]byte, error) {
	return loadHex32(path, "token")
}

func loadHex32(path, what string) ([32]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return [32]byte{}, fmt.Errorf("cannot read %s %s: %w", what, path, err)
	}
	v, err := ParseHex32(string(b))
	if err != nil {
		return v, fmt.Errorf("%s %s: %w", what, path, err)
	}
	return v, nil
}
