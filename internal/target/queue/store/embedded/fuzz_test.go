package embedded

import (
	"bytes"
	"encoding/binary"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/maddy-spool/spool/internal/target/queue/store"
)

// Fuzz tests for every decoder of on-disk state: metadata JSON, schedule
// values, the database format marker, bbolt keys and content file names.
// The committed corpus is in testdata/fuzz/FuzzXxx; run one for longer with
//
//	go test -run='^$' -fuzz='^FuzzDecodeMeta$' -fuzztime=60s ./internal/target/queue/store/

// maxErrLen bounds an error message about damaged state: it goes to the log
// and the quarantine record, so it must not repeat megabytes of input.
const maxErrLen = 512

func checkErr(t *testing.T, what string, err error) {
	t.Helper()
	msg := err.Error()
	if msg == "" {
		t.Fatalf("%s: empty error message", what)
	}
	if len(msg) > maxErrLen {
		t.Fatalf("%s: error message of %d bytes (limit %d): %.200s...", what, len(msg), maxErrLen, msg)
	}
}

func FuzzDecodeMeta(f *testing.F) {
	full := newMsg("a@example.com", "b@example.org")
	full.OriginalFrom = "orig@example.org"
	full.MailOpts = store.MailOptions{Body: "8BITMIME", Size: 1234, RequireTLS: true, UTF8: true, Return: "HDRS", EnvelopeID: "env-1"}
	auth := "<>"
	full.MailOpts.Auth = &auth
	full.Conn = store.ConnInfo{Proto: "ESMTPS", Hostname: "mx.example.org", RemoteAddr: "192.0.2.1:25", AuthUser: "u"}
	full.Rcpts[0].Notify = []string{"SUCCESS", "FAILURE"}
	full.Rcpts[0].OrigType, full.Rcpts[0].Orig = "rfc822", "a@example.com"
	full.Rcpts[1].State = store.RcptFailed
	full.Rcpts[1].Tries = 3
	full.Rcpts[1].LastAttempt = t0.Add(time.Hour)
	full.Rcpts[1].LastError = &store.SMTPStatus{Code: 550, Enhanced: [3]int{5, 1, 1}, Message: "no such user", RemoteMTA: "mx.example.org"}
	full.Rcpts[1].Reported = 3
	full.HeaderLen, full.BodyLen = 100, 200
	full.Attempts = 2
	full.FirstAttempt, full.LastAttempt = t0, t0.Add(time.Hour)
	full.AddHistory(store.AttemptRecord{Time: t0, Duration: time.Second, Delivered: 1, Permanent: 1, Error: "550 no such user"})
	for _, m := range []*store.Message{newMsg("a@example.com"), full} {
		b, err := store.EncodeMeta(m)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte(`{"v":2,"from":"a@b","rcpts":[{"addr":"x"}],"arrival":"2026-01-01T00:00:00Z"}`))
	f.Add([]byte(`{"v":1,"rcpts":[{"addr":"x","state":7}],"arrival":"2026-01-01T00:00:00Z"}`))
	f.Add([]byte(`{"v":1,"rcpts":[{"addr":"x"}],"arrival":"2026-01-01T00:00:00Z","header_len":-1}`))
	f.Add([]byte(`{"v":1,"rcpts":[{"addr":"x"}],"arrival":"2026-01-01T00:00:00Z"} {}`))
	f.Add([]byte(`{"v":1,"rcpts":[{"addr":"x"}],"arrival":"` + strings.Repeat("9", 600) + `"}`))
	f.Add([]byte(`{"v":` + strings.Repeat("1", 600) + `}`))
	f.Add([]byte("\x00\x01garbage"))
	f.Add([]byte{})

	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := store.DecodeMeta(42, b)
		if err != nil {
			checkErr(t, "decodeMeta", err)
			return
		}
		if m.ID != 42 || len(m.Rcpts) == 0 || m.HeaderLen < 0 || m.BodyLen < 0 || m.Size() < 0 || m.Arrival.IsZero() {
			t.Fatalf("decodeMeta accepted invalid metadata: %+v", m)
		}
		// What was accepted can be written back (Update must not fail
		// forever on a loaded entry), and reads back the same.
		enc, err := store.EncodeMeta(m)
		if err != nil {
			t.Fatalf("encodeMeta of decoded metadata: %v", err)
		}
		m2, err := store.DecodeMeta(42, enc)
		if err != nil {
			t.Fatalf("decodeMeta(encodeMeta(m)): %v\n%s", err, enc)
		}
		enc2, err := store.EncodeMeta(m2)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(enc, enc2) {
			t.Fatalf("round trip changed metadata:\n%s\n%s", enc, enc2)
		}
		// The schedule entry derived from it survives its own encoding.
		if _, err := decodeSched(42, encodeSched(schedOf(m))); err != nil {
			t.Fatalf("sched of decoded metadata: %v", err)
		}
	})
}

func FuzzDecodeSched(f *testing.F) {
	f.Add(encodeSched(SchedEntry{NextAttempt: t0, Arrival: t0, Pending: 1}))
	f.Add(encodeSched(SchedEntry{NextAttempt: t0.Add(time.Hour), Arrival: t0, Held: true, Pending: 1000}))
	f.Add(append(make([]byte, 16), 0x80, 0, 0, 0, 0))
	f.Add(bytes.Repeat([]byte{0xff}, schedLen))
	f.Add([]byte{1, 2, 3})
	f.Add(make([]byte, schedLen+1))

	f.Fuzz(func(t *testing.T, b []byte) {
		e, err := decodeSched(7, b)
		if err != nil {
			checkErr(t, "decodeSched", err)
			if len(b) == schedLen && b[16]&^schedHeld == 0 {
				t.Fatalf("well-formed value rejected: %v", err)
			}
			return
		}
		if e.ID != 7 || e.Pending < 0 {
			t.Fatalf("decoded %+v", e)
		}
		// Every valid value is exactly what the encoder writes for it.
		if enc := encodeSched(e); !bytes.Equal(enc, b) {
			t.Fatalf("encodeSched(decodeSched(%x)) = %x", b, enc)
		}
	})
}

func FuzzParseID(f *testing.F) {
	for _, s := range []string{"000000000000002a", "2A", "", "0", "../etc/passwd", "12/34",
		"00000000000000001", "xyz", "ffffffffffffffff", "0000000000000001.tmp", "+1", "0x1f", " 1",
		strings.Repeat("a", 4096)} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		id, err := store.ParseID(s)
		if err != nil {
			checkErr(t, "ParseID", err)
			return
		}
		if id == 0 {
			t.Fatalf("ParseID(%q) = 0 without error", s)
		}
		// A parsed ID is safe as a file name: no separators, no dots.
		if strings.ContainsAny(s, "/.\\\x00") {
			t.Fatalf("ParseID accepted %q", s)
		}
		str := id.String()
		if len(str) != 16 || !strings.EqualFold(strings.TrimLeft(str, "0"), strings.TrimLeft(s, "0")) {
			t.Fatalf("ParseID(%q).String() = %q", s, str)
		}
		if back, err := store.ParseID(str); err != nil || back != id {
			t.Fatalf("ParseID(String()) = %v, %v; want %v", back, err, id)
		}
		if back, ok := keyID(idKey(id)); !ok || back != id {
			t.Fatalf("keyID(idKey(%v)) = %v, %v", id, back, ok)
		}
	})
}

func FuzzKeyID(f *testing.F) {
	f.Add(idKey(1))
	f.Add(idKey(^store.ID(0)))
	f.Add([]byte{1, 2, 3})
	f.Add([]byte("meta"))
	f.Add(make([]byte, 9))
	f.Fuzz(func(t *testing.T, k []byte) {
		id, ok := keyID(k)
		if ok != (len(k) == 8) {
			t.Fatalf("keyID(%x) ok=%v", k, ok)
		}
		if ok && (!bytes.Equal(idKey(id), k) || uint64(id) != binary.BigEndian.Uint64(k)) {
			t.Fatalf("idKey(keyID(%x)) = %x", k, idKey(id))
		}
	})
}

func FuzzFormatMarker(f *testing.F) {
	f.Add([]byte{dbFormat})
	f.Add([]byte{1})
	f.Add([]byte{0})
	f.Add([]byte{99})
	f.Add([]byte{})
	f.Add([]byte{1, 0})
	f.Add(bytes.Repeat([]byte{'x'}, 4096))
	f.Fuzz(func(t *testing.T, v []byte) {
		format, err := formatVersion(v)
		if (err == nil) != (len(v) == 1 && v[0] >= 1 && v[0] <= dbFormat) {
			t.Fatalf("formatVersion(%x) = %v", v, err)
		}
		if err != nil {
			checkErr(t, "formatVersion", err)
		} else if format != v[0] {
			t.Fatalf("formatVersion(%x) = %d", v, format)
		}
	})
}

func FuzzBoltMeta(f *testing.F) {
	// Seeds: the two meta pages of a real database, as is and cut short.
	dir := f.TempDir()
	s, err := OpenDir(dir, DirOptions{})
	if err != nil {
		f.Fatal(err)
	}
	s.Close()
	db, err := os.ReadFile(filepath.Join(dir, "queue.db"))
	if err != nil {
		f.Fatal(err)
	}
	pages := db[:2*os.Getpagesize()]
	f.Add(pages, int64(len(db)))
	f.Add(pages, int64(len(pages)))
	f.Add(pages[:100], int64(100))
	f.Add([]byte{}, int64(0))
	f.Add(bytes.Repeat([]byte{0xde}, 8192), int64(1<<20))

	f.Fuzz(func(t *testing.T, file []byte, size int64) {
		if size < int64(len(file)) || size > 1<<40 {
			size = int64(len(file))
		}
		head := file
		if len(head) > boltPageHeader+boltMetaLen {
			head = head[:boltPageHeader+boltMetaLen]
		}
		read := func(off int64, p []byte) error {
			if off < 0 || off+int64(len(p)) > int64(len(file)) {
				return io.ErrUnexpectedEOF // beyond what the fuzzer gave: a hole
			}
			copy(p, file[off:])
			return nil
		}
		err := checkBoltMeta(head, size, read)
		if err != nil {
			checkErr(t, "checkBoltMeta", err)
			return
		}
		// Accepted: the meta page bbolt will use fits in the file.
		m0, ok0 := decodeBoltMeta(head)
		if ok0 && m0.pgid > uint64(size)/uint64(m0.pageSize) {
			p1 := make([]byte, boltPageHeader+boltMetaLen)
			m1, ok1 := boltMeta{}, false
			if read(int64(m0.pageSize), p1) == nil {
				m1, ok1 = decodeBoltMeta(p1)
			}
			if !ok1 || m1.txid <= m0.txid {
				t.Fatalf("accepted meta with %d pages of %d bytes in a %d-byte file", m0.pgid, m0.pageSize, size)
			}
		}
	})
}
