package embedded

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/maddy-spool/spool/internal/target/queue/store"
	"github.com/maddy-spool/spool/internal/target/queue/store/storetest"
)

// TestLoadCoversOnlyMessagesStoredBefore: the start-up load covers the
// messages stored before Open, and only those. A message committed while
// it runs is counted once, and one stored but not committed (its session
// may still abort) is neither claimable nor counted.
func TestLoadCoversOnlyMessagesStoredBefore(t *testing.T) {
	ctx := context.Background()
	dir, clock := t.TempDir(), storetest.NewClock()
	open := func(beforeLoad func()) *Store {
		s, err := Open(dir, Options{Node: "a", Now: clock.Now, beforeLoad: beforeLoad})
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	create := func(s *Store, addr string) *store.Lease {
		m := &store.Message{From: "s@x.test", Arrival: clock.Now(), NextAttempt: clock.Now(), Rcpts: []store.Rcpt{{Addr: addr}}}
		l, err := s.Create(ctx, m, nil, strings.NewReader("body"), 4)
		if err != nil {
			t.Fatal(err)
		}
		return l
	}
	s := open(nil)
	old := create(s, "old@x.test")
	if _, err := s.Commit(ctx, old); err != nil {
		t.Fatal(err)
	}
	s.Close()

	loading, resume := make(chan struct{}), make(chan struct{})
	s = open(func() { close(loading); <-resume })
	defer s.Close()
	<-loading
	committed := create(s, "new@x.test")
	if _, err := s.Commit(ctx, committed); err != nil {
		t.Fatal(err)
	}
	receiving := create(s, "receiving@x.test")
	close(resume)
	s.WaitLoaded()

	if st, _ := s.Stats(ctx); st.Messages != 2 || st.Recipients != 2 {
		t.Fatalf("Stats = %+v; want old and new, nothing twice, not the one being received", st)
	}
	clock.Advance(time.Second)
	cs, err := s.Claim(ctx, 10, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(cs) != 2 || cs[0].Message.ID != old.ID || cs[1].Message.ID != committed.ID {
		t.Fatalf("claimed %d messages; want old and new only", len(cs))
	}
	if err := s.Delete(ctx, receiving); err != nil {
		t.Fatal(err)
	}
}
