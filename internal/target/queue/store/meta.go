package store

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
)

// metaVersion is the version of the metadata encoding written by this code.
// An entry with a higher version was written by a newer Spool: it is
// quarantined rather than misread.
const metaVersion = 1

// maxMetaSize bounds what the decoder accepts, so a damaged length can never
// make it allocate without limit.
const maxMetaSize = 16 << 20

type metaEnvelope struct {
	V int `json:"v"`
	*Message
}

// EncodeMeta encodes m's metadata, the form every backend stores.
func EncodeMeta(m *Message) ([]byte, error) {
	return json.Marshal(metaEnvelope{V: metaVersion, Message: m})
}

// DecodeMeta decodes metadata written by EncodeMeta for message id. It
// refuses (and a backend then quarantines) damaged metadata, metadata
// of a newer format, and values the queue could not act on.
func DecodeMeta(id ID, b []byte) (*Message, error) {
	if len(b) > maxMetaSize {
		return nil, fmt.Errorf("metadata of %d bytes exceeds limit", len(b))
	}
	env := metaEnvelope{Message: &Message{}}
	dec := json.NewDecoder(bytes.NewReader(b))
	if err := dec.Decode(&env); err != nil {
		return nil, fmt.Errorf("metadata: %w", shortError{err})
	}
	if dec.More() {
		return nil, errors.New("metadata: trailing data")
	}
	if env.V != metaVersion {
		return nil, fmt.Errorf("metadata format version %d, this build reads %d", env.V, metaVersion)
	}
	m := env.Message
	m.ID = id
	if err := validateMeta(m); err != nil {
		return nil, err
	}
	return m, nil
}

// maxErrText bounds the text of a decoding error. encoding/json and time
// repeat the offending literal, which in a damaged entry can be megabytes;
// the error goes to the log and the quarantine record.
const maxErrText = 200

// shortError cuts the message of the error it wraps to maxErrText bytes.
type shortError struct{ err error }

func (e shortError) Error() string {
	s := e.err.Error()
	if len(s) > maxErrText {
		return strings.ToValidUTF8(s[:maxErrText], "") + "...(cut)"
	}
	return s
}

func (e shortError) Unwrap() error { return e.err }

// maxContentLen bounds the header and body lengths in metadata, so that
// their sum (Message.Size) cannot overflow. No real message comes near it.
const maxContentLen = 1 << 40

// validateMeta rejects decoded metadata that would make the queue misbehave.
func validateMeta(m *Message) error {
	if len(m.Rcpts) == 0 {
		return errors.New("metadata: no recipients")
	}
	if m.HeaderLen < 0 || m.BodyLen < 0 {
		return errors.New("metadata: negative content length")
	}
	if m.HeaderLen > maxContentLen || m.BodyLen > maxContentLen {
		return fmt.Errorf("metadata: content length %d+%d exceeds limit", m.HeaderLen, m.BodyLen)
	}
	if m.Arrival.IsZero() {
		return errors.New("metadata: no arrival time")
	}
	for i := range m.Rcpts {
		if m.Rcpts[i].State > RcptFailed {
			return fmt.Errorf("metadata: recipient %d: unknown state %d", i, m.Rcpts[i].State)
		}
	}
	return nil
}
