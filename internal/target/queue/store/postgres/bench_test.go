package postgres

import (
	"bytes"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/maddy-spool/spool/internal/testutils/pgtest"
)

// benchStore opens a handle on a fresh database of the shared cluster
// (fsync on), reading the real clock.
func benchStore(b *testing.B) *Store {
	b.Helper()
	s, err := Open(ctx, Options{DSN: pgtest.Database(b), Node: "bench", Logf: b.Logf})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { s.Close() })
	return s
}

// enqueue creates and, if commit, commits a 4 KiB message.
func enqueue(s *Store, commit bool) error {
	l, err := s.Create(ctx, msgAt(time.Now(), "r1@example.org", "r2@example.org"), []byte(hdr), bytes.NewReader(body4k), int64(len(body4k)))
	if err == nil && commit {
		_, err = s.Commit(ctx, l)
	}
	return err
}

// parallel calls fn on exactly n goroutines until the messages it
// reports handled reach b.N, and reports the rate.
func parallel(b *testing.B, n int, fn func() (int, error)) {
	var (
		done atomic.Int64
		wg   sync.WaitGroup
		fail atomic.Value
	)
	b.ResetTimer()
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for done.Load() < int64(b.N) {
				k, err := fn()
				if err != nil {
					fail.Store(err)
					return
				}
				done.Add(int64(k))
			}
		}()
	}
	wg.Wait()
	b.StopTimer()
	if err := fail.Load(); err != nil {
		b.Fatal(err)
	}
	b.ReportMetric(float64(done.Load())/b.Elapsed().Seconds(), "msgs/s")
}

var body4k = bytes.Repeat([]byte("0123456789abcde\n"), 256)

// BenchmarkCreate stores 4 KiB messages from concurrent senders: Create
// alone (durable when it returns), and Create then Commit (queued).
func BenchmarkCreate(b *testing.B) {
	for _, commit := range []bool{false, true} {
		for _, senders := range []int{1, 16, 64} {
			name := fmt.Sprintf("senders=%d", senders)
			if commit {
				name += "/commit"
			}
			b.Run(name, func(b *testing.B) {
				s := benchStore(b)
				parallel(b, senders, func() (int, error) { return 1, enqueue(s, commit) })
			})
		}
	}
}

// BenchmarkClaimSave claims messages ten at a time on 16 workers and
// saves each (concurrently, as deliveries end) due again at once, so the
// same queue of 2000 messages goes round.
func BenchmarkClaimSave(b *testing.B) {
	s := benchStore(b)
	var wg sync.WaitGroup
	for i := 0; i < 2000; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := enqueue(s, true); err != nil {
				b.Error(err)
			}
		}()
	}
	wg.Wait()
	parallel(b, 16, func() (int, error) {
		cs, err := s.Claim(ctx, 10, nil)
		if err != nil {
			return 0, err
		}
		errs := make(chan error, len(cs))
		for _, c := range cs {
			go func() {
				c.Message.Attempts++
				c.Message.NextAttempt = time.Now()
				_, err := s.Save(ctx, c.Lease, c.Message)
				errs <- err
			}()
		}
		for range cs {
			if err := <-errs; err != nil {
				return 0, err
			}
		}
		return len(cs), nil
	})
}

// BenchmarkStats measures Stats over a queue of 100 000 messages of 4 KiB
// (copies of one, made by SQL).
func BenchmarkStats(b *testing.B) {
	s := benchStore(b)
	err := enqueue(s, true)
	if err == nil {
		_, err = s.pool.Exec(ctx, `
			INSERT INTO spool_messages (meta, arrival, next_attempt, claimable_at, held, pending, receiving,
				lease_token, header, body, body_len)
			SELECT meta, arrival, next_attempt, claimable_at, held, pending, receiving, lease_token, header, body, body_len
			FROM spool_messages, generate_series(2, 100000)`)
	}
	if err == nil {
		_, err = s.pool.Exec(ctx, "VACUUM ANALYZE spool_messages")
	}
	if err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		st, err := s.Stats(ctx)
		if err != nil || st.Messages != 100000 {
			b.Fatal(st, err)
		}
	}
}
