package admin

import (
	"encoding/json"
	"fmt"
	"time"

	"github.com/maddy-spool/spool/internal/target/queue/store"
)

// Version is the protocol version this package speaks.
const Version = 1

// MaxRequestSize bounds one request line. A request is a filter and a few
// flags; anything larger is refused rather than buffered.
const MaxRequestSize = 64 << 10

// Read operations, next to the Ops that change the queue.
const (
	OpInstances = "instances"
	OpList      = "list"
	OpShow      = "show"
	OpStats     = "stats"
)

// Request is one client request.
type Request struct {
	V  int    `json:"v"`
	Op string `json:"op"`
	// Instance names the target.spool block; empty means every instance
	// for reads, and is refused for changes by ID when there are several.
	Instance string `json:"instance,omitempty"`
	Filter   Filter `json:"filter"`
	// Headers and Body ask show for the stored message.
	Headers bool `json:"headers,omitempty"`
	Body    bool `json:"body,omitempty"`
}

// Response is one line of the server's answer.
type Response struct {
	V         int          `json:"v"`
	Error     string       `json:"error,omitempty"`
	Done      bool         `json:"done,omitempty"`
	Instances []string     `json:"instances,omitempty"`
	Message   *MessageInfo `json:"message,omitempty"`
	Detail    *Detail      `json:"detail,omitempty"`
	// Content is a piece of the stored message (show --body), in order.
	Content []byte  `json:"content,omitempty"`
	Stats   *Stats  `json:"stats,omitempty"`
	Result  *Result `json:"result,omitempty"`
}

// filterJSON is Filter on the wire: IDs in their hexadecimal form and the
// age in seconds, as operators write them.
type filterJSON struct {
	IDs       []string `json:"ids,omitempty"`
	From      string   `json:"from,omitempty"`
	To        string   `json:"to,omitempty"`
	OlderThan float64  `json:"older_than_seconds,omitempty"`
	Held      *bool    `json:"held,omitempty"`
}

// MarshalJSON implements json.Marshaler.
func (f Filter) MarshalJSON() ([]byte, error) {
	w := filterJSON{From: f.From, To: f.To, OlderThan: f.OlderThan.Seconds(), Held: f.Held}
	for _, id := range f.IDs {
		w.IDs = append(w.IDs, id.String())
	}
	return json.Marshal(w)
}

// UnmarshalJSON implements json.Unmarshaler; malformed IDs are errors.
func (f *Filter) UnmarshalJSON(b []byte) error {
	var w filterJSON
	if err := json.Unmarshal(b, &w); err != nil {
		return err
	}
	if w.OlderThan < 0 || w.OlderThan > float64(100*365*24*3600) {
		return fmt.Errorf("older_than_seconds %v out of range", w.OlderThan)
	}
	*f = Filter{From: w.From, To: w.To, OlderThan: time.Duration(w.OlderThan * float64(time.Second)), Held: w.Held}
	for _, s := range w.IDs {
		id, err := store.ParseID(s)
		if err != nil {
			return err
		}
		f.IDs = append(f.IDs, id)
	}
	return nil
}

// ParseRequest decodes and checks one request line.
func ParseRequest(line []byte) (Request, error) {
	var req Request
	if err := json.Unmarshal(line, &req); err != nil {
		return Request{}, fmt.Errorf("malformed request: %v", err)
	}
	if req.V != Version {
		return Request{}, fmt.Errorf("unsupported protocol version %d (this server speaks %d)", req.V, Version)
	}
	switch req.Op {
	case OpInstances, OpList, OpShow, OpStats:
	default:
		if _, err := ParseOp(req.Op); err != nil {
			return Request{}, err
		}
	}
	if req.Op == OpShow && len(req.Filter.IDs) != 1 {
		return Request{}, fmt.Errorf("show takes exactly one message ID")
	}
	if err := req.Filter.Validate(); err != nil {
		return Request{}, err
	}
	return req, nil
}
