// Package lazyfs is an in-memory FUSE file system for power-loss tests.
//
// Every regular file's content and every directory's entries are kept in
// two versions: the volatile one, which all operations see, and the durable
// one, which is what a disk would hold after a power cut. Crash throws the
// volatile state away and goes back to the durable one.
//
// What becomes durable, and when, follows ext4's default data=ordered mode
// conservatively (anything ext4 might lose is lost):
//
//   - A file's content (its bytes and its size, including truncation and
//     growth) becomes durable on fsync or fdatasync of that file, and only
//     then. Writes not yet synced are lost at a crash; with torn writes
//     enabled, a random prefix of them (the last one possibly cut short)
//     survives instead, as when a disk wrote some queued blocks before the
//     power went.
//   - A directory's entries (names created by create, mkdir or rename, and
//     names removed by unlink, rmdir or rename) become durable on fsync of
//     that directory, and only then. A new file whose directory was never
//     fsynced is gone after a crash even if its content was fsynced; a
//     renamed file whose directories were not fsynced is back under its old
//     name. A rename between two directories is durable for each side when
//     that side's directory is fsynced.
//   - Inode attributes other than size (mode, times) are not modelled.
//
// FailFsync makes chosen fsync and fdatasync calls fail with EIO, and
// only those: writes go on. A failed fsync makes nothing durable. For a
// file it also drops the writes it should have made durable from what a
// later fsync makes durable (they stay visible until a crash), as Linux
// does: pages whose writeback failed are marked clean, so a later fsync
// succeeds without writing them. A later fsync of a directory makes all
// its current entries durable.
//
// To stop all writes at a chosen point, FreezeAfter makes the n-th mutating
// operation and every one after it fail with EIO; reads keep working, so a
// process with the database mapped into memory is not killed by SIGBUS. A
// test then kills or closes whatever uses the mount, unmounts, calls Crash
// and mounts again to see what survived.
//
// Mounting needs /dev/fuse and CAP_SYS_ADMIN: it calls mount(2) directly,
// so no fusermount binary is needed.
package lazyfs

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"sort"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// FS is the state of one lazy file system. It outlives mounts: mount it,
// crash it, mount it again.
type FS struct {
	mu      sync.Mutex
	root    *inode
	nextIno uint64

	// mutations counts mutating operations since the last Crash;
	// freezeAt is the count at which writes start failing (0: never).
	mutations int
	freezeAt  int
	frozen    bool
	frozenCh  chan struct{}

	// failFsync, if set, decides which fsyncs fail (see FailFsync).
	failFsync func(Fsync) bool
}

// Fsync describes an fsync or fdatasync call to the function given to
// FailFsync.
type Fsync struct {
	// Path is relative to the mount point; "" is the root.
	Path string
	Dir  bool
	// Writes are the file's writes the call is to make durable, in the
	// order they were made (truncations are left out).
	Writes []Extent
}

// Extent is the range of one write.
type Extent struct {
	Off, Len int64
}

type write struct {
	off  int64
	data []byte
	// truncate: set the size to off instead of writing data.
	truncate bool
}

type inode struct {
	ino uint64
	dir bool
	// Regular files.
	data, durable []byte
	unsynced      []write
	// Directories.
	entries, durEntries map[string]*inode
}

// New returns an empty file system: a root directory that is durable.
func New() *FS {
	fsys := &FS{nextIno: 1, frozenCh: make(chan struct{})}
	fsys.root = fsys.newInode(true)
	return fsys
}

func (fsys *FS) newInode(dir bool) *inode {
	fsys.nextIno++
	in := &inode{ino: fsys.nextIno, dir: dir}
	if dir {
		in.entries, in.durEntries = map[string]*inode{}, map[string]*inode{}
	}
	return in
}

// FreezeAfter makes the n-th mutating operation from now (counting from 1)
// and all later ones fail with EIO until the next Crash. Mutating
// operations are write, truncate, create, mkdir, unlink, rmdir, rename,
// fsync and fdatasync. n <= 0 cancels a pending freeze.
func (fsys *FS) FreezeAfter(n int) {
	fsys.mu.Lock()
	defer fsys.mu.Unlock()
	if n <= 0 {
		fsys.freezeAt = 0
		return
	}
	fsys.freezeAt = fsys.mutations + n
}

// Frozen is closed once the file system froze.
func (fsys *FS) Frozen() <-chan struct{} {
	fsys.mu.Lock()
	defer fsys.mu.Unlock()
	return fsys.frozenCh
}

// FailFsync makes each later fsync or fdatasync for which fail returns
// true fail with EIO (see the package doc for what that leaves). fail is
// called with the file system locked, so it must not call methods of
// fsys. nil makes every fsync succeed again; Crash does that too.
func (fsys *FS) FailFsync(fail func(Fsync) bool) {
	fsys.mu.Lock()
	defer fsys.mu.Unlock()
	fsys.failFsync = fail
}

// Mutations returns the number of mutating operations since the last Crash.
func (fsys *FS) Mutations() int {
	fsys.mu.Lock()
	defer fsys.mu.Unlock()
	return fsys.mutations
}

// mutate accounts for one mutating operation; it returns EIO once frozen.
// Called with mu held.
func (fsys *FS) mutate() syscall.Errno {
	if fsys.frozen {
		return syscall.EIO
	}
	fsys.mutations++
	if fsys.freezeAt > 0 && fsys.mutations >= fsys.freezeAt {
		fsys.frozen = true
		close(fsys.frozenCh)
		return syscall.EIO
	}
	return 0
}

// Crash replaces the volatile state by the durable one, as a power cut
// would. With rng non-nil, each file keeps a random prefix of its unsynced
// writes (the last one possibly cut short) on top of its durable content.
// The file system is usable (and no longer frozen) afterwards; it must not
// be mounted while Crash runs.
func (fsys *FS) Crash(rng *rand.Rand) {
	fsys.mu.Lock()
	defer fsys.mu.Unlock()
	seen := map[*inode]bool{}
	var visit func(in *inode)
	visit = func(in *inode) {
		if seen[in] {
			return
		}
		seen[in] = true
		if !in.dir {
			if rng != nil && len(in.unsynced) > 0 {
				keep := rng.Intn(len(in.unsynced) + 1)
				for i, w := range in.unsynced[:keep] {
					if i == keep-1 && !w.truncate && len(w.data) > 0 && rng.Intn(2) == 0 {
						w.data = w.data[:rng.Intn(len(w.data))]
					}
					in.durable = apply(in.durable, w)
				}
			}
			in.data = bytes.Clone(in.durable)
			in.unsynced = nil
			return
		}
		in.entries = cloneEntries(in.durEntries)
		// Visit in name order so that a seeded rng gives the same result.
		for _, name := range sortedNames(in.durEntries) {
			visit(in.durEntries[name])
		}
	}
	visit(fsys.root)
	fsys.mutations, fsys.freezeAt, fsys.frozen = 0, 0, false
	fsys.failFsync = nil
	fsys.frozenCh = make(chan struct{})
}

func sortedNames(m map[string]*inode) []string {
	names := make([]string, 0, len(m))
	for n := range m {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// apply performs one write or truncation on b.
func apply(b []byte, w write) []byte {
	if w.truncate {
		if w.off <= int64(len(b)) {
			return b[:w.off]
		}
		return append(b, make([]byte, w.off-int64(len(b)))...)
	}
	if end := w.off + int64(len(w.data)); end > int64(len(b)) {
		b = append(b, make([]byte, end-int64(len(b)))...)
	}
	copy(b[w.off:], w.data)
	return b
}

// Mount serves the file system at dir until the returned server is
// unmounted.
func (fsys *FS) Mount(dir string) (*fuse.Server, error) {
	zero := time.Duration(0)
	srv, err := fs.Mount(dir, &node{fsys: fsys, in: fsys.root}, &fs.Options{
		// No caching of names or attributes in the kernel: another process
		// (the one under test) must see exactly the current state.
		EntryTimeout:    &zero,
		AttrTimeout:     &zero,
		NegativeTimeout: &zero,
		MountOptions: fuse.MountOptions{
			FsName:            "lazyfs",
			Name:              "lazyfs",
			DirectMountStrict: true,
			// Other users (and root without CAP_DAC_OVERRIDE for FUSE)
			// may use the mount.
			AllowOther: true,
		},
	})
	if err != nil {
		return nil, fmt.Errorf("lazyfs: mounting at %s: %w", dir, err)
	}
	return srv, nil
}

// Unmount unmounts srv, retrying while the kernel still reports the mount
// busy (a killed process's files are released asynchronously).
func Unmount(srv *fuse.Server) error {
	var err error
	for i := 0; i < 100; i++ {
		if err = srv.Unmount(); err == nil || !errors.Is(err, syscall.EBUSY) {
			return err
		}
		time.Sleep(20 * time.Millisecond)
	}
	return err
}

// Require skips t where FUSE cannot be used (Available), except under CI
// (the environment variable CI set), where it fails t instead.
func Require(t testing.TB) {
	t.Helper()
	if err := Available(); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("FUSE is needed for this test in CI: %v", err)
		}
		t.Skipf("FUSE not available, test skipped: %v", err)
	}
}

// Available reports why FUSE cannot be mounted here, or nil if it can be
// tried: /dev/fuse must exist and the process must be root.
func Available() error {
	if _, err := os.Stat("/dev/fuse"); err != nil {
		return fmt.Errorf("no /dev/fuse: %w", err)
	}
	if os.Geteuid() != 0 {
		return errors.New("not running as root (mount(2) needs CAP_SYS_ADMIN)")
	}
	return nil
}
