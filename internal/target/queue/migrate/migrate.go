// Package migrate moves queued messages into a Spool store, for `maddy
// spool import`: those of maddy's own target.queue (maddy 0.8.1), and
// those of an embedded Spool store, into any store (see "Importing a
// Spool store" below).
//
// # Source format
//
// target.queue keeps three files per message in its directory: ID.meta
// (JSON metadata: envelope, pending recipients, per-recipient tries and
// last errors, first/last attempt), ID.header (the header block) and
// ID.body. What is carried over and what is not is described on convert
// and in docs/reference/migration.md. In short: the pending recipients
// (maddy's To list) are imported with their tries count and last error;
// recipients maddy already delivered or failed for good are not, so they
// are neither sent again nor reported on again (maddy sent its failure
// report when they failed).
//
// # Steps per message and crash states
//
// An entry NAME is moved in five steps, each durable before the next:
//
//  1. NAME.meta is renamed to NAME.meta.importing (the marker) and the
//     directory is fsynced. From here on maddy's target.queue ignores the
//     entry (it loads *.meta only), so a rollback cannot deliver it twice.
//  2. The message is created in the store with Held set, so Spool does not
//     attempt it yet.
//  3. NAME.header and NAME.body are removed and the directory is fsynced.
//  4. The store entry is updated with Held cleared.
//  5. The marker is removed and the directory is fsynced.
//
// A crash (or an error) leaves one of these states, which the next run
// resolves from the marker alone:
//
//   - before 1: the entry is untouched and is imported from scratch.
//   - between 1 and 2 (marker, header and body present, nothing in the
//     store): the store is searched for the message (same maddy ID, sender
//     and arrival time); it is not found, so it is created.
//   - between 2 and 3 (marker, header, body, held store entry): the search
//     finds the held entry; steps 3 to 5 are done.
//   - between 3 and 5 (marker, header or body gone): the store entry was
//     created before anything was removed, so nothing is created again;
//     leftover files are removed, the entry is released if still held, and
//     the marker removed. If the entry is no longer in the store (Spool ran
//     in between and finished it), only the leftovers are removed.
//
// Creating only while both content files exist, removing them only after
// Create returned, and keeping the entry held until they are gone, is what
// makes the search exact: a held entry cannot have been delivered and
// deleted by Spool, so "not found while the content files exist" always
// means "never created". The one way to duplicate is an operator releasing
// or deleting such a held entry by hand before re-running the import.
//
// Entries that cannot be read (damaged or unknown metadata, truncated
// header, missing content) are not touched and are reported, as are files
// that belong to no entry.
//
// # Importing a Spool store
//
// ImportStore moves the messages of an embedded Spool store (a directory
// with queue.db, see store/embedded) into another store, typically the
// PostgreSQL store of a cluster whose nodes may be running: the path from
// one node to a cluster. Each message keeps its whole state (recipients'
// states, tries, last errors, reported DSN kinds, history, attempt times,
// held flag, envelope and DSN options, connection details, content), so
// nothing is delivered or reported twice and nothing is lost. The maddy
// that used the source must be stopped: the source is opened for writing,
// which takes its lock file, and fails naming the holder otherwise.
//
// A message is recognised in the destination by its copy key (copyKey: a
// hash of maddy's message ID, the sender, the arrival time to the
// nanosecond, the content lengths and the recipient addresses), which no
// change of state alters. A run is one round, kept in a directory of the
// source, LOCATION/imported-STAMP.partial, and goes through these steps,
// each durable before the next:
//
//  1. The round directory is created (and LOCATION fsynced); a round an
//     interrupted run left is reused.
//  2. The destination is read and every source message is matched with
//     its copy, if an earlier run made one. Before messages without a
//     copy are created, their keys are appended to the round's journal
//     (copied.keys) and fsynced, a batch at a time.
//  3. Each message without a copy is created in the destination with
//     Held set, so no node attempts it; a copy whose state differs from
//     its source message (a maddy ran on the source between two runs) is
//     updated to the source's state, still held. Copies of journaled keys
//     that the source no longer has (that maddy finished them) are
//     deleted from the destination if they are still held.
//  4. Only when every queued source message has a copy: queue.db is
//     renamed into the round directory, and both directories are
//     fsynced. This is the seal: from here on nothing can deliver from the
//     source (a maddy started on LOCATION finds no database and starts
//     empty). The database is never deleted: the operator can inspect the
//     round directory as a store (maddy spool list --dir).
//  5. bodies/ and quarantine/ are moved into the round directory too, so
//     that it is a whole store, and that is fsynced.
//  6. The moved database is read, and the copy of every message that was
//     not held in the source is released (Held cleared); copies of held
//     messages stay held.
//  7. The round directory is renamed to LOCATION/imported-STAMP, and
//     LOCATION fsynced: the round is done.
//
// A crash (or an error) at any point leaves a state the next run resolves
// from what is on disk:
//
//   - before 4 (queue.db still in LOCATION): every copy is held, so
//     nothing is delivered twice, and the source is whole. The run
//     starts again at 2 in the same round directory: messages already
//     copied are matched and not created again, the others are created.
//     A Create that failed before storing left no copy; one that stored
//     and then failed (or whose reply was lost) left a held copy that the
//     match finds. If the operator went back and ran maddy on the source
//     in between, the copies are brought up to date and those of
//     messages it finished are removed (their keys are in the journal,
//     written before the creates), so what is released later is the
//     source's last state.
//   - between 4 and 7 (queue.db in imported-STAMP.partial): the run
//     first finishes step 5, if LOCATION has no new database, and then
//     steps 6 and 7. Every message had a copy when the database was
//     moved, so a message whose copy is not found was released earlier
//     and finished by a node since; releasing a copy already released
//     changes nothing.
//   - after 7: nothing is left to do; the run says so.
//
// A message damaged in the source (its content missing or unreadable) is
// moved to the source store's quarantine when read, and so is no longer
// queued there; it is reported and does not keep the rest from moving on.
// Any other failure to copy a message stops the run before step 4 and is
// reported; the next run completes it. As with target.queue entries, the
// one way to duplicate a message is an operator releasing or deleting a
// held copy by hand before the import is done.
package migrate

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/maddy-spool/spool/internal/target/queue/store"
	"github.com/maddy-spool/spool/internal/target/queue/store/embedded"
)

// File name suffixes of maddy's target.queue, and of the import marker.
const (
	suffixMeta      = ".meta"
	suffixHeader    = ".header"
	suffixBody      = ".body"
	suffixMarker    = ".meta.importing"
	suffixBroken    = ".meta_broken" // maddy's own mark for an entry that made it panic
	suffixMetaWrite = ".meta.new"    // maddy's metadata being rewritten
)

// Options tune an import.
type Options struct {
	// Now is the clock; nil means time.Now. It decides when imported
	// messages become due (never before now).
	Now func() time.Time
	// Logf receives one line per entry handled; nil discards them.
	Logf func(format string, args ...interface{})
	// DryRun reads and checks every entry and reports what would be done,
	// without changing the source directory or the store.
	DryRun bool
	// Progress, if set, is called after every entry read and every entry
	// handled; see Progress.
	Progress func(Progress)

	// beforeStep, if set (by tests), is called at the named points of
	// ImportStore's protocol; an error stops the run there, as a crash
	// would.
	beforeStep func(step string) error
}

// withDefaults fills in the options left unset.
func (o Options) withDefaults() Options {
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Logf == nil {
		o.Logf = func(string, ...interface{}) {}
	}
	if o.Progress == nil {
		o.Progress = func(Progress) {}
	}
	return o
}

// Progress is how far an import is: Done of the Total entries of its
// current phase. An import of a target.queue directory first reads the
// metadata of every entry (PhaseReading: Total is the number of metadata
// files), then handles the readable ones (PhaseImporting: Total counts
// them, interrupted imports included). An import of a Spool store copies
// its messages (PhaseImporting), then releases the copies
// (PhaseReleasing: Total is the number of messages moved aside).
type Progress struct {
	Phase       string
	Done, Total int
}

// The phases of an import.
const (
	PhaseReading   = "reading"
	PhaseImporting = "importing"
	PhaseReleasing = "releasing"
)

// Imported is one maddy entry now in the store.
type Imported struct {
	// Name is the maddy queue ID (the file name without suffix).
	Name string
	// ID is the new store ID; 0 in a dry run.
	ID store.ID
	// Rcpts is the number of pending recipients imported.
	Rcpts int
	// Dropped lists recipients maddy had already finished with (failed for
	// good, or delivered after an earlier failure); they are not imported.
	Dropped []string
	// Resumed is set when the entry was left half-imported by an earlier
	// run and this run completed it.
	Resumed bool
}

// Skipped is an entry that needed no import.
type Skipped struct {
	Name   string
	Reason string
}

// Failed is an entry (or file) left in the source directory because it
// could not be imported, with the reason.
type Failed struct {
	Name string
	Err  error
}

// Result is what an import did.
type Result struct {
	Imported []Imported
	Skipped  []Skipped
	Failed   []Failed
	// Stray lists files of maddy's queue format that belong to no entry
	// (content without metadata, a metadata rewrite maddy did not finish).
	// They are left alone.
	Stray []string
	// Rounds are the Spool store databases ImportStore moved aside (or
	// would, in a dry run) and released from.
	Rounds []Round
	// Notes are remarks on the run as a whole, for the operator.
	Notes []string
	// DryRun is set when nothing was changed.
	DryRun bool
	// Elapsed is how long the import took, by Options.Now.
	Elapsed time.Duration
}

// Destination is the store messages are imported into: an embedded
// store's Dir opened while maddy is stopped, or any store.Backend through
// BackendDestination.
type Destination interface {
	// Create stores a new message durably; it is not attempted while
	// held.
	Create(ctx context.Context, m *store.Message, header []byte, body io.Reader, bodyLen int64) error
	// Update replaces the metadata of a stored message.
	Update(ctx context.Context, m *store.Message) error
	// Walk calls fn for every stored message.
	Walk(fn func(*store.Message) error) error
	// Delete removes a stored message with its content.
	Delete(ctx context.Context, id store.ID) error
}

var _ Destination = (*embedded.Dir)(nil)

// BackendDestination imports into a store.Backend, such as a PostgreSQL
// store that nodes may be running on: each message is stored held and
// committed at once, and released (Update) under a lease of its own, so
// no node attempts it before its maddy files are gone.
func BackendDestination(b store.Backend) Destination { return backendDestination{b} }

type backendDestination struct{ b store.Backend }

func (d backendDestination) Create(ctx context.Context, m *store.Message, header []byte, body io.Reader, bodyLen int64) error {
	l, err := d.b.Create(ctx, m, header, body, bodyLen)
	if err != nil {
		return err
	}
	if _, err := d.b.Commit(ctx, l); err != nil {
		// Stored, not yet committed: the receiving lease expires and the
		// message is queued as it is (held); the next run finds it.
		return err
	}
	return nil
}

func (d backendDestination) Update(ctx context.Context, m *store.Message) error {
	c, err := d.claim(ctx, m.ID)
	if err != nil {
		return err
	}
	req, err := d.b.Save(ctx, c.Lease, m)
	if err == nil && req != 0 {
		// An operator acted meanwhile; the import does not apply it.
		_, err = d.b.Release(ctx, c.Lease)
	}
	return err
}

func (d backendDestination) Delete(ctx context.Context, id store.ID) error {
	c, err := d.claim(ctx, id)
	if err != nil {
		return err
	}
	return d.b.Delete(ctx, c.Lease)
}

// claimTries and claimWait bound how long the import waits for a message
// another party holds for a moment (an operator's change on a node).
const (
	claimTries = 10
	claimWait  = 200 * time.Millisecond
)

// claim leases message id for the import, waiting a little while another
// party holds it.
func (d backendDestination) claim(ctx context.Context, id store.ID) (store.Claim, error) {
	for i := 1; ; i++ {
		c, err := d.b.ClaimID(ctx, id)
		if !errors.Is(err, store.ErrLeased) || i == claimTries {
			return c, err
		}
		select {
		case <-ctx.Done():
			return c, ctx.Err()
		case <-time.After(claimWait):
		}
	}
}

func (d backendDestination) Walk(fn func(*store.Message) error) error {
	return d.b.Walk(context.Background(), fn)
}

// Import moves every message queued by maddy's target.queue in fromDir into
// dst. It processes entries one by one and keeps going past entries it
// cannot import; those are listed in Result.Failed. The returned error is
// for problems that stop the whole run: fromDir cannot be listed, the
// store cannot be searched, or ctx is done.
//
// Import is safe to run again, after a crash or an error at any point (see
// the package documentation); maddy must not be running on fromDir.
func Import(ctx context.Context, fromDir string, dst Destination, opts Options) (res Result, err error) {
	im := &importer{dir: fromDir, dst: dst, opts: opts.withDefaults(), res: Result{DryRun: opts.DryRun}}
	start := im.opts.Now()
	defer func() { res.Elapsed = im.opts.Now().Sub(start) }()
	fresh, markers, err := im.scan()
	if err != nil {
		return im.res, err
	}
	total := len(markers) + len(fresh)
	done := 0
	// Half-done entries first, so a re-run finishes what it started before
	// taking on more.
	for _, name := range markers {
		if err := ctx.Err(); err != nil {
			return im.res, err
		}
		if err := im.resume(ctx, name); err != nil {
			return im.res, err
		}
		done++
		im.opts.Progress(Progress{PhaseImporting, done, total})
	}
	for _, e := range fresh {
		if err := ctx.Err(); err != nil {
			return im.res, err
		}
		im.importFresh(ctx, e)
		done++
		im.opts.Progress(Progress{PhaseImporting, done, total})
	}
	return im.res, nil
}

type importer struct {
	dir  string
	dst  Destination
	opts Options
	res  Result
	// byMsgID indexes the store's messages by maddy ID, built on the first
	// marker found (only a resumed run needs to search the store).
	byMsgID map[string][]*store.Message
}

// entry is a readable maddy entry ready to be moved.
type entry struct {
	name    string
	conv    converted
	header  []byte
	bodyLen int64
}

func (im *importer) path(name, suffix string) string {
	return filepath.Join(im.dir, name+suffix)
}

// scan lists the source directory: it reads every fresh entry (so they
// can be imported in arrival order), returns the names of entries with a
// marker, and records broken entries and stray files.
func (im *importer) scan() ([]entry, []string, error) {
	dirEntries, err := os.ReadDir(im.dir)
	if err != nil {
		return nil, nil, err
	}
	files := map[string]bool{}
	for _, de := range dirEntries {
		if !de.IsDir() {
			files[de.Name()] = true
		}
	}
	owned := map[string]bool{} // names with metadata or a marker
	var fresh []entry
	var markers []string
	var names []string
	toRead := 0 // metadata files without a marker: read below
	for f := range files {
		names = append(names, f)
		if name, ok := strings.CutSuffix(f, suffixMeta); ok && !files[name+suffixMarker] {
			toRead++
		}
	}
	slices.Sort(names)
	read := 0
	for _, f := range names {
		switch {
		case strings.HasSuffix(f, suffixMarker):
			name := strings.TrimSuffix(f, suffixMarker)
			owned[name] = true
			if files[name+suffixMeta] {
				im.fail(name, fmt.Errorf("both %s and %s exist; maddy ran after an interrupted import, remove the older one by hand", name+suffixMeta, f))
				continue
			}
			markers = append(markers, name)
		case strings.HasSuffix(f, suffixMeta):
			name := strings.TrimSuffix(f, suffixMeta)
			owned[name] = true
			if files[name+suffixMarker] {
				continue // reported with the marker
			}
			e, err := im.read(name, name+suffixMeta)
			read++
			im.opts.Progress(Progress{PhaseReading, read, toRead})
			if err != nil {
				im.fail(name, err)
				continue
			}
			if e.conv.msg == nil {
				im.skip(name, "no pending recipients (maddy would discard it)")
				continue
			}
			fresh = append(fresh, e)
		case strings.HasSuffix(f, suffixBroken):
			name := strings.TrimSuffix(f, suffixBroken)
			owned[name] = true
			im.fail(name, errors.New("maddy marked this entry broken (.meta_broken) after a crash while delivering it; not imported"))
		}
	}
	for _, f := range names {
		for _, suf := range []string{suffixHeader, suffixBody, suffixMetaWrite} {
			if strings.HasSuffix(f, suf) && !owned[strings.TrimSuffix(f, suf)] {
				im.res.Stray = append(im.res.Stray, f)
			}
		}
	}
	slices.SortStableFunc(fresh, func(a, b entry) int {
		return a.conv.msg.Arrival.Compare(b.conv.msg.Arrival)
	})
	return fresh, markers, nil
}

// read parses the metadata file metaFile of entry name.
func (im *importer) read(name, metaFile string) (entry, error) {
	e := entry{name: name}
	f, err := os.Open(filepath.Join(im.dir, metaFile))
	if err != nil {
		return e, err
	}
	meta, err := parseMeta(f)
	f.Close()
	if err != nil {
		return e, fmt.Errorf("%s: %w", metaFile, err)
	}
	if meta.MsgMeta.ID != name {
		return e, fmt.Errorf("%s: message ID %q does not match the file name", metaFile, meta.MsgMeta.ID)
	}
	if meta.FirstAttempt.IsZero() {
		return e, fmt.Errorf("%s: no arrival time (FirstAttempt)", metaFile)
	}
	e.conv = convert(meta, im.opts.Now())
	return e, nil
}

// loadContent reads and checks the header file of e and the size of its
// body file. Headers are read one entry at a time, not during the scan, so
// a large queue is never held in memory.
func (im *importer) loadContent(e *entry) error {
	var err error
	e.header, err = os.ReadFile(im.path(e.name, suffixHeader))
	if err != nil {
		return err
	}
	if err := parseHeader(e.header); err != nil {
		return fmt.Errorf("%s: %w", e.name+suffixHeader, err)
	}
	st, err := os.Stat(im.path(e.name, suffixBody))
	if err != nil {
		return err
	}
	if !st.Mode().IsRegular() {
		return fmt.Errorf("%s is not a regular file", e.name+suffixBody)
	}
	e.bodyLen = st.Size()
	return nil
}

func (im *importer) importFresh(ctx context.Context, e entry) {
	if err := im.loadContent(&e); err != nil {
		im.fail(e.name, err)
		return
	}
	if im.opts.DryRun {
		im.imported(e, 0, false)
		return
	}
	// Step 1.
	if err := os.Rename(im.path(e.name, suffixMeta), im.path(e.name, suffixMarker)); err != nil {
		im.fail(e.name, err)
		return
	}
	if err := syncDir(im.dir); err != nil {
		im.fail(e.name, fmt.Errorf("marked as being imported, but: %w; run the import again", err))
		return
	}
	im.create(ctx, e, false)
}

// create is steps 2 to 5 for an entry whose marker is durable.
func (im *importer) create(ctx context.Context, e entry, resumed bool) {
	body, err := os.Open(im.path(e.name, suffixBody))
	if err != nil {
		im.fail(e.name, fmt.Errorf("%w; left as %s, run the import again", err, e.name+suffixMarker))
		return
	}
	defer body.Close()
	msg := e.conv.msg
	msg.Held = true
	if err := im.dst.Create(ctx, msg, e.header, body, e.bodyLen); err != nil {
		im.fail(e.name, fmt.Errorf("store: %w; left as %s, run the import again", err, e.name+suffixMarker))
		return
	}
	if err := im.finish(ctx, e.name, msg); err != nil {
		im.fail(e.name, err)
		return
	}
	im.imported(e, msg.ID, resumed)
}

// finish is steps 3 to 5: msg is the store entry of name, which is durable.
func (im *importer) finish(ctx context.Context, name string, msg *store.Message) error {
	again := func(err error) error {
		return fmt.Errorf("stored as %v, but: %w; run the import again to finish", msg.ID, err)
	}
	for _, suf := range []string{suffixHeader, suffixBody} {
		if err := os.Remove(im.path(name, suf)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return again(err)
		}
	}
	if err := syncDir(im.dir); err != nil {
		return again(err)
	}
	if msg.Held {
		msg.Held = false
		if err := im.dst.Update(ctx, msg); err != nil {
			msg.Held = true
			return again(err)
		}
	}
	if err := os.Remove(im.path(name, suffixMarker)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return again(err)
	}
	if err := syncDir(im.dir); err != nil {
		return again(err)
	}
	return nil
}

// resume completes an entry an earlier run left with a marker. Only an
// error searching the store is returned; everything else is recorded.
func (im *importer) resume(ctx context.Context, name string) error {
	e, err := im.read(name, name+suffixMarker)
	if err != nil {
		im.fail(name, err)
		return nil
	}
	if e.conv.msg == nil {
		// Import never marks such an entry, so this one was made by hand.
		im.fail(name, errors.New("marker has no pending recipients; not touched"))
		return nil
	}
	_, hdrErr := os.Stat(im.path(name, suffixHeader))
	_, bodyErr := os.Stat(im.path(name, suffixBody))
	contentGone := errors.Is(hdrErr, fs.ErrNotExist) || errors.Is(bodyErr, fs.ErrNotExist)
	found, err := im.find(e.conv.msg)
	if err != nil {
		return fmt.Errorf("searching the store for %s: %w", name, err)
	}
	switch {
	case found != nil:
		if im.opts.DryRun {
			im.imported(e, found.ID, true)
			return nil
		}
		if err := im.finish(ctx, name, found); err != nil {
			im.fail(name, err)
			return nil
		}
		im.imported(e, found.ID, true)
	case contentGone:
		// Removal starts only after Create returned, so the message was in
		// the store and has been finished by Spool since.
		if !im.opts.DryRun {
			if err := im.finish(ctx, name, &store.Message{}); err != nil {
				im.fail(name, err)
				return nil
			}
		}
		im.skip(name, "imported by an earlier run and no longer in the store; removed its leftover files")
	default:
		if err := im.loadContent(&e); err != nil {
			im.fail(name, err)
			return nil
		}
		if im.opts.DryRun {
			im.imported(e, 0, true)
			return nil
		}
		im.create(ctx, e, true)
	}
	return nil
}

// find returns the store entry created from the maddy entry that m was
// converted from, or nil. maddy IDs are only 4 random bytes, so the sender
// and the arrival time (nanosecond precision) must match too.
func (im *importer) find(m *store.Message) (*store.Message, error) {
	if im.byMsgID == nil {
		im.byMsgID = map[string][]*store.Message{}
		err := im.dst.Walk(func(sm *store.Message) error {
			im.byMsgID[sm.MsgID] = append(im.byMsgID[sm.MsgID], sm)
			return nil
		})
		if err != nil {
			im.byMsgID = nil
			return nil, err
		}
	}
	for _, sm := range im.byMsgID[m.MsgID] {
		if sm.From == m.From && sm.Arrival.Equal(m.Arrival) {
			return sm, nil
		}
	}
	return nil, nil
}

func (im *importer) imported(e entry, id store.ID, resumed bool) {
	im.res.Imported = append(im.res.Imported, Imported{
		Name: e.name, ID: id, Rcpts: len(e.conv.msg.Rcpts), Dropped: e.conv.dropped, Resumed: resumed,
	})
	im.opts.Logf("imported %s as %v (%d recipients)", e.name, id, len(e.conv.msg.Rcpts))
}

func (im *importer) skip(name, reason string) {
	im.res.Skipped = append(im.res.Skipped, Skipped{Name: name, Reason: reason})
	im.opts.Logf("skipped %s: %s", name, reason)
}

func (im *importer) fail(name string, err error) {
	im.res.Failed = append(im.res.Failed, Failed{Name: name, Err: err})
	im.opts.Logf("not imported %s: %v", name, err)
}

// syncDir makes renames and removals in dir durable.
func syncDir(dir string) error { return embedded.OSFS{}.SyncDir(dir) }

// roundDuration shortens d for people: milliseconds below a second,
// tenths of a second above.
func roundDuration(d time.Duration) time.Duration {
	if d < time.Second {
		return d.Round(time.Millisecond)
	}
	return d.Round(100 * time.Millisecond)
}

// Write prints the result for an operator: one line per entry, then a
// summary line with the time the import took.
func (r *Result) Write(w io.Writer) error {
	var b strings.Builder
	verb := "imported"
	if r.DryRun {
		verb = "would import"
	}
	for _, i := range r.Imported {
		fmt.Fprintf(&b, "%s %s", verb, i.Name)
		if i.ID != 0 {
			fmt.Fprintf(&b, " as %v", i.ID)
		}
		fmt.Fprintf(&b, ": %d recipient(s)", i.Rcpts)
		if len(i.Dropped) > 0 {
			fmt.Fprintf(&b, "; already finished by maddy, not imported: %s", strings.Join(i.Dropped, ", "))
		}
		if i.Resumed {
			b.WriteString(" (completing an interrupted import)")
		}
		b.WriteByte('\n')
	}
	for _, s := range r.Skipped {
		fmt.Fprintf(&b, "skipped %s: %s\n", s.Name, s.Reason)
	}
	for _, f := range r.Failed {
		fmt.Fprintf(&b, "NOT imported %s: %v\n", f.Name, f.Err)
	}
	for _, s := range r.Stray {
		fmt.Fprintf(&b, "stray file %s: belongs to no queue entry, left alone\n", s)
	}
	for _, rd := range r.Rounds {
		for _, rm := range rd.Removed {
			if r.DryRun {
				fmt.Fprintf(&b, "would remove held copy %s: its source message was finished by maddy after an interrupted import\n", rm)
			} else {
				fmt.Fprintf(&b, "removed held copy %s: its source message was finished by maddy after an interrupted import\n", rm)
			}
		}
		switch {
		case r.DryRun && rd.Sealed:
			fmt.Fprintf(&b, "would finish the release from %s%s: %d message(s) released, %d staying held (held in the source)\n",
				rd.Dir, partialSuffix, rd.Released, rd.KeptHeld)
		case r.DryRun:
			fmt.Fprintf(&b, "would move the source database to %s, then release %d message(s); %d would stay held (held in the source)\n",
				rd.Dir, rd.Released, rd.KeptHeld)
		case !rd.Sealed:
		case rd.Done:
			fmt.Fprintf(&b, "source database moved to %s (kept for inspection; nothing delivers from it); released %d message(s), %d kept held (held in the source)",
				rd.Dir, rd.Released, rd.KeptHeld)
			if rd.Finished > 0 {
				fmt.Fprintf(&b, ", %d already finished in the destination", rd.Finished)
			}
			b.WriteByte('\n')
		default:
			fmt.Fprintf(&b, "source database moved to %s%s, release not finished (%d released so far): run the import again\n",
				rd.Dir, partialSuffix, rd.Released)
		}
	}
	for _, n := range r.Notes {
		fmt.Fprintf(&b, "note: %s\n", n)
	}
	fmt.Fprintf(&b, "%d %s, %d skipped, %d not imported, %d stray file(s) in %v\n",
		len(r.Imported), verb, len(r.Skipped), len(r.Failed), len(r.Stray), roundDuration(r.Elapsed))
	_, err := io.WriteString(w, b.String())
	return err
}
