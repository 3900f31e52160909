package bench

import (
	"context"
	"math"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/maddy-spool/spool/internal/testutils/pgtest"
)

func TestMain(m *testing.M) {
	code := m.Run()
	if testPGServer != nil {
		testPGServer.Close()
	}
	os.Exit(code)
}

var (
	testPGOnce   sync.Once
	testPGServer *PGServer
	testPGErr    error
)

// testPG returns the package's PostgreSQL cluster, started on first use;
// it skips t when PostgreSQL is not installed (fails under CI).
func testPG(t *testing.T) *PGServer {
	t.Helper()
	pgtest.Require(t)
	testPGOnce.Do(func() { testPGServer, testPGErr = StartPG(nil) })
	if testPGErr != nil {
		t.Fatal(testPGErr)
	}
	return testPGServer
}

// testLoc is a fresh place for a queue of kind: a temporary directory, or
// a new database.
func testLoc(t *testing.T, kind Kind) string {
	t.Helper()
	if !kind.InDatabase() {
		return t.TempDir()
	}
	dsn, err := testPG(t).NewDatabase(t.Name())
	if err != nil {
		t.Fatal(err)
	}
	return dsn
}

func TestPercentile(t *testing.T) {
	ms := func(v ...int) []time.Duration {
		var d []time.Duration
		for _, x := range v {
			d = append(d, time.Duration(x)*time.Millisecond)
		}
		return d
	}
	tests := []struct {
		in   []time.Duration
		p    float64
		want time.Duration
	}{
		{nil, 50, 0},
		{ms(7), 99, 7 * time.Millisecond},
		{ms(5, 1, 4, 2, 3), 50, 3 * time.Millisecond},
		{ms(5, 1, 4, 2, 3), 100, 5 * time.Millisecond},
		{ms(1, 2, 3, 4, 5, 6, 7, 8, 9, 10), 90, 9 * time.Millisecond},
		{ms(1, 2, 3, 4, 5, 6, 7, 8, 9, 10), 0, 1 * time.Millisecond},
	}
	for _, tc := range tests {
		if got := Percentile(tc.in, tc.p); got != tc.want {
			t.Errorf("Percentile(%v, %v) = %v, want %v", tc.in, tc.p, got, tc.want)
		}
	}
}

func TestMedian(t *testing.T) {
	tests := []struct {
		in   []float64
		want float64
	}{
		{[]float64{3}, 3},
		{[]float64{4, 1}, 2.5},
		{[]float64{9, 1, 5}, 5},
	}
	for _, tc := range tests {
		if got := Median(tc.in); got != tc.want {
			t.Errorf("Median(%v) = %v, want %v", tc.in, got, tc.want)
		}
	}
	if !math.IsNaN(Median(nil)) {
		t.Error("Median(nil) is not NaN")
	}
}

func TestTablePrintsRatios(t *testing.T) {
	var tb Table
	tb.Section("s")
	f := tb.Figure("rate", "msg/s")
	f.Add(Maddy, 100)
	f.Add(Maddy, 300)
	f.Add(Spool, 800)
	f.Add(SpoolPG, 400)
	only := tb.Figure("pgonly", "")
	only.Add(SpoolPG, 7)
	d := tb.Figure("disk", "ops/s")
	d.Shared = true
	d.Add(Maddy, 42)
	var out strings.Builder
	tb.Print(&out)
	rows := map[string][]string{}
	for _, l := range strings.Split(out.String(), "\n") {
		if fields := strings.Fields(l); len(fields) > 0 {
			rows[fields[0]] = fields
		}
	}
	// name, unit, maddy, spool, spool-pg, spool/maddy, pg/maddy, pg/spool, rounds...
	want := map[string][]string{
		"rate":   {"rate", "(msg/s)", "200.0", "800.0", "400.0", "4.00", "2.00", "0.50"},
		"pgonly": {"pgonly", "-", "-", "7.00", "-", "-", "-"},
		"disk":   {"disk", "(ops/s)", "42.0", "42.0", "42.0", "-", "-", "-"},
	}
	for name, w := range want {
		got := rows[name]
		if len(got) < len(w) || strings.Join(got[:len(w)], " ") != strings.Join(w, " ") {
			t.Errorf("%s row = %q, want it to start with %q", name, got, w)
		}
	}
	if h := rows["figure"]; len(h) < 7 || h[1] != "maddy" || h[3] != "spool-pg" || h[6] != "pg/spool" {
		t.Errorf("header = %q", h)
	}
}

func TestFigureNotesAppend(t *testing.T) {
	var f Figure
	f.AddNote("a %d", 1)
	f.AddNote("b")
	if f.Note != "a 1; b" {
		t.Errorf("note %q", f.Note)
	}
}

func TestReadCPUTimeAndMemStatus(t *testing.T) {
	if _, err := os.Stat("/proc/self/stat"); err != nil {
		t.Skip("no /proc")
	}
	// Burn a little CPU so the counters are not both zero.
	deadline := time.Now().Add(50 * time.Millisecond)
	for x := 0; time.Now().Before(deadline); x++ {
		_ = x * x
	}
	u, s, err := ReadCPUTime(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if u+s <= 0 {
		t.Errorf("CPU time %v + %v after a busy loop", u, s)
	}
	m, err := ReadMemStatus("self")
	if err != nil {
		t.Fatal(err)
	}
	if m.RSS <= 0 || m.RSSAnon <= 0 || m.HWM < m.RSS {
		t.Errorf("implausible memory status %+v", m)
	}
	if c := SelfCPU(); c <= 0 {
		t.Errorf("SelfCPU %v after a busy loop", c)
	}
	// A child that burns CPU and is waited for counts in the tree.
	before, err := TreeCPU(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if before < u+s {
		t.Errorf("TreeCPU %v < own CPU %v", before, u+s)
	}
}

// TestQueuesDeliverThroughNullTarget builds both modules through the
// registry and checks that what is enqueued reaches the null target once,
// with a latency sample each.
func TestQueuesDeliverThroughNullTarget(t *testing.T) {
	for _, kind := range Kinds {
		t.Run(string(kind), func(t *testing.T) {
			q, err := OpenQueue(kind, testLoc(t, kind), QueueOptions{MaxParallelism: 2})
			if err != nil {
				t.Fatal(err)
			}
			defer q.Close()
			body := Body(1000)
			for i := 0; i < 3; i++ {
				if err := Enqueue(context.Background(), q.Target, "t"+string(rune('a'+i)), MsgSpec{BodySize: len(body), Rcpts: 2}, body); err != nil {
					t.Fatal(err)
				}
			}
			if !q.Null.WaitDelivered(3, 30*time.Second) {
				t.Fatalf("delivered %d of 3", q.Null.Delivered())
			}
			if n := len(q.Null.Latencies()); n != 3 {
				t.Errorf("%d latency samples, want 3", n)
			}
			if m := q.Null.MaxInFlight(); m < 1 || m > 2 {
				t.Errorf("max in flight %d, want 1..2", m)
			}
		})
	}
}

// TestGeneratedBacklogLoads writes a small not-yet-due backlog in each
// format and checks that the module loads it without delivering it, then
// a due one that it delivers.
func TestGeneratedBacklogLoads(t *testing.T) {
	t.Parallel()
	for _, kind := range Kinds {
		t.Run(string(kind), func(t *testing.T) {
			dir := testLoc(t, kind)
			if _, err := Generate(kind, dir, Backlog{N: 20, BodySize: 100, Due: true}); err != nil {
				t.Fatal(err)
			}
			q, err := OpenQueue(kind, dir, QueueOptions{})
			if err != nil {
				t.Fatal(err)
			}
			defer q.Close()
			q.WaitLoaded()
			// maddy holds loaded entries back for 10 s after start.
			if !q.Null.WaitDelivered(20, 60*time.Second) {
				t.Fatalf("delivered %d of 20 generated due messages", q.Null.Delivered())
			}
		})
	}
}
