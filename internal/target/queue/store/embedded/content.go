package embedded

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"

	"github.com/maddy-spool/spool/internal/target/queue/store"

	bolt "go.etcd.io/bbolt"
)

// Create implements Store.
func (d *Dir) Create(ctx context.Context, m *store.Message, header []byte, body io.Reader, bodyLen int64) error {
	return d.create(ctx, m, header, body, bodyLen, nil)
}

// create is Create; allocated, if set, is told the new message's ID before
// anything of it is written.
func (d *Dir) create(ctx context.Context, m *store.Message, header []byte, body io.Reader, bodyLen int64, allocated func(store.ID)) error {
	if d.readOnly {
		return errors.New("store: opened read-only")
	}
	if err := d.Failed(); err != nil {
		return err
	}
	id := store.ID(d.nextID.Add(1))
	m.ID = id
	if allocated != nil {
		allocated(id)
	}
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

func (b memBody) Len() int { return len(b) }

func (b memBody) Remove() error { return nil }

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

func (b fileBody) Len() int { return int(b.n) }

func (b fileBody) Remove() error { return nil }

func (d *Dir) corrupt(id store.ID, reason error) error {
	d.Quarantine(id, reason)
	return fmt.Errorf("%w %v: %v", store.ErrCorrupt, id, reason)
}
