package embedded

import (
	"encoding/binary"
	"fmt"
	"time"

	"github.com/maddy-spool/spool/internal/target/queue/store"
)

// A sched value is binary: next attempt and arrival as Unix nanoseconds,
// a flags byte, the pending recipient count, then (format 3) the
// destination's bytes, if any. The fixed part keeps start-up to a plain
// cursor walk with little allocation per entry.
const (
	schedLen  = 21
	schedHeld = 1 << 0
	// maxDestinationLen bounds a destination (a domain is at most 255).
	maxDestinationLen = 1024
)

func encodeSched(e SchedEntry) []byte {
	b := make([]byte, schedLen, schedLen+len(e.Destination))
	binary.BigEndian.PutUint64(b[0:], uint64(e.NextAttempt.UnixNano()))
	binary.BigEndian.PutUint64(b[8:], uint64(e.Arrival.UnixNano()))
	if e.Held {
		b[16] |= schedHeld
	}
	binary.BigEndian.PutUint32(b[17:], uint32(e.Pending))
	return append(b, e.Destination...)
}

func decodeSched(id store.ID, b []byte) (SchedEntry, error) {
	if len(b) < schedLen || len(b) > schedLen+maxDestinationLen {
		return SchedEntry{}, fmt.Errorf("schedule entry of %d bytes, want %d to %d", len(b), schedLen, schedLen+maxDestinationLen)
	}
	if b[16]&^schedHeld != 0 {
		return SchedEntry{}, fmt.Errorf("schedule entry has unknown flags %#x", b[16])
	}
	return SchedEntry{
		ID:          id,
		NextAttempt: time.Unix(0, int64(binary.BigEndian.Uint64(b[0:]))),
		Arrival:     time.Unix(0, int64(binary.BigEndian.Uint64(b[8:]))),
		Held:        b[16]&schedHeld != 0,
		Pending:     int(binary.BigEndian.Uint32(b[17:])),
		Destination: string(b[schedLen:]),
	}, nil
}

func idKey(id store.ID) []byte {
	var k [8]byte
	binary.BigEndian.PutUint64(k[:], uint64(id))
	return k[:]
}

func keyID(k []byte) (store.ID, bool) {
	if len(k) != 8 {
		return 0, false
	}
	return store.ID(binary.BigEndian.Uint64(k)), true
}

// arrivalKeyLen is the length of a key of the arrival index: the arrival
// time as Unix nanoseconds with the sign bit flipped (so times before 1970
// sort first), then the ID, both big-endian.
const arrivalKeyLen = 16

// schedArrivalKey returns the arrival index key of the message with
// schedule value sched, or nil if sched is not well-formed.
func schedArrivalKey(id store.ID, sched []byte) []byte {
	if len(sched) < schedLen {
		return nil
	}
	k := make([]byte, arrivalKeyLen)
	copy(k, sched[8:16]) // the arrival time, see encodeSched
	k[0] ^= 0x80
	binary.BigEndian.PutUint64(k[8:], uint64(id))
	return k
}

// arrivalKey returns the arrival index key of a message.
func arrivalKey(id store.ID, arrival time.Time) []byte {
	return schedArrivalKey(id, encodeSched(SchedEntry{Arrival: arrival}))
}

func parseArrivalKey(k []byte) (store.ID, time.Time, bool) {
	if len(k) != arrivalKeyLen {
		return 0, time.Time{}, false
	}
	ns := int64(binary.BigEndian.Uint64(k) ^ 1<<63)
	return store.ID(binary.BigEndian.Uint64(k[8:])), time.Unix(0, ns), true
}

// SchedEntry is the part of a message that scheduling needs; start-up reads
// only these.
type SchedEntry struct {
	ID          store.ID
	NextAttempt time.Time
	Arrival     time.Time
	Held        bool
	// Pending is the number of recipients still pending.
	Pending int
	// Destination is the message's destination (store.Message).
	Destination string
}

// schedOf returns the schedule entry of m.
func schedOf(m *store.Message) SchedEntry {
	return SchedEntry{ID: m.ID, NextAttempt: m.NextAttempt, Arrival: m.Arrival, Held: m.Held, Pending: len(m.Pending()), Destination: m.Destination}
}

// QuarantineFunc is told about every entry moved aside, with the reason.
// sched is the entry's schedule entry when it had a readable one (so the
// caller knows the message was counted as queued), else nil. id is 0 for a
// whole damaged database.
type QuarantineFunc func(id store.ID, sched *SchedEntry, reason error)
