// Package embedded is the default store of target.spool: a bbolt database
// and a directory of content files on the local disk, needing no setup,
// owned by one maddy process.
//
// It has two layers. Dir (dir.go, layout.go, recover.go, commit.go,
// content.go, scan.go) keeps what is durable and is described below.
// Store (embedded.go, claim.go) implements store.Backend on a Dir: who
// works on which message (leases, fencing tokens, operator requests) and
// which messages wait for their time (a heap of due times) are kept in
// memory, since only one process opens the directory. After a restart
// nothing is leased, and every stored message, one still being received
// when the process died included, is claimable at its stored due time:
// delivery is at least once. Open loads the schedule of the stored
// messages in the background, covering exactly those stored before it, so
// a large queue does not delay the start and nothing is counted twice.
//
// A queued message is three things: its metadata (envelope, per-recipient
// state, attempt history; see store.Message), its content (the header
// block followed by the body), and a small schedule entry (next attempt
// time, arrival time, held flag) that start-up reads instead of the
// metadata.
//
// # Layout
//
//	LOCATION/lock            lock file: flock held while the store is open,
//	                         exclusive with the writer's PID in it, or
//	                         shared by read-only openers
//	LOCATION/queue.db        bbolt database: buckets meta, sched, content,
//	                         quarantine, arrival (index by arrival time),
//	                         info (format, ID high-water mark)
//	LOCATION/bodies/ID       content of messages larger than InlineLimit
//	LOCATION/quarantine/     content files of quarantined entries
//
// The arrival index (database format 2) is changed in the transaction
// that creates, updates, deletes or quarantines an entry, so Oldest reads
// one key instead of the whole queue. A format-1 database is migrated
// when opened for writing: the index is built from the schedule entries
// in chunks, and the format marker set to 2 last, so a crash during the
// migration leaves format 1 and the next open starts it over. Builds that
// know only format 1 refuse a format-2 database. A read-only open leaves
// a format-1 database as it is, and Oldest then scans.
//
// Small messages (the common case) live entirely in queue.db, so that one
// bbolt commit makes a whole batch of them durable: concurrent Create,
// Update and Delete calls are collected by a single committer goroutine and
// applied in one transaction (group commit). Each call still returns only
// after the transaction holding its own change has been fsynced.
//
// # Durability contract
//
// OpenDir takes the lock before it reads queue.db, and fails, naming the
// holder's PID, if another process holds it past LockTimeout. Only a
// holder of the lock judges queue.db damaged, so a database another
// process is still creating or growing is never moved aside. A damaged
// database is also moved aside only while bbolt's own lock on it can be
// taken, which keeps out builds that did not have the lock file.
//
// OpenDir fsyncs the store's directory and the one above it, so that the
// names queue.db, bodies/ and quarantine/ (and the store directory itself,
// when OpenDir created it) are durable before anything is stored: a name
// in a directory survives power loss only once that directory is fsynced.
//
// When Create returns nil, the message survives kill -9 and power loss:
//
//  1. a large message's content file is written and fsynced, then
//  2. the bodies/ directory is fsynced (once per batch), so the file's name
//     is durable, then
//  3. the bbolt transaction inserting meta, sched and (for a small message)
//     content is committed; bbolt fsyncs its data pages before the meta page
//     that makes them visible, so a crash during the commit leaves the
//     previous state.
//
// A crash before step 3 leaves at most an orphan content file with no
// metadata. Open removes such orphans (and *.tmp leftovers): the client never
// got a success reply for them. A crash after step 3 leaves the complete
// message. There is no state in which metadata refers to missing content,
// except through outside damage, which Get reports as ErrCorrupt and the
// entry is quarantined.
//
// Update replaces meta and sched of one message in one transaction: after a
// crash either the old or the new state is seen, never a mix. Delete removes
// the entry in one transaction and then unlinks its content file; a crash in
// between leaves an orphan file that the next Open removes.
//
// Entries that cannot be decoded (damaged bytes, a newer entry format) are
// never deleted: they are moved to the quarantine bucket together with the
// reason, their content file is moved to quarantine/, the error is logged by
// the caller and counted, and the rest of the queue carries on. The move of
// the file follows the commit of the quarantine record; if a crash loses
// the move, Open finishes it instead of removing the file as an orphan.
// A move into quarantine/ never replaces a file there: a taken name gets
// a numeric suffix (ID.1, ID.2, ...), which is logged.
//
// When queue.db itself cannot be opened (garbage, empty, or shorter than
// its own meta page says, which bbolt would meet as SIGBUS), every content
// file is moved to quarantine/ (suffix .damaged-STAMP) and those moves are
// fsynced, then queue.db is moved aside and that is fsynced, and only then
// is a new, empty database created. If a content file cannot be moved,
// OpenDir fails with an error naming it; queue.db stays in place and
// nothing is deleted, so the next open tries again. A crash after the
// move of queue.db but before the new database's first commit leaves no
// (or an empty) queue.db next to the moved one; the next open creates the
// database then, with the same ID floor (see ID).
//
// # Failed writes
//
// A write that fails cleanly fails alone, and the store goes on (with a
// full disk, it takes new mail again once space is freed): a content file
// that cannot be written, which Create removes, or a bbolt commit that
// fails writing its pages, which bbolt rolls back before it writes the
// meta page.
//
// A failed fsync is different: the kernel may drop the data it could not
// write and report success for a later fsync, so what is on disk is
// unknown. The same holds when bbolt fails after writing its meta page: it
// reports an error, yet reads the new state back from its mapping (a read
// transaction then has the failed one's ID). So after a failed fsync of a
// content file, of bodies/ or quarantine/, or bbolt's fdatasync (or grow
// sync), or a failed commit whose new state is live, the store stops:
// every later Create, Update, Delete or Quarantine fails at once with an
// error wrapping ErrFailed, reads go on, Failed reports the error, and
// DirOptions.OnFailed is told once. Create keeps the content file it
// wrote, since its entry may be durable; the next OpenDir removes it if
// the entry is not. A restart recovers: OpenDir reads the state from disk.
//
// Content files are opened without following symlinks and must be regular
// files of exactly the size the metadata gives; anything else is damage
// and quarantines the entry, so a file planted in bodies/ can never be
// served as message content. Files in bodies/ whose names are not IDs are
// left alone (and logged); removal and quarantine act on a symlink itself,
// never on its target.
//
// The contract is checked by TestCrashKeepsAcknowledgedMessages (kill -9),
// TestPowerLoss, which runs the store on a FUSE file system that drops
// everything not fsynced at random points (internal/testutils/lazyfs),
// and TestFsyncFailure, which makes single fsyncs on it fail.
package embedded
