package embedded

import (
	"errors"
	"os"

	"golang.org/x/sys/unix"
)

// RenameNoReplace uses renameat2(RENAME_NOREPLACE), which checks and
// renames in one step. File systems without it get link and unlink.
func (OSFS) RenameNoReplace(oldName, newName string) error {
	err := unix.Renameat2(unix.AT_FDCWD, oldName, unix.AT_FDCWD, newName, unix.RENAME_NOREPLACE)
	if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.ENOTSUP) {
		return linkUnlink(oldName, newName)
	}
	if err != nil {
		return &os.LinkError{Op: "rename", Old: oldName, New: newName, Err: err}
	}
	return nil
}
