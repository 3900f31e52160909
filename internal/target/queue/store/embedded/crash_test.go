package embedded

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/maddy-spool/spool/internal/target/queue/store"
)

// The crash test runs the store in a child process (this test binary,
// re-executed), which prints each ID whose Create returned. The parent
// kills it with SIGKILL in the middle of a stream of concurrent creates and
// checks the durability contract: every acknowledged message is present
// and intact after reopening; nothing else is half there.

const crashChildEnv = "SPOOL_STORE_CRASH_CHILD"

func crashBody(id int) string {
	// Mix inline and file-backed content (inline limit set to 512 below).
	return strings.Repeat(fmt.Sprintf("body of message %d\r\n", id), 1+id%64)
}

func TestCrashChild(t *testing.T) {
	dir := os.Getenv(crashChildEnv)
	if dir == "" {
		t.Skip("helper for TestCrashKeepsAcknowledgedMessages")
	}
	s, err := OpenDir(dir, DirOptions{InlineLimit: 512})
	if err != nil {
		fmt.Println("open-error", err)
		os.Exit(3)
	}
	out := bufio.NewWriter(os.Stdout)
	var mu sync.Mutex
	var wg sync.WaitGroup
	for w := 0; w < 16; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := 0; ; i++ {
				n := w*1_000_000 + i
				m := newMsg(fmt.Sprintf("r%d@example.com", n))
				m.MsgID = strconv.Itoa(n)
				body := crashBody(n)
				if err := s.Create(context.Background(), m, []byte("X-N: "+m.MsgID+"\r\n\r\n"), strings.NewReader(body), int64(len(body))); err != nil {
					fmt.Println("create-error", err)
					os.Exit(3)
				}
				mu.Lock()
				fmt.Fprintf(out, "ack %d %d\n", m.ID, n)
				out.Flush()
				mu.Unlock()
			}
		}(w)
	}
	wg.Wait()
}

func TestCrashKeepsAcknowledgedMessages(t *testing.T) {
	if testing.Short() {
		t.Skip("spawns processes")
	}
	dir := t.TempDir()
	for round := 0; round < 5; round++ {
		cmd := exec.Command(os.Args[0], "-test.run=^TestCrashChild$")
		cmd.Env = append(os.Environ(), crashChildEnv+"="+dir)
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		acked := map[store.ID]int{}
		sc := bufio.NewScanner(stdout)
		// Kill after a varying number of acknowledgements, mid-stream.
		killAt := 50 + round*70
		for sc.Scan() {
			var id store.ID
			var n int
			if _, err := fmt.Sscanf(sc.Text(), "ack %d %d", &id, &n); err != nil {
				t.Fatalf("child said %q", sc.Text())
			}
			acked[id] = n
			if len(acked) == killAt {
				cmd.Process.Signal(syscall.SIGKILL)
				break
			}
		}
		// Acks printed before the kill landed count too.
		for sc.Scan() {
			var id store.ID
			var n int
			if _, err := fmt.Sscanf(sc.Text(), "ack %d %d", &id, &n); err == nil {
				acked[id] = n
			}
		}
		cmd.Wait()

		s, err := OpenDir(dir, DirOptions{InlineLimit: 512})
		if err != nil {
			t.Fatalf("round %d: reopen after kill: %v", round, err)
		}
		for id, n := range acked {
			m, err := s.Get(id)
			if err != nil {
				t.Fatalf("round %d: acknowledged message %v lost: %v", round, id, err)
			}
			h, b := readContent(t, s, m)
			if h != fmt.Sprintf("X-N: %d\r\n\r\n", n) || b != crashBody(n) {
				t.Fatalf("round %d: message %v damaged", round, id)
			}
		}
		// Everything present is whole: no entry without readable content.
		total := 0
		if err := s.Walk(func(m *store.Message) error {
			total++
			_, err := s.Content(m)
			return err
		}); err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		if q, _ := s.Quarantined(); q != 0 {
			t.Fatalf("round %d: %d entries quarantined after a crash", round, q)
		}
		t.Logf("round %d: %d acknowledged, %d stored after kill", round, len(acked), total)
		s.Close()
	}
}
