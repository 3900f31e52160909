package queue

import (
	"fmt"
	"syscall"

	"github.com/foxcpp/maddy/framework/exterrors"
)

// defaultMinFreeSpace is the free space below which new mail is refused. It
// leaves room for the attempts, DSNs and state updates of the mail already
// queued, so a filling disk stops intake before it can hurt stored mail.
const defaultMinFreeSpace = 100 << 20

// statfsFree returns the bytes available to unprivileged writers on the
// filesystem holding path (what the server can really use; root's reserve
// is not counted).
func statfsFree(path string) (uint64, error) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(path, &st); err != nil {
		return 0, err
	}
	// The field types differ between platforms; both are non-negative.
	return uint64(st.Bavail) * uint64(st.Bsize), nil
}

// freeSpace reports the free bytes under the queue location.
func (q *Queue) freeSpace() (uint64, error) {
	if q.diskFree != nil {
		return q.diskFree(q.location)
	}
	return statfsFree(q.location)
}

// checkFreeSpace refuses a message of size bytes when storing it would
// leave less than min_free_space free. A failing statfs does not refuse
// mail: the store reports real write errors itself.
func (q *Queue) checkFreeSpace(size int64) error {
	if q.cfg.minFreeSpace == 0 || q.cfg.store.kind != storeEmbedded {
		return nil // a shared store's disk is the database server's
	}
	free, err := q.freeSpace()
	if err != nil {
		q.Log.Debugf("cannot read free space of %s: %v", q.location, err)
		return nil
	}
	if size < 0 {
		size = 0
	}
	if free >= q.cfg.minFreeSpace && free-q.cfg.minFreeSpace >= uint64(size) {
		return nil
	}
	return &exterrors.SMTPError{
		Code:         452,
		EnhancedCode: exterrors.EnhancedCode{4, 3, 1},
		Message:      "Insufficient system storage, try again later",
		TargetName:   ModName,
		Err:          fmt.Errorf("%d bytes free under %s, %d needed for the message and min_free_space %d", free, q.location, size, q.cfg.minFreeSpace),
		Misc:         map[string]interface{}{"free_bytes": free},
	}
}
