package embedded

import (
	"syscall"

	bolt "go.etcd.io/bbolt"
)

// releaseMapped drops the database's pages from this process's page
// tables (they stay in the page cache; the next access maps them again).
//
// Why: bbolt reads through a shared file mapping. On a read fault the
// kernel maps the neighbouring pages that are already cached too
// ("fault-around", 64 KiB by default), whether or not the mapping is
// advised random, so a scan of the small schedule entries of a warm
// database leaves most of the file resident and counted in RSS
// (spool-bench's warm start-up: 645-713 bytes per queued message, of
// which 63-80 are heap). Scans over every message (start-up, admin list)
// call this when done.
//
// The read transaction keeps bbolt from remapping meanwhile, so the
// range is the live mapping. madvise is called with the address bbolt
// reports rather than a Go slice over it: the mapping is not Go memory.
func releaseMapped(db *bolt.DB) {
	db.View(func(tx *bolt.Tx) error {
		size := tx.Size()
		if size <= 0 {
			return nil
		}
		syscall.Syscall(syscall.SYS_MADVISE, db.Info().Data, uintptr(size), syscall.MADV_DONTNEED)
		return nil
	})
}
