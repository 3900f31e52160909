package metrics

import (
	"fmt"
	"testing"
)

func TestTopInFlight(t *testing.T) {
	many := map[string]int{}
	for i := 0; i < 15; i++ {
		many[fmt.Sprintf("d%02d.test", i)] = i + 1 // d14 busiest
	}
	for _, tc := range []struct {
		name string
		in   map[string]int
		want string
	}{
		{"none", nil, "map[other:0]"},
		{"a few", map[string]int{"a.test": 2, "b.test": 5}, "map[a.test:2 b.test:5 other:0]"},
		{"more than the top", many, "map[d05.test:6 d06.test:7 d07.test:8 d08.test:9 d09.test:10 d10.test:11 d11.test:12 d12.test:13 d13.test:14 d14.test:15 other:15]"},
		{"a destination named other", map[string]int{"other": 3, "a.test": 1}, "map[a.test:1 other:3]"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := fmt.Sprint(TopInFlight(tc.in)); got != tc.want {
				t.Fatalf("TopInFlight = %s, want %s", got, tc.want)
			}
		})
	}
}
