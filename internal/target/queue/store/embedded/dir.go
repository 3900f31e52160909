package embedded

import (
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/maddy-spool/spool/internal/target/queue/store"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
)

// DefaultInlineLimit is the largest content (header and body) kept inside
// the database. Larger content goes to its own file so the database stays
// small and a big body is streamed, never held in memory.
const DefaultInlineLimit = 64 << 10

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

func (d *Dir) bodiesDir() string { return filepath.Join(d.path, "bodies") }

func (d *Dir) quarantineDir() string { return filepath.Join(d.path, "quarantine") }

func (d *Dir) bodyPath(id store.ID) string { return filepath.Join(d.bodiesDir(), id.String()) }

// LastID implements Store.
func (d *Dir) LastID() store.ID { return store.ID(d.nextID.Load()) }

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
