package bench

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestPGServer checks the cluster helpers the spool-pg figures rest on:
// the generator through the store's API, the WAL flush and CPU counters,
// a cold restart and dropping a database.
func TestPGServer(t *testing.T) {
	pg := testPG(t)
	dsn, err := pg.NewDatabase("Server test/1")
	if err != nil {
		t.Fatal(err)
	}
	before, err := pg.Sample()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Generate(SpoolPG, dsn, Backlog{N: 50, BodySize: 200}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond) // the generator's backends exit and report
	after, err := pg.Sample()
	if err != nil {
		t.Fatal(err)
	}
	d := after.Sub(before)
	if d.WALSyncs <= 0 || d.CPU <= 0 {
		t.Errorf("generating 50 messages: %d WAL flushes, %v database CPU", d.WALSyncs, d.CPU)
	}
	// Group commit: 50 Creates and 50 Commits from 256 workers need far
	// fewer than 100 flushes.
	if d.WALSyncs >= 100 {
		t.Errorf("%d WAL flushes for 50 messages created and committed", d.WALSyncs)
	}
	if desc, err := pg.Describe(); err != nil || desc == "" {
		t.Errorf("Describe: %q, %v", desc, err)
	}
	if err := pg.Restart(true); err != nil {
		t.Fatal(err)
	}
	// The queue starts on the restarted server and sees the backlog as
	// not due: nothing is delivered, a new message is.
	q, err := OpenQueue(SpoolPG, dsn, QueueOptions{})
	if err != nil {
		t.Fatal(err)
	}
	body := Body(100)
	if err := Enqueue(t.Context(), q.Target, "after-restart", MsgSpec{BodySize: len(body), Rcpts: 1}, body); err != nil {
		t.Fatal(err)
	}
	if !q.Null.WaitDelivered(1, 30*time.Second) {
		t.Fatal("the new message was not delivered")
	}
	time.Sleep(100 * time.Millisecond)
	if n := q.Null.Delivered(); n != 1 {
		t.Errorf("%d delivered, want only the new message", n)
	}
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	if err := pg.DropDatabase(dsn); err != nil {
		t.Fatal(err)
	}
	if err := pg.DropDatabase(dsn); err == nil {
		t.Error("dropping a database twice succeeded")
	}
}

// TestDispatchOnSeveralNodes runs three queue instances on one database
// delivering to one null target: every due message is delivered once.
func TestDispatchOnSeveralNodes(t *testing.T) {
	dsn := testLoc(t, SpoolPG)
	const n = 120
	if _, err := Generate(SpoolPG, dsn, Backlog{N: n, BodySize: 100, Due: true}); err != nil {
		t.Fatal(err)
	}
	null := NewNullTarget("test-nodes")
	defer null.Release()
	null.TrackIDs()
	for _, node := range []string{"n1", "n2", "n3"} {
		q, err := OpenQueue(SpoolPG, dsn, QueueOptions{MaxParallelism: 4, Node: node, Null: null})
		if err != nil {
			t.Fatal(err)
		}
		defer q.Close()
	}
	if !null.WaitDelivered(n, 60*time.Second) {
		t.Fatalf("delivered %d of %d", null.Delivered(), n)
	}
	if d := null.Duplicates(); d != 0 {
		t.Errorf("%d duplicate deliveries", d)
	}
	if m := null.MaxInFlight(); m > 12 {
		t.Errorf("%d deliveries at once over 3 nodes of max_parallelism 4", m)
	}
}

// TestE2EOnSeveralNodesAndTakeover runs the real binary: one and three
// nodes on one database end to end, then a takeover of a killed node's
// messages with the shortest lease.
func TestE2EOnSeveralNodesAndTakeover(t *testing.T) {
	t.Parallel()
	pg := testPG(t)
	root, err := ModuleRoot()
	if err != nil {
		t.Fatal(err)
	}
	bin, err := BuildMaddy(root, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	dsn := testLoc(t, SpoolPG)
	if _, err := Generate(SpoolPG, dsn, Backlog{N: 30, BodySize: 100}); err != nil {
		t.Fatal(err)
	}
	for _, nodes := range []int{1, 3} {
		dir := t.TempDir()
		res, err := RunE2E(E2EConfig{Bin: bin, Kind: SpoolPG, Dir: dir, DSN: dsn, Nodes: nodes, Messages: 60,
			Clients: 6, BodySize: 1000, Timeout: time.Minute, PG: pg})
		if err != nil {
			t.Fatalf("%d nodes: %v", nodes, err)
		}
		if res.Accepted != 60 || res.Delivered != 60 || res.Duplicates != 0 {
			t.Errorf("%d nodes: accepted %d, delivered %d, %d duplicates; want 60, 60, 0", nodes, res.Accepted, res.Delivered, res.Duplicates)
		}
		if res.User+res.System <= 0 || res.DBCPU <= 0 {
			t.Errorf("%d nodes: server CPU %v, database CPU %v", nodes, res.User+res.System, res.DBCPU)
		}
		if nodes > 1 {
			if _, err := os.Stat(filepath.Join(dir, "node3", "maddy.log")); err != nil {
				t.Errorf("node 3 did not run: %v", err)
			}
		}
	}

	lease := 10 * time.Second
	res, err := RunTakeover(TakeoverConfig{Bin: bin, Dir: t.TempDir(), DSN: testLoc(t, SpoolPG), Nodes: 3,
		Lease: lease, Messages: 40, Timeout: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("takeover: %+v", res)
	if res.Held < 1 || res.Held > 16 {
		t.Errorf("the killed node held %d messages, want 1..16 (max_parallelism)", res.Held)
	}
	if res.LeaseLeft <= 0 || res.LeaseLeft > lease {
		t.Errorf("lease left at the kill %v, want within (0, %v]", res.LeaseLeft, lease)
	}
	if res.Took < res.LeaseLeft {
		t.Errorf("took over after %v, before the lease expired (%v)", res.Took, res.LeaseLeft)
	}
	if res.Duplicates != 0 {
		t.Errorf("%d duplicate deliveries", res.Duplicates)
	}
}
