package migrate

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/maddy-spool/spool/internal/target/queue/store/embedded"
)

// BenchmarkImport measures a whole import of 500 small entries cloned from
// the real fixture, fsyncs included (one op = one message).
func BenchmarkImport(b *testing.B) {
	fx := maddyFixture(b)
	u := msgUnattempted.id
	files := map[string][]byte{}
	for _, suf := range []string{".meta", ".header", ".body"} {
		data, err := os.ReadFile(filepath.Join(fx.unattempted, u+suf))
		if err != nil {
			b.Fatal(err)
		}
		files[suf] = data
	}
	const n = 500
	for i := 0; i < b.N; i += n {
		b.StopTimer()
		src := b.TempDir()
		for j := 0; j < n; j++ {
			name := fmt.Sprintf("%08x", j+1)
			for suf, data := range files {
				data = bytes.ReplaceAll(data, []byte(`"ID":"`+u+`"`), []byte(`"ID":"`+name+`"`))
				if err := os.WriteFile(filepath.Join(src, name+suf), data, 0o600); err != nil {
					b.Fatal(err)
				}
			}
		}
		s, err := embedded.OpenDir(b.TempDir(), embedded.DirOptions{})
		if err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		res, err := Import(context.Background(), src, s, Options{})
		b.StopTimer()
		if err != nil || len(res.Imported) != n {
			b.Fatalf("Import: %d imported, %v", len(res.Imported), err)
		}
		s.Close()
		b.StartTimer()
	}
}
