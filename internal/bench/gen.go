package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/emersion/go-message/textproto"
	"github.com/emersion/go-smtp"
	"github.com/foxcpp/maddy/framework/module"

	"github.com/maddy-spool/spool/internal/target/queue/store"
	"github.com/maddy-spool/spool/internal/target/queue/store/embedded"
)

// Backlog describes messages a generator writes straight into a module's
// on-disk format, as if they had been accepted earlier and had failed one
// attempt.
type Backlog struct {
	N        int
	BodySize int
	// Due makes the messages due at once; otherwise they are due in a day.
	Due bool
}

// Generate writes b into loc in kind's format (for SpoolPG, loc is the
// DSN of its database) and flushes the file system (sync; for SpoolPG a
// CHECKPOINT first) so the write-back does not disturb what is measured
// next.
func Generate(kind Kind, loc string, b Backlog) (time.Duration, error) {
	start := time.Now()
	var err error
	switch kind {
	case Spool:
		err = generateSpool(loc, b)
	case SpoolPG:
		err = generatePG(loc, b)
	default:
		err = generateMaddy(loc, b)
	}
	if err != nil {
		return 0, err
	}
	syscall.Sync()
	return time.Since(start), nil
}

// backlogMessage is generated message id as Spool stores it: arrived an
// hour ago, tried once, due at next.
func backlogMessage(id string, arrival, next time.Time) (*store.Message, []byte, error) {
	var hdr bytes.Buffer
	if err := textproto.WriteHeader(&hdr, Header(id, arrival)); err != nil {
		return nil, nil, err
	}
	return &store.Message{
		MsgID:       id,
		From:        Sender,
		Arrival:     arrival,
		NextAttempt: next,
		LastAttempt: arrival,
		Attempts:    1,
		Rcpts: []store.Rcpt{{Addr: Rcpt(0), Tries: 1, LastAttempt: arrival,
			LastError: &store.SMTPStatus{Code: 451, Enhanced: [3]int{4, 0, 0}, Message: "try later", Temporary: true}}},
	}, hdr.Bytes(), nil
}

// backlogTimes are the arrival and next attempt of generated messages.
func backlogTimes(b Backlog) (arrival, next time.Time) {
	now := time.Now()
	arrival = now.Add(-time.Hour)
	next = now.Add(24 * time.Hour)
	if b.Due {
		next = now.Add(-time.Minute)
	}
	return arrival, next
}

// generateWorkers is how many goroutines write entries at once.
const generateWorkers = 256

func generateSpool(dir string, b Backlog) error {
	st, err := embedded.OpenDir(dir, embedded.DirOptions{})
	if err != nil {
		return err
	}
	genErr := generateMessages(b, func(m *store.Message, hdr, body []byte) error {
		return st.Create(context.Background(), m, hdr, bytes.NewReader(body), int64(len(body)))
	})
	if err := st.Close(); genErr == nil {
		genErr = err
	}
	return genErr
}

// generateMessages calls create for each message of b (as Spool stores
// it, with its header block and body) from generateWorkers goroutines.
func generateMessages(b Backlog, create func(m *store.Message, hdr, body []byte) error) error {
	arrival, next := backlogTimes(b)
	body := Body(b.BodySize)
	return forEach(b.N, generateWorkers, func(i int) error {
		m, hdr, err := backlogMessage("g"+strconv.Itoa(i), arrival, next)
		if err != nil {
			return err
		}
		return create(m, hdr, body)
	})
}

// maddyQueueMeta mirrors the JSON that maddy 0.8.1's target.queue keeps in
// ID.meta (its QueueMetadata type).
type maddyQueueMeta struct {
	MsgMeta              *module.MsgMetadata
	From                 string
	To                   []string
	FailedRcpts          []string
	TemporaryFailedRcpts []string
	RcptErrs             map[string]*smtp.SMTPError
	TriesCount           map[string]int
	FirstAttempt         time.Time
	LastAttempt          time.Time
}

// generateMaddy writes ID.header, ID.body and ID.meta per message, the
// files maddy's target.queue reads at start. maddy computes the next
// attempt from LastAttempt and the tries count (15 min after one try) and
// never earlier than 10 s after start.
func generateMaddy(dir string, b Backlog) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	now := time.Now()
	last := now.Add(24 * time.Hour)
	if b.Due {
		last = now.Add(-time.Hour)
	}
	body := Body(b.BodySize)
	return forEach(b.N, 16, func(i int) error {
		return writeMaddyEntry(dir, "g"+strconv.Itoa(i), body, now.Add(-time.Hour), last)
	})
}

func writeMaddyEntry(dir, id string, body []byte, first, last time.Time) error {
	var hdr bytes.Buffer
	if err := textproto.WriteHeader(&hdr, Header(id, first)); err != nil {
		return err
	}
	meta, err := json.Marshal(maddyQueueMeta{
		MsgMeta:      &module.MsgMetadata{ID: id},
		From:         Sender,
		To:           []string{Rcpt(0)},
		RcptErrs:     map[string]*smtp.SMTPError{Rcpt(0): {Code: 451, EnhancedCode: smtp.EnhancedCode{4, 0, 0}, Message: "try later"}},
		TriesCount:   map[string]int{Rcpt(0): 1},
		FirstAttempt: first,
		LastAttempt:  last,
	})
	if err != nil {
		return err
	}
	for _, f := range []struct {
		ext  string
		data []byte
	}{{".header", hdr.Bytes()}, {".body", body}, {".meta", append(meta, '\n')}} {
		if err := os.WriteFile(filepath.Join(dir, id+f.ext), f.data, 0o644); err != nil {
			return fmt.Errorf("generate maddy queue: %w", err)
		}
	}
	return nil
}

// forEach calls fn for 0..n-1 from the given number of goroutines and
// returns the first error; after an error no new calls start.
func forEach(n, workers int, fn func(i int) error) error {
	work := make(chan int)
	errs := make(chan error, workers)
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range work {
				if err := fn(i); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	var err error
feed:
	for i := 0; i < n; i++ {
		select {
		case work <- i:
		case err = <-errs:
			break feed
		}
	}
	close(work)
	wg.Wait()
	if err == nil {
		select {
		case err = <-errs:
		default:
		}
	}
	return err
}
