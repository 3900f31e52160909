package main

import (
	"strings"
	"testing"
	"time"
)

func TestProgressLine(t *testing.T) {
	for _, tc := range []struct {
		phase       string
		done, total int
		elapsed     time.Duration
		want        string
	}{
		{"importing", 0, 100000, 0, "importing 0/100000 (0%)"},
		// Too early for a rate that means anything.
		{"importing", 10, 100000, 100 * time.Millisecond, "importing 10/100000 (0%)"},
		{"importing", 25000, 100000, 10 * time.Second, "importing 25000/100000 (25%), 2500/s, about 30s left"},
		{"reading", 99999, 100000, 40 * time.Second, "reading 99999/100000 (99%), 2500/s, about 1s left"},
		{"importing", 100000, 100000, 50 * time.Second, "importing 100000/100000 (100%), 2000/s"},
		{"importing", 3, 7, 90 * time.Minute, "importing 3/7 (42%), 0.0/s, about 2h0m0s left"},
		{"reading", 0, 0, time.Second, "reading 0/0"},
	} {
		if got := progressLine(tc.phase, tc.done, tc.total, tc.elapsed); got != tc.want {
			t.Errorf("progressLine(%q, %d, %d, %v) = %q, want %q", tc.phase, tc.done, tc.total, tc.elapsed, got, tc.want)
		}
	}
}

// TestProgressMeter: the line is redrawn in place (carriage return, no
// newline), at most every progressInterval except for a phase's first and
// last update, blanks what a longer earlier line left, and is erased at
// the end.
func TestProgressMeter(t *testing.T) {
	var out strings.Builder
	now := time.Date(2026, 12, 1, 10, 0, 0, 0, time.UTC)
	m := newProgressMeter(&out, func() time.Time { return now })
	step := func(d time.Duration, phase string, done, total int) string {
		now = now.Add(d)
		before := out.Len()
		m.update(phase, done, total)
		return out.String()[before:]
	}
	if got := step(0, "reading", 1, 1000); got != "\rreading 1/1000 (0%)" {
		t.Fatalf("first update drew %q", got)
	}
	if got := step(progressInterval/2, "reading", 2, 1000); got != "" {
		t.Fatalf("an update within the interval drew %q", got)
	}
	if got := step(progressInterval/2, "reading", 3, 1000); got != "\rreading 3/1000 (0%)" {
		t.Fatalf("an update after the interval drew %q", got)
	}
	if got := step(time.Millisecond, "reading", 1000, 1000); !strings.HasPrefix(got, "\rreading 1000/1000 (100%)") {
		t.Fatalf("the phase's last update drew %q", got)
	}
	// A new phase starts its own clock; the shorter line blanks the rest
	// of the longer one.
	prev := "reading 1000/1000 (100%)"
	if got := step(time.Millisecond, "importing", 1, 9); got != "\r"+"importing 1/9 (11%)"+strings.Repeat(" ", len(prev)-len("importing 1/9 (11%)")) {
		t.Fatalf("the next phase drew %q", got)
	}
	before := out.Len()
	m.done()
	if got := out.String()[before:]; got != "\r"+strings.Repeat(" ", len("importing 1/9 (11%)"))+"\r" {
		t.Fatalf("done wrote %q, want the line erased", got)
	}
	if strings.Contains(out.String(), "\n") {
		t.Fatalf("the meter wrote a newline: %q", out.String())
	}
}
