package embedded

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/maddy-spool/spool/internal/target/queue/store"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
)

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
