package bench

import (
	"bytes"
	"context"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/emersion/go-message/textproto"
	"github.com/emersion/go-smtp"
	"github.com/foxcpp/maddy/framework/buffer"
	"github.com/foxcpp/maddy/framework/module"
)

// MsgSpec is the shape of the messages a load sends.
type MsgSpec struct {
	BodySize int
	Rcpts    int
}

func (s MsgSpec) String() string {
	return fmt.Sprintf("%s, %d rcpt", SizeString(s.BodySize), s.Rcpts)
}

// SizeString prints a byte count as KiB/MiB.
func SizeString(n int) string {
	switch {
	case n >= 1<<20 && n%(1<<20) == 0:
		return fmt.Sprintf("%d MiB", n>>20)
	case n >= 1<<10 && n%(1<<10) == 0:
		return fmt.Sprintf("%d KiB", n>>10)
	}
	return fmt.Sprintf("%d B", n)
}

// Body returns a message body of n bytes: 78-character lines ending in CRLF.
func Body(n int) []byte {
	line := bytes.Repeat([]byte("0123456789abcdefghijklmnopqrstuvwxyz"), 3)[:76]
	var b bytes.Buffer
	b.Grow(n)
	for b.Len()+78 <= n {
		b.Write(line)
		b.WriteString("\r\n")
	}
	for b.Len() < n {
		b.WriteByte('x')
	}
	return b.Bytes()
}

// Rcpt is the address of the i-th recipient of benchmark messages.
func Rcpt(i int) string { return "rcpt" + strconv.Itoa(i) + "@sink.example" }

// Sender is the envelope sender of benchmark messages.
const Sender = "sender@bench.example"

// Header returns the header block of a benchmark message sent at sent.
func Header(id string, sent time.Time) textproto.Header {
	var h textproto.Header
	h.Add("From", "Bench <"+Sender+">")
	h.Add("To", Rcpt(0))
	h.Add("Subject", "spool-bench "+id)
	h.Add("Message-ID", "<"+id+"@bench.example>")
	h.Add(SentHeader, strconv.FormatInt(sent.UnixNano(), 10))
	return h
}

// Enqueue hands one message to t as maddy's SMTP endpoint does: Start,
// AddRcpt for each recipient, Body, Commit. It returns once Commit has.
func Enqueue(ctx context.Context, t module.DeliveryTarget, id string, spec MsgSpec, body []byte) error {
	sent := time.Now()
	d, err := t.Start(ctx, &module.MsgMetadata{ID: id}, Sender)
	if err != nil {
		return fmt.Errorf("Start: %w", err)
	}
	for i := 0; i < spec.Rcpts; i++ {
		if err := d.AddRcpt(ctx, Rcpt(i), smtp.RcptOptions{}); err != nil {
			d.Abort(ctx)
			return fmt.Errorf("AddRcpt: %w", err)
		}
	}
	if err := d.Body(ctx, Header(id, sent), buffer.MemoryBuffer{Slice: body}); err != nil {
		d.Abort(ctx)
		return fmt.Errorf("Body: %w", err)
	}
	if err := d.Commit(ctx); err != nil {
		return fmt.Errorf("Commit: %w", err)
	}
	return nil
}

// LoadResult is the outcome of RunLoad.
type LoadResult struct {
	// Accepted counts messages whose Commit returned nil.
	Accepted int64
	Errors   int64
	FirstErr error
	// Elapsed runs from the start until the last sender returned.
	Elapsed time.Duration
	// EnqueueLatency holds the Start→Commit time of each accepted message.
	EnqueueLatency []time.Duration
}

// Rate is accepted messages per second.
func (r LoadResult) Rate() float64 { return float64(r.Accepted) / r.Elapsed.Seconds() }

var msgSeq atomic.Int64

// RunLoad runs senders concurrent senders, each enqueueing messages back to
// back until duration has passed (or maxMsgs were started, if > 0).
func RunLoad(ctx context.Context, t module.DeliveryTarget, senders int, duration time.Duration, maxMsgs int64, spec MsgSpec) LoadResult {
	body := Body(spec.BodySize)
	var (
		res     LoadResult
		mu      sync.Mutex
		started atomic.Int64
		wg      sync.WaitGroup
	)
	start := time.Now()
	deadline := start.Add(duration)
	for s := 0; s < senders; s++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var lat []time.Duration
			var accepted, errs int64
			var firstErr error
			for time.Now().Before(deadline) {
				if maxMsgs > 0 && started.Add(1) > maxMsgs {
					break
				}
				id := "b" + strconv.FormatInt(msgSeq.Add(1), 36)
				t0 := time.Now()
				if err := Enqueue(ctx, t, id, spec, body); err != nil {
					errs++
					if firstErr == nil {
						firstErr = err
					}
					continue
				}
				lat = append(lat, time.Since(t0))
				accepted++
			}
			mu.Lock()
			res.Accepted += accepted
			res.Errors += errs
			if res.FirstErr == nil {
				res.FirstErr = firstErr
			}
			res.EnqueueLatency = append(res.EnqueueLatency, lat...)
			mu.Unlock()
		}()
	}
	wg.Wait()
	res.Elapsed = time.Since(start)
	return res
}
