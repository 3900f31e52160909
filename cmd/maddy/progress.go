package main

import (
	"fmt"
	"io"
	"math"
	"strings"
	"time"
)

// progressInterval is the least time between two redraws of a progress
// line (a phase's first and last update are always drawn).
const progressInterval = 250 * time.Millisecond

// progressMeter shows how far a long command is on one terminal line,
// redrawn in place: "importing 25000/100000 (25%), 2500/s, about 30s
// left". It is only for terminals; its output is meaningless in a file.
type progressMeter struct {
	w     io.Writer
	now   func() time.Time
	phase string
	start time.Time // of the phase
	drawn time.Time // last redraw; zero before the phase's first
	width int       // of the line on screen
}

func newProgressMeter(w io.Writer, now func() time.Time) *progressMeter {
	return &progressMeter{w: w, now: now}
}

// update records that done of total items of phase are done and redraws
// the line if it is time to.
func (m *progressMeter) update(phase string, done, total int) {
	now := m.now()
	if phase != m.phase {
		m.phase, m.start, m.drawn = phase, now, time.Time{}
	}
	if !m.drawn.IsZero() && now.Sub(m.drawn) < progressInterval && done < total {
		return
	}
	m.drawn = now
	m.draw(progressLine(phase, done, total, now.Sub(m.start)))
}

// done erases the line, leaving the cursor where it began.
func (m *progressMeter) done() {
	if m.width > 0 {
		fmt.Fprintf(m.w, "\r%s\r", strings.Repeat(" ", m.width))
		m.width = 0
	}
}

func (m *progressMeter) draw(line string) {
	pad := ""
	if n := m.width - len(line); n > 0 {
		pad = strings.Repeat(" ", n)
	}
	fmt.Fprintf(m.w, "\r%s%s", line, pad)
	m.width = len(line)
}

// progressLine says how far a phase is after elapsed: done/total, the
// share done, and once a second has passed the rate and the time left at
// that rate.
func progressLine(phase string, done, total int, elapsed time.Duration) string {
	line := fmt.Sprintf("%s %d/%d", phase, done, total)
	if total <= 0 {
		return line
	}
	line += fmt.Sprintf(" (%d%%)", done*100/total)
	if elapsed < time.Second || done <= 0 {
		return line
	}
	rate := float64(done) / elapsed.Seconds()
	if rate >= 10 {
		line += fmt.Sprintf(", %.0f/s", rate)
	} else {
		line += fmt.Sprintf(", %.1f/s", rate)
	}
	if done < total {
		left := time.Duration(math.Ceil(float64(total-done)/rate)) * time.Second
		line += fmt.Sprintf(", about %v left", left)
	}
	return line
}
