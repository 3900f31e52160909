package embedded

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/maddy-spool/spool/internal/target/queue/store"

	bolt "go.etcd.io/bbolt"
)

// maxBatch bounds how many operations one group commit applies.
const maxBatch = 512

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
