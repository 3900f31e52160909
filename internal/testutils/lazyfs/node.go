package lazyfs

import (
	"bytes"
	"context"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// node is the go-fuse face of an inode. All state lives in the inode and is
// guarded by FS.mu; go-fuse keeps its own tree of names, which it updates
// after each successful create, rename or unlink.
type node struct {
	fs.Inode
	fsys *FS
	in   *inode
}

var (
	_ fs.NodeLookuper   = (*node)(nil)
	_ fs.NodeGetattrer  = (*node)(nil)
	_ fs.NodeSetattrer  = (*node)(nil)
	_ fs.NodeReaddirer  = (*node)(nil)
	_ fs.NodeCreater    = (*node)(nil)
	_ fs.NodeOpener     = (*node)(nil)
	_ fs.NodeReader     = (*node)(nil)
	_ fs.NodeWriter     = (*node)(nil)
	_ fs.NodeFsyncer    = (*node)(nil)
	_ fs.NodeFlusher    = (*node)(nil)
	_ fs.NodeMkdirer    = (*node)(nil)
	_ fs.NodeUnlinker   = (*node)(nil)
	_ fs.NodeRmdirer    = (*node)(nil)
	_ fs.NodeRenamer    = (*node)(nil)
	_ fs.NodeOpendirer  = (*node)(nil)
	_ fs.NodeStatfser   = (*node)(nil)
	_ fs.NodeAllocater  = (*node)(nil)
	_ fs.NodeReadlinker = (*node)(nil)
)

func mode(in *inode) uint32 {
	if in.dir {
		return syscall.S_IFDIR | 0o755
	}
	return syscall.S_IFREG | 0o644
}

func fillAttr(in *inode, a *fuse.Attr) {
	a.Ino = in.ino
	a.Mode = mode(in)
	a.Nlink = 1
	if in.dir {
		a.Nlink = 2
	}
	a.Size = uint64(len(in.data))
	a.Blocks = (a.Size + 511) / 512
	a.Blksize = 4096
}

// child returns the go-fuse inode for in, below n.
func (n *node) child(ctx context.Context, in *inode) *fs.Inode {
	return n.NewInode(ctx, &node{fsys: n.fsys, in: in}, fs.StableAttr{Mode: mode(in) & syscall.S_IFMT, Ino: in.ino})
}

func (n *node) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	n.fsys.mu.Lock()
	defer n.fsys.mu.Unlock()
	in, ok := n.in.entries[name]
	if !ok {
		return nil, syscall.ENOENT
	}
	fillAttr(in, &out.Attr)
	return n.child(ctx, in), 0
}

func (n *node) Getattr(ctx context.Context, fh fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	n.fsys.mu.Lock()
	defer n.fsys.mu.Unlock()
	fillAttr(n.in, &out.Attr)
	return 0
}

func (n *node) Setattr(ctx context.Context, fh fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	n.fsys.mu.Lock()
	defer n.fsys.mu.Unlock()
	if size, ok := in.GetSize(); ok {
		if n.in.dir {
			return syscall.EISDIR
		}
		if errno := n.fsys.mutate(); errno != 0 {
			return errno
		}
		n.truncate(int64(size))
	}
	fillAttr(n.in, &out.Attr)
	return 0
}

// truncate sets the volatile size. Called with mu held.
func (n *node) truncate(size int64) {
	w := write{off: size, truncate: true}
	n.in.data = apply(n.in.data, w)
	n.in.unsynced = append(n.in.unsynced, w)
}

func (n *node) Opendir(ctx context.Context) syscall.Errno { return 0 }

func (n *node) Readdir(ctx context.Context) (fs.DirStream, syscall.Errno) {
	n.fsys.mu.Lock()
	defer n.fsys.mu.Unlock()
	if !n.in.dir {
		return nil, syscall.ENOTDIR
	}
	var list []fuse.DirEntry
	for _, name := range sortedNames(n.in.entries) {
		in := n.in.entries[name]
		list = append(list, fuse.DirEntry{Name: name, Ino: in.ino, Mode: mode(in)})
	}
	return fs.NewListDirStream(list), 0
}

func (n *node) Create(ctx context.Context, name string, flags uint32, _ uint32, out *fuse.EntryOut) (*fs.Inode, fs.FileHandle, uint32, syscall.Errno) {
	n.fsys.mu.Lock()
	defer n.fsys.mu.Unlock()
	if in, ok := n.in.entries[name]; ok {
		if flags&syscall.O_EXCL != 0 {
			return nil, nil, 0, syscall.EEXIST
		}
		if in.dir {
			return nil, nil, 0, syscall.EISDIR
		}
		fillAttr(in, &out.Attr)
		return n.child(ctx, in), nil, fuse.FOPEN_KEEP_CACHE, 0
	}
	if errno := n.fsys.mutate(); errno != 0 {
		return nil, nil, 0, errno
	}
	in := n.fsys.newInode(false)
	n.in.entries[name] = in
	fillAttr(in, &out.Attr)
	return n.child(ctx, in), nil, fuse.FOPEN_KEEP_CACHE, 0
}

func (n *node) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if flags&syscall.O_TRUNC != 0 {
		n.fsys.mu.Lock()
		defer n.fsys.mu.Unlock()
		if errno := n.fsys.mutate(); errno != 0 {
			return nil, 0, errno
		}
		n.truncate(0)
	}
	// Keep the kernel's page cache across opens: this mount is the only
	// writer, and it writes through (no writeback cache).
	return nil, fuse.FOPEN_KEEP_CACHE, 0
}

func (n *node) Read(ctx context.Context, fh fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	n.fsys.mu.Lock()
	defer n.fsys.mu.Unlock()
	if off >= int64(len(n.in.data)) {
		return fuse.ReadResultData(nil), 0
	}
	end := min(off+int64(len(dest)), int64(len(n.in.data)))
	// Copy: the result is sent after the lock is released.
	return fuse.ReadResultData(bytes.Clone(n.in.data[off:end])), 0
}

func (n *node) Write(ctx context.Context, fh fs.FileHandle, data []byte, off int64) (uint32, syscall.Errno) {
	n.fsys.mu.Lock()
	defer n.fsys.mu.Unlock()
	if errno := n.fsys.mutate(); errno != 0 {
		return 0, errno
	}
	w := write{off: off, data: bytes.Clone(data)}
	n.in.data = apply(n.in.data, w)
	n.in.unsynced = append(n.in.unsynced, w)
	return uint32(len(data)), 0
}

// Fsync serves fsync and fdatasync of files and fsync of directories.
func (n *node) Fsync(ctx context.Context, fh fs.FileHandle, flags uint32) syscall.Errno {
	path := n.Path(nil) // before locking: it takes go-fuse's locks
	n.fsys.mu.Lock()
	defer n.fsys.mu.Unlock()
	if errno := n.fsys.mutate(); errno != 0 {
		return errno
	}
	if n.fsys.failFsync != nil && n.fsys.failFsync(n.describeFsync(path)) {
		if !n.in.dir {
			n.in.unsynced = nil // lost: see FailFsync
		}
		return syscall.EIO
	}
	if n.in.dir {
		n.in.durEntries = cloneEntries(n.in.entries)
		return 0
	}
	for _, w := range n.in.unsynced {
		n.in.durable = apply(n.in.durable, w)
	}
	n.in.unsynced = nil
	return 0
}

// describeFsync describes an fsync of n for FailFsync. Called with mu
// held.
func (n *node) describeFsync(path string) Fsync {
	c := Fsync{Path: path, Dir: n.in.dir}
	for _, w := range n.in.unsynced {
		if !w.truncate {
			c.Writes = append(c.Writes, Extent{Off: w.off, Len: int64(len(w.data))})
		}
	}
	return c
}

func cloneEntries(m map[string]*inode) map[string]*inode {
	c := make(map[string]*inode, len(m))
	for k, v := range m {
		c[k] = v
	}
	return c
}

func (n *node) Flush(ctx context.Context, fh fs.FileHandle) syscall.Errno { return 0 }

func (n *node) Mkdir(ctx context.Context, name string, _ uint32, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	n.fsys.mu.Lock()
	defer n.fsys.mu.Unlock()
	if _, ok := n.in.entries[name]; ok {
		return nil, syscall.EEXIST
	}
	if errno := n.fsys.mutate(); errno != 0 {
		return nil, errno
	}
	in := n.fsys.newInode(true)
	n.in.entries[name] = in
	fillAttr(in, &out.Attr)
	return n.child(ctx, in), 0
}

func (n *node) Unlink(ctx context.Context, name string) syscall.Errno {
	return n.remove(name, false)
}

func (n *node) Rmdir(ctx context.Context, name string) syscall.Errno {
	return n.remove(name, true)
}

func (n *node) remove(name string, dir bool) syscall.Errno {
	n.fsys.mu.Lock()
	defer n.fsys.mu.Unlock()
	in, ok := n.in.entries[name]
	switch {
	case !ok:
		return syscall.ENOENT
	case dir && !in.dir:
		return syscall.ENOTDIR
	case !dir && in.dir:
		return syscall.EISDIR
	case dir && len(in.entries) > 0:
		return syscall.ENOTEMPTY
	}
	if errno := n.fsys.mutate(); errno != 0 {
		return errno
	}
	delete(n.in.entries, name)
	return 0
}

// renameNoReplace is RENAME_NOREPLACE of renameat2(2).
const renameNoReplace = 1

func (n *node) Rename(ctx context.Context, name string, newParent fs.InodeEmbedder, newName string, flags uint32) syscall.Errno {
	n.fsys.mu.Lock()
	defer n.fsys.mu.Unlock()
	dst, ok := newParent.(*node)
	if !ok || !dst.in.dir {
		return syscall.EXDEV
	}
	if flags&^uint32(renameNoReplace) != 0 {
		return syscall.ENOTSUP // RENAME_EXCHANGE, RENAME_WHITEOUT
	}
	in, ok := n.in.entries[name]
	if !ok {
		return syscall.ENOENT
	}
	if old, ok := dst.in.entries[newName]; ok {
		switch {
		case flags&renameNoReplace != 0:
			return syscall.EEXIST
		case old.dir && !in.dir:
			return syscall.EISDIR
		case !old.dir && in.dir:
			return syscall.ENOTDIR
		case old.dir && len(old.entries) > 0:
			return syscall.ENOTEMPTY
		}
	}
	if errno := n.fsys.mutate(); errno != 0 {
		return errno
	}
	delete(n.in.entries, name)
	dst.in.entries[newName] = in
	return 0
}

func (n *node) Statfs(ctx context.Context, out *fuse.StatfsOut) syscall.Errno {
	// Plenty of room: free space is not what this file system tests.
	out.Bsize, out.Frsize = 4096, 4096
	out.Blocks, out.Bfree, out.Bavail = 1<<24, 1<<23, 1<<23
	out.Files, out.Ffree = 1<<20, 1<<19
	out.NameLen = 255
	return 0
}

// Allocate (fallocate) is refused: callers fall back to writing.
func (n *node) Allocate(ctx context.Context, fh fs.FileHandle, off, size uint64, mode uint32) syscall.Errno {
	return syscall.EOPNOTSUPP
}

// Readlink: there are no symlinks.
func (n *node) Readlink(ctx context.Context) ([]byte, syscall.Errno) { return nil, syscall.EINVAL }
