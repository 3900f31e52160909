package migrate

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"slices"
	"time"

	"github.com/emersion/go-message/textproto"
	"github.com/emersion/go-smtp"
	"github.com/foxcpp/maddy/framework/exterrors"

	"github.com/maddy-spool/spool/internal/target/queue/attempt"
	"github.com/maddy-spool/spool/internal/target/queue/store"
)

// maddyMeta mirrors the JSON that maddy 0.8.1's target.queue writes to
// ID.meta (its QueueMetadata). It is declared here rather than imported
// because maddy keeps the type in an internal package, and because decoding
// is strict: an entry carrying a field this code does not know came from a
// format it was not written for, and is left in place rather than imported
// with that field silently dropped.
type maddyMeta struct {
	MsgMeta *maddyMsgMeta
	From    string
	// To lists the recipients still to be tried: maddy removes a recipient
	// once it is delivered or has failed for good.
	To []string
	// FailedRcpts and TemporaryFailedRcpts are declared by maddy 0.8.1 but
	// never filled in; they are accepted so that a value there is not taken
	// for an unknown format.
	FailedRcpts          []string
	TemporaryFailedRcpts []string
	// RcptErrs holds the last error of every recipient that ever failed,
	// including ones that later succeeded or failed for good.
	RcptErrs map[string]*maddySMTPError
	// TriesCount counts temporary failures per recipient. maddy deletes a
	// recipient's count when it fails for good but keeps it when it is
	// delivered after a retry.
	TriesCount map[string]int
	// FirstAttempt is set when the message is accepted (it is the arrival
	// time; the first attempt follows immediately). LastAttempt starts
	// equal to it and is set after every attempt that leaves recipients to
	// retry.
	FirstAttempt time.Time
	LastAttempt  time.Time
}

// maddyMsgMeta mirrors module.MsgMetadata as maddy serializes it.
type maddyMsgMeta struct {
	ID              string
	OriginalFrom    string
	DontTraceSender bool
	Quarantine      bool
	OriginalRcpts   map[string]string
	SMTPOpts        maddyMailOptions
	// Conn is always written as null (maddy clears it because it holds
	// live objects); any value is ignored.
	Conn               json.RawMessage
	TLSRequireOverride bool
}

// maddyMailOptions mirrors go-smtp's MailOptions as maddy 0.8.1 (built with
// its go-smtp fork) serializes them.
type maddyMailOptions struct {
	Body       string
	Size       int64
	RequireTLS bool
	UTF8       bool
	Return     string
	EnvelopeID string
	Auth       *string
}

// maddySMTPError mirrors go-smtp's SMTPError.
type maddySMTPError struct {
	Code         int
	EnhancedCode [3]int
	Message      string
}

// maxMetaSize bounds how much of a .meta file is read; real ones are a few
// KiB, so anything larger is damage, not mail.
const maxMetaSize = 16 << 20

// parseMeta decodes one .meta file strictly: unknown fields, trailing
// data and missing required parts are errors.
func parseMeta(r io.Reader) (*maddyMeta, error) {
	raw, err := io.ReadAll(io.LimitReader(r, maxMetaSize+1))
	if err != nil {
		return nil, err
	}
	if len(raw) > maxMetaSize {
		return nil, fmt.Errorf("metadata larger than %d bytes", maxMetaSize)
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	var m maddyMeta
	if err := dec.Decode(&m); err != nil {
		return nil, fmt.Errorf("metadata: %w", err)
	}
	if dec.More() {
		return nil, errors.New("metadata: trailing data")
	}
	if m.MsgMeta == nil {
		return nil, errors.New("metadata: no MsgMeta")
	}
	for _, rcpt := range m.To {
		if rcpt == "" {
			return nil, errors.New("metadata: empty recipient address")
		}
	}
	return &m, nil
}

// parseHeader checks that a .header file is a complete header block as
// maddy writes it (textproto.WriteHeader always ends it with an empty
// line). maddy fsyncs the header only after the metadata, so a power loss
// can leave a truncated header next to valid metadata; the missing empty
// line is how that shows.
func parseHeader(raw []byte) error {
	if !bytes.HasSuffix(raw, []byte("\r\n\r\n")) && !bytes.Equal(raw, []byte("\r\n")) {
		return errors.New("header is truncated (no empty line at its end)")
	}
	r := bufio.NewReader(bytes.NewReader(raw))
	if _, err := textproto.ReadHeader(r); err != nil {
		return fmt.Errorf("header: %w", err)
	}
	if r.Buffered() > 0 {
		return errors.New("header: data after the end of the header block")
	}
	return nil
}

// maddy 0.8.1's retry timing: after an attempt it waits
// initialRetry * 1.25^(n-1), n being the smallest tries count among the
// recipients still pending, with the power converted to a whole number
// (time.Duration) before multiplying.
const (
	maddyInitialRetry = 15 * time.Minute
	maddyRetryScale   = 1.25
)

func maddyRetryDelay(tries int) time.Duration {
	return maddyInitialRetry * time.Duration(math.Pow(maddyRetryScale, float64(tries-1)))
}

// converted is a maddy entry translated into Spool's terms.
type converted struct {
	msg *store.Message
	// dropped lists recipients maddy had finished with (failed for good,
	// or delivered after an earlier failure) as far as its metadata shows;
	// they are not imported. Recipients delivered on their first try leave
	// no trace in maddy's metadata.
	dropped []string
}

// convert builds the Spool message for a maddy entry. It returns nil msg
// when no recipient is pending. now is the import time: the next attempt
// is never put before it.
func convert(m *maddyMeta, now time.Time) converted {
	mm := m.MsgMeta
	msg := &store.Message{
		MsgID:        mm.ID,
		From:         m.From,
		OriginalFrom: mm.OriginalFrom,
		MailOpts: store.MailOptions{
			Body:       mm.SMTPOpts.Body,
			Size:       mm.SMTPOpts.Size,
			RequireTLS: mm.SMTPOpts.RequireTLS,
			UTF8:       mm.SMTPOpts.UTF8,
			Return:     mm.SMTPOpts.Return,
			EnvelopeID: mm.SMTPOpts.EnvelopeID,
			Auth:       mm.SMTPOpts.Auth,
		},
		DontTraceSender:    mm.DontTraceSender,
		Quarantine:         mm.Quarantine,
		TLSRequireOverride: mm.TLSRequireOverride,
		Arrival:            m.FirstAttempt,
	}

	// maddy only reports on messages with a non-empty original sender: its
	// own DSNs have a null sender and no original sender. Spool's rule is
	// the envelope sender alone, so a message whose null sender was
	// rewritten by a bounce pipeline modifier would get reports from Spool
	// that maddy never sent. Marking every kind as already reported keeps
	// maddy's decision without touching the envelope.
	var reported uint8
	if mm.OriginalFrom == "" && m.From != "" {
		reported = ^uint8(0)
	}

	pending := map[string]bool{}
	minTries := -1
	for _, addr := range m.To {
		if pending[addr] {
			continue // maddy does not deduplicate; sending twice would deliver twice
		}
		pending[addr] = true
		r := store.Rcpt{
			Addr:     addr,
			Original: mm.OriginalRcpts[addr],
			State:    store.RcptPending,
			Tries:    m.TriesCount[addr],
			Reported: reported,
		}
		if r.Tries > 0 {
			r.LastAttempt = m.LastAttempt
		}
		if e := m.RcptErrs[addr]; e != nil {
			st := lastError(e)
			r.LastError = &st
		}
		if r.Tries > msg.Attempts {
			msg.Attempts = r.Tries
		}
		if minTries < 0 || r.Tries < minTries {
			minTries = r.Tries
		}
		msg.Rcpts = append(msg.Rcpts, r)
	}

	var dropped []string
	seen := map[string]bool{}
	addDropped := func(addr string) {
		if !pending[addr] && !seen[addr] {
			seen[addr] = true
			dropped = append(dropped, addr)
		}
	}
	for _, addr := range m.FailedRcpts {
		addDropped(addr)
	}
	for addr := range m.RcptErrs {
		addDropped(addr)
	}
	for addr := range m.TriesCount {
		addDropped(addr)
	}
	slices.Sort(dropped)

	if len(msg.Rcpts) == 0 {
		return converted{dropped: dropped}
	}

	// Every pending recipient took part in every attempt (maddy's list only
	// shrinks), so the most-tried one counts the attempts. maddy keeps no
	// separate first-attempt time: its first attempt starts on arrival.
	if msg.Attempts > 0 {
		msg.FirstAttempt = m.FirstAttempt
		msg.LastAttempt = m.LastAttempt
	}
	msg.NextAttempt = now
	if minTries > 0 {
		if next := m.LastAttempt.Add(maddyRetryDelay(minTries)); next.After(now) {
			msg.NextAttempt = next
		}
	}
	return converted{msg: msg, dropped: dropped}
}

// lastError turns the error maddy kept for a pending recipient into
// Spool's form. The recipient is pending because maddy classified the
// error as temporary, so the status is temporary whatever its code says;
// attempt.Status then makes code and enhanced code agree with that, as it
// does for Spool's own attempts.
func lastError(e *maddySMTPError) store.SMTPStatus {
	err := exterrors.WithTemporary(&smtp.SMTPError{
		Code:         e.Code,
		EnhancedCode: smtp.EnhancedCode(e.EnhancedCode),
		Message:      e.Message,
	}, true)
	return attempt.Status(err)
}
