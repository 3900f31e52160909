package schedule

import (
	"errors"
	"fmt"
	"time"
)

// Policy decides when a message is retried and when retrying ends.
//
// Retries are scheduled per message, not per recipient: one attempt carries
// every recipient still pending, so a message to five users of one host
// costs one SMTP transaction per attempt rather than five (Postfix behaves
// the same way). Tries are still counted per recipient, and only pending
// recipients are sent again.
type Policy struct {
	// Delays lists the wait after the 1st, 2nd, ... failed attempt; the
	// last element repeats.
	Delays []time.Duration
	// Jitter spreads each delay uniformly over ±Jitter of its length, so a
	// wave of messages deferred together does not return together.
	Jitter float64
	// MaxTries ends retrying once a recipient has been tried this often.
	MaxTries int
	// MaxAge ends retrying once a message has been queued this long.
	MaxAge time.Duration
}

// DefaultDelays follows RFC 5321 section 4.5.4.1 (a first retry after a few
// minutes, later ones at least 30 minutes apart, give up after 4-5 days)
// and Postfix's 5-minute first back-off. The cap of 8 hours makes the
// default 20 tries span the default 5 days: 5m+30m+1h+2h+4h+14×8h ≈ 4.98 d
// until the 20th try (4d20h with the queue's default delay_warning, which
// moves the 6th try to 4h), so neither limit cuts the other short.
var DefaultDelays = []time.Duration{5 * time.Minute, 30 * time.Minute, time.Hour, 2 * time.Hour, 4 * time.Hour, 8 * time.Hour}

// Default limits, as maddy's target.queue (20 tries) and RFC 5321's advice
// to give up after 4-5 days.
const (
	DefaultMaxTries = 20
	DefaultMaxAge   = 5 * 24 * time.Hour
	DefaultJitter   = 0.1
)

// DefaultPolicy returns the policy used when nothing is configured.
func DefaultPolicy() Policy {
	return Policy{Delays: DefaultDelays, Jitter: DefaultJitter, MaxTries: DefaultMaxTries, MaxAge: DefaultMaxAge}
}

// Exponential returns the delays initial, initial*factor, ... up to and
// including max; with factor 1 the delay is always initial.
func Exponential(initial time.Duration, factor float64, max time.Duration) ([]time.Duration, error) {
	if initial <= 0 || max < initial {
		return nil, fmt.Errorf("need 0 < initial (%v) <= max (%v)", initial, max)
	}
	if factor < 1 {
		return nil, fmt.Errorf("factor %v is below 1", factor)
	}
	var out []time.Duration
	for d := float64(initial); ; d *= factor {
		if d >= float64(max) || len(out) == 64 {
			return append(out, max), nil
		}
		out = append(out, time.Duration(d))
		if factor == 1 {
			return out, nil
		}
	}
}

// Validate reports a policy that cannot work.
func (p Policy) Validate() error {
	if len(p.Delays) == 0 {
		return errors.New("retry schedule is empty")
	}
	for _, d := range p.Delays {
		if d <= 0 {
			return fmt.Errorf("retry delay %v is not positive", d)
		}
	}
	if p.Jitter < 0 || p.Jitter >= 1 {
		return fmt.Errorf("jitter %v is not in [0, 1)", p.Jitter)
	}
	if p.MaxTries < 1 {
		return fmt.Errorf("max_tries %d is below 1", p.MaxTries)
	}
	if p.MaxAge <= 0 {
		return fmt.Errorf("max_age %v is not positive", p.MaxAge)
	}
	return nil
}

// Retry is what the policy says after an attempt left recipients with
// temporary failures.
type Retry struct {
	// GiveUp is true when the limits are reached: the remaining temporary
	// failures become permanent.
	GiveUp bool
	// At is the next attempt (when not giving up).
	At time.Time
}

// AfterFailure returns what follows an attempt at now that left
// temporarily failed recipients, the most tried of which has now been
// tried tries times. rnd is a uniform random number in [0, 1), injected so
// tests are deterministic.
//
// The last attempt is clamped to arrival+MaxAge, so the message gets one
// try at its deadline rather than expiring unattempted.
func (p Policy) AfterFailure(tries int, arrival, now time.Time, rnd float64) Retry {
	deadline := arrival.Add(p.MaxAge)
	if tries >= p.MaxTries || !now.Before(deadline) {
		return Retry{GiveUp: true}
	}
	next := now.Add(p.Delay(tries, rnd))
	if next.After(deadline) {
		next = deadline
	}
	return Retry{At: next}
}

// Delay returns the wait after the n-th failed attempt (n >= 1), jittered
// by rnd in [0, 1).
func (p Policy) Delay(n int, rnd float64) time.Duration {
	if n < 1 {
		n = 1
	}
	if n > len(p.Delays) {
		n = len(p.Delays)
	}
	base := float64(p.Delays[n-1])
	return time.Duration(base * (1 + p.Jitter*(2*rnd-1)))
}

// Until returns the time after which a message that arrived at arrival is
// no longer retried (the DSN's Will-Retry-Until).
func (p Policy) Until(arrival time.Time) time.Time { return arrival.Add(p.MaxAge) }
