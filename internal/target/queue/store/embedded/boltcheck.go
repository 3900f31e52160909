package embedded

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"os"
)

// bbolt maps the whole database file into memory and trusts its meta page
// about how many pages there are. A database file cut short (by a full
// disk during a copy, a bad restore, a file system repair) would make the
// first read of a missing page kill the process with SIGBUS, before bbolt
// could return an error. checkBoltFile reads the meta pages the way bbolt
// does and reports such a file as damaged, so OpenDir moves it aside.
//
// Layout (bbolt 1.x, native byte order): each of the first two pages starts
// with a 16-byte page header, then the meta: magic, version, page size,
// flags (4 bytes each), root bucket (16), freelist page (8), page count
// (8), transaction ID (8), and an FNV-64a checksum of the meta up to it.
const (
	boltMagic      = 0xED0CDAED
	boltVersion    = 2
	boltPageHeader = 16
	boltMetaLen    = 64
	boltSumOffset  = 56
	// boltMaxPageSize bounds the page size a damaged meta can claim, so
	// the check never reads far into a hostile file.
	boltMaxPageSize = 1 << 16
)

type boltMeta struct {
	pageSize uint32
	pgid     uint64
	txid     uint64
}

// errDamagedDB marks a database file that must be moved aside.
var errDamagedDB = errors.New("damaged database")

// decodeBoltMeta decodes one meta page; ok is false when bbolt would not
// use it either (wrong magic, version or checksum).
func decodeBoltMeta(page []byte) (boltMeta, bool) {
	if len(page) < boltPageHeader+boltMetaLen {
		return boltMeta{}, false
	}
	b := page[boltPageHeader : boltPageHeader+boltMetaLen]
	ne := binary.NativeEndian
	if ne.Uint32(b[0:]) != boltMagic || ne.Uint32(b[4:]) != boltVersion {
		return boltMeta{}, false
	}
	h := fnv.New64a()
	h.Write(b[:boltSumOffset])
	if h.Sum64() != ne.Uint64(b[boltSumOffset:]) {
		return boltMeta{}, false
	}
	return boltMeta{pageSize: ne.Uint32(b[8:]), pgid: ne.Uint64(b[40:]), txid: ne.Uint64(b[48:])}, true
}

// checkBoltMeta checks a database file's first bytes (head) against its
// size; readPage reads len(p) bytes at off. It returns nil when bbolt may
// open the file: its meta pages are unusable (bbolt reports that itself as
// ErrInvalid or ErrChecksum), or the meta page bbolt will use (the valid
// one with the higher transaction ID) has a page count that fits in the
// file. An empty or too short file is damaged: bbolt would silently start
// a new database over it, and the content files of the lost entries would
// then be removed as orphans.
func checkBoltMeta(head []byte, size int64, readPage func(off int64, p []byte) error) error {
	if size == 0 {
		return fmt.Errorf("%w: empty file", errDamagedDB)
	}
	readMeta := func(off int64) (boltMeta, bool) {
		p := make([]byte, boltPageHeader+boltMetaLen)
		if off+int64(len(p)) > size || readPage(off, p) != nil {
			return boltMeta{}, false
		}
		return decodeBoltMeta(p)
	}
	m0, ok0 := decodeBoltMeta(head)
	pageSize := int64(os.Getpagesize())
	if ok0 {
		if m0.pageSize < boltPageHeader+boltMetaLen || m0.pageSize > boltMaxPageSize {
			return fmt.Errorf("%w: page size %d", errDamagedDB, m0.pageSize)
		}
		pageSize = int64(m0.pageSize)
	}
	if size < 2*pageSize {
		return fmt.Errorf("%w: %d bytes, shorter than the two meta pages", errDamagedDB, size)
	}
	use, found := m0, ok0
	if ok0 {
		if m1, ok := readMeta(pageSize); ok && m1.txid > m0.txid && m1.pageSize == m0.pageSize {
			use = m1
		}
	} else {
		// bbolt looks for the second meta page at the usual page sizes.
		for ps := int64(1024); ps <= 16384 && !found; ps *= 2 {
			if m1, ok := readMeta(ps); ok && int64(m1.pageSize) == ps {
				use, found = m1, true
			}
		}
	}
	if !found {
		return nil
	}
	if use.pgid > uint64(size)/uint64(use.pageSize) {
		return fmt.Errorf("%w: file is %d bytes, its meta page says %d pages of %d bytes (truncated?)",
			errDamagedDB, size, use.pgid, use.pageSize)
	}
	return nil
}

// checkBoltFile runs checkBoltMeta on the database file at path, if any.
func checkBoltFile(path string) error {
	// A symlinked queue.db is followed, as bbolt does: it is the
	// operator's choice where the database lives.
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("%w: not a regular file (%v)", errDamagedDB, fi.Mode().Type())
	}
	head := make([]byte, boltPageHeader+boltMetaLen)
	if _, err := io.ReadFull(f, head); err != nil && fi.Size() >= int64(len(head)) {
		return err
	}
	return checkBoltMeta(head, fi.Size(), func(off int64, p []byte) error {
		_, err := f.ReadAt(p, off)
		return err
	})
}
