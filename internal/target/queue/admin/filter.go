package admin

import (
	"fmt"
	"strings"
	"time"

	"github.com/maddy-spool/spool/internal/target/queue/store"
)

// Filter selects queued messages. Every set field must match (AND); an
// empty Filter matches every message.
type Filter struct {
	// IDs, when not empty, limits the selection to these messages.
	IDs []store.ID `json:"ids,omitempty"`
	// From matches the envelope sender: a full address (case-insensitive)
	// or "@domain" for any sender in that domain.
	From string `json:"from,omitempty"`
	// To matches if any recipient still pending has this address or is
	// in this "@domain".
	To string `json:"to,omitempty"`
	// OlderThan matches messages that arrived longer ago than this.
	OlderThan time.Duration `json:"older_than,omitempty"`
	// Held, when set, matches only held (true) or only not held (false)
	// messages.
	Held *bool `json:"held,omitempty"`
}

// Validate reports a filter that cannot match anything sensible.
func (f Filter) Validate() error {
	for _, a := range []struct{ name, v string }{{"from", f.From}, {"to", f.To}} {
		if a.v == "" {
			continue
		}
		if strings.ContainsAny(a.v, " \t\r\n<>") {
			return fmt.Errorf("--%s %q: want an address or @domain", a.name, a.v)
		}
		if a.v == "@" {
			return fmt.Errorf("--%s %q: domain missing after @", a.name, a.v)
		}
	}
	if f.OlderThan < 0 {
		return fmt.Errorf("--older-than must not be negative")
	}
	return nil
}

// Explicit reports whether the filter names its messages by ID. Bulk
// changes without explicit IDs need the operator's confirmation.
func (f Filter) Explicit() bool { return len(f.IDs) > 0 }

// Empty reports whether the filter matches every message.
func (f Filter) Empty() bool {
	return len(f.IDs) == 0 && f.From == "" && f.To == "" && f.OlderThan == 0 && f.Held == nil
}

// Match reports whether m is selected at time now.
func (f Filter) Match(m *store.Message, now time.Time) bool {
	if len(f.IDs) > 0 && !containsID(f.IDs, m.ID) {
		return false
	}
	if f.Held != nil && m.Held != *f.Held {
		return false
	}
	if f.OlderThan > 0 && now.Sub(m.Arrival) <= f.OlderThan {
		return false
	}
	if f.From != "" && !addrMatches(f.From, m.From) {
		return false
	}
	if f.To != "" {
		found := false
		for i := range m.Rcpts {
			r := &m.Rcpts[i]
			if r.State == store.RcptPending && addrMatches(f.To, r.Addr) {
				found = true
				break
			}
		}
		if !found {
			return false
		}
	}
	return true
}

func containsID(ids []store.ID, id store.ID) bool {
	for _, x := range ids {
		if x == id {
			return true
		}
	}
	return false
}

// addrMatches compares an address with a pattern: an address, or "@domain"
// for every address in the domain. Comparison ignores case, as operators
// expect of domains and as nearly every server treats local parts.
func addrMatches(pattern, addr string) bool {
	if strings.HasPrefix(pattern, "@") {
		at := strings.LastIndexByte(addr, '@')
		return at >= 0 && strings.EqualFold(addr[at:], pattern)
	}
	return strings.EqualFold(pattern, addr)
}

// Domain returns the domain part of an address, lower-cased ("" if none).
func Domain(addr string) string {
	at := strings.LastIndexByte(addr, '@')
	if at < 0 {
		return ""
	}
	return strings.ToLower(addr[at+1:])
}
