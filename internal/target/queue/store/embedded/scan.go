package embedded

import (
	"bytes"
	"errors"
	"fmt"
	"time"

	"github.com/maddy-spool/spool/internal/target/queue/store"

	bolt "go.etcd.io/bbolt"
)

// scanChunk bounds how many entries one read transaction visits in
// Schedule and Walk. A long read transaction would stop writers from
// growing the database file, and with it new mail, for its whole duration.
const scanChunk = 4096

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
