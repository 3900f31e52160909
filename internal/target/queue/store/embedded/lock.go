package embedded

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// lockName is the store's lock file. A writer holds an exclusive flock on
// it for the store's lifetime and writes its PID into it; read-only
// openers hold a shared one. OpenDir takes it before it looks at queue.db,
// so no opener judges (and moves aside) a database another one is using.
const lockName = "lock"

// lockRetry is how often a held lock is tried again until LockTimeout.
const lockRetry = 50 * time.Millisecond

// storeLock is a held lock file.
type storeLock struct {
	f         *os.File
	exclusive bool
}

// lockStore takes the lock of the store in dir, waiting up to timeout
// while another process holds it. A read-only open of a store that has no
// lock file (written by a build without one) gets a nil lock: it creates
// nothing, and bbolt's own lock on queue.db still keeps writers out.
func lockStore(dir string, readOnly bool, timeout time.Duration) (*storeLock, error) {
	path := filepath.Join(dir, lockName)
	flags, how := os.O_RDWR|os.O_CREATE, unix.LOCK_EX
	if readOnly {
		flags, how = os.O_RDONLY, unix.LOCK_SH
	}
	// Not following a symlink: a planted one must not make the store
	// create or write a file elsewhere.
	f, err := os.OpenFile(path, flags|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if readOnly && errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("store: lock file: %w", err)
	}
	deadline := time.Now().Add(timeout)
	for {
		err = unix.Flock(int(f.Fd()), how|unix.LOCK_NB)
		if err == nil {
			break
		}
		if !errors.Is(err, unix.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("store: locking %s: %w", path, err)
		}
		if !time.Now().Before(deadline) {
			holder := lockHolder(f)
			f.Close()
			return nil, lockedError(dir, holder)
		}
		time.Sleep(lockRetry)
	}
	l := &storeLock{f: f, exclusive: !readOnly}
	if l.exclusive {
		// Not fsynced: the PID only matters while this process lives.
		pid := []byte(strconv.Itoa(os.Getpid()) + "\n")
		if err := f.Truncate(0); err == nil {
			_, err = f.WriteAt(pid, 0)
		}
		if err != nil {
			l.release()
			return nil, fmt.Errorf("store: writing %s: %w", path, err)
		}
	}
	return l, nil
}

// TryLockDir takes the lock of the store in dir as a writer holds it,
// without waiting, for a tool that changes the directory only while no
// maddy uses it (maddy spool import). It fails, naming the holder, if
// the store is in use; release gives the lock back.
func TryLockDir(dir string) (release func(), err error) {
	l, err := lockStore(dir, false, 0)
	if err != nil {
		return nil, err
	}
	return l.release, nil
}

// lockHolder names the process holding the lock file f, from the PID in
// it: "PID 1234", or "another process" when there is none (the holder is
// read-only, or has not written it yet).
func lockHolder(f *os.File) string {
	buf := make([]byte, 24)
	n, err := f.ReadAt(buf, 0)
	if err != nil && !errors.Is(err, io.EOF) {
		return "another process"
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(buf[:n])))
	if err != nil || pid <= 0 {
		return "another process"
	}
	return "PID " + strconv.Itoa(pid)
}

func lockedError(what, holder string) error {
	return fmt.Errorf("store: %s is locked by %s (is another maddy running on this queue?)", what, holder)
}

// release drops the lock; a writer first clears its PID.
func (l *storeLock) release() {
	if l == nil {
		return
	}
	if l.exclusive {
		_ = l.f.Truncate(0)
	}
	l.f.Close()
}

// lockDBFile takes bbolt's lock on the database file at path without
// waiting, for a process that holds only that lock: a build without the
// lock file. The returned function releases it. A missing file needs no
// lock.
func lockDBFile(path string) (func(), error) {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return func() {}, nil
	}
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, lockedError(path, "another process")
		}
		return nil, err
	}
	return func() { f.Close() }, nil
}
