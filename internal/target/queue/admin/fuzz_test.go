package admin

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
)

// FuzzParseRequest feeds arbitrary bytes to the request decoder: it must
// never panic, and whatever it accepts must be a request the server can
// act on and that encodes back to an equivalent request.
func FuzzParseRequest(f *testing.F) {
	for _, s := range []string{
		`{"v":1,"op":"list"}`,
		`{"v":1,"op":"list","instance":"outbound","filter":{"from":"@a.test","to":"b@c.test","older_than_seconds":3600,"held":true}}`,
		`{"v":1,"op":"show","filter":{"ids":["1"]},"headers":true,"body":true}`,
		`{"v":1,"op":"hold","filter":{"ids":["0000000000000001","ffffffffffffffff"]}}`,
		`{"v":1,"op":"bounce","filter":{"ids":["0"]}}`,
		`{"v":1,"op":"stats"}`,
		`{"v":2,"op":"list"}`,
		`{"v":1,"op":"list","filter":{"older_than_seconds":1e300}}`,
		`{"v":1,"op":"list","filter":{"ids":[1,2]}}`,
		`{"v":1,"op":"retry","filter":null}`,
		`[]`, `null`, ``, `{`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		req, err := ParseRequest(data)
		if err != nil {
			if err.Error() == "" {
				t.Fatal("empty error text")
			}
			return
		}
		if req.V != Version {
			t.Fatalf("accepted version %d", req.V)
		}
		if req.Op == OpShow && len(req.Filter.IDs) != 1 {
			t.Fatal("accepted show without exactly one ID")
		}
		for _, id := range req.Filter.IDs {
			if id == 0 {
				t.Fatal("accepted ID 0")
			}
		}
		if req.Filter.OlderThan < 0 {
			t.Fatal("accepted a negative age")
		}
		b, err := json.Marshal(req)
		if err != nil {
			t.Fatal(err)
		}
		again, err := ParseRequest(b)
		if err != nil {
			t.Fatalf("re-encoded request %s refused: %v", b, err)
		}
		b2, _ := json.Marshal(again)
		if !bytes.Equal(b, b2) {
			t.Fatalf("round trip changed the request:\n%s\n%s", b, b2)
		}
	})
}

// FuzzReadLine checks the request framing: at most max bytes are
// accepted, and a line is returned without its terminator.
func FuzzReadLine(f *testing.F) {
	f.Add([]byte("{}\n"), 16)
	f.Add([]byte(strings.Repeat("x", 40)+"\n"), 16)
	f.Add([]byte("no newline"), 64)
	f.Add([]byte("\r\n"), 1)
	f.Fuzz(func(t *testing.T, data []byte, max int) {
		if max <= 0 || max > 1<<16 {
			return
		}
		line, err := readLine(bytes.NewReader(data), max)
		if err != nil {
			return
		}
		if len(line) > max {
			t.Fatalf("returned %d bytes, max %d", len(line), max)
		}
		if bytes.IndexByte(line, '\n') >= 0 {
			t.Fatal("line contains a newline")
		}
		if !bytes.HasPrefix(data, line) {
			t.Fatal("line is not a prefix of the input")
		}
	})
}
