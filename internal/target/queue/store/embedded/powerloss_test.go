package embedded

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/maddy-spool/spool/internal/target/queue/store"

	"github.com/maddy-spool/spool/internal/testutils/lazyfs"
)

// The power-loss test runs the store on a lazyfs mount (see package lazyfs
// for what it keeps across a crash). Each round, a child process (this test
// binary, re-executed) runs Create/Update/Delete from several goroutines and
// prints each operation before it starts and when it returns nil. The
// file system freezes at a random mutating operation (all later writes fail
// with EIO), the child is killed, the volatile state is dropped, and a
// second child reopens the store and reports what it holds. The parent
// checks the durability contract of the package doc against the log:
//
//   - every acknowledged Create is present, whole, with the state of its
//     last acknowledged Update, or of an Update in flight at the crash;
//   - every acknowledged Delete is gone;
//   - an unacknowledged Create is either absent or whole;
//   - no entry refers to missing or short content, nothing is quarantined,
//     no content file without an entry is left in bodies/, and the store
//     opens.
//
// Rounds continue on the state the previous one left. The seed is printed;
// set SPOOL_POWERLOSS_SEED to repeat a run and SPOOL_POWERLOSS_ROUNDS to
// change the number of crash points.

const (
	plChildEnv = "SPOOL_POWERLOSS_CHILD" // "work:DIR:SEED" or "verify:DIR"
	plWorkers  = 4
	plOps      = 40 // per worker and round
	plInline   = 512
)

// plMessage is the exact metadata of message n at version v (the number of
// Updates applied), so the verifier can tell a mixed state from a whole one.
func plMessage(n, v int) *store.Message {
	m := newMsg(fmt.Sprintf("r%da@example.com", n), fmt.Sprintf("r%db@example.com", n))
	m.MsgID = strconv.Itoa(n)
	m.Attempts = v
	m.NextAttempt = t0.Add(time.Duration(v) * time.Minute)
	m.Held = v%3 == 2
	if v > 0 {
		m.Rcpts[v%2].State = store.RcptDelivered
		m.Rcpts[v%2].Tries = v
		m.LastAttempt = t0.Add(time.Duration(v) * time.Second)
		m.AddHistory(store.AttemptRecord{Time: m.LastAttempt, Error: strings.Repeat("e", v)})
	}
	return m
}

func plHeader(n int) string { return fmt.Sprintf("X-N: %d\r\n\r\n", n) }

func TestPowerLossChild(t *testing.T) {
	spec := os.Getenv(plChildEnv)
	if spec == "" {
		t.Skip("helper for TestPowerLoss")
	}
	parts := strings.SplitN(spec, ":", 3)
	switch parts[0] {
	case "work":
		seed, _ := strconv.ParseInt(parts[2], 10, 64)
		plWork(parts[1], seed)
	case "verify":
		plVerify(parts[1])
	}
	os.Exit(0)
}

func plWork(dir string, seed int64) {
	out := os.Stdout // unbuffered: one write per line, so a kill never splits one
	s, err := OpenDir(dir, DirOptions{InlineLimit: plInline})
	if err != nil {
		fmt.Fprintf(out, "open-error %v\n", err)
		os.Exit(3)
	}
	// Existing messages are split between the workers by ID.
	owned := make([][]*store.Message, plWorkers)
	if err := s.Walk(func(m *store.Message) error {
		owned[int(m.ID)%plWorkers] = append(owned[int(m.ID)%plWorkers], m)
		return nil
	}); err != nil {
		fmt.Fprintf(out, "walk-error %v\n", err)
		os.Exit(3)
	}
	var wg sync.WaitGroup
	for w := 0; w < plWorkers; w++ {
		wg.Add(1)
		go func(w int, mine []*store.Message) {
			defer wg.Done()
			rng := rand.New(rand.NewSource(seed + int64(w)))
			for i := 0; i < plOps; i++ {
				var err error
				// As many creates as deletes, so the queue stays small
				// over hundreds of rounds.
				switch op := rng.Intn(20); {
				case op < 7 || len(mine) == 0:
					n := int(seed%1_000_000)*1000 + w*plOps + i
					m := plMessage(n, 0)
					body := crashBody(n)
					if err = s.Create(context.Background(), m, []byte(plHeader(n)), strings.NewReader(body), int64(len(body))); err == nil {
						fmt.Fprintf(out, "create-ok %d %d\n", m.ID, n)
						mine = append(mine, m)
					}
				case op < 13:
					j := rng.Intn(len(mine))
					old := mine[j]
					n, _ := strconv.Atoi(old.MsgID)
					m := plMessage(n, old.Attempts+1)
					m.ID, m.HeaderLen, m.BodyLen = old.ID, old.HeaderLen, old.BodyLen
					fmt.Fprintf(out, "update-begin %d %d\n", m.ID, m.Attempts)
					if err = s.Update(context.Background(), m); err == nil {
						fmt.Fprintf(out, "update-ok %d %d\n", m.ID, m.Attempts)
						mine[j] = m
					}
				default:
					j := rng.Intn(len(mine))
					id := mine[j].ID
					fmt.Fprintf(out, "delete-begin %d\n", id)
					if err = s.Delete(context.Background(), id); err == nil {
						fmt.Fprintf(out, "delete-ok %d\n", id)
						mine = append(mine[:j], mine[j+1:]...)
					}
				}
				if err != nil {
					fmt.Fprintf(out, "op-error %v\n", err)
					return // the file system froze: this worker is done
				}
			}
		}(w, owned[w])
	}
	wg.Wait()
	s.Close()
}

// plVerify opens the store and prints "entry ID N V" for each whole entry
// and "bad ..." for every breach it can see by itself.
func plVerify(dir string) {
	out := bufio.NewWriter(os.Stdout)
	defer out.Flush()
	var quarantined []string
	s, err := OpenDir(dir, DirOptions{
		InlineLimit: plInline,
		OnQuarantine: func(id store.ID, _ *SchedEntry, r error) {
			quarantined = append(quarantined, fmt.Sprintf("%v: %v", id, r))
		},
		Logf: func(f string, a ...interface{}) { fmt.Fprintf(out, "log "+f+"\n", a...) },
	})
	if err != nil {
		fmt.Fprintf(out, "bad store does not open: %v\n", err)
		return
	}
	defer s.Close()
	sched := map[store.ID]SchedEntry{}
	if err := s.Schedule(func(e SchedEntry) error { sched[e.ID] = e; return nil }); err != nil {
		fmt.Fprintf(out, "bad Schedule: %v\n", err)
	}
	var msgs []*store.Message
	if err := s.Walk(func(m *store.Message) error { msgs = append(msgs, m); return nil }); err != nil {
		fmt.Fprintf(out, "bad Walk: %v\n", err)
	}
	for _, m := range msgs {
		n, err := strconv.Atoi(m.MsgID)
		if err != nil {
			fmt.Fprintf(out, "bad %v: msg_id %q\n", m.ID, m.MsgID)
			continue
		}
		want := plMessage(n, m.Attempts)
		want.ID, want.HeaderLen, want.BodyLen = m.ID, int64(len(plHeader(n))), int64(len(crashBody(n)))
		gotMeta, _ := store.EncodeMeta(m)
		wantMeta, _ := store.EncodeMeta(want)
		if !bytes.Equal(gotMeta, wantMeta) {
			fmt.Fprintf(out, "bad %v: metadata is not a whole version:\n got %s\nwant %s\n", m.ID, gotMeta, wantMeta)
			continue
		}
		if e, ok := sched[m.ID]; !ok || !e.NextAttempt.Equal(m.NextAttempt) || !e.Arrival.Equal(m.Arrival) || e.Held != m.Held || e.Pending != len(m.Pending()) {
			fmt.Fprintf(out, "bad %v: schedule entry %+v (present %v) does not match metadata %+v\n", m.ID, e, ok, schedOf(m))
			continue
		}
		c, err := s.Content(m)
		if err != nil {
			fmt.Fprintf(out, "bad %v: content: %v\n", m.ID, err)
			continue
		}
		r, err := c.Body.Open()
		if err != nil {
			fmt.Fprintf(out, "bad %v: body: %v\n", m.ID, err)
			continue
		}
		body, err := io.ReadAll(r)
		r.Close()
		if err != nil || string(c.Header) != plHeader(n) || string(body) != crashBody(n) {
			fmt.Fprintf(out, "bad %v: content damaged (%v)\n", m.ID, err)
			continue
		}
		fmt.Fprintf(out, "entry %d %d %d\n", m.ID, n, m.Attempts)
	}
	if len(sched) != len(msgs) {
		fmt.Fprintf(out, "bad %d schedule entries for %d messages\n", len(sched), len(msgs))
	}
	entries, err := os.ReadDir(filepath.Join(dir, "bodies"))
	if err != nil {
		fmt.Fprintf(out, "bad reading bodies/: %v\n", err)
	}
	for _, e := range entries {
		id, err := store.ParseID(e.Name())
		if err != nil {
			fmt.Fprintf(out, "bad foreign file bodies/%s\n", e.Name())
			continue
		}
		if _, err := s.Get(id); err != nil {
			fmt.Fprintf(out, "bad orphan content file bodies/%s left after open: %v\n", e.Name(), err)
		}
	}
	for _, q := range quarantined {
		fmt.Fprintf(out, "bad quarantined %s\n", q)
	}
}

// plRun starts the child in mode spec and returns its output lines. If
// frozen is non-nil, the child is killed as soon as it is closed.
func plRun(t *testing.T, spec string, frozen <-chan struct{}) []string {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestPowerLossChild$")
	cmd.Env = append(os.Environ(), plChildEnv+"="+spec)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	select {
	case <-exited:
	case <-frozen:
		// Power is gone: nothing the child does from now on reaches the
		// durable state, so it can be killed at leisure.
		cmd.Process.Kill()
		<-exited
	case <-time.After(2 * time.Minute):
		cmd.Process.Kill()
		<-exited
		t.Fatalf("child %s hung; stderr:\n%s", spec, stderr.String())
	}
	if strings.Contains(stderr.String(), "panic") || strings.Contains(stdout.String(), "panic:") {
		t.Fatalf("child %s panicked:\n%s%s", spec, stdout.String(), stderr.String())
	}
	return strings.Split(strings.TrimSpace(stdout.String()), "\n")
}

// plMount mounts fsys at mnt and returns the function that unmounts it.
func plMount(t *testing.T, fsys *lazyfs.FS, mnt string) func() {
	t.Helper()
	srv, err := fsys.Mount(mnt)
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("mounting lazyfs: %v", err)
		}
		t.Skipf("FUSE not available, test skipped: %v", err)
	}
	return func() {
		if err := lazyfs.Unmount(srv); err != nil {
			t.Fatalf("unmount: %v", err)
		}
	}
}

// plState is what the parent knows of one message.
type plState struct {
	n int
	// versions the message may have after the crash; must says it has to
	// be present.
	versions map[int]bool
	must     bool
	// mayBeGone: a Delete was started (and so maybe committed).
	mayBeGone bool
}

func TestPowerLoss(t *testing.T) {
	if testing.Short() {
		t.Skip("spawns processes and mounts FUSE")
	}
	lazyfs.Require(t)
	seed := time.Now().UnixNano()
	if s := os.Getenv("SPOOL_POWERLOSS_SEED"); s != "" {
		seed, _ = strconv.ParseInt(s, 10, 64)
	}
	rounds := 40
	if s := os.Getenv("SPOOL_POWERLOSS_ROUNDS"); s != "" {
		rounds, _ = strconv.Atoi(s)
	}
	t.Logf("seed %d (SPOOL_POWERLOSS_SEED=%d repeats this run), %d rounds", seed, seed, rounds)
	rng := rand.New(rand.NewSource(seed))

	fsys := lazyfs.New()
	mnt := t.TempDir()
	dir := filepath.Join(mnt, "queue") // created by OpenDir on the mount
	mount := func() func() { return plMount(t, fsys, mnt) }

	known := map[store.ID]int{} // verified state: ID -> version
	names := map[store.ID]int{} // ID -> message number
	// Average number of mutating operations of a whole work round, learnt
	// from rounds that ran to the end; the crash point is drawn below it.
	maxK := 1500
	crashes, acked, checked := 0, 0, 0
	for round := 0; round < rounds; round++ {
		roundSeed := rng.Int63()
		k := 1 + rng.Intn(maxK)
		torn := rng.Intn(2) == 0

		unmount := mount()
		fsys.FreezeAfter(k)
		lines := plRun(t, fmt.Sprintf("work:%s:%d", dir, roundSeed), fsys.Frozen())
		froze := false
		select {
		case <-fsys.Frozen():
			froze = true
		default:
			if m := fsys.Mutations(); m+m/2 > maxK {
				maxK = m + m/2
			}
		}
		unmount()
		var crashRng *rand.Rand
		if torn {
			crashRng = rand.New(rand.NewSource(roundSeed))
		}
		fsys.Crash(crashRng)
		crashes++

		// Expectations from the verified state plus this round's log.
		exp := map[store.ID]*plState{}
		for id, v := range known {
			exp[id] = &plState{n: names[id], versions: map[int]bool{v: true}, must: true}
		}
		for _, l := range lines {
			f := strings.Fields(l)
			if len(f) < 2 {
				continue
			}
			id64, _ := strconv.ParseUint(f[1], 10, 64)
			id := store.ID(id64)
			if f[0] != "create-ok" && exp[id] == nil {
				continue // op-error lines, or an ID the verifier never saw
			}
			arg := 0
			if len(f) > 2 {
				arg, _ = strconv.Atoi(f[2])
			}
			switch f[0] {
			case "create-ok":
				exp[id] = &plState{n: arg, versions: map[int]bool{0: true}, must: true}
				names[id] = arg
				acked++
			case "update-begin":
				exp[id].versions[arg] = true
			case "update-ok":
				exp[id].versions = map[int]bool{arg: true}
				acked++
			case "delete-begin":
				exp[id].mayBeGone = true
			case "delete-ok":
				exp[id].must = false
				exp[id].versions = nil // must be gone
				acked++
			}
		}

		unmount = mount()
		out := plRun(t, "verify:"+dir, nil)
		unmount()
		found := map[store.ID]int{}
		for _, l := range out {
			f := strings.Fields(l)
			switch {
			case len(f) == 0 || f[0] == "log":
			case f[0] == "entry" && len(f) == 4:
				id64, _ := strconv.ParseUint(f[1], 10, 64)
				n, _ := strconv.Atoi(f[2])
				v, _ := strconv.Atoi(f[3])
				found[store.ID(id64)] = v
				if _, ok := names[store.ID(id64)]; !ok {
					names[store.ID(id64)] = n
				}
				if names[store.ID(id64)] != n {
					t.Errorf("round %d: entry %v holds message %d, was created as %d", round, store.ID(id64), n, names[store.ID(id64)])
				}
			default:
				t.Errorf("round %d (seed %d, crash at op %d, torn %v): %s", round, roundSeed, k, torn, l)
			}
		}
		for id, e := range exp {
			v, ok := found[id]
			switch {
			case !ok && e.must && !e.mayBeGone:
				t.Errorf("round %d (seed %d, crash at op %d, torn %v): acknowledged message %v lost", round, roundSeed, k, torn, id)
			case ok && e.versions == nil:
				t.Errorf("round %d: message %v present after its Delete was acknowledged", round, id)
			case ok && !e.versions[v]:
				t.Errorf("round %d (seed %d, crash at op %d): message %v has version %d, want one of %v", round, roundSeed, k, id, v, e.versions)
			}
		}
		for id, v := range found {
			if _, ok := exp[id]; !ok && v != 0 {
				t.Errorf("round %d: unacknowledged new message %v has version %d", round, id, v)
			}
		}
		checked += len(found)
		known = found
		if t.Failed() {
			t.Fatalf("stopping after round %d; rerun with SPOOL_POWERLOSS_SEED=%d", round, seed)
		}
		t.Logf("round %d: crash at mutating op %d (froze %v, torn %v): %d lines of log, %d messages after restart", round, k, froze, torn, len(lines), len(found))
	}
	t.Logf("%d crash points, %d acknowledged operations checked, %d entry checks, %d messages at the end", crashes, acked, checked, len(known))
}
