package embedded

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/maddy-spool/spool/internal/target/queue/store"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
)

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
//	3: a schedule entry may carry the message's destination after its
//	   fixed part (entries of format 2 are valid format-3 entries
//	   without one, so the move to 3 rewrites nothing)
const dbFormat = 3

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
		if err != nil {
			return err
		}
		if format == 2 {
			// Builds that know format 2 would refuse longer schedule
			// entries as damage; the marker makes them refuse the whole
			// database, as the contract says, before any is written.
			format = dbFormat
			return info.Put(keyFormat, []byte{dbFormat})
		}
		if format >= 2 {
			return nil
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
