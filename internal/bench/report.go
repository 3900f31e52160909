package bench

import (
	"fmt"
	"io"
	"math"
	"sort"
	"strings"
	"time"
)

// Percentile returns the p-th percentile (0..100) of d by the nearest-rank
// method; 0 for no samples.
func Percentile(d []time.Duration, p float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	rank := int(math.Ceil(p / 100 * float64(len(s))))
	if rank < 1 {
		rank = 1
	}
	return s[rank-1]
}

// Median returns the median of v (the mean of the middle two for an even
// count); NaN for none.
func Median(v []float64) float64 {
	if len(v) == 0 {
		return math.NaN()
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// Figure is one measured quantity with its samples per module (one per
// round).
type Figure struct {
	Name string
	Unit string
	// Samples per module; a module missing here was not measured.
	Samples map[Kind][]float64
	// Note is printed after the row (e.g. a timeout or a check's result).
	Note string
	// Shared marks a figure that is not about a module (a disk probe): it
	// is printed in every column, without a ratio.
	Shared bool
}

// Add records one sample for kind.
func (f *Figure) Add(kind Kind, v float64) {
	if f.Samples == nil {
		f.Samples = map[Kind][]float64{}
	}
	f.Samples[kind] = append(f.Samples[kind], v)
}

// AddNote appends to the figure's note.
func (f *Figure) AddNote(format string, args ...interface{}) {
	n := fmt.Sprintf(format, args...)
	if f.Note != "" {
		n = f.Note + "; " + n
	}
	f.Note = n
}

// Value is the median of kind's samples.
func (f *Figure) Value(kind Kind) (float64, bool) {
	s, ok := f.Samples[kind]
	if !ok || len(s) == 0 {
		return 0, false
	}
	return Median(s), true
}

// Table is an ordered list of figures with section headings.
type Table struct {
	rows []tableRow
}

type tableRow struct {
	section string
	fig     *Figure
}

// Section starts a new group of rows.
func (t *Table) Section(title string) { t.rows = append(t.rows, tableRow{section: title}) }

// Figure adds a row and returns it for filling in.
func (t *Table) Figure(name, unit string) *Figure {
	f := &Figure{Name: name, Unit: unit}
	t.rows = append(t.rows, tableRow{fig: f})
	return f
}

// Ratios are the ratio columns of the table, numerator over denominator.
var Ratios = []struct {
	Name     string
	Num, Den Kind
}{
	{"spool/maddy", Spool, Maddy},
	{"pg/maddy", SpoolPG, Maddy},
	{"pg/spool", SpoolPG, Spool},
}

// Print writes the table: per figure the median over rounds of each kind
// (Kinds), the ratios (Ratios), and every round's value.
func (t *Table) Print(w io.Writer) {
	fmt.Fprintf(w, "%-66s", "figure")
	for _, k := range Kinds {
		fmt.Fprintf(w, " %12s", k)
	}
	for _, r := range Ratios {
		fmt.Fprintf(w, " %11s", r.Name)
	}
	fmt.Fprintf(w, "  %s\n", "rounds")
	for _, r := range t.rows {
		if r.fig == nil {
			fmt.Fprintf(w, "\n== %s\n", r.section)
			continue
		}
		f := r.fig
		name := f.Name
		if f.Unit != "" {
			name += " (" + f.Unit + ")"
		}
		var line strings.Builder
		fmt.Fprintf(&line, "%-66s", name)
		shared, sharedOK := f.sharedValue()
		for _, k := range Kinds {
			v, ok := f.Value(k)
			if f.Shared {
				v, ok = shared, sharedOK
			}
			fmt.Fprintf(&line, " %12s", cell(v, ok))
		}
		for _, r := range Ratios {
			ratio := "-"
			n, nok := f.Value(r.Num)
			d, dok := f.Value(r.Den)
			if !f.Shared && nok && dok && d != 0 {
				ratio = fmt.Sprintf("%.2f", n/d)
			}
			fmt.Fprintf(&line, " %11s", ratio)
		}
		rounds := []string{}
		for _, k := range Kinds {
			if v, ok := f.Samples[k]; ok {
				if f.Shared {
					k = "all"
				}
				parts := make([]string, len(v))
				for i, x := range v {
					parts[i] = formatNum(x)
				}
				rounds = append(rounds, string(k)+"="+strings.Join(parts, "/"))
			}
		}
		fmt.Fprintf(&line, "  %s", strings.Join(rounds, " "))
		if f.Note != "" {
			line.WriteString("  [" + f.Note + "]")
		}
		fmt.Fprintln(w, line.String())
	}
}

// sharedValue is the value of a Shared figure, recorded under any kind.
func (f *Figure) sharedValue() (float64, bool) {
	for _, k := range Kinds {
		if v, ok := f.Value(k); ok {
			return v, true
		}
	}
	return 0, false
}

func cell(v float64, ok bool) string {
	if !ok {
		return "-"
	}
	return formatNum(v)
}

func formatNum(v float64) string {
	switch a := math.Abs(v); {
	case math.IsNaN(v):
		return "NaN"
	case a >= 1000:
		return fmt.Sprintf("%.0f", v)
	case a >= 10:
		return fmt.Sprintf("%.1f", v)
	case a >= 1:
		return fmt.Sprintf("%.2f", v)
	default:
		return fmt.Sprintf("%.3g", v)
	}
}

// Ms converts a duration to milliseconds.
func Ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
