package embedded

import (
	"io"
	"os"
	"syscall"
)

// FS is the seam through which the directory store touches content files
// (not the database file, which bbolt manages). Tests substitute it to make
// writes, fsyncs and renames fail at chosen points.
type FS interface {
	// CreateExcl creates a new file for writing; it fails if name exists,
	// so a content file is never overwritten.
	CreateExcl(name string) (File, error)
	Open(name string) (ReadFile, error)
	Remove(name string) error
	Rename(oldName, newName string) error
	// RenameNoReplace renames like Rename, but if newName exists it fails
	// with an error matching os.ErrExist instead of replacing it.
	RenameNoReplace(oldName, newName string) error
	ReadDir(name string) ([]os.DirEntry, error)
	MkdirAll(name string) error
	// SyncDir fsyncs a directory, making the names in it durable.
	SyncDir(name string) error
}

// File is a content file being written.
type File interface {
	io.Writer
	Sync() error
	Close() error
}

// ReadFile is a content file being read.
type ReadFile interface {
	io.Reader
	io.Closer
	Stat() (os.FileInfo, error)
}

// OSFS is the FS of the operating system.
type OSFS struct{}

func (OSFS) CreateExcl(name string) (File, error) {
	return os.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
}

// Open opens a content file for reading. It does not follow a symlink
// (a planted link must not make the store read, or serve as message
// content, a file outside its directory) and does not block on a FIFO.
func (OSFS) Open(name string) (ReadFile, error) {
	return os.OpenFile(name, os.O_RDONLY|noFollow|syscall.O_NONBLOCK, 0)
}

// noFollow makes open fail on a symlink in the last path element.
const noFollow = syscall.O_NOFOLLOW

// Remove and Rename act on a symlink itself, never on what it points to.
func (OSFS) Remove(name string) error                   { return os.Remove(name) }
func (OSFS) Rename(oldName, newName string) error       { return os.Rename(oldName, newName) }
func (OSFS) ReadDir(name string) ([]os.DirEntry, error) { return os.ReadDir(name) }
func (OSFS) MkdirAll(name string) error                 { return os.MkdirAll(name, 0o700) }

func (OSFS) SyncDir(name string) error {
	d, err := os.Open(name)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
}

// linkUnlink renames without replacing by way of a hard link, which fails
// if newName exists. A crash in between leaves both names; the file is
// then met again under its old name. A symlink is linked itself, not its
// target; a directory cannot be moved this way.
func linkUnlink(oldName, newName string) error {
	if err := os.Link(oldName, newName); err != nil {
		return err
	}
	return os.Remove(oldName)
}
