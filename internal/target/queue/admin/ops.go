package admin

import (
	"context"
	"fmt"
	"time"

	"github.com/maddy-spool/spool/internal/target/queue/store"
)

// Op is an operation that changes the queue.
type Op string

const (
	// OpHold keeps messages from being attempted (and from expiring)
	// until released.
	OpHold Op = "hold"
	// OpRelease makes held messages due now.
	OpRelease Op = "release"
	// OpRetry makes messages that are not held due now.
	OpRetry Op = "retry"
	// OpDelete removes messages without telling their senders.
	OpDelete Op = "delete"
	// OpBounce fails the pending recipients now, with a DSN to the
	// sender as NOTIFY asks.
	OpBounce Op = "bounce"
)

// Ops lists every Op, in the order the CLI documents them.
var Ops = []Op{OpRetry, OpHold, OpRelease, OpDelete, OpBounce}

// ParseOp checks that s names an Op.
func ParseOp(s string) (Op, error) {
	for _, op := range Ops {
		if string(op) == s {
			return op, nil
		}
	}
	return "", fmt.Errorf("unknown operation %q", s)
}

// Outcome says what an operation did to one message.
type Outcome string

const (
	// Changed: the message is now in the asked state.
	Changed Outcome = "changed"
	// Unchanged: it already was, or the operation does not apply (retry
	// of a held message).
	Unchanged Outcome = "unchanged"
	// Deferred: an attempt was in flight; the operation is applied when
	// it ends (Item.Detail says what became of the message if the wait
	// ended in time).
	Deferred Outcome = "deferred"
	// NotFound: no such message (delivered or removed meanwhile).
	NotFound Outcome = "not_found"
	// Receiving: the message is still being received and cannot be
	// changed yet.
	Receiving Outcome = "receiving"
	// Failed: the change could not be saved (see Item.Detail).
	Failed Outcome = "failed"
)

// Item is what happened to one message.
type Item struct {
	ID      string  `json:"id"`
	Outcome Outcome `json:"outcome"`
	Detail  string  `json:"detail,omitempty"`
}

// Result is what an operation did. Counts are of messages.
type Result struct {
	Instance string `json:"instance"`
	Op       Op     `json:"op"`
	// Matched messages were selected by the filter.
	Matched int `json:"matched"`
	// Changed, Unchanged, Deferred, Missing and Failed add up to Matched.
	Changed   int `json:"changed"`
	Unchanged int `json:"unchanged"`
	Deferred  int `json:"deferred"`
	Missing   int `json:"missing"`
	Failed    int `json:"failed"`
	// Items lists every message whose outcome is not Changed (at most
	// MaxItems), and every message when the filter named explicit IDs.
	Items []Item `json:"items,omitempty"`
}

// MaxItems bounds Result.Items so a bulk operation over a huge queue
// answers with a bounded response.
const MaxItems = 1000

// Add records one message's outcome.
func (r *Result) Add(id store.ID, o Outcome, detail string, explicit bool) {
	r.Matched++
	switch o {
	case Changed:
		r.Changed++
	case Unchanged:
		r.Unchanged++
	case Deferred:
		r.Deferred++
	case NotFound, Receiving:
		r.Missing++
	case Failed:
		r.Failed++
	}
	if (o != Changed || explicit) && len(r.Items) < MaxItems {
		r.Items = append(r.Items, Item{ID: id.String(), Outcome: o, Detail: detail})
	}
}

// Queue is a live target.spool instance as the control socket sees it.
type Queue interface {
	Reader
	// Apply runs op on the messages f selects and says what it did.
	Apply(ctx context.Context, op Op, f Filter) (Result, error)
	// Now is the queue's clock.
	Now() time.Time
	// Suspended lists the destinations suspended as dead.
	Suspended() []Suspended
}
