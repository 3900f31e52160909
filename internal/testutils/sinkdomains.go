package testutils

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/emersion/go-smtp"
)

// DomainBehaviour is how an SMTPSink treats the recipients of one domain,
// standing in for that domain's servers: slow, down, or back. Set it with
// SMTPSink.SetDomain while the sink runs; the zero value accepts at once.
//
// A command uses the behaviour in force when the command arrives: a
// change made while a slow RCPT is being answered applies from the next
// command on.
type DomainBehaviour struct {
	// RcptDelay is how long each RCPT for the domain waits before it is
	// answered.
	RcptDelay time.Duration
	// RcptReply, if set, answers every RCPT for the domain (e.g.
	// 451 4.4.1 for a domain that is down), whatever the script says.
	// The script is still consulted, so its attempt counts go on.
	RcptReply *smtp.SMTPError
	// DataDelay is how long DATA waits, after the body was read, before
	// it is answered when the transaction has an accepted recipient of
	// the domain (the longest delay of its domains applies).
	DataDelay time.Duration
	// DataReply, if set, is the DATA reply for the domain's recipients,
	// whatever the script says: over SMTP it answers the whole
	// transaction (the first objection wins), over LMTP only those
	// recipients.
	DataReply *smtp.SMTPError
}

// DomainStats are what an SMTPSink saw of one recipient domain, counted
// over the sink's lifetime.
type DomainStats struct {
	// Rcpts counts the RCPT commands for the domain; RcptsRefused those
	// answered with an error (by the domain's RcptReply or the script).
	Rcpts        int
	RcptsRefused int
	// Transactions counts the transactions (MAIL to the end of DATA, a
	// RSET or the end of the connection) with at least one RCPT for the
	// domain, refused or not; a transaction for several domains counts
	// for each.
	Transactions int
	// Accepted counts the messages accepted with at least one recipient
	// of the domain.
	Accepted int
	// InFlight is the number of transactions of the domain going on now:
	// from the first RCPT for the domain until DATA is answered (just
	// before the reply is sent, so a client never sees its transactions
	// overlap), or until the transaction ends otherwise: a RSET, the next
	// MAIL, or the end of the connection. MaxInFlight is the most there
	// ever were at once.
	InFlight    int
	MaxInFlight int
}

// String formats the figures for test logs.
func (d DomainStats) String() string {
	return fmt.Sprintf("rcpts=%d refused=%d transactions=%d accepted=%d in_flight=%d max_in_flight=%d",
		d.Rcpts, d.RcptsRefused, d.Transactions, d.Accepted, d.InFlight, d.MaxInFlight)
}

// AddrDomain returns the lower-cased domain of an address (what follows
// its last '@'), or "" if it has none.
func AddrDomain(addr string) string {
	i := strings.LastIndexByte(addr, '@')
	if i < 0 {
		return ""
	}
	return strings.ToLower(addr[i+1:])
}

// SetDomain sets how the sink treats the recipients of domain
// (case-insensitive) from the next command on.
func (s *SMTPSink) SetDomain(domain string, b DomainBehaviour) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.domainRules[strings.ToLower(domain)] = b
}

// ClearDomain makes the sink treat domain like any other again: no delay,
// the script's replies. A domain that was down recovers.
func (s *SMTPSink) ClearDomain(domain string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.domainRules, strings.ToLower(domain))
}

// DomainStats returns what the sink saw of domain so far.
func (s *SMTPSink) DomainStats(domain string) DomainStats {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.domainStatsLocked(domain)
}

func (s *SMTPSink) domainStatsLocked(domain string) DomainStats {
	if d := s.domains[strings.ToLower(domain)]; d != nil {
		return *d
	}
	return DomainStats{}
}

// AllDomainStats returns the figures of every domain seen so far.
func (s *SMTPSink) AllDomainStats() map[string]DomainStats {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[string]DomainStats, len(s.domains))
	for k, v := range s.domains {
		out[k] = *v
	}
	return out
}

// DescribeDomains formats AllDomainStats, one domain a line, for test
// logs.
func (s *SMTPSink) DescribeDomains() string {
	all := s.AllDomainStats()
	names := make([]string, 0, len(all))
	for k := range all {
		names = append(names, k)
	}
	sort.Strings(names)
	var b strings.Builder
	for _, k := range names {
		fmt.Fprintf(&b, "  %s: %v\n", k, all[k])
	}
	return b.String()
}

// WaitDomain blocks until cond holds for domain's figures and returns
// them; cond is re-evaluated whenever the sink's state changes. On ctx
// expiry it returns the last figures with an error.
func (s *SMTPSink) WaitDomain(ctx context.Context, domain string, cond func(DomainStats) bool) (DomainStats, error) {
	err := waitUntil(ctx, &s.mu, &s.changed, func() bool { return cond(s.domainStatsLocked(domain)) })
	st := s.DomainStats(domain)
	if err != nil {
		return st, fmt.Errorf("testutils: waiting on domain %s (%v): %w", domain, st, err)
	}
	return st, nil
}

// domainStatsFor returns the counters of domain, creating them; s.mu is
// held.
func (s *SMTPSink) domainStatsFor(domain string) *DomainStats {
	d := s.domains[domain]
	if d == nil {
		d = &DomainStats{}
		s.domains[domain] = d
	}
	return d
}

// rcptArrived counts a RCPT for rcpt's domain, registers the session's
// transaction with the domain the first time (newTx), and returns the
// domain's behaviour at this moment.
func (s *SMTPSink) rcptArrived(domain string, newTx bool) DomainBehaviour {
	s.mu.Lock()
	defer s.mu.Unlock()
	d := s.domainStatsFor(domain)
	d.Rcpts++
	if newTx {
		d.Transactions++
		d.InFlight++
		d.MaxInFlight = max(d.MaxInFlight, d.InFlight)
	}
	s.changed.broadcast()
	return s.domainRules[domain]
}

// rcptRefused counts a refused RCPT of domain.
func (s *SMTPSink) rcptRefused(domain string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.domainStatsFor(domain).RcptsRefused++
	s.changed.broadcast()
}

// domainsLeft ends a transaction of each domain.
func (s *SMTPSink) domainsLeft(domains []string) {
	if len(domains) == 0 {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, dom := range domains {
		s.domainStatsFor(dom).InFlight--
	}
	s.changed.broadcast()
}

// dataBehaviour returns, for a transaction's recipients, the longest
// DataDelay of their domains and each recipient's DataReply (nil if its
// domain sets none).
func (s *SMTPSink) dataBehaviour(rcpts []string) (time.Duration, []*smtp.SMTPError) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var delay time.Duration
	replies := make([]*smtp.SMTPError, len(rcpts))
	for i, r := range rcpts {
		b := s.domainRules[AddrDomain(r)]
		delay = max(delay, b.DataDelay)
		replies[i] = b.DataReply
	}
	return delay, replies
}

// countAcceptedLocked counts an accepted message for each of its
// recipients' domains; s.mu is held.
func (s *SMTPSink) countAcceptedLocked(rcpts []string) {
	seen := make(map[string]bool, len(rcpts))
	for _, r := range rcpts {
		dom := AddrDomain(r)
		if !seen[dom] {
			seen[dom] = true
			s.domainStatsFor(dom).Accepted++
		}
	}
}

// pause waits d, or less if the sink closes meanwhile (then it returns
// the reply a closed sink gives).
func (s *SMTPSink) pause(d time.Duration) error {
	if d <= 0 {
		return nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-s.closing:
		return errSinkClosed
	}
}
