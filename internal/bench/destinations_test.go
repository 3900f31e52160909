package bench

import (
	"math"
	"strings"
	"testing"
	"time"

	"github.com/maddy-spool/spool/internal/testutils"
)

func TestSlowLoadRcpt(t *testing.T) {
	const n = 2000
	per := map[string]int{}
	for seq := int64(1); seq <= n; seq++ {
		r := SlowLoadRcpt(seq)
		if !strings.HasPrefix(r, "u") || strings.Count(r, "@") != 1 {
			t.Fatalf("recipient %d: %q", seq, r)
		}
		per[testutils.AddrDomain(r)]++
	}
	if got := per[SlowDomain]; got != n/SlowEvery {
		t.Errorf("%d of %d messages for the slow domain, want %d (5 %%)", got, n, n/SlowEvery)
	}
	if len(per) != OtherDomains+1 {
		t.Errorf("domains %v, want the slow one and %d others", per, OtherDomains)
	}
	for i := range OtherDomains {
		if got := per[OtherDomain(i)]; got < (n-n/SlowEvery)/OtherDomains-OtherDomains || got > (n-n/SlowEvery)/OtherDomains+OtherDomains {
			t.Errorf("%s has %d messages; the other mail is not spread evenly: %v", OtherDomain(i), got, per)
		}
	}
}

func TestCountWithin(t *testing.T) {
	t0 := time.Unix(1000, 0)
	at := func(secs ...float64) []time.Time {
		var out []time.Time
		for _, s := range secs {
			out = append(out, t0.Add(time.Duration(s*float64(time.Second))))
		}
		return out
	}
	for _, tc := range []struct {
		name     string
		times    []time.Time
		from, to float64
		want     int
	}{
		{"none", nil, 0, 10, 0},
		{"start included", at(0, 1, 2), 0, 10, 3},
		{"end excluded", at(9.999, 10, 11), 0, 10, 1},
		{"before the window", at(-1, -0.001), 0, 10, 0},
		{"burst then probes", at(0.1, 0.1, 0.2, 10.3, 30.4, 60.5, 90.6), 0, 120, 7},
		{"probes only", at(0.1, 0.1, 0.2, 10.3, 30.4, 60.5, 90.6), 10, 120, 4},
		{"unsorted", at(5, 1, 20, 3), 2, 6, 2},
	} {
		got := CountWithin(tc.times, t0.Add(time.Duration(tc.from*float64(time.Second))), t0.Add(time.Duration(tc.to*float64(time.Second))))
		if got != tc.want {
			t.Errorf("%s: %d, want %d", tc.name, got, tc.want)
		}
	}
}

func TestSlowVerdict(t *testing.T) {
	ms := time.Millisecond
	// other mail: 1900 messages, each taking p50 ms, the last at took.
	res := func(p50 time.Duration, took time.Duration) DomainResult {
		return DomainResult{Count: 1900, Latency: []time.Duration{p50 / 2, p50, 3 * p50}, Took: took}
	}
	for _, tc := range []struct {
		name                 string
		base, slow           DomainResult
		wantLat, wantThr     float64
		wantLatOK, wantThrOK bool
	}{
		{"unaffected", res(35*ms, 2500*ms), res(35*ms, 2500*ms), 1, 1, true, true},
		{"at both bounds", res(35*ms, 2000*ms), res(70*ms, 2500*ms), 2, 0.8, true, true},
		{"latency over", res(35*ms, 2000*ms), res(71*ms, 2000*ms), 71.0 / 35, 1, false, true},
		{"throughput under", res(35*ms, 2000*ms), res(35*ms, 2600*ms), 1, 2000.0 / 2600, true, false},
		{"before the feature", res(35*ms, 2436*ms), res(14*time.Second, 33929*ms), 400, 2436.0 / 33929, false, false},
	} {
		lat, thr, latOK, thrOK := SlowVerdict(tc.base, tc.slow)
		if math.Abs(lat-tc.wantLat) > 1e-9 || math.Abs(thr-tc.wantThr) > 1e-9 || latOK != tc.wantLatOK || thrOK != tc.wantThrOK {
			t.Errorf("%s: latency %.4f× (%v), throughput %.4f× (%v); want %.4f× (%v), %.4f× (%v)",
				tc.name, lat, latOK, thr, thrOK, tc.wantLat, tc.wantLatOK, tc.wantThr, tc.wantThrOK)
		}
	}
	// Nothing delivered in the baseline: no ratio, no goal met.
	lat, thr, latOK, thrOK := SlowVerdict(DomainResult{}, res(35*ms, time.Second))
	if !math.IsNaN(lat) || !math.IsNaN(thr) || latOK || thrOK {
		t.Errorf("empty baseline: %v (%v), %v (%v); want NaN, not met", lat, latOK, thr, thrOK)
	}
}

func TestDeadVerdict(t *testing.T) {
	s := time.Second
	for _, tc := range []struct {
		name                     string
		attempts, sent, got      int
		took                     time.Duration
		wantAttempts, wantRecovr bool
	}{
		{"met", 27, 2000, 2000, 31 * s, true, true},
		{"at the bounds", 100, 2000, 2000, 60 * s, true, true},
		{"one attempt too many", 101, 2000, 2000, 10 * s, false, true},
		{"too slow after recovery", 27, 2000, 2000, 61 * s, true, false},
		{"not all delivered", 27, 2000, 1999, 10 * s, true, false},
		{"before the feature", 2000, 2000, 2000, 212 * s, false, false},
		{"nothing sent", 0, 0, 0, 0, true, false},
	} {
		r := DeadResult{OutageAttempts: tc.attempts, DeadSent: tc.sent, Dead: DomainResult{Count: tc.got}, RecoveryToLast: tc.took}
		a, rec := DeadVerdict(r)
		if a != tc.wantAttempts || rec != tc.wantRecovr {
			t.Errorf("%s: attempts met %v, recovery met %v; want %v, %v", tc.name, a, rec, tc.wantAttempts, tc.wantRecovr)
		}
	}
}

func TestDomainResultRate(t *testing.T) {
	for _, tc := range []struct {
		d    DomainResult
		want float64
	}{
		{DomainResult{Count: 1900, Took: 2 * time.Second}, 950},
		{DomainResult{Count: 10}, 0},
		{DomainResult{}, 0},
	} {
		if got := tc.d.Rate(); got != tc.want {
			t.Errorf("%+v: rate %v, want %v", tc.d, got, tc.want)
		}
	}
}
