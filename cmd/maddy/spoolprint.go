package main

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"
	"unicode"

	"github.com/maddy-spool/spool/internal/target/queue/admin"
)

const timeLayout = "2006-01-02 15:04:05"

// clean makes text from the queue (addresses, remote error messages) safe
// for a terminal: control characters, which could move the cursor or hide
// text, are shown as '?', and very long texts are cut.
func clean(s string, max int) string {
	var b strings.Builder
	n := 0
	for _, r := range s {
		if n == max {
			b.WriteString("...")
			break
		}
		if unicode.IsControl(r) || r == unicode.ReplacementChar {
			r = '?'
		}
		b.WriteRune(r)
		n++
	}
	return b.String()
}

func when(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.UTC().Format(timeLayout)
}

// listPrinter prints list output: one JSON object per line, or a
// mailq-like table with each pending recipient and its last error under
// its message. It streams: nothing is kept but the counts.
type listPrinter struct {
	w          io.Writer
	json       *json.Encoder
	instance   string
	messages   int
	recipients int
}

func newListPrinter(w io.Writer, asJSON bool) *listPrinter {
	p := &listPrinter{w: w}
	if asJSON {
		p.json = json.NewEncoder(w)
	}
	return p
}

func (p *listPrinter) message(m admin.MessageInfo) error {
	p.messages++
	p.recipients += len(m.Pending)
	if p.json != nil {
		return p.json.Encode(m)
	}
	if p.messages == 1 || m.Instance != p.instance {
		if p.messages > 1 {
			fmt.Fprintln(p.w)
		}
		fmt.Fprintf(p.w, "== %s\n%-16s  %9s  %-19s  %-19s  %-5s  %s\n", clean(m.Instance, 200),
			"ID", "SIZE", "ARRIVED (UTC)", "NEXT ATTEMPT (UTC)", "RCPTS", "FROM")
		p.instance = m.Instance
	}
	next := when(m.NextAttempt)
	switch {
	case m.Held:
		next = "held"
	case m.Receiving:
		next = "being received"
	case m.InFlight:
		next = "attempting: " + clean(m.LeaseOwner, 7)
	}
	from := m.From
	if from == "" {
		from = "<>"
	}
	_, err := fmt.Fprintf(p.w, "%-16s  %9d  %-19s  %-19s  %-5s  %s\n", m.ID, m.Size, when(m.Arrival), next,
		fmt.Sprintf("%d/%d", len(m.Pending), m.Rcpts), clean(from, 200))
	for _, r := range m.Pending {
		line := "    " + clean(r.Addr, 200)
		if r.Tries > 0 {
			line += fmt.Sprintf("  (%d tries)", r.Tries)
		}
		if r.LastError != "" {
			line += "  " + clean(r.LastError, 160)
		}
		fmt.Fprintln(p.w, line)
	}
	return err
}

func (p *listPrinter) finish() error {
	if p.json != nil {
		return nil
	}
	if p.messages == 0 {
		_, err := fmt.Fprintln(p.w, "no messages queued")
		return err
	}
	_, err := fmt.Fprintf(p.w, "-- %s, %s pending\n", plural(p.messages, "message"), plural(p.recipients, "recipient"))
	return err
}

// plural says "1 message" or "2 messages".
func plural(n int, noun string) string {
	if n == 1 {
		return "1 " + noun
	}
	return fmt.Sprintf("%d %ss", n, noun)
}

func printDetail(w io.Writer, d *admin.Detail) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	row := func(k, v string) { fmt.Fprintf(tw, "%s:\t%s\n", k, v) }
	from := d.From
	if from == "" {
		from = "<>"
	}
	state := "queued, next attempt " + when(d.NextAttempt)
	switch {
	case d.Held:
		state = "held (not attempted until released)"
	case d.Receiving:
		state = "being received (not committed yet)"
	case d.InFlight:
		state = "being attempted now by " + clean(d.LeaseOwner, 200) + ", lease until " + when(d.LeaseExpiry)
	}
	row("Message", d.ID+" (instance "+clean(d.Instance, 200)+")")
	row("State", state)
	row("maddy message ID", clean(d.MsgID, 200))
	row("From", clean(from, 500))
	row("Size", fmt.Sprintf("%d bytes", d.Size))
	row("Arrived", when(d.Arrival))
	if d.Destination != "" {
		row("Destination", clean(d.Destination, 300))
	}
	row("Attempts", fmt.Sprintf("%d (first %s, last %s)", d.Attempts, when(d.FirstAttempt), when(d.LastAttempt)))
	var opts []string
	for _, o := range []struct{ k, v string }{{"ENVID", d.EnvelopeID}, {"RET", d.Return}, {"BODY", d.BodyType}} {
		if o.v != "" {
			opts = append(opts, o.k+"="+clean(o.v, 200))
		}
	}
	if d.SMTPUTF8 {
		opts = append(opts, "SMTPUTF8")
	}
	if d.RequireTLS {
		opts = append(opts, "REQUIRETLS")
	}
	if len(opts) > 0 {
		row("MAIL FROM options", strings.Join(opts, " "))
	}
	if d.Proto != "" || d.RemoteAddr != "" {
		via := clean(d.Proto, 50) + " from " + clean(d.RemoteAddr, 100)
		if d.Helo != "" {
			via += " (HELO " + clean(d.Helo, 200) + ")"
		}
		if d.AuthUser != "" {
			via += ", authenticated as " + clean(d.AuthUser, 200)
		}
		row("Received via", via)
	}
	tw.Flush()
	fmt.Fprintln(w, "\nRecipients:")
	for _, r := range d.All {
		line := fmt.Sprintf("  %s  %s, %d tries", clean(r.Addr, 500), r.State, r.Tries)
		if !r.LastAttempt.IsZero() {
			line += ", last " + when(r.LastAttempt)
		}
		if len(r.Notify) > 0 {
			line += ", NOTIFY=" + clean(strings.Join(r.Notify, ","), 100)
		}
		if r.ORCPT != "" {
			line += ", ORCPT=" + clean(r.ORCPT, 500)
		}
		if r.Via != "" {
			line += ", through " + clean(r.Via, 200)
		}
		fmt.Fprintln(w, line)
		if r.LastError != "" {
			fmt.Fprintln(w, "      last error: "+clean(r.LastError, 2000))
		}
		for _, a := range r.History {
			h := "      " + when(a.Time) + "  " + clean(a.Result, 500)
			if a.Via != "" {
				h += "  (through " + clean(a.Via, 200) + ")"
			}
			fmt.Fprintln(w, h)
		}
	}
	if len(d.History) > 0 {
		fmt.Fprintln(w, "\nAttempt history (latest last):")
		for _, h := range d.History {
			line := fmt.Sprintf("  %s  %.3fs  delivered %d, temporary %d, permanent %d", when(h.Time), h.Duration, h.Delivered, h.Temporary, h.Permanent)
			if h.Error != "" {
				line += "  " + clean(h.Error, 500)
			}
			fmt.Fprintln(w, line)
		}
	}
	return nil
}

func printStats(w io.Writer, s admin.Stats) error {
	fmt.Fprintf(w, "== %s\n", clean(s.Instance, 200))
	fmt.Fprintf(w, "%s (%d bytes), %s pending\n", plural(s.Messages, "message"), s.Bytes, plural(s.Recipients, "recipient"))
	fmt.Fprintf(w, "held %d, new %d, deferred %d, being attempted %d\n", s.Held, s.New, s.Deferred, s.InFlight)
	if s.Messages > 0 {
		fmt.Fprintf(w, "oldest arrived %s UTC, %s ago\n", when(s.OldestArrival), (time.Duration(s.OldestAge) * time.Second).String())
	}
	if len(s.TopDomains) > 0 {
		fmt.Fprintln(w, "\nPending recipients by destination domain and message age (minutes, like qshape):")
		tw := tabwriter.NewWriter(w, 0, 4, 1, ' ', tabwriter.AlignRight)
		fmt.Fprint(tw, "DOMAIN\tTOTAL\t")
		for _, a := range s.AgeBuckets {
			fmt.Fprintf(tw, "<%s\t", a)
		}
		fmt.Fprintln(tw, "older\t")
		for _, d := range s.TopDomains {
			fmt.Fprintf(tw, "%s\t%d\t", clean(d.Key, 100), d.Recipients)
			for _, n := range d.Ages {
				fmt.Fprintf(tw, "%d\t", n)
			}
			fmt.Fprintln(tw)
		}
		tw.Flush()
	}
	if len(s.TopErrors) > 0 {
		fmt.Fprintln(w, "\nMost frequent last errors (recipients):")
		for _, e := range s.TopErrors {
			fmt.Fprintf(w, "%8d  %s\n", e.Recipients, clean(e.Key, 200))
		}
	}
	if len(s.Suspended) > 0 {
		fmt.Fprintln(w, "\nSuspended destinations (dead; none of their mail is attempted until a probe succeeds):")
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "  DESTINATION\tSINCE (UTC)\tNEXT PROBE (UTC)\tREASON")
		for _, d := range s.Suspended {
			next := when(d.NextProbe)
			if d.NextProbe.IsZero() {
				next = "probing now"
			}
			fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\n", clean(d.Destination, 100), when(d.Since), next, clean(d.Reason, 200))
		}
		tw.Flush()
		fmt.Fprintln(w, "  (* is the whole next hop; maddy spool retry or release of a destination's mail lifts its suspension,")
		fmt.Fprintln(w, "  e.g. maddy spool retry --to @DOMAIN, or retry --all for *)")
	}
	fmt.Fprintln(w)
	return nil
}

func printResults(w io.Writer, f admin.Filter, results []admin.Result) {
	for _, r := range results {
		fmt.Fprintf(w, "%s (%s): %d matched, %d changed", r.Op, clean(r.Instance, 200), r.Matched, r.Changed)
		for _, c := range []struct {
			n    int
			what string
		}{{r.Unchanged, "unchanged"}, {r.Deferred, "deferred (attempt in flight)"}, {r.Missing, "not queued"}, {r.Failed, "failed"}} {
			if c.n > 0 {
				fmt.Fprintf(w, ", %d %s", c.n, c.what)
			}
		}
		fmt.Fprintln(w)
		for _, it := range r.Items {
			line := fmt.Sprintf("  %s  %s", it.ID, it.Outcome)
			if it.Detail != "" {
				line += ": " + clean(it.Detail, 500)
			}
			fmt.Fprintln(w, line)
		}
	}
	for _, id := range missingIDs(f, results) {
		fmt.Fprintf(w, "  %s  not queued\n", id)
	}
}
