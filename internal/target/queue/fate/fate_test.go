package fate

import (
	"fmt"
	"testing"
	"time"

	"github.com/maddy-spool/spool/internal/target/queue/schedule"
	"github.com/maddy-spool/spool/internal/target/queue/store"
)

var t0 = time.Date(2026, 11, 28, 12, 0, 0, 0, time.UTC)

var (
	temp = &store.SMTPStatus{Code: 451, Enhanced: [3]int{4, 4, 1}, Message: "try later", Temporary: true}
	perm = &store.SMTPStatus{Code: 550, Enhanced: [3]int{5, 1, 1}, Message: "no such user"}
)

func testRules() Rules {
	return Rules{
		Policy: schedule.Policy{
			Delays:   []time.Duration{5 * time.Minute, time.Hour},
			MaxTries: 3,
			MaxAge:   24 * time.Hour,
		},
		DelayWarning: 90 * time.Minute,
	}
}

func message(addrs ...string) *store.Message {
	m := &store.Message{Arrival: t0, NextAttempt: t0}
	for _, a := range addrs {
		m.Rcpts = append(m.Rcpts, store.Rcpt{Addr: a})
	}
	return m
}

// TestApply: what one attempt's results do to each recipient.
func TestApply(t *testing.T) {
	type want struct {
		states   string // one letter per recipient: p(ending), d(elivered), f(ailed)
		tries    string
		next     time.Duration // after t0; only checked while a recipient is pending
		attempts int
	}
	for _, tc := range []struct {
		name  string
		prep  func(m *store.Message) // state before the attempt
		at    time.Duration
		res   []*store.SMTPStatus
		cancl bool
		want  want
	}{
		{name: "all delivered", res: []*store.SMTPStatus{nil, nil},
			want: want{states: "dd", tries: "11", attempts: 1}},
		{name: "one temporary, one permanent", res: []*store.SMTPStatus{temp, perm},
			want: want{states: "pf", tries: "11", next: 5 * time.Minute, attempts: 1}},
		{name: "second failure waits the second delay", at: 5 * time.Minute,
			prep: func(m *store.Message) { m.Rcpts[0].Tries, m.Rcpts[1].Tries = 1, 1 },
			res:  []*store.SMTPStatus{temp, nil},
			want: want{states: "pd", tries: "22", next: 65 * time.Minute, attempts: 1}},
		{name: "moved to the delay report mark", at: 40 * time.Minute,
			prep: func(m *store.Message) { m.Rcpts[0].Tries, m.Rcpts[1].Tries = 1, 1 },
			res:  []*store.SMTPStatus{temp, temp},
			// 40m + 1h is after the 90m mark
			want: want{states: "pp", tries: "22", next: 90 * time.Minute, attempts: 1}},
		{name: "no mark for NOTIFY=NEVER", at: 40 * time.Minute,
			prep: func(m *store.Message) {
				for i := range m.Rcpts {
					m.Rcpts[i].Tries, m.Rcpts[i].Notify = 1, []string{"NEVER"}
				}
			},
			res:  []*store.SMTPStatus{temp, temp},
			want: want{states: "pp", tries: "22", next: 100 * time.Minute, attempts: 1}},
		{name: "max_tries gives up the temporary ones", at: time.Hour,
			prep: func(m *store.Message) { m.Rcpts[0].Tries, m.Rcpts[1].Tries = 2, 0 },
			res:  []*store.SMTPStatus{nil, temp},
			// the most-tried recipient counts, even if it was delivered
			want: want{states: "df", tries: "31", attempts: 1}},
		{name: "max_age gives up", at: 24 * time.Hour,
			res:  []*store.SMTPStatus{temp, temp},
			want: want{states: "ff", tries: "11", attempts: 1}},
		{name: "last try is clamped to the deadline", at: 23*time.Hour + 30*time.Minute,
			prep: func(m *store.Message) { m.Rcpts[0].Tries, m.Rcpts[1].Tries = 1, 1 },
			res:  []*store.SMTPStatus{temp, temp},
			want: want{states: "pp", tries: "22", next: 24 * time.Hour, attempts: 1}},
		{name: "cancelled: only accepted recipients recorded", cancl: true,
			res:  []*store.SMTPStatus{nil, temp},
			want: want{states: "dp", tries: "10", next: 0, attempts: 0}},
		{name: "only pending recipients are attempted",
			prep: func(m *store.Message) { m.Rcpts[0].State, m.Rcpts[0].Tries = store.RcptDelivered, 1 },
			res:  []*store.SMTPStatus{temp},
			want: want{states: "dp", tries: "11", next: 5 * time.Minute, attempts: 1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := message("a@x.test", "b@x.test")
			r := testRules()
			if tc.prep != nil {
				tc.prep(m)
			}
			r.Apply(m, Attempt{Time: t0.Add(tc.at), Duration: time.Second, Results: tc.res, Cancelled: tc.cancl}, 0.5)
			states, tries := "", ""
			for _, rc := range m.Rcpts {
				states += rc.State.String()[:1]
				tries += fmt.Sprint(rc.Tries)
			}
			if states != tc.want.states || tries != tc.want.tries || m.Attempts != tc.want.attempts {
				t.Fatalf("states %s tries %s attempts %d; want %s %s %d", states, tries, m.Attempts, tc.want.states, tc.want.tries, tc.want.attempts)
			}
			if len(m.Pending()) > 0 && !m.NextAttempt.Equal(t0.Add(tc.want.next)) {
				t.Fatalf("next attempt at %v, want %v", m.NextAttempt.Sub(t0), tc.want.next)
			}
			for i, rc := range m.Rcpts {
				if i < len(tc.res) && rc.State == store.RcptFailed && rc.LastError == nil {
					t.Fatalf("%s failed without a status", rc.Addr)
				}
			}
			if tc.cancl && (len(m.History) != 0 || m.Rcpts[1].LastError != nil) {
				t.Fatalf("a cancelled attempt was recorded: %+v", m)
			}
		})
	}
}

// TestGiveUpKeepsLastTemporaryStatus: a recipient failed by the limits
// keeps the 4xx it last saw, for its failure report.
func TestGiveUpKeepsLastTemporaryStatus(t *testing.T) {
	m := message("a@x.test")
	m.Rcpts[0].Tries = 2
	r := testRules()
	r.Apply(m, Attempt{Time: t0, Results: []*store.SMTPStatus{temp}}, 0.5)
	if rc := m.Rcpts[0]; rc.State != store.RcptFailed || rc.LastError == nil || rc.LastError.Code != 451 {
		t.Fatalf("after giving up: %+v", rc)
	}
	if owed := r.Owed(m, t0); owed[0] != Failure {
		t.Fatalf("owed %v, want a failure report", owed)
	}
}

// TestOwed: which report each recipient is owed, by NOTIFY and state.
func TestOwed(t *testing.T) {
	for _, tc := range []struct {
		notify   []string
		state    store.RcptState
		lastErr  *store.SMTPStatus
		reported Kind
		at       time.Duration
		want     Kind
	}{
		{nil, store.RcptFailed, perm, 0, 0, Failure},
		{nil, store.RcptFailed, perm, Failure, 0, 0},
		{[]string{"NEVER"}, store.RcptFailed, perm, 0, 0, 0},
		{[]string{"SUCCESS"}, store.RcptFailed, perm, 0, 0, 0},
		{nil, store.RcptDelivered, nil, 0, 0, 0},
		{[]string{"SUCCESS"}, store.RcptDelivered, nil, 0, 0, Success},
		{[]string{"success", "failure"}, store.RcptDelivered, nil, Success, 0, 0},
		{nil, store.RcptPending, temp, 0, 89 * time.Minute, 0},
		{nil, store.RcptPending, temp, 0, 90 * time.Minute, Delay},
		{nil, store.RcptPending, nil, 0, 2 * time.Hour, 0}, // not tried yet
		{nil, store.RcptPending, temp, Delay, 5 * time.Hour, 0},
		{[]string{"FAILURE"}, store.RcptPending, temp, 0, 2 * time.Hour, 0},
	} {
		name := fmt.Sprintf("%v/%v/%v/%v", tc.notify, tc.state, tc.reported, tc.at)
		t.Run(name, func(t *testing.T) {
			m := message("a@x.test")
			rc := &m.Rcpts[0]
			rc.Notify, rc.State, rc.LastError, rc.Reported = tc.notify, tc.state, tc.lastErr, uint8(tc.reported)
			if got := testRules().Owed(m, t0.Add(tc.at))[0]; got != tc.want {
				t.Fatalf("owed %v, want %v", got, tc.want)
			}
		})
	}
}

// TestDelayReportMarks checks the delay report schedule, including
// catching up after a long downtime with one report, not one per missed
// interval.
func TestDelayReportMarks(t *testing.T) {
	r := Rules{DelayWarning: 5 * time.Minute, DelayRepeat: 7 * time.Minute}
	m := message("a@x.test")
	rc := &m.Rcpts[0]
	at := func(d time.Duration) time.Time { return t0.Add(d) }
	for _, step := range []struct {
		sentAt  time.Duration // a delay report is sent at this time
		wantDue time.Duration // then the next one is due at this time
	}{
		{5 * time.Minute, 12 * time.Minute},
		{12*time.Minute + 30*time.Second, 19 * time.Minute},
		{3 * time.Hour, 3*time.Hour + 7*time.Minute}, // marks at 5m + k×7m: 180m is past the 25th repeat, next is 187m
	} {
		if due, ok := r.delayReportDue(m, rc); !ok || at(step.sentAt).Before(due) {
			t.Fatalf("at %v no report due (next due %v)", step.sentAt, due.Sub(t0))
		}
		r.MarkReported(m, 0, Delay, at(step.sentAt))
		due, ok := r.delayReportDue(m, rc)
		if !ok || !due.Equal(at(step.wantDue)) {
			t.Fatalf("after a report at %v the next is due at %v, want %v", step.sentAt, due.Sub(t0), step.wantDue)
		}
		if next, _ := r.nextDelayMark(m, rc, at(step.sentAt)); !next.Equal(due) {
			t.Fatalf("nextDelayMark %v, want %v", next.Sub(t0), step.wantDue)
		}
	}
	r.DelayRepeat = 0
	if _, ok := r.delayReportDue(m, rc); ok {
		t.Fatal("a repeat is due with delay_warning_repeat off")
	}
}

// TestBounce fails what is pending, keeps what is settled, and releases a
// held message.
func TestBounce(t *testing.T) {
	m := message("a@x.test", "b@x.test")
	m.Rcpts[0].State = store.RcptDelivered
	m.Held = true
	n := Bounce(m, func(last *store.SMTPStatus) *store.SMTPStatus { return perm })
	if n != 1 || m.Rcpts[0].State != store.RcptDelivered || m.Rcpts[1].State != store.RcptFailed || m.Held {
		t.Fatalf("after Bounce (%d): %+v", n, m)
	}
	if Bounce(m, nil) != 0 {
		t.Fatal("bounced again with nothing pending")
	}
}

// TestPostpone: a message of a suspended destination is not attempted,
// counts no try, and keeps its deadline and delay reports.
func TestPostpone(t *testing.T) {
	refused := &store.SMTPStatus{Code: 451, Enhanced: [3]int{4, 4, 1}, Message: "connection refused", Temporary: true}
	for _, tc := range []struct {
		name      string
		prep      func(m *store.Message)
		at        time.Duration
		wantState store.RcptState
		wantNext  time.Duration // after t0, while pending
	}{
		// testRules: delays 5m then 1h, max age 24h, delay report at 90m.
		{name: "never tried: next as after a first try", at: 0, wantState: store.RcptPending, wantNext: 5 * time.Minute},
		{name: "postponed before: spaced like the next try", prep: func(m *store.Message) { m.Postponed = 1 },
			at: 10 * time.Minute, wantState: store.RcptPending, wantNext: 10*time.Minute + time.Hour},
		{name: "moved to the delay report mark", prep: func(m *store.Message) { m.Rcpts[0].Tries = 1 },
			at: 60 * time.Minute, wantState: store.RcptPending, wantNext: 90 * time.Minute},
		{name: "never past the deadline", prep: func(m *store.Message) { m.Rcpts[0].Tries = 1; m.Rcpts[0].Reported = uint8(Delay) },
			at: 23*time.Hour + 30*time.Minute, wantState: store.RcptPending, wantNext: 24 * time.Hour},
		{name: "at the deadline retrying ends", at: 24 * time.Hour, wantState: store.RcptFailed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := message("a@x.test")
			if tc.prep != nil {
				tc.prep(m)
			}
			triesBefore := m.Rcpts[0].Tries
			testRules().Postpone(m, refused, t0.Add(tc.at), 0.5)
			rc := m.Rcpts[0]
			if rc.State != tc.wantState || rc.Tries != triesBefore || m.Attempts != 0 {
				t.Fatalf("state %v, tries %d (were %d), attempts %d", rc.State, rc.Tries, triesBefore, m.Attempts)
			}
			if rc.LastError == nil || rc.LastError.Message != "connection refused" {
				t.Fatalf("last error %+v, want the destination's", rc.LastError)
			}
			if tc.wantState == store.RcptPending && !m.NextAttempt.Equal(t0.Add(tc.wantNext)) {
				t.Fatalf("next attempt at %v, want %v", m.NextAttempt.Sub(t0), tc.wantNext)
			}
		})
	}
}

// TestApplyRecordsRecipientHistory: each recipient keeps its last
// attempts, and the target that took it.
func TestApplyRecordsRecipientHistory(t *testing.T) {
	m := message("a@x.test", "b@x.test")
	r := testRules()
	for i := 0; i < store.MaxRcptHistory+2; i++ {
		r.Apply(m, Attempt{Time: t0.Add(time.Duration(i) * time.Minute), Results: []*store.SMTPStatus{temp, temp}}, 0.5)
		for j := range m.Rcpts {
			m.Rcpts[j].Tries = 0 // keep retrying
		}
	}
	r.Apply(m, Attempt{Time: t0.Add(time.Hour), Results: []*store.SMTPStatus{nil, temp}, Via: []string{"relay", ""}}, 0.5)
	a := m.Rcpts[0]
	if len(a.History) != store.MaxRcptHistory || a.State != store.RcptDelivered || a.Via != "relay" {
		t.Fatalf("a: %d history entries, state %v, via %q", len(a.History), a.State, a.Via)
	}
	last := a.History[len(a.History)-1]
	if !last.Time.Equal(t0.Add(time.Hour)) || last.Status != nil || last.Via != "relay" {
		t.Fatalf("a's last attempt %+v", last)
	}
	if b := m.Rcpts[1]; b.History[len(b.History)-1].Status == nil || b.Via != "" {
		t.Fatalf("b's last attempt %+v, via %q", b.History[len(b.History)-1], b.Via)
	}
}
