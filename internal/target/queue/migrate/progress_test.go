package migrate

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestImportReportsProgress: Import says how far it is after every entry,
// first while reading the metadata, then while moving the entries, and
// the result says how long the whole run took.
func TestImportReportsProgress(t *testing.T) {
	fx := maddyFixture(t)
	src := copyFixture(t, fx.queue)
	// A damaged entry is read (and fails) but is not imported.
	if err := os.WriteFile(filepath.Join(src, "0badbad0.meta"), []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	s := openStore(t, t.TempDir())
	base := time.Date(2026, 12, 1, 10, 0, 0, 0, time.UTC)
	clock := base
	var got []Progress
	res, err := Import(context.Background(), src, s, Options{
		// Every look at the clock is a second later.
		Now:      func() time.Time { clock = clock.Add(time.Second); return clock },
		Progress: func(p Progress) { got = append(got, p) },
	})
	if err != nil {
		t.Fatal(err)
	}
	want := []Progress{
		{PhaseReading, 1, 3}, {PhaseReading, 2, 3}, {PhaseReading, 3, 3},
		{PhaseImporting, 1, 2}, {PhaseImporting, 2, 2},
	}
	if len(got) != len(want) {
		t.Fatalf("progress %+v, want %+v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("progress %+v, want %+v", got, want)
		}
	}
	if len(res.Imported) != 2 || len(res.Failed) != 1 {
		t.Fatalf("result %+v", res)
	}
	// From the first look at the clock (the start) to the last (the end).
	if want := clock.Sub(base.Add(time.Second)); res.Elapsed != want || want < 2*time.Second {
		t.Errorf("elapsed %v, want %v: the run's length by the injected clock", res.Elapsed, want)
	}
	var out bytes.Buffer
	if err := res.Write(&out); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	summary := lines[len(lines)-1]
	if wantSum := "2 imported, 0 skipped, 1 not imported, 0 stray file(s) in " + res.Elapsed.String(); summary != wantSum {
		t.Errorf("summary %q, want %q", summary, wantSum)
	}
}
