package bench

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/maddy-spool/spool/internal/target/queue/store"
	"github.com/maddy-spool/spool/internal/target/queue/store/postgres"
	"github.com/maddy-spool/spool/internal/testutils"
)

// TakeoverConfig describes one takeover measurement: Nodes maddy
// processes share a SpoolPG queue; node n1's next hop accepts each
// message's data and never answers, so n1's attempts stay in flight, their
// leases renewed, while the other nodes deliver the rest. Then n1 is
// killed (SIGKILL) and the others must take its messages over once their
// leases expire.
type TakeoverConfig struct {
	Bin string
	// Dir holds the nodes' state directories.
	Dir string
	// DSN is the queue's database.
	DSN string
	// Nodes is the number of nodes, at least 2; n1 is killed.
	Nodes int
	// Lease is the store's lease.
	Lease time.Duration
	// Messages are sent through the nodes other than n1.
	Messages int
	// Timeout bounds each wait (the last one: Lease plus Timeout).
	Timeout time.Duration
}

// TakeoverResult is what one takeover measurement saw.
type TakeoverResult struct {
	// Held is the number of messages whose leases n1 held when it was
	// killed (its attempts in flight).
	Held int
	// LeaseLeft is the time from the kill until the last of those leases
	// expired, as stored (n1 renews them every third of a lease, so this
	// is between two thirds of a lease and a whole one).
	LeaseLeft time.Duration
	// Took is the time from the kill until the other nodes had delivered
	// every message n1 held.
	Took time.Duration
	// Duplicates counts messages the sink received more than once.
	Duplicates int
}

// KilledNode is the node RunTakeover kills.
const KilledNode = "n1"

// RunTakeover runs one takeover measurement (see TakeoverConfig).
func RunTakeover(c TakeoverConfig) (TakeoverResult, error) {
	var res TakeoverResult
	if c.Nodes < 2 {
		return res, errors.New("bench: a takeover needs at least 2 nodes")
	}
	release := make(chan struct{})
	var stalled atomic.Int64
	stall, err := testutils.StartSMTPSink(testutils.WithoutRecording(), testutils.WithOnMessage(func(*testutils.Message) error {
		stalled.Add(1)
		<-release
		return errors.New("stalled next hop")
	}))
	if err != nil {
		return res, err
	}
	defer stall.Close()
	defer close(release) // before stall.Close, which waits for the hooks
	sink, err := testutils.StartSMTPSink(testutils.WithoutRecording())
	if err != nil {
		return res, err
	}
	defer sink.Close()

	e := E2EConfig{Bin: c.Bin, Kind: SpoolPG, Dir: c.Dir, DSN: c.DSN, Nodes: c.Nodes, Lease: c.Lease, Timeout: c.Timeout}
	servers, stop, err := startNodes(e, func(i int) int {
		if i == 0 {
			return stall.Port()
		}
		return sink.Port()
	})
	if err != nil {
		return res, err
	}
	defer stop()
	var addrs []string
	for _, s := range servers[1:] {
		addrs = append(addrs, s.addr)
	}
	if _, err := sendSMTP(addrs, 8, c.Messages, 4096); err != nil {
		return res, err
	}
	// Every message is either delivered by another node or stuck in an
	// attempt of n1's.
	deadline := time.Now().Add(c.Timeout)
	for sink.Accepted()+int(stalled.Load()) < c.Messages {
		if time.Now().After(deadline) {
			return res, fmt.Errorf("bench: takeover: %d delivered and %d in n1's attempts of %d within %v",
				sink.Accepted(), stalled.Load(), c.Messages, c.Timeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
	held, expiry, err := leasesOf(c.DSN, KilledNode)
	if err != nil {
		return res, err
	}
	if held == 0 {
		return res, fmt.Errorf("bench: takeover: node %s held no leases (%d messages stalled)", KilledNode, stalled.Load())
	}
	res.Held = held
	killed := time.Now()
	servers[0].kill()
	res.LeaseLeft = expiry.Sub(killed)
	deadline = time.Now().Add(c.Lease + c.Timeout)
	for sink.Accepted() < c.Messages && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	res.Took = time.Since(killed)
	res.Duplicates = len(sink.Duplicates())
	if n := sink.Accepted(); n < c.Messages {
		return res, fmt.Errorf("bench: takeover: only %d of %d delivered %v after the kill", n, c.Messages, res.Took.Round(time.Millisecond))
	}
	return res, nil
}

// leasesOf counts the messages leased to node and returns the latest of
// their lease expiries, read through the store's own API (Walk) with a
// handle of an observer node.
func leasesOf(dsn, node string) (int, time.Time, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	st, err := postgres.Open(ctx, postgres.Options{DSN: dsn, Node: "bench-observer", Logf: func(string, ...any) {}})
	if err != nil {
		return 0, time.Time{}, err
	}
	defer st.Close()
	var (
		n      int
		latest time.Time
	)
	err = st.Walk(ctx, func(m *store.Message) error {
		if m.Lease != nil && m.Lease.Owner == node {
			n++
			if m.Lease.Expiry.After(latest) {
				latest = m.Lease.Expiry
			}
		}
		return nil
	})
	return n, latest, err
}
