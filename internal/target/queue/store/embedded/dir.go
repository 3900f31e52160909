package embedded

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/maddy-spool/spool/internal/target/queue/store"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
)

// DefaultInlineLimit is the largest content (header and body) kept inside
// the database. Larger content goes to its own file so the database stays
// small and a big body is streamed, never held in memory.
const DefaultInlineLimit = 64 << 10

// maxBatch bounds how many operations one group commit applies.
const maxBatch = 512

// scanChunk bounds how many entries one read transaction visits in
// Schedule and Walk. A long read transaction would stop writers from
// growing the database file, and with it new mail, for its whole duration.
const scanChunk = 4096

var (
	bucketMeta       = []byte("meta")
	bucketSched      = []byte("sched")
	bucketContent    = []byte("content")
	bucketQuarantine = []byte("quarantine")
	bucketInfo       = []byte("info")
	// bucketArrival indexes the queued messages by arrival time: keys are
	// arrivalKey, values empty. Format 2 and later.
	bucketArrival = []byte("arrival")
	keyFormat     = []byte("format")
	// keyLastID holds the highest ID ever committed (8 bytes, big-endian),
	// so IDs of deleted messages are not handed out again.
	keyLastID = []byte("last_id")
)

// dbFormat is the version of the database layout. A database written with a
// newer layout is refused rather than misread or modified; an older one is
// migrated when opened for writing.
//
//	1: buckets meta, sched, content, quarantine, info
//	2: adds the arrival index (bucketArrival)
const dbFormat = 2

// DirOptions configures OpenDir.
type DirOptions struct {
	// ReadOnly opens the store for inspection only (an admin command while
	// the server is down). No clean-up is done and writes fail.
	ReadOnly bool
	// InlineLimit overrides DefaultInlineLimit.
	InlineLimit int64
	// FS overrides the operating system's file system for content files.
	FS FS
	// OnQuarantine is told about entries moved aside.
	OnQuarantine QuarantineFunc
	// Logf receives notices about recovery actions at open.
	Logf func(format string, args ...interface{})
	// LockTimeout bounds the wait for another process holding the
	// database. Default 2s.
	LockTimeout time.Duration
	// OnFailed is told, once, when the store stops after a failed write
	// (see ErrFailed), with the error writes fail with from then on. It
	// is called on the goroutine that met the failure and must not call
	// Close.
	OnFailed func(error)
}

// Dir is the directory store: a bbolt database plus a directory of large
// content files. See the package documentation for its durability contract.
type Dir struct {
	path     string
	lock     *storeLock
	db       *bolt.DB
	fs       FS
	readOnly bool
	// indexed is set when the database has the arrival index: always,
	// unless a format-1 database was opened read-only.
	indexed     bool
	inlineLimit int64
	onQuar      QuarantineFunc
	onFailed    func(error)
	logf        func(string, ...interface{})

	failMu sync.Mutex
	failed error // set once by fail

	nextID atomic.Uint64

	mu     sync.RWMutex // guards closed against sends on ops
	closed bool
	ops    chan *op
	done   chan struct{}
}

type opKind uint8

const (
	opCreate opKind = iota
	opUpdate
	opDelete
	opQuarantine
)

type op struct {
	kind    opKind
	id      store.ID
	meta    []byte
	sched   []byte
	content []byte // inline content, opCreate only
	file    bool   // opCreate: content is in bodies/ and must be made durable
	reason  string // opQuarantine

	// removeFile is set by the committer for opDelete when the content was
	// in its own file, to unlink it after the commit.
	removeFile bool
	// quarSched is set by the committer for opQuarantine: the entry's
	// schedule entry, if it was readable.
	quarSched *SchedEntry
	done      chan error
}

// OpenDir opens (creating if needed) the directory store at path.
func OpenDir(path string, opts DirOptions) (*Dir, error) {
	d := &Dir{
		path:        path,
		fs:          opts.FS,
		readOnly:    opts.ReadOnly,
		inlineLimit: opts.InlineLimit,
		onQuar:      opts.OnQuarantine,
		onFailed:    opts.OnFailed,
		logf:        opts.Logf,
	}
	if d.fs == nil {
		d.fs = OSFS{}
	}
	if d.inlineLimit <= 0 {
		d.inlineLimit = DefaultInlineLimit
	}
	if d.logf == nil {
		d.logf = func(string, ...interface{}) {}
	}
	if d.onQuar == nil {
		d.onQuar = func(store.ID, *SchedEntry, error) {}
	}
	if d.onFailed == nil {
		d.onFailed = func(error) {}
	}
	timeout := opts.LockTimeout
	if timeout <= 0 {
		timeout = 2 * time.Second
	}

	if !d.readOnly {
		for _, sub := range []string{path, d.bodiesDir(), d.quarantineDir()} {
			if err := d.fs.MkdirAll(sub); err != nil {
				return nil, fmt.Errorf("store: %w", err)
			}
		}
	}

	lock, err := lockStore(path, d.readOnly, timeout)
	if err != nil {
		return nil, err
	}
	d.lock = lock
	db, err := d.openDB(timeout)
	if err != nil {
		lock.release()
		return nil, err
	}
	d.db = db
	if err := d.init(); err != nil {
		db.Close()
		lock.release()
		return nil, err
	}
	return d, nil
}

// openDB opens queue.db, moving it aside first if it is damaged. The
// caller holds the store's lock, so the database is not being written by
// another opener while it is judged.
func (d *Dir) openDB(timeout time.Duration) (*bolt.DB, error) {
	dbPath := filepath.Join(d.path, dbName)
	var db *bolt.DB
	err := checkBoltFile(dbPath)
	if err == nil {
		db, err = bolt.Open(dbPath, 0o600, &bolt.Options{
			Timeout:      timeout,
			ReadOnly:     d.readOnly,
			FreelistType: bolt.FreelistMapType,
		})
	}
	if errors.Is(err, berrors.ErrTimeout) {
		return nil, lockedError(dbPath, "another process")
	}
	if err != nil && !d.readOnly && isDamagedDB(err) {
		db, err = d.recoverDamagedDB(dbPath, err, timeout)
	}
	if err != nil {
		return nil, fmt.Errorf("store: open %s: %w", dbPath, err)
	}
	return db, nil
}

// init readies an opened database and, for a writer, cleans up and starts
// the committer.
func (d *Dir) init() error {
	if !d.readOnly {
		if err := d.syncNames(); err != nil {
			return err
		}
	}
	if err := d.initBuckets(); err != nil {
		return err
	}
	if err := d.initNextID(); err != nil {
		return err
	}
	if !d.readOnly {
		if err := d.removeOrphans(); err != nil {
			return err
		}
		d.ops = make(chan *op, maxBatch)
		d.done = make(chan struct{})
		go d.commitLoop()
	}
	return nil
}

// syncNames makes the names of the store's directory, queue.db, bodies/ and
// quarantine/ durable: a directory entry is durable only once the directory
// holding it is fsynced, and neither mkdir nor bbolt's creation of its file
// does that. Without it, a power loss soon after the first start could lose
// the whole queue even though every commit was fsynced.
func (d *Dir) syncNames() error {
	if err := d.fs.SyncDir(filepath.Dir(d.path)); err != nil {
		// The parent may not be readable by this user; the store's own
		// entries below matter more, so carry on.
		d.logf("store: fsync of %s: %v", filepath.Dir(d.path), err)
	}
	if err := d.fs.SyncDir(d.path); err != nil {
		return fmt.Errorf("store: %w", err)
	}
	return nil
}

func isDamagedDB(err error) bool {
	return errors.Is(err, errDamagedDB) || errors.Is(err, berrors.ErrInvalid) ||
		errors.Is(err, berrors.ErrChecksum) || errors.Is(err, berrors.ErrVersionMismatch)
}

// recoverDamagedDB moves a database bbolt cannot open aside, together with
// every content file (they belong to the entries in it), and starts afresh,
// so the server keeps accepting and delivering new mail. Nothing is deleted:
// the operator can inspect or restore what was moved.
//
// The content files are moved first and the database last: if a move
// fails, OpenDir fails and queue.db is still in place, so the next open
// tries again. Had the database gone first, the next open would start a
// new one and remove the files left in bodies/ as orphans.
func (d *Dir) recoverDamagedDB(dbPath string, openErr error, timeout time.Duration) (*bolt.DB, error) {
	unlock, err := lockDBFile(dbPath)
	if err != nil {
		return nil, fmt.Errorf("%v; not moved aside: %w", openErr, err)
	}
	defer unlock()
	suffix := damagedSuffix + time.Now().UTC().Format("20060102T150405Z")
	entries, err := d.fs.ReadDir(d.bodiesDir())
	if err != nil {
		return nil, fmt.Errorf("%v; listing content files to move aside: %w", openErr, err)
	}
	for _, e := range entries {
		src := filepath.Join(d.bodiesDir(), e.Name())
		if _, err := d.moveNoReplace(src, d.quarantineDir(), e.Name()+suffix); err != nil {
			return nil, fmt.Errorf("%v; moving content file %s to %s failed, so the database is left in place and nothing is deleted: %w",
				openErr, e.Name(), d.quarantineDir(), err)
		}
	}
	// The moves must be durable before the database is moved aside: else
	// a power loss could leave the content files in bodies/ next to a new
	// database that does not know them, and they would be removed as
	// orphans.
	for _, dir := range []string{d.quarantineDir(), d.bodiesDir()} {
		if err := d.fs.SyncDir(dir); err != nil {
			return nil, fmt.Errorf("%v; moving content files aside: %w", openErr, err)
		}
	}
	aside, err := d.moveNoReplace(dbPath, d.path, dbName+suffix)
	if err != nil {
		return nil, fmt.Errorf("%v; moving it aside failed: %w", openErr, err)
	}
	if err := d.fs.SyncDir(d.path); err != nil {
		return nil, fmt.Errorf("%v; moving it aside: %w", openErr, err)
	}
	d.logf("store: %s could not be opened (%v); moved it to %s and %d content files to %s; starting with an empty queue",
		dbPath, openErr, aside, len(entries), d.quarantineDir())
	d.onQuar(0, nil, fmt.Errorf("damaged database moved to %s: %w", aside, openErr))
	return bolt.Open(dbPath, 0o600, &bolt.Options{Timeout: timeout, FreelistType: bolt.FreelistMapType})
}

func (d *Dir) initBuckets() error {
	var format byte
	if d.readOnly {
		err := d.db.View(func(tx *bolt.Tx) error {
			var err error
			format, err = checkFormat(tx.Bucket(bucketInfo))
			return err
		})
		d.indexed = format >= 2
		return err
	}
	floor, err := d.replacementFloor()
	if err != nil {
		return err
	}
	err = d.db.Update(func(tx *bolt.Tx) error {
		for _, name := range [][]byte{bucketMeta, bucketSched, bucketContent, bucketQuarantine} {
			if _, err := tx.CreateBucketIfNotExists(name); err != nil {
				return err
			}
		}
		info, err := tx.CreateBucketIfNotExists(bucketInfo)
		if err != nil {
			return err
		}
		if info.Get(keyFormat) == nil {
			// A new database: its first transaction sets the floor, so
			// no crash can leave it without one.
			if err := raiseLastID(info, floor); err != nil {
				return err
			}
			if _, err := tx.CreateBucket(bucketArrival); err != nil {
				return err
			}
			format = dbFormat
			return info.Put(keyFormat, []byte{dbFormat})
		}
		format, err = checkFormat(info)
		if err != nil || format >= 2 {
			return err
		}
		// Format 1: the index is built afresh, also over what an
		// interrupted migration left.
		if err := tx.DeleteBucket(bucketArrival); err != nil && !errors.Is(err, berrors.ErrBucketNotFound) {
			return err
		}
		_, err = tx.CreateBucket(bucketArrival)
		return err
	})
	if err != nil {
		return err
	}
	if format < 2 {
		if err := d.buildArrivalIndex(); err != nil {
			return fmt.Errorf("store: migrating the database to format %d: %w", dbFormat, err)
		}
	}
	d.indexed = true
	return nil
}

// buildArrivalIndex fills the (empty) arrival index from the schedule
// entries, scanChunk entries per transaction, and then sets the format to
// 2. A crash before that leaves format 1, and the next open starts over.
func (d *Dir) buildArrivalIndex() error {
	var after []byte
	for done := false; !done; {
		err := d.db.Update(func(tx *bolt.Tx) error {
			idx := tx.Bucket(bucketArrival)
			c := tx.Bucket(bucketSched).Cursor()
			k, v := firstAfter(c, after)
			for n := 0; k != nil && n < scanChunk; k, v = c.Next() {
				n++
				after = bytes.Clone(k)
				id, ok := keyID(k)
				if ak := schedArrivalKey(id, v); ok && ak != nil {
					if err := idx.Put(ak, nil); err != nil {
						return err
					}
				}
			}
			done = k == nil
			if done {
				return tx.Bucket(bucketInfo).Put(keyFormat, []byte{dbFormat})
			}
			return nil
		})
		if err != nil {
			return err
		}
	}
	d.logf("store: migrated the database to format %d (arrival index)", dbFormat)
	return nil
}

const (
	dbName = "queue.db"
	// damagedSuffix, followed by the time, is appended to the names of a
	// damaged database and its content files when they are moved aside.
	damagedSuffix = ".damaged-"
)

// replacementFloor returns the ID above which a new database starts: 0,
// unless a damaged database was moved aside in this directory (by this
// open, or by an earlier one that crashed before the new database was
// committed). Then it is the higher of recoveryIDFloor and the highest ID
// among the files in quarantine/, which the damaged one's content files
// were moved to.
func (d *Dir) replacementFloor() (store.ID, error) {
	entries, err := d.fs.ReadDir(d.path)
	if err != nil {
		return 0, fmt.Errorf("store: %w", err)
	}
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), dbName+damagedSuffix) {
			moved, err := d.highestFileID(d.quarantineDir())
			return max(moved, recoveryIDFloor(time.Now())), err
		}
	}
	return 0, nil
}

// checkFormat returns the format of the database whose info bucket is
// info, or an error if this build cannot read it.
func checkFormat(info *bolt.Bucket) (byte, error) {
	if info == nil {
		return 0, errors.New("store: queue database has no format marker (not a Spool queue?)")
	}
	return formatVersion(info.Get(keyFormat))
}

// formatVersion checks the value of the format key in the info bucket.
func formatVersion(v []byte) (byte, error) {
	if len(v) == 0 {
		return 0, errors.New("store: queue database has no format marker (not a Spool queue?)")
	}
	if len(v) != 1 {
		return 0, fmt.Errorf("store: queue database format marker of %d bytes, want 1 (not a Spool queue?); refusing to touch it", len(v))
	}
	if v[0] < 1 || v[0] > dbFormat {
		return 0, fmt.Errorf("store: queue database format %d, this build reads 1 to %d (written by another Spool version); refusing to touch it", v[0], dbFormat)
	}
	return v[0], nil
}

// raiseLastID raises the stored high-water mark of IDs to id.
func raiseLastID(info *bolt.Bucket, id store.ID) error {
	if id == 0 || id <= storedLastID(info) {
		return nil
	}
	return info.Put(keyLastID, idKey(id))
}

// storedLastID returns the high-water mark of IDs, 0 if none is stored
// (a database written by a build that did not keep one).
func storedLastID(info *bolt.Bucket) store.ID {
	if info == nil {
		return 0
	}
	id, _ := keyID(info.Get(keyLastID))
	return id
}

// initNextID continues after the stored high-water mark and after the
// highest ID used by an entry, a quarantined entry, or a content file (in
// bodies/ or quarantine/), so no ID is handed out twice, also in a store
// whose database has no high-water mark yet.
func (d *Dir) initNextID() error {
	var last store.ID
	err := d.db.View(func(tx *bolt.Tx) error {
		last = storedLastID(tx.Bucket(bucketInfo))
		for _, name := range [][]byte{bucketMeta, bucketSched, bucketContent, bucketQuarantine} {
			b := tx.Bucket(name)
			if b == nil {
				continue
			}
			if k, _ := b.Cursor().Last(); k != nil {
				if id, ok := keyID(k); ok {
					last = max(last, id)
				}
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	for _, dir := range []string{d.bodiesDir(), d.quarantineDir()} {
		id, err := d.highestFileID(dir)
		if err != nil {
			return err
		}
		last = max(last, id)
	}
	d.nextID.Store(uint64(last))
	return nil
}

// highestFileID returns the highest ID that names a file in dir: a content
// file ("ID"), a leftover ("ID.tmp"), or a file moved to quarantine/
// ("ID.damaged-STAMP", "ID.N").
func (d *Dir) highestFileID(dir string) (store.ID, error) {
	entries, err := d.fs.ReadDir(dir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return 0, fmt.Errorf("store: %w", err)
	}
	var last store.ID
	for _, e := range entries {
		name, _, _ := strings.Cut(e.Name(), ".")
		if id, err := store.ParseID(name); err == nil {
			last = max(last, id)
		}
	}
	return last, nil
}

// removeOrphans deletes content files that no committed entry refers to.
// Per the durability contract such a file belongs to a Create that crashed
// before its commit, so its sender never got a success reply.
func (d *Dir) removeOrphans() error {
	entries, err := d.fs.ReadDir(d.bodiesDir())
	if err != nil {
		return fmt.Errorf("store: %w", err)
	}
	moved := 0
	err = d.db.View(func(tx *bolt.Tx) error {
		meta, quar := tx.Bucket(bucketMeta), tx.Bucket(bucketQuarantine)
		for _, e := range entries {
			name := e.Name()
			id, perr := store.ParseID(name)
			if perr == nil && meta.Get(idKey(id)) != nil {
				continue
			}
			if perr == nil && quar.Get(idKey(id)) != nil {
				// Quarantined, but the move of its content file did not
				// happen or was lost in a crash: finish it, never delete.
				if dst, err := d.moveNoReplace(filepath.Join(d.bodiesDir(), name), d.quarantineDir(), name); err != nil {
					d.logf("store: moving content file %s of quarantined entry to %s: %v", name, d.quarantineDir(), err)
				} else {
					d.logf("store: moved content file %s of quarantined entry to %s", name, dst)
					moved++
				}
				continue
			}
			if perr != nil && !strings.HasSuffix(name, ".tmp") {
				// Not ours: leave foreign files alone, but say so.
				d.logf("store: ignoring foreign file %s in %s", name, d.bodiesDir())
				continue
			}
			if err := d.fs.Remove(filepath.Join(d.bodiesDir(), name)); err != nil {
				d.logf("store: removing orphan content file %s: %v", name, err)
			}
		}
		return nil
	})
	if err == nil && moved > 0 {
		err = d.fs.SyncDir(d.quarantineDir())
	}
	return err
}

// maxRenameTries bounds the names moveNoReplace tries.
const maxRenameTries = 1000

// moveNoReplace moves src into dir as name, never replacing a file there:
// if name is taken, it uses name.1, name.2, ... and logs that. It returns
// the path moved to.
func (d *Dir) moveNoReplace(src, dir, name string) (string, error) {
	for i := 0; ; i++ {
		dst := filepath.Join(dir, name)
		if i > 0 {
			dst = fmt.Sprintf("%s.%d", dst, i)
		}
		err := d.fs.RenameNoReplace(src, dst)
		if err == nil {
			if i > 0 {
				d.logf("store: %s exists; moved %s to %s instead", filepath.Join(dir, name), src, dst)
			}
			return dst, nil
		}
		if !errors.Is(err, os.ErrExist) || i == maxRenameTries {
			return "", err
		}
	}
}

func (d *Dir) bodiesDir() string           { return filepath.Join(d.path, "bodies") }
func (d *Dir) quarantineDir() string       { return filepath.Join(d.path, "quarantine") }
func (d *Dir) bodyPath(id store.ID) string { return filepath.Join(d.bodiesDir(), id.String()) }

// submit hands an operation to the committer and waits until it is
// durable (or failed).
func (d *Dir) submit(ctx context.Context, o *op) error {
	if d.readOnly {
		return errors.New("store: opened read-only")
	}
	if err := d.Failed(); err != nil {
		return err
	}
	o.done = make(chan error, 1)
	d.mu.RLock()
	if d.closed {
		d.mu.RUnlock()
		return store.ErrClosed
	}
	select {
	case d.ops <- o:
	case <-ctx.Done():
		d.mu.RUnlock()
		return ctx.Err()
	}
	d.mu.RUnlock()
	// Once queued, the operation is committed or failed regardless of ctx:
	// waiting for it keeps the caller's view (success or not) truthful.
	return <-o.done
}

func (d *Dir) commitLoop() {
	defer close(d.done)
	batch := make([]*op, 0, maxBatch)
	for first := range d.ops {
		batch = append(batch[:0], first)
	drain:
		for len(batch) < maxBatch {
			select {
			case o, ok := <-d.ops:
				if !ok {
					break drain
				}
				batch = append(batch, o)
			default:
				break drain
			}
		}
		d.commit(batch)
	}
}

// commit applies a batch in one transaction. Steps 2 and 3 of the
// durability contract happen here: the bodies directory is fsynced before
// the transaction that makes new content files reachable.
func (d *Dir) commit(batch []*op) {
	errs := make([]error, len(batch))
	err := d.Failed()
	for _, o := range batch {
		if err == nil && o.kind == opCreate && o.file {
			if serr := d.fs.SyncDir(d.bodiesDir()); serr != nil {
				err = d.fail(fmt.Errorf("store: fsync of %s: %w", d.bodiesDir(), serr))
			}
			break
		}
	}
	if err == nil {
		err = d.commitTx(batch, errs)
	}
	for i, o := range batch {
		e := errs[i]
		if err != nil {
			e = err
		}
		if e == nil {
			d.afterCommit(o)
		}
		o.done <- e
	}
}

// commitTx applies the batch in one bbolt transaction, setting errs for
// operations that fail by themselves.
func (d *Dir) commitTx(batch []*op, errs []error) error {
	var txID int
	applied := false
	err := d.db.Update(func(tx *bolt.Tx) error {
		txID = tx.ID()
		b := buckets{
			meta: tx.Bucket(bucketMeta), sched: tx.Bucket(bucketSched), content: tx.Bucket(bucketContent),
			quar: tx.Bucket(bucketQuarantine), arrival: tx.Bucket(bucketArrival),
		}
		var lastID store.ID
		for i, o := range batch {
			if o.kind == opCreate {
				lastID = max(lastID, o.id)
			}
			errs[i] = applyOp(o, b)
			// Only bbolt's own failures abort the transaction; a
			// per-operation error (e.g. not found) fails just that one.
			if errs[i] != nil && !errors.Is(errs[i], store.ErrNotFound) {
				return errs[i]
			}
		}
		if err := raiseLastID(tx.Bucket(bucketInfo), lastID); err != nil {
			return err
		}
		applied = true
		return nil
	})
	switch {
	case err == nil:
		return nil
	case !applied:
		// Rolled back before bbolt wrote anything.
		return fmt.Errorf("store: commit: %w", err)
	}
	return d.commitFailed(fmt.Errorf("store: commit: %w", err), txID)
}

// commitFailed decides what a failed bbolt commit of transaction txID
// leaves. When writing a page failed, bbolt rolls back before it writes
// the meta page: the previous state holds on disk and in memory, so only
// this write fails (a full disk ends here). Anything else stops the store:
// a failed fdatasync (bbolt returns it bare, not as an *os.PathError)
// leaves unknown what is on disk; and when the meta page was written
// before the failure, bbolt reads it back from its mapping, so the new
// state is live (a read transaction's ID is txID) although the commit
// reported an error.
func (d *Dir) commitFailed(err error, txID int) error {
	live := -1
	if verr := d.db.View(func(tx *bolt.Tx) error { live = tx.ID(); return nil }); verr != nil {
		return d.fail(fmt.Errorf("%w; reading the database afterwards: %v", err, verr))
	}
	var pe *os.PathError
	if live < txID && errors.As(err, &pe) && pe.Op == "write" {
		return err
	}
	if live >= txID {
		err = fmt.Errorf("%w; its changes are live all the same", err)
	}
	return d.fail(err)
}

// fail stops the store: every later write fails at once with the returned
// error, which wraps ErrFailed and cause. The first call logs it and tells
// OnFailed.
func (d *Dir) fail(cause error) error {
	d.failMu.Lock()
	first := d.failed == nil
	if first {
		d.failed = &failedError{cause}
	}
	err := d.failed
	d.failMu.Unlock()
	if first {
		d.logf("%v", err)
		d.onFailed(err)
	}
	return err
}

// Failed returns the error writes fail with once the store stopped after
// a failed write (it wraps ErrFailed), or nil while the store is healthy.
func (d *Dir) Failed() error {
	d.failMu.Lock()
	defer d.failMu.Unlock()
	return d.failed
}

// failedError is the error of a stopped store.
type failedError struct{ cause error }

func (e *failedError) Error() string {
	return "store: stopped after a failed write (" + strings.TrimPrefix(e.cause.Error(), "store: ") + "); restart to recover"
}

func (e *failedError) Unwrap() []error { return []error{store.ErrFailed, e.cause} }

// buckets are the buckets of a write transaction.
type buckets struct {
	meta, sched, content, quar, arrival *bolt.Bucket
}

func applyOp(o *op, b buckets) error {
	k := idKey(o.id)
	exists := b.meta.Get(k) != nil
	switch {
	case o.kind == opCreate && exists:
		return fmt.Errorf("store: ID %v already in use", o.id)
	case o.kind == opQuarantine && !exists && b.sched.Get(k) == nil:
		return store.ErrNotFound // already moved aside or deleted
	case (o.kind == opUpdate || o.kind == opDelete) && !exists:
		return store.ErrNotFound
	}
	// An undecodable schedule entry has no index key; Oldest skips what
	// is left behind of it.
	oldArrival := schedArrivalKey(o.id, b.sched.Get(k))
	switch o.kind {
	case opCreate:
		if o.content != nil {
			if err := b.content.Put(k, o.content); err != nil {
				return err
			}
		}
	case opDelete:
		o.removeFile = b.content.Get(k) == nil
		return removeEntry(k, oldArrival, b)
	case opQuarantine:
		if e, err := decodeSched(o.id, b.sched.Get(k)); err == nil {
			o.quarSched = &e
		}
		rec := quarantineRecord{Reason: o.reason, Time: time.Now().UTC(), Meta: b.meta.Get(k), Content: b.content.Get(k)}
		o.removeFile = rec.Content == nil
		v, err := json.Marshal(rec)
		if err != nil {
			return err
		}
		if err := b.quar.Put(k, v); err != nil {
			return err
		}
		return removeEntry(k, oldArrival, b)
	}
	if newArrival := schedArrivalKey(o.id, o.sched); !bytes.Equal(oldArrival, newArrival) {
		if oldArrival != nil {
			if err := b.arrival.Delete(oldArrival); err != nil {
				return err
			}
		}
		if err := b.arrival.Put(newArrival, nil); err != nil {
			return err
		}
	}
	if err := b.meta.Put(k, o.meta); err != nil {
		return err
	}
	return b.sched.Put(k, o.sched)
}

// removeEntry deletes the entry with key k and its arrival index key.
func removeEntry(k, arrival []byte, b buckets) error {
	if arrival != nil {
		if err := b.arrival.Delete(arrival); err != nil {
			return err
		}
	}
	for _, bk := range []*bolt.Bucket{b.meta, b.sched, b.content} {
		if err := bk.Delete(k); err != nil {
			return err
		}
	}
	return nil
}

// quarantineRecord is what is kept of an entry moved aside.
type quarantineRecord struct {
	Reason  string    `json:"reason"`
	Time    time.Time `json:"time"`
	Meta    []byte    `json:"meta,omitempty"`
	Content []byte    `json:"content,omitempty"`
}

func (d *Dir) afterCommit(o *op) {
	if !o.removeFile {
		return
	}
	src := d.bodyPath(o.id)
	var err error
	switch o.kind {
	case opDelete:
		err = d.fs.Remove(src)
	case opQuarantine:
		// The quarantine record is committed; if this move is lost in a
		// crash, the next OpenDir finishes it (see removeOrphans).
		_, err = d.moveNoReplace(src, d.quarantineDir(), o.id.String())
		if err == nil {
			if err := d.fs.SyncDir(d.quarantineDir()); err != nil {
				d.fail(fmt.Errorf("store: fsync of %s: %w", d.quarantineDir(), err))
			}
			return
		}
	}
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		// The entry is gone from the database; the file is now an orphan
		// that the next OpenDir removes (or, for quarantine, an orphan
		// content file that is kept in bodies/ until then).
		d.logf("store: content file of %v: %v", o.id, err)
	}
}

// Create implements Store.
func (d *Dir) Create(ctx context.Context, m *store.Message, header []byte, body io.Reader, bodyLen int64) error {
	if d.readOnly {
		return errors.New("store: opened read-only")
	}
	if err := d.Failed(); err != nil {
		return err
	}
	id := store.ID(d.nextID.Add(1))
	m.ID = id
	m.HeaderLen = int64(len(header))

	o := &op{kind: opCreate, id: id}
	if int64(len(header))+bodyLen <= d.inlineLimit {
		buf := bytes.NewBuffer(make([]byte, 0, int64(len(header))+bodyLen))
		buf.Write(header)
		n, err := io.Copy(buf, io.LimitReader(body, d.inlineLimit+1))
		if err != nil {
			return fmt.Errorf("store: reading body: %w", err)
		}
		if int64(len(header))+n <= d.inlineLimit {
			m.BodyLen = n
			o.content = buf.Bytes()
		} else {
			// The body was longer than announced: spill what was read.
			if err := d.writeContentFile(id, buf.Bytes(), body, m); err != nil {
				return err
			}
			o.file = true
		}
	} else {
		if err := d.writeContentFile(id, header, body, m); err != nil {
			return err
		}
		o.file = true
	}

	var err error
	if o.meta, err = store.EncodeMeta(m); err != nil {
		d.discardContentFile(o)
		return err
	}
	o.sched = encodeSched(schedOf(m))
	if err := d.submit(ctx, o); err != nil {
		d.discardContentFile(o)
		return err
	}
	return nil
}

// discardContentFile removes the content file of a Create that failed. If
// the removal fails too, the file is an orphan for the next OpenDir. A
// stopped store keeps it: the entry may be durable all the same, and the
// next OpenDir removes the file if it is not.
func (d *Dir) discardContentFile(o *op) {
	if o.file && d.Failed() == nil {
		_ = d.fs.Remove(d.bodyPath(o.id))
	}
}

// writeContentFile is step 1 of the durability contract: the content file
// is complete and fsynced before any metadata refers to it. prefix is
// written first (the header, or bytes already read from body).
func (d *Dir) writeContentFile(id store.ID, prefix []byte, body io.Reader, m *store.Message) (err error) {
	path := d.bodyPath(id)
	f, err := d.fs.CreateExcl(path)
	if err != nil {
		return fmt.Errorf("store: %w", err)
	}
	defer func() {
		if err != nil {
			f.Close()
			if d.Failed() == nil {
				_ = d.fs.Remove(path)
			}
		}
	}()
	if _, err = f.Write(prefix); err != nil {
		return fmt.Errorf("store: writing content: %w", err)
	}
	n, err := io.Copy(f, body)
	if err != nil {
		return fmt.Errorf("store: writing content: %w", err)
	}
	m.BodyLen = int64(len(prefix)) - m.HeaderLen + n
	if err = f.Sync(); err != nil {
		// The file's state on disk is now unknown, and so is that of
		// whatever else was written back with it.
		return d.fail(fmt.Errorf("store: fsync of content file %v: %w", id, err))
	}
	if err = f.Close(); err != nil {
		return fmt.Errorf("store: closing content: %w", err)
	}
	return nil
}

// Update implements Store.
func (d *Dir) Update(ctx context.Context, m *store.Message) error {
	b, err := store.EncodeMeta(m)
	if err != nil {
		return err
	}
	return d.submit(ctx, &op{kind: opUpdate, id: m.ID, meta: b, sched: encodeSched(schedOf(m))})
}

// Delete implements Store.
func (d *Dir) Delete(ctx context.Context, id store.ID) error {
	return d.submit(ctx, &op{kind: opDelete, id: id})
}

// Quarantine implements Store. It never fails loudly: if even that write
// fails, the entry stays where it is and is met again on the next read.
func (d *Dir) Quarantine(id store.ID, reason error) {
	if d.readOnly {
		d.onQuar(id, nil, reason)
		return
	}
	o := &op{kind: opQuarantine, id: id, reason: reason.Error()}
	switch err := d.submit(context.Background(), o); {
	case errors.Is(err, store.ErrNotFound):
		return // someone else moved or deleted it first
	case err != nil:
		d.logf("store: quarantining %v failed: %v", id, err)
		return
	}
	d.onQuar(id, o.quarSched, reason)
}

// Get implements Store.
func (d *Dir) Get(id store.ID) (*store.Message, error) {
	var raw []byte
	err := d.db.View(func(tx *bolt.Tx) error {
		v := tx.Bucket(bucketMeta).Get(idKey(id))
		if v == nil {
			return store.ErrNotFound
		}
		raw = bytes.Clone(v)
		return nil
	})
	if err != nil {
		return nil, err
	}
	m, err := store.DecodeMeta(id, raw)
	if err != nil {
		d.Quarantine(id, err)
		return nil, fmt.Errorf("%w %v: %v", store.ErrCorrupt, id, err)
	}
	return m, nil
}

// Content implements Store.
func (d *Dir) Content(m *store.Message) (store.Content, error) {
	var inline []byte
	err := d.db.View(func(tx *bolt.Tx) error {
		if tx.Bucket(bucketMeta).Get(idKey(m.ID)) == nil {
			return store.ErrNotFound
		}
		if v := tx.Bucket(bucketContent).Get(idKey(m.ID)); v != nil {
			inline = bytes.Clone(v)
		}
		return nil
	})
	if err != nil {
		return store.Content{}, err
	}
	if inline != nil {
		if int64(len(inline)) != m.Size() {
			return store.Content{}, d.corrupt(m.ID, fmt.Errorf("content is %d bytes, metadata says %d", len(inline), m.Size()))
		}
		return store.Content{Header: inline[:m.HeaderLen], Body: memBody(inline[m.HeaderLen:])}, nil
	}

	path := d.bodyPath(m.ID)
	f, err := d.fs.Open(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return store.Content{}, d.corrupt(m.ID, fmt.Errorf("content file %s is missing", path))
		}
		if errors.Is(err, syscall.ELOOP) {
			return store.Content{}, d.corrupt(m.ID, fmt.Errorf("content file %s is a symlink; not followed", path))
		}
		return store.Content{}, fmt.Errorf("store: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return store.Content{}, fmt.Errorf("store: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return store.Content{}, d.corrupt(m.ID, fmt.Errorf("content file %s is not a regular file (%v)", path, fi.Mode().Type()))
	}
	if fi.Size() != m.Size() {
		return store.Content{}, d.corrupt(m.ID, fmt.Errorf("content file %s is %d bytes, metadata says %d", path, fi.Size(), m.Size()))
	}
	// Allocated only now: the length is backed by the file's real size,
	// not just by what the metadata claims.
	header := make([]byte, m.HeaderLen)
	if _, err = io.ReadFull(f, header); err != nil {
		return store.Content{}, fmt.Errorf("store: reading content: %w", err)
	}
	return store.Content{Header: header, Body: fileBody{fs: d.fs, path: path, off: m.HeaderLen, n: m.BodyLen}}, nil
}

type memBody []byte

func (b memBody) Open() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(b)), nil }
func (b memBody) Len() int                     { return len(b) }
func (b memBody) Remove() error                { return nil }

// fileBody streams the body part of a content file, so a large message is
// never held in memory.
type fileBody struct {
	fs   FS
	path string
	off  int64
	n    int64
}

func (b fileBody) Open() (io.ReadCloser, error) {
	f, err := b.fs.Open(b.path)
	if err != nil {
		return nil, fmt.Errorf("store: %w", err)
	}
	if _, err := io.CopyN(io.Discard, f, b.off); err != nil {
		f.Close()
		return nil, fmt.Errorf("store: reading content: %w", err)
	}
	return struct {
		io.Reader
		io.Closer
	}{io.LimitReader(f, b.n), f}, nil
}

func (b fileBody) Len() int      { return int(b.n) }
func (b fileBody) Remove() error { return nil }

func (d *Dir) corrupt(id store.ID, reason error) error {
	d.Quarantine(id, reason)
	return fmt.Errorf("%w %v: %v", store.ErrCorrupt, id, reason)
}

// firstAfter positions c at the first key after the key after (at the
// first key if after is nil), for a scan continued in a new transaction.
func firstAfter(c *bolt.Cursor, after []byte) (k, v []byte) {
	if after == nil {
		return c.First()
	}
	k, v = c.Seek(after)
	if k != nil && bytes.Equal(k, after) {
		k, v = c.Next()
	}
	return k, v
}

// scan visits a bucket in chunks of short read transactions.
func (d *Dir) scan(bucket []byte, fn func(id store.ID, v []byte) error) error {
	var after []byte
	for {
		n := 0
		var bad []store.ID
		var badErr []error
		err := d.db.View(func(tx *bolt.Tx) error {
			c := tx.Bucket(bucket).Cursor()
			k, v := firstAfter(c, after)
			for ; k != nil && n < scanChunk; k, v = c.Next() {
				n++
				after = bytes.Clone(k)
				id, ok := keyID(k)
				if !ok {
					continue // not written by us; left for the operator
				}
				if err := fn(id, v); err != nil {
					if errors.Is(err, store.ErrCorrupt) {
						bad, badErr = append(bad, id), append(badErr, err)
						continue
					}
					return err
				}
			}
			return nil
		})
		// Quarantine outside the read transaction: it needs a write.
		for i := range bad {
			d.Quarantine(bad[i], badErr[i])
		}
		if err != nil || n < scanChunk {
			return err
		}
	}
}

// Schedule implements Store.
func (d *Dir) Schedule(fn func(SchedEntry) error) error {
	defer releaseMapped(d.db)
	return d.scan(bucketSched, func(id store.ID, v []byte) error {
		e, err := decodeSched(id, v)
		if err != nil {
			return fmt.Errorf("%w: %v", store.ErrCorrupt, err)
		}
		return fn(e)
	})
}

// Walk implements Store.
func (d *Dir) Walk(fn func(*store.Message) error) error {
	defer releaseMapped(d.db)
	return d.scan(bucketMeta, func(id store.ID, v []byte) error {
		m, err := store.DecodeMeta(id, v)
		if err != nil {
			return fmt.Errorf("%w: %v", store.ErrCorrupt, err)
		}
		return fn(m)
	})
}

// Oldest implements Store. It reads the first entry of the arrival index
// that still matches a schedule entry; a format-1 database opened
// read-only has no index and is scanned.
func (d *Dir) Oldest() (time.Time, bool, error) {
	if !d.indexed {
		return d.oldestByScan()
	}
	var t time.Time
	var ok bool
	err := d.db.View(func(tx *bolt.Tx) error {
		sched := tx.Bucket(bucketSched)
		c := tx.Bucket(bucketArrival).Cursor()
		for k, _ := c.First(); k != nil; k, _ = c.Next() {
			id, arrival, valid := parseArrivalKey(k)
			if !valid || !bytes.Equal(schedArrivalKey(id, sched.Get(idKey(id))), k) {
				continue // left behind by a damaged schedule entry
			}
			t, ok = arrival, true
			return nil
		}
		return nil
	})
	return t, ok, err
}

// LastID implements Store.
func (d *Dir) LastID() store.ID { return store.ID(d.nextID.Load()) }

// oldestByScan finds the earliest arrival by reading every schedule entry.
func (d *Dir) oldestByScan() (time.Time, bool, error) {
	defer releaseMapped(d.db)
	var t time.Time
	var ok bool
	err := d.scan(bucketSched, func(id store.ID, v []byte) error {
		if e, err := decodeSched(id, v); err == nil && (!ok || e.Arrival.Before(t)) {
			t, ok = e.Arrival, true
		}
		return nil // a damaged entry is reported when Schedule meets it
	})
	return t, ok, err
}

// Quarantined returns the number of entries in quarantine.
func (d *Dir) Quarantined() (int, error) {
	n := 0
	err := d.db.View(func(tx *bolt.Tx) error {
		n = tx.Bucket(bucketQuarantine).Stats().KeyN
		return nil
	})
	return n, err
}

// Close implements Store. It waits for operations already submitted.
func (d *Dir) Close() error {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return nil
	}
	d.closed = true
	if d.ops != nil {
		close(d.ops)
	}
	d.mu.Unlock()
	if d.done != nil {
		<-d.done
	}
	err := d.db.Close()
	d.lock.release()
	return err
}

// recoveryIDFloor returns the ID above which a database replacing a damaged
// one starts. The damaged database cannot be read, so the floor must be
// above any ID it could have issued. The floor is the time in units of
// 2^-20 seconds (Unix seconds shifted left by 20 bits, plus the fraction
// of the second), so it grows by about one per microsecond: a database
// counting from 1 would have had to issue about a million IDs per second
// since 1970 to reach it, and one that started at an earlier floor more
// than one per microsecond since it was created. Each later recovery gets
// a higher floor, as long as the clock does not go back.
func recoveryIDFloor(now time.Time) store.ID {
	return store.ID(uint64(now.Unix())<<20 | uint64(now.Nanosecond())<<20/1e9)
}
