package testutils

import (
	"bytes"
	"encoding/json"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
)

// PyDSN is what testdata/parse_dsn.py reports about a delivery status
// notification parsed with Python's standard email package: a parser
// independent of the Go code that generated the report.
type PyDSN struct {
	Defects     []string    `json:"defects"`
	Headers     [][2]string `json:"headers"`
	ContentType string      `json:"content_type"`
	ReportType  string      `json:"report_type"`
	Boundary    string      `json:"boundary"`
	FromName    string      `json:"from_name"`
	FromAddr    string      `json:"from_addr"`
	ToAddr      string      `json:"to_addr"`
	Date        string      `json:"date"`
	Parts       []struct {
		ContentType string  `json:"content_type"`
		CTE         string  `json:"cte"`
		Charset     *string `json:"charset"`
	} `json:"parts"`
	Text       string      `json:"text"`
	PerMessage [][2]string `json:"per_message"`
	Recipients []struct {
		Fields [][2]string          `json:"fields"`
		Typed  map[string][2]string `json:"typed"`
	} `json:"recipients"`
	ReturnedType    string      `json:"returned_type"`
	ReturnedHeaders [][2]string `json:"returned_headers"`
	ReturnedBody    *string     `json:"returned_body"`
}

// Field returns the value of a recipient group's field ("" if absent).
func (r *PyDSN) Field(rcpt int, name string) string {
	for _, f := range r.Recipients[rcpt].Fields {
		if strings.EqualFold(f[0], name) {
			return f[1]
		}
	}
	return ""
}

var (
	pythonOnce sync.Once
	pythonPath string
)

// findPython locates python3; it asks the interpreter for its own path so
// that wrapper scripts (pyenv shims) are not run for every report.
func findPython() {
	p, err := exec.LookPath("python3")
	if err != nil {
		return
	}
	pythonPath = p
	out, err := exec.Command(p, "-c", "import sys; print(sys.executable)").Output()
	if exe := strings.TrimSpace(string(out)); err == nil && exe != "" {
		pythonPath = exe
	}
}

// ParseDSNWithPython parses raw (a whole report, header and body) with
// testdata/parse_dsn.py and fails the test on any defect Python's parser
// finds. Without python3 the test is skipped.
func ParseDSNWithPython(t testing.TB, raw []byte) *PyDSN {
	t.Helper()
	pythonOnce.Do(findPython)
	if pythonPath == "" {
		t.Skip("python3 not found; skipping the independent parser check")
	}
	_, self, _, _ := runtime.Caller(0)
	cmd := exec.Command(pythonPath, filepath.Join(filepath.Dir(self), "testdata", "parse_dsn.py"))
	cmd.Stdin = bytes.NewReader(raw)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("parse_dsn.py: %v\n%s", err, stderr.String())
	}
	var res PyDSN
	if err := json.Unmarshal(out, &res); err != nil {
		t.Fatalf("parse_dsn.py output: %v\n%s", err, out)
	}
	if len(res.Defects) != 0 {
		t.Errorf("Python's email parser found defects: %v", res.Defects)
	}
	return &res
}
