package admin

import (
	"sort"
	"strconv"
	"time"

	"github.com/maddy-spool/spool/internal/target/queue/attempt"
	"github.com/maddy-spool/spool/internal/target/queue/store"
)

// Reader is the read side of a queue's store; store.Store has it, and so
// does a live queue.
type Reader interface {
	Walk(fn func(*store.Message) error) error
	Get(id store.ID) (*store.Message, error)
	Content(m *store.Message) (store.Content, error)
}

// MessageInfo is one line of `maddy spool list`.
type MessageInfo struct {
	Instance    string    `json:"instance"`
	ID          string    `json:"id"`
	MsgID       string    `json:"msg_id,omitempty"`
	Size        int64     `json:"size"`
	Arrival     time.Time `json:"arrival"`
	From        string    `json:"from"`
	Rcpts       int       `json:"rcpts"`
	Attempts    int       `json:"attempts"`
	NextAttempt time.Time `json:"next_attempt"`
	Held        bool      `json:"held"`
	// Destination is the destination the entry's recipients are sent to
	// ("" for a queue with one destination).
	Destination string `json:"destination,omitempty"`
	// InFlight is true while an attempt holds the message (live server
	// only), on LeaseOwner's node until LeaseExpiry unless renewed.
	InFlight    bool      `json:"in_flight,omitempty"`
	LeaseOwner  string    `json:"lease_owner,omitempty"`
	LeaseExpiry time.Time `json:"lease_expiry,omitzero"`
	// Receiving is true while the message is still being received (its
	// client's transaction is not committed yet).
	Receiving bool `json:"receiving,omitempty"`
	// Pending lists the recipients not yet delivered or failed.
	Pending []RcptInfo `json:"pending"`
}

// RcptInfo is one recipient's state.
type RcptInfo struct {
	Addr        string    `json:"addr"`
	State       string    `json:"state"`
	Tries       int       `json:"tries"`
	LastAttempt time.Time `json:"last_attempt,omitzero"`
	LastError   string    `json:"last_error,omitempty"`
	Temporary   bool      `json:"temporary,omitempty"`
	Notify      []string  `json:"notify,omitempty"`
	ORCPT       string    `json:"orcpt,omitempty"`
	// Via names the target that took the recipient when it was not the
	// usual one (the fallback target).
	Via string `json:"via,omitempty"`
	// History is the recipient's last attempts, oldest first (show only).
	History []RcptAttemptInfo `json:"history,omitempty"`
}

// AttemptInfo is one entry of a message's attempt history.
type AttemptInfo struct {
	Time      time.Time `json:"time"`
	Duration  float64   `json:"duration_seconds"`
	Delivered int       `json:"delivered"`
	Temporary int       `json:"temporary"`
	Permanent int       `json:"permanent"`
	Error     string    `json:"error,omitempty"`
}

// Detail is the output of `maddy spool show`.
type Detail struct {
	MessageInfo
	FirstAttempt time.Time     `json:"first_attempt,omitzero"`
	LastAttempt  time.Time     `json:"last_attempt,omitzero"`
	All          []RcptInfo    `json:"rcpts_all"`
	History      []AttemptInfo `json:"history"`
	// DSN and envelope options given by the sender (RFC 3461 and others).
	EnvelopeID string `json:"envid,omitempty"`
	Return     string `json:"ret,omitempty"`
	SMTPUTF8   bool   `json:"smtputf8,omitempty"`
	RequireTLS bool   `json:"requiretls,omitempty"`
	BodyType   string `json:"body_type,omitempty"`
	// Where the message came from.
	Proto      string `json:"proto,omitempty"`
	Helo       string `json:"helo,omitempty"`
	RemoteAddr string `json:"remote_addr,omitempty"`
	AuthUser   string `json:"auth_user,omitempty"`
	// Header is the stored header block, when asked for.
	Header string `json:"header,omitempty"`
}

// Info summarises m for a list line.
func Info(instance string, m *store.Message) MessageInfo {
	mi := MessageInfo{
		Instance:    instance,
		ID:          m.ID.String(),
		MsgID:       m.MsgID,
		Size:        m.Size(),
		Arrival:     m.Arrival,
		From:        m.From,
		Rcpts:       len(m.Rcpts),
		Attempts:    m.Attempts,
		NextAttempt: m.NextAttempt,
		Held:        m.Held,
		Destination: m.Destination,
		Pending:     []RcptInfo{},
	}
	if l := m.Lease; l != nil {
		mi.InFlight, mi.Receiving = !l.Receiving, l.Receiving
		mi.LeaseOwner, mi.LeaseExpiry = l.Owner, l.Expiry
	}
	for i := range m.Rcpts {
		if m.Rcpts[i].State == store.RcptPending {
			mi.Pending = append(mi.Pending, rcptInfo(&m.Rcpts[i]))
		}
	}
	return mi
}

// DetailOf describes m fully (without content).
func DetailOf(instance string, m *store.Message) Detail {
	d := Detail{
		MessageInfo:  Info(instance, m),
		FirstAttempt: m.FirstAttempt,
		LastAttempt:  m.LastAttempt,
		All:          make([]RcptInfo, len(m.Rcpts)),
		History:      make([]AttemptInfo, len(m.History)),
		EnvelopeID:   m.MailOpts.EnvelopeID,
		Return:       m.MailOpts.Return,
		SMTPUTF8:     m.MailOpts.UTF8,
		RequireTLS:   m.MailOpts.RequireTLS,
		BodyType:     m.MailOpts.Body,
		Proto:        m.Conn.Proto,
		Helo:         m.Conn.Hostname,
		RemoteAddr:   m.Conn.RemoteAddr,
		AuthUser:     m.Conn.AuthUser,
	}
	for i := range m.Rcpts {
		d.All[i] = rcptDetail(&m.Rcpts[i])
	}
	for i, h := range m.History {
		d.History[i] = AttemptInfo{Time: h.Time, Duration: h.Duration.Seconds(),
			Delivered: h.Delivered, Temporary: h.Temporary, Permanent: h.Permanent, Error: h.Error}
	}
	return d
}

func rcptInfo(r *store.Rcpt) RcptInfo {
	ri := RcptInfo{Addr: r.Addr, State: r.State.String(), Tries: r.Tries, LastAttempt: r.LastAttempt, Notify: r.Notify}
	if r.Orig != "" {
		ri.ORCPT = r.OrigType + ";" + r.Orig
	}
	if r.LastError != nil {
		ri.LastError = attempt.FormatStatus(*r.LastError)
		ri.Temporary = r.LastError.Temporary
	}
	ri.Via = r.Via
	return ri
}

// rcptDetail is rcptInfo with the recipient's attempt history.
func rcptDetail(r *store.Rcpt) RcptInfo {
	ri := rcptInfo(r)
	for _, a := range r.History {
		ai := RcptAttemptInfo{Time: a.Time, Result: "accepted", Via: a.Via}
		if a.Status != nil {
			ai.Result = attempt.FormatStatus(*a.Status)
		}
		ri.History = append(ri.History, ai)
	}
	return ri
}

// RcptAttemptInfo is one attempt of one recipient.
type RcptAttemptInfo struct {
	Time time.Time `json:"time"`
	// Result is "accepted", or the reply the target refused with.
	Result string `json:"result"`
	Via    string `json:"via,omitempty"`
}

// List calls fn for every message of r that f selects, in ID (arrival)
// order. It reads metadata only, never content, and does not keep the
// store's read transaction open while fn runs: the IDs are collected
// first, then each message is read on its own, so a slow reader (a
// client on the socket) never holds up the writers.
func List(r Reader, instance string, f Filter, now time.Time, fn func(MessageInfo) error) error {
	ids, err := Select(r, f, now)
	if err != nil {
		return err
	}
	for _, id := range ids {
		m, err := r.Get(id)
		if err != nil {
			continue // gone meanwhile, or quarantined (logged by the store)
		}
		if !f.Match(m, now) {
			continue // changed meanwhile
		}
		if err := fn(Info(instance, m)); err != nil {
			return err
		}
	}
	return nil
}

// Select returns the IDs of the messages f selects, in ID order. With
// explicit IDs only those are read.
func Select(r Reader, f Filter, now time.Time) ([]store.ID, error) {
	var ids []store.ID
	if f.Explicit() {
		seen := make(map[store.ID]bool, len(f.IDs))
		for _, id := range f.IDs {
			if seen[id] {
				continue
			}
			seen[id] = true
			m, err := r.Get(id)
			if err != nil {
				continue
			}
			if f.Match(m, now) {
				ids = append(ids, id)
			}
		}
		sort.Slice(ids, func(i, j int) bool { return ids[i] < ids[j] })
		return ids, nil
	}
	err := r.Walk(func(m *store.Message) error {
		if f.Match(m, now) {
			ids = append(ids, m.ID)
		}
		return nil
	})
	return ids, err
}

// Stats are the figures of `maddy spool stats`, in the spirit of Postfix's
// qshape: counts by state, the oldest message, and where mail is stuck.
type Stats struct {
	Instance   string `json:"instance"`
	Messages   int    `json:"messages"`
	Recipients int    `json:"recipients_pending"`
	Bytes      int64  `json:"bytes"`
	// By state: Held messages are never attempted; New ones have not been
	// attempted yet; Deferred ones failed temporarily at least once.
	Held     int `json:"held"`
	New      int `json:"new"`
	Deferred int `json:"deferred"`
	InFlight int `json:"in_flight,omitempty"`

	OldestArrival time.Time `json:"oldest_arrival,omitzero"`
	OldestAge     float64   `json:"oldest_age_seconds"`

	// AgeBuckets are the upper bounds of the age columns of TopDomains'
	// Ages (the last column counts everything older).
	AgeBuckets []string `json:"age_buckets"`
	// TopDomains are the destination domains with the most pending
	// recipients; TopErrors the most frequent last errors.
	TopDomains []Count `json:"top_domains"`
	TopErrors  []Count `json:"top_errors"`
	// Suspended lists the destinations this node has suspended as dead
	// (live server only; each node of a cluster suspends on its own).
	Suspended []Suspended `json:"suspended,omitempty"`
}

// Suspended is a destination suspended as dead: none of its messages is
// attempted until its next probe succeeds.
type Suspended struct {
	Destination string    `json:"destination"`
	Since       time.Time `json:"since"`
	// NextProbe is when the next probe is sent; zero while one is in
	// flight.
	NextProbe time.Time `json:"next_probe,omitzero"`
	Reason    string    `json:"reason,omitempty"`
}

// Count is one row of a top list.
type Count struct {
	Key        string `json:"key"`
	Recipients int    `json:"recipients"`
	// Ages counts the recipients by message age, one column per
	// Stats.AgeBuckets entry plus one for older.
	Ages []int `json:"ages,omitempty"`
}

// statsAges are qshape's default columns: doubling from 5 minutes.
var statsAges = []time.Duration{5 * time.Minute, 10 * time.Minute, 20 * time.Minute, 40 * time.Minute,
	80 * time.Minute, 160 * time.Minute, 320 * time.Minute, 640 * time.Minute, 1280 * time.Minute}

// TopN is how many rows the top lists keep.
const TopN = 10

// ComputeStats reads every message's metadata (never content) and
// summarises the queue.
func ComputeStats(r Reader, instance string, now time.Time) (Stats, error) {
	s := Stats{Instance: instance}
	for _, a := range statsAges {
		s.AgeBuckets = append(s.AgeBuckets, strconv.Itoa(int(a.Minutes()))+"m")
	}
	domains := map[string]*Count{}
	errs := map[string]*Count{}
	err := r.Walk(func(m *store.Message) error {
		s.Messages++
		s.Bytes += m.Size()
		switch {
		case m.Held:
			s.Held++
		case m.Attempts == 0:
			s.New++
		default:
			s.Deferred++
		}
		if m.Lease != nil && !m.Lease.Receiving {
			s.InFlight++
		}
		if s.OldestArrival.IsZero() || m.Arrival.Before(s.OldestArrival) {
			s.OldestArrival = m.Arrival
		}
		col := ageColumn(now.Sub(m.Arrival))
		for i := range m.Rcpts {
			rc := &m.Rcpts[i]
			if rc.State != store.RcptPending {
				continue
			}
			s.Recipients++
			d := Domain(rc.Addr)
			c := domains[d]
			if c == nil {
				c = &Count{Key: d, Ages: make([]int, len(statsAges)+1)}
				domains[d] = c
			}
			c.Recipients++
			c.Ages[col]++
			if rc.LastError != nil {
				k := errorKey(*rc.LastError)
				e := errs[k]
				if e == nil {
					e = &Count{Key: k}
					errs[k] = e
				}
				e.Recipients++
			}
		}
		return nil
	})
	if !s.OldestArrival.IsZero() {
		s.OldestAge = now.Sub(s.OldestArrival).Seconds()
	}
	s.TopDomains = top(domains)
	s.TopErrors = top(errs)
	return s, err
}

func ageColumn(age time.Duration) int {
	for i, a := range statsAges {
		if age < a {
			return i
		}
	}
	return len(statsAges)
}

// errorKey groups errors that differ only in details such as queue IDs
// in the text, by keeping the status codes and the start of the text.
func errorKey(st store.SMTPStatus) string {
	s := attempt.FormatStatus(st)
	if len(s) > 80 {
		s = s[:80] + "..."
	}
	return s
}

func top(m map[string]*Count) []Count {
	out := make([]Count, 0, len(m))
	for _, c := range m {
		out = append(out, *c)
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Recipients != out[j].Recipients {
			return out[i].Recipients > out[j].Recipients
		}
		return out[i].Key < out[j].Key
	})
	if len(out) > TopN {
		out = out[:TopN]
	}
	return out
}
