package migrate

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/maddy-spool/spool/internal/target/queue/store"
	"github.com/maddy-spool/spool/internal/target/queue/store/embedded"
)

// Names in a Spool store directory (see store/embedded) and the ones an
// import of it adds.
const (
	storeDBName = "queue.db"
	// roundPrefix starts the name of the directory an import moves the
	// database into: imported-YYYYMMDDTHHMMSSZ, with partialSuffix until
	// every message is released in the destination.
	roundPrefix   = "imported-"
	partialSuffix = ".partial"
	// journalName, in the round directory, lists the copy key of every
	// message the import is about to create in the destination.
	journalName = "copied.keys"
	// journalBatch is how many keys are made durable at once, ahead of
	// the creates they announce.
	journalBatch = 100
	// sourceLockTimeout bounds the wait for the source store's lock.
	sourceLockTimeout = 2 * time.Second
)

// storeContentDirs are the embedded store's directories of content files,
// moved with its database so that the moved-aside store is whole.
var storeContentDirs = []string{"bodies", "quarantine"}

// Round is one import of a Spool store's database (ImportStore).
type Round struct {
	// Dir is the directory the source database was moved into (or would
	// be, in a dry run), by its final name.
	Dir string
	// Sealed is set once the database is moved aside (by this run or an
	// earlier one); Done once, in addition, every message that was not
	// held in the source is released in the destination.
	Sealed, Done bool
	// Released counts the copies released (or found released by an
	// earlier run), KeptHeld those left held because the source message
	// was held, Finished the messages whose copy was no longer in the
	// destination when it was to be released (a node had finished it).
	Released, KeptHeld, Finished int
	// Removed lists held copies removed from the destination because the
	// source no longer had their message: a maddy ran on the source
	// between two runs of an interrupted import and finished it.
	Removed []string
}

// IsSpoolStore reports whether dir holds a Spool store (queue.db) or what
// an import of one left there (imported-* directories), as opposed to a
// target.queue directory.
func IsSpoolStore(dir string) (bool, error) {
	if _, err := os.Stat(filepath.Join(dir, storeDBName)); err == nil {
		return true, nil
	} else if !errors.Is(err, fs.ErrNotExist) {
		return false, err
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return false, err
	}
	for _, e := range entries {
		if e.IsDir() && strings.HasPrefix(e.Name(), roundPrefix) {
			return true, nil
		}
	}
	return false, nil
}

// ImportStore moves every message of the embedded Spool store in fromDir
// into dst with its whole state, as described in the package
// documentation ("Importing a Spool store"): copied held, the source
// database moved aside, then released. The maddy that used fromDir must
// be stopped; dst may be a store other nodes are running on.
//
// Messages it cannot copy are listed in Result.Failed; the database is
// moved aside only when every message is in dst. The returned error is
// for problems that stop the whole run. Like Import, it is safe to run
// again after a crash or an error at any point, and must be run again
// until Result.Failed is empty.
func ImportStore(ctx context.Context, fromDir string, dst Destination, opts Options) (res Result, err error) {
	si := &storeImporter{dir: fromDir, dst: dst, opts: opts.withDefaults()}
	si.res.DryRun = opts.DryRun
	start := si.opts.Now()
	defer func() {
		res = si.res
		res.Elapsed = si.opts.Now().Sub(start)
	}()
	return si.res, si.run(ctx)
}

type storeImporter struct {
	dir  string
	dst  Destination
	opts Options
	res  Result
}

// step runs the test hook at a named point of the protocol.
func (si *storeImporter) step(name string) error {
	if si.opts.beforeStep == nil {
		return nil
	}
	return si.opts.beforeStep(name)
}

func (si *storeImporter) run(ctx context.Context) error {
	entries, err := os.ReadDir(si.dir)
	if err != nil {
		return err
	}
	var sealed, unsealed, done []string
	for _, e := range entries {
		name := e.Name()
		if !e.IsDir() || !strings.HasPrefix(name, roundPrefix) {
			continue
		}
		path := filepath.Join(si.dir, name)
		switch {
		case !strings.HasSuffix(name, partialSuffix):
			done = append(done, path)
		case fileExists(filepath.Join(path, storeDBName)):
			sealed = append(sealed, path)
		default:
			unsealed = append(unsealed, path)
		}
	}
	// Finish releasing first: those databases can deliver nothing any
	// more, and their copies wait held until this is done.
	for _, r := range sealed {
		if err := si.finishRound(ctx, r); err != nil {
			return err
		}
	}
	if len(si.res.Failed) > 0 {
		return nil
	}
	live := fileExists(filepath.Join(si.dir, storeDBName))
	switch {
	case len(unsealed) > 1:
		return fmt.Errorf("%s holds several unfinished imports (%s); an import leaves at most one: remove the others by hand if they hold nothing but %s",
			si.dir, strings.Join(unsealed, ", "), journalName)
	case live:
		reuse := ""
		if len(unsealed) == 1 {
			reuse = unsealed[0]
		}
		return si.copyRound(ctx, reuse)
	case len(unsealed) == 1:
		return fmt.Errorf("%s has no %s, yet %s records an unfinished import of it (was %s moved or removed by hand?)",
			si.dir, storeDBName, unsealed[0], storeDBName)
	case len(sealed) == 0 && len(done) == 0:
		return fmt.Errorf("%s holds no Spool store (no %s)", si.dir, storeDBName)
	case len(sealed) == 0:
		for _, d := range done {
			si.note("%s: imported by an earlier run; nothing left to do", d)
		}
	}
	return nil
}

// copyRound is the copy phase and the seal of the live database, then
// the release. reuse is the round directory an interrupted run left, if
// any.
func (si *storeImporter) copyRound(ctx context.Context, reuse string) error {
	src, err := embedded.OpenDir(si.dir, embedded.DirOptions{
		ReadOnly:    si.opts.DryRun,
		LockTimeout: sourceLockTimeout,
		Logf:        si.opts.Logf,
	})
	if err != nil {
		return fmt.Errorf("opening the Spool store in %s: %w; stop the maddy that uses it (and any other import from it) before importing", si.dir, err)
	}
	srcOpen := true
	defer func() {
		if srcOpen {
			src.Close()
		}
	}()
	msgs, err := walkAll(src.Walk)
	if err != nil {
		return fmt.Errorf("reading the Spool store in %s: %w", si.dir, err)
	}
	if len(msgs) == 0 && reuse == "" {
		si.note("%s: no message queued; nothing to import, left as it is", si.dir)
		return nil
	}

	idx, err := si.index()
	if err != nil {
		return err
	}
	roundDir := reuse
	var journal map[string]bool
	if roundDir == "" {
		roundDir, err = si.newRoundName()
		if err != nil {
			return err
		}
	} else if journal, err = readJournal(filepath.Join(roundDir, journalName)); err != nil {
		return err
	}

	type item struct {
		m    *store.Message
		key  string
		copy *store.Message // in the destination, from an earlier run
	}
	items := make([]item, len(msgs))
	inSource := map[string]bool{}
	for i, m := range msgs {
		k := copyKey(m)
		items[i] = item{m: m, key: k, copy: idx.take(k)}
		inSource[k] = true
	}

	round := Round{Dir: strings.TrimSuffix(roundDir, partialSuffix)}
	// Copies an earlier run made of messages the source no longer has: a
	// maddy ran on the source since and finished them there.
	for k := range journal {
		if inSource[k] {
			continue
		}
		for _, c := range idx.takeAll(k) {
			if !c.Held {
				si.note("copy %v (maddy message %s) is not held in the destination, though its source message is gone: it was released by hand; left as it is", c.ID, c.MsgID)
				continue
			}
			if !si.opts.DryRun {
				if err := si.dst.Delete(ctx, c.ID); err != nil && !errors.Is(err, store.ErrNotFound) {
					return fmt.Errorf("removing copy %v, whose source message is gone: %w", c.ID, err)
				}
			}
			round.Removed = append(round.Removed, fmt.Sprintf("%v (maddy message %s)", c.ID, c.MsgID))
		}
	}

	var jw *journalWriter
	if !si.opts.DryRun {
		if reuse == "" {
			if err := os.Mkdir(roundDir, 0o700); err != nil {
				return err
			}
			if err := syncDir(si.dir); err != nil {
				return err
			}
			if err := si.step("round"); err != nil {
				return err
			}
		}
		jw, err = openJournal(roundDir)
		if err != nil {
			return err
		}
		defer jw.close()
	}

	blocking := 0 // failures that keep the database from being moved aside
	journaled := 0
	for i, it := range items {
		if err := ctx.Err(); err != nil {
			return err
		}
		name := it.m.ID.String()
		rcpts := len(it.m.Pending())
		switch {
		case it.copy != nil:
			if !sameState(it.copy, it.m) && !si.opts.DryRun {
				// The source changed since the copy was made (a maddy ran
				// on it in between): the copy takes its state.
				upd := *it.m
				upd.ID, upd.Held, upd.Lease = it.copy.ID, true, nil
				if err := si.dst.Update(ctx, &upd); err != nil {
					si.fail(name, fmt.Errorf("updating its copy %v: %w; run the import again", it.copy.ID, err))
					blocking++
					break
				}
			}
			si.imported(name, it.copy.ID, rcpts, true)
		case si.opts.DryRun:
			si.imported(name, 0, rcpts, false)
		default:
			if i >= journaled {
				var keys []string
				j := i
				for ; j < len(items) && len(keys) < journalBatch; j++ {
					if items[j].copy == nil {
						keys = append(keys, items[j].key)
					}
				}
				if err := jw.append(keys); err != nil {
					return fmt.Errorf("recording what is being copied: %w", err)
				}
				journaled = j
			}
			id, err := si.create(ctx, src, it.m)
			if errors.Is(err, store.ErrCorrupt) {
				// The store moved the entry to its quarantine: it is no
				// longer queued in the source, so it does not keep the
				// rest from moving on.
				si.fail(name, fmt.Errorf("damaged in the source store, which moved it to its quarantine (kept with the database): %w", err))
				break
			}
			if err != nil {
				si.fail(name, fmt.Errorf("%w; run the import again", err))
				blocking++
				break
			}
			si.imported(name, id, rcpts, false)
		}
		si.opts.Progress(Progress{PhaseImporting, i + 1, len(items)})
	}

	if si.opts.DryRun {
		for _, it := range items {
			if it.m.Held {
				round.KeptHeld++
			} else {
				round.Released++
			}
		}
		si.res.Rounds = append(si.res.Rounds, round)
		return nil
	}
	if blocking > 0 {
		si.note("%s was not moved aside: %d message(s) are not copied yet; every copy stays held until a run copies them all", filepath.Join(si.dir, storeDBName), blocking)
		if len(round.Removed) > 0 {
			si.res.Rounds = append(si.res.Rounds, round)
		}
		return nil
	}

	// The seal: from the rename on, nothing can deliver from the source.
	if err := si.step("seal"); err != nil {
		return err
	}
	if err := os.Rename(filepath.Join(si.dir, storeDBName), filepath.Join(roundDir, storeDBName)); err != nil {
		return fmt.Errorf("moving the source database aside: %w", err)
	}
	if err := syncDir(roundDir); err != nil {
		return err
	}
	if err := syncDir(si.dir); err != nil {
		return err
	}
	if err := si.step("sealed"); err != nil {
		return err
	}
	// Still under the source's lock: no maddy can have made new content
	// directories in the meantime.
	if err := moveContentDirs(si.dir, roundDir); err != nil {
		return err
	}
	srcOpen = false
	if err := src.Close(); err != nil {
		si.opts.Logf("closing the source store: %v", err)
	}
	if err := si.step("release"); err != nil {
		return err
	}
	return si.releaseRound(ctx, roundDir, round.Removed)
}

// create copies m with its content into the destination, held, and
// returns its ID there.
func (si *storeImporter) create(ctx context.Context, src *embedded.Dir, m *store.Message) (store.ID, error) {
	c, err := src.Content(m)
	if err != nil {
		return 0, fmt.Errorf("reading its content: %w", err)
	}
	body, err := c.Body.Open()
	if err != nil {
		return 0, fmt.Errorf("reading its content: %w", err)
	}
	defer body.Close()
	cp := *m
	cp.ID, cp.Held, cp.Lease = 0, true, nil
	if err := si.dst.Create(ctx, &cp, c.Header, body, m.BodyLen); err != nil {
		return 0, fmt.Errorf("store: %w", err)
	}
	return cp.ID, nil
}

// finishRound completes a round whose database was moved aside by an
// earlier run: the rest of the move, then the release.
func (si *storeImporter) finishRound(ctx context.Context, roundDir string) error {
	if !si.opts.DryRun {
		if err := si.completeMove(roundDir); err != nil {
			return err
		}
	}
	return si.releaseRound(ctx, roundDir, nil)
}

// completeMove moves the content directories after the database if a
// crash came in between. It does so only while nothing else uses the
// source directory: a maddy that started there since has a new database,
// whose content they now are.
func (si *storeImporter) completeMove(roundDir string) error {
	if fileExists(filepath.Join(si.dir, storeDBName)) {
		return nil
	}
	unlock, err := embedded.TryLockDir(si.dir)
	if err != nil {
		si.note("%s is in use (%v): its content directories are left where they are", si.dir, err)
		return nil
	}
	defer unlock()
	if fileExists(filepath.Join(si.dir, storeDBName)) {
		return nil
	}
	return moveContentDirs(si.dir, roundDir)
}

// releaseRound is the release phase of the database in roundDir (moved
// there, so it can deliver nothing): every message that was not held in
// the source is released in the destination, then the round directory
// takes its final name.
func (si *storeImporter) releaseRound(ctx context.Context, roundDir string, removed []string) error {
	round := Round{Dir: strings.TrimSuffix(roundDir, partialSuffix), Removed: removed, Sealed: true}
	aside, err := embedded.OpenDir(roundDir, embedded.DirOptions{ReadOnly: true, LockTimeout: sourceLockTimeout})
	if err != nil {
		return fmt.Errorf("opening the moved-aside database in %s: %w", roundDir, err)
	}
	msgs, err := walkAll(aside.Walk)
	aside.Close()
	if err != nil {
		return fmt.Errorf("reading the moved-aside database in %s: %w", roundDir, err)
	}
	idx, err := si.index()
	if err != nil {
		return err
	}
	failed := 0
	for i, m := range msgs {
		if err := ctx.Err(); err != nil {
			return err
		}
		c := idx.take(copyKey(m))
		switch {
		case c == nil && m.Held:
			si.note("held message %v of the source has no copy in the destination (removed there by hand?)", m.ID)
		case c == nil:
			// Every message was copied before the seal, so its copy was
			// released earlier and a node has finished it since.
			round.Finished++
		case m.Held:
			round.KeptHeld++
		case !c.Held:
			round.Released++
		default:
			if !si.opts.DryRun {
				rel := *c
				rel.Held, rel.Lease = false, nil
				err := si.dst.Update(ctx, &rel)
				if errors.Is(err, store.ErrNotFound) {
					round.Finished++ // removed in the destination meanwhile
					break
				}
				if err != nil {
					si.fail(m.ID.String(), fmt.Errorf("releasing its copy %v: %w; run the import again", c.ID, err))
					failed++
					break
				}
			}
			round.Released++
		}
		si.opts.Progress(Progress{PhaseReleasing, i + 1, len(msgs)})
	}
	if failed == 0 && !si.opts.DryRun {
		if err := si.step("done"); err != nil {
			return err
		}
		if err := os.Rename(roundDir, round.Dir); err != nil {
			return fmt.Errorf("renaming %s when done: %w", roundDir, err)
		}
		if err := syncDir(si.dir); err != nil {
			return err
		}
	}
	round.Done = failed == 0
	si.res.Rounds = append(si.res.Rounds, round)
	return nil
}

// newRoundName returns an unused name for a new round directory.
func (si *storeImporter) newRoundName() (string, error) {
	stamp := si.opts.Now().UTC().Format("20060102T150405Z")
	for n := 1; ; n++ {
		base := roundPrefix + stamp
		if n > 1 {
			base += "-" + strconv.Itoa(n)
		}
		path := filepath.Join(si.dir, base)
		if !fileExists(path) && !fileExists(path+partialSuffix) {
			return path + partialSuffix, nil
		}
	}
}

func (si *storeImporter) imported(name string, id store.ID, rcpts int, resumed bool) {
	si.res.Imported = append(si.res.Imported, Imported{Name: name, ID: id, Rcpts: rcpts, Resumed: resumed})
	si.opts.Logf("imported %s as %v (%d recipients pending)", name, id, rcpts)
}

func (si *storeImporter) fail(name string, err error) {
	si.res.Failed = append(si.res.Failed, Failed{Name: name, Err: err})
	si.opts.Logf("not imported %s: %v", name, err)
}

func (si *storeImporter) note(format string, args ...interface{}) {
	s := fmt.Sprintf(format, args...)
	si.res.Notes = append(si.res.Notes, s)
	si.opts.Logf("%s", s)
}

// walkAll returns every message a Walk visits.
func walkAll(walk func(func(*store.Message) error) error) ([]*store.Message, error) {
	var msgs []*store.Message
	err := walk(func(m *store.Message) error {
		msgs = append(msgs, m)
		return nil
	})
	return msgs, err
}

// copyIndex finds the destination's messages by copy key.
type copyIndex map[string][]*store.Message

// take removes and returns one message with key k, or nil.
func (x copyIndex) take(k string) *store.Message {
	ms := x[k]
	if len(ms) == 0 {
		return nil
	}
	x[k] = ms[1:]
	return ms[0]
}

// takeAll removes and returns every message with key k.
func (x copyIndex) takeAll(k string) []*store.Message {
	ms := x[k]
	delete(x, k)
	return ms
}

// index reads the destination's messages by copy key.
func (si *storeImporter) index() (copyIndex, error) {
	x := copyIndex{}
	err := si.dst.Walk(func(m *store.Message) error {
		k := copyKey(m)
		x[k] = append(x[k], m)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("reading the destination: %w", err)
	}
	return x, nil
}

// copyKey identifies a message and its copies: what no change of its
// state touches (maddy's message ID, sender, arrival to the nanosecond,
// content lengths, recipient addresses). Two different messages cannot
// share it unless maddy gave both the same ID in the same nanosecond.
func copyKey(m *store.Message) string {
	h := sha256.New()
	fmt.Fprintf(h, "%q %q %d %d %d", m.MsgID, m.From, m.Arrival.UnixNano(), m.HeaderLen, m.BodyLen)
	for _, r := range m.Rcpts {
		fmt.Fprintf(h, " %q", r.Addr)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// sameState reports whether a copy has the state of the source message,
// the held flag aside.
func sameState(a, b *store.Message) bool {
	x, y := *a, *b
	x.Held, y.Held = false, false
	ea, err := store.EncodeMeta(&x)
	if err != nil {
		return false
	}
	eb, err := store.EncodeMeta(&y)
	return err == nil && bytes.Equal(ea, eb)
}

// readJournal reads the keys of a round's journal. A line cut short by
// a crash is not a key and is skipped: its create had not started.
func readJournal(path string) (map[string]bool, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	keys := map[string]bool{}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		k := sc.Text()
		if _, err := hex.DecodeString(k); err == nil && len(k) == 2*sha256.Size {
			keys[k] = true
		}
	}
	return keys, nil
}

// journalWriter appends keys to a round's journal.
type journalWriter struct {
	f       *os.File
	dir     string
	created bool // the file's name is not yet durable
}

func openJournal(roundDir string) (*journalWriter, error) {
	path := filepath.Join(roundDir, journalName)
	created := !fileExists(path)
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	return &journalWriter{f: f, dir: roundDir, created: created}, nil
}

// append makes keys durable before the creates they announce.
func (j *journalWriter) append(keys []string) error {
	if len(keys) == 0 {
		return nil
	}
	if _, err := j.f.WriteString(strings.Join(keys, "\n") + "\n"); err != nil {
		return err
	}
	if err := j.f.Sync(); err != nil {
		return err
	}
	if j.created {
		if err := syncDir(j.dir); err != nil {
			return err
		}
		j.created = false
	}
	return nil
}

func (j *journalWriter) close() { j.f.Close() }

// moveContentDirs moves the store's content directories from src into
// roundDir (those not moved yet) and makes the moves durable.
func moveContentDirs(src, roundDir string) error {
	moved := false
	for _, d := range storeContentDirs {
		from, to := filepath.Join(src, d), filepath.Join(roundDir, d)
		if !fileExists(from) || fileExists(to) {
			continue
		}
		if err := os.Rename(from, to); err != nil {
			return fmt.Errorf("moving %s aside: %w", from, err)
		}
		moved = true
	}
	if !moved {
		return nil
	}
	if err := syncDir(roundDir); err != nil {
		return err
	}
	return syncDir(src)
}

func fileExists(path string) bool {
	_, err := os.Lstat(path)
	return err == nil
}
