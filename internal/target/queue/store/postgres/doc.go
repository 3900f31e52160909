// Package postgres is a store.Backend kept in a PostgreSQL database that
// several maddy nodes share: each node opens its own handle (Open) under
// a unique node name, and the nodes divide the queue between them through
// leases (see package store). It needs PostgreSQL 12 or later (tested
// with 15) and one database, or one schema (search_path in the DSN), per
// queue.
//
// # Schema
//
// Open brings the schema to the version this build knows, in one
// transaction that first takes a transaction-level advisory lock, so that
// nodes starting together migrate once and in order. spool_schema records
// each version applied; a database whose version is newer than this
// build's is refused ("schema version N is newer than this build supports
// (M); upgrade maddy on this node"). Version 1:
//
//	spool_messages     one row per message:
//	  id               bigint from the sequence spool_message_ids: never
//	                   reused once committed (a failed Create's is
//	                   skipped, or after a server crash may come again);
//	                   a node reserves 64 at a time for the messages it
//	                   receives in memory, so IDs follow arrival only
//	                   roughly across nodes
//	  meta             the metadata, exactly as store.EncodeMeta writes it
//	  arrival          Message.Arrival, for Stats
//	  next_attempt     Message.NextAttempt, as last saved
//	  claimable_at     when Claim may take the row: next_attempt while
//	                   no lease holds it, the lease expiry while one does
//	  held, pending    Message.Held; the number of pending recipients
//	  receiving        set from Create to Commit for a message stored at
//	                   Create (one larger than InlineLimit)
//	  lease_owner, lease_expiry
//	                   the lease (both NULL when none)
//	  lease_token      the fencing token: 1 at Create, +1 at every claim
//	  request          an operator request recorded for the holder (0: none)
//	  header           the header block
//	  body, body_len   the body when header and body fit InlineLimit,
//	                   else NULL and the body is in spool_chunks
//	index spool_messages_claimable (claimable_at, id) WHERE NOT held
//	index spool_messages_lease_owner (lease_owner) WHERE lease_owner IS NOT NULL
//	spool_chunks       (message_id, seq, data): a large body in rows of
//	                   256 KiB, stored uncompressed out of line
//	spool_nodes        (name, host, pid, instance, started, heartbeat)
//	spool_quarantine   damaged rows as they were, with the reason, when
//	                   and by which node; their chunks stay in spool_chunks
//
// Version 2 adds destination (text) and the index spool_messages_destination
// (destination, claimable_at, id) WHERE NOT held; version 3 compresses
// header and body with LZ4 where the server supports it.
//
// Because a lease moves claimable_at to its expiry, "claimable" is one
// range of one partial index, NOT held AND claimable_at <= now, an
// expired lease is claimable with no sweeper, and NextDue is the first
// entry of that index.
//
// # Claims, fencing and requests
//
// Claim is one statement: a CTE selects the due rows in (claimable_at,
// id) order with LIMIT and FOR UPDATE SKIP LOCKED, and the UPDATE around it
// gives them the new lease (token+1, owner, expiry = now+Lease,
// claimable_at = expiry) and returns their metadata. SKIP LOCKED lets
// nodes claim side by side; a row another node claimed after this
// statement's snapshot is re-checked once locked and dropped, so a row is
// never returned to two holders. ClaimID is an UPDATE of one row WHERE it
// is not validly leased; when that matches nothing, a probe tells
// ErrLeased from ErrNotFound.
//
// Every write that ends or extends a lease (Commit, Save, Release,
// Delete, Renew) matches WHERE id = $id AND lease_token = $token AND
// lease_owner IS NOT NULL. If no row matches, the lease was taken over,
// ended, or the message removed: ErrLeaseLost, nothing written. An expired
// lease nobody claimed since still matches, and its write is the truth.
// Commit, Save and Release are one statement:
//
//	WITH old AS (SELECT id, request FROM spool_messages
//	             WHERE <fenced> FOR UPDATE)
//	UPDATE spool_messages SET <new state>, request = 0,
//	       lease_owner, lease_expiry, claimable_at =
//	           ended (NULL, NULL, next_attempt) if old.request = 0,
//	           else kept
//	FROM old ... RETURNING old.request
//
// so a recorded request is read and cleared atomically with the write,
// and when there was one the lease is kept for the holder to apply it.
// Request sets request on a row whose lease is valid now (ErrNotLeased if
// none, ErrNotFound if no row); the latest wins. A request whose holder
// dies stays on the row for the next holder's Save.
//
// # Writes, group commit and content
//
// A Create whose content fits InlineLimit writes nothing: the handle keeps
// the message until Commit, which inserts it queued (see Store.Create).
// Every Commit, Save, Release and Delete is handed to a committer. A committer sends all the
// writes waiting (up to 128) as one pgx batch: one round trip and one
// implicit transaction, so one WAL flush makes every session's message
// durable at once. Each write is fenced on its own within the batch; a
// fenced write that matches no row is that write's ErrLeaseLost. Writes
// are ordered by message ID in a batch, as Renew locks them, so batches
// cannot deadlock. If the server refuses a statement, the batch is rolled
// back and each write is retried alone, so only the bad one fails. Two
// committers run, so one batch is collected while another commits.
//
// A larger Create runs in a transaction of its own: it inserts the row
// with a receiving lease,
// then COPYs the body into spool_chunks, reading it from the io.Reader one
// chunk at a time into one buffer; a 50 MB message is never in memory
// whole. A claim returns the header and inline body of each message it
// leases, and the attempt's Content takes them from there; otherwise
// Content reads the header (and an inline body); Body.Open reads a
// chunked body one chunk per statement, holding no connection between
// chunks.
//
// # Durability
//
// Commit returns nil only after its transaction committed, which with
// the server's default settings (fsync = on, synchronous_commit = on)
// means its WAL was flushed to disk, and with it the WAL of the Create
// before it: the message survives a crash of the node and of the
// database server, and the client may be given 250. The same holds for
// every other write when it returns, except a large message's Create,
// which commits without waiting for the flush (see Store.Create): until
// Commit, the client has not been answered, and a crash of the database's
// machine (not of its processes alone) may lose the message. TestPowerLoss
// checks the promise against a power cut: the server's WAL on a file
// system that loses what was not fsynced, killed while sessions commit,
// every acknowledged message there after recovery (with
// synchronous_commit = off for the sessions, it finds acknowledged
// messages gone). Server settings weaken this promise for every client
// of that server, and this package cannot detect them:
//
//   - synchronous_commit = off: a commit returns before its WAL is
//     flushed. A server crash (not a clean shutdown) loses up to about
//     three times wal_writer_delay of acknowledged transactions: mail the
//     client was given 250 for is gone, and saved outcomes roll back (a
//     delivered message is delivered again).
//   - fsync = off: a power loss or OS crash can lose any amount, or
//     corrupt the database.
//   - a standby with synchronous_commit = local or remote_write (or
//     asynchronous replication): a failover to the standby loses what it
//     had not received or flushed, acknowledged mail included.
//
// Recommended: fsync = on, full_page_writes = on, synchronous_commit = on;
// with a standby that may be promoted, synchronous_standby_names set and
// synchronous_commit = on or remote_apply. Group commit keeps the cost of
// each flush shared among concurrent sessions.
//
// # Failures
//
// While the server is unreachable every call fails with an error (a
// connection error, or the caller's context), none panics, and none
// waits beyond its context. The pool opens new connections when the
// server is back, and the listener reconnects with backoff (50 ms doubling
// to 5 s), so the same handle works again without being reopened.
//
// Failed always returns nil: a write is one transaction that committed or
// not, and nothing about the handle is in doubt afterwards. The one write
// whose outcome is unknown is one whose connection broke while its COMMIT
// was in flight (or whose caller gave up after the batch was sent). It is
// reported as an error, and the design bears either outcome: a Create
// that did commit is a row with a receiving lease, queued when that lease
// expires, and a small message's Commit that did commit queued it (either
// way the client, told of a failure, may send again: at least once); a
// Save, Release or Commit of a stored message that did commit ended the
// lease, so the
// holder's retry gets ErrLeaseLost and drops the message, which is
// correct since the state was written (a request it returned is lost
// with the reply); one that did not commit leaves the lease as it was. A
// Claim whose reply is lost leaves its messages leased, to nobody who
// works on them, until their leases expire.
//
// What a failure costs:
//   - A node that crashes: the messages it held (claimed, and being
//     received) wait until their leases expire, one Lease (ReceiveLease
//     for mail being received), and are then claimed by any node; if the
//     same node name comes back first, it takes them back at once at Open.
//     Attempts in flight are made again: at least once, bounded by what
//     was leased on the dead node. Mail still being received when the
//     node died is lost if it was small enough to be kept in memory, and
//     queued as it was otherwise; either way its client did not hear 250
//     and sends it again.
//   - A node cut off from the database: its writes fail; its leases expire
//     and are taken over; when it comes back, its late writes are fenced
//     off (ErrLeaseLost) and it drops those messages. The cost is one
//     repeated attempt per message it held.
//   - The database server crashing: nothing acknowledged is lost (with the
//     settings above); calls fail until it is back.
//
// # Clocks
//
// Every lease and due-time decision uses the Now option (the node's
// clock), never the server's now(), so all nodes' clocks must agree to
// within a small fraction of Lease (NTP keeps them within milliseconds). A
// node whose clock runs ahead takes over leases early (and its claims
// fence off a holder still working, costing repeated attempts); one that
// runs behind keeps leases past their expiry.
//
// # Nodes
//
// Open registers the node in spool_nodes. If the name is registered with
// a heartbeat fresher than Lease by another host, by another live process
// on this host, or by another open handle of this process, Open fails
// ("node name mx1 is already in use by a running node on host H (last
// seen ... ago); give each node a unique `node` name"). Otherwise it takes
// the name over and, in the same transaction, ends every lease held under
// it: the messages the node held before a crash, those it was receiving
// included, are claimable at once. The heartbeat is renewed every Lease/3.
// Close finishes the writes submitted, and removes the registration; it
// does not release leases (the next Open of the name takes them back).
//
// # Wake-ups
//
// Each handle keeps a dedicated connection (not from the pool) LISTENing
// on the channel "spool:" plus the schema name. A statement that makes a
// message claimable now (a Commit, a Release or a Save due at once, a
// take-back) calls pg_notify in its RETURNING clause, through the function
// spool_wake; PostgreSQL delivers identical notifications of one
// transaction once, so a batch notifies once however many messages it
// made claimable. A handle's own writes signal its Wake directly, and the
// listener ignores the notifications of its own sessions (by backend
// PID); another node's notification fires Wake 25 ms later, gathering a
// burst into one wake-up and letting the node that made the message
// claimable claim it first (see remoteWakeDelay). Wake also fires after
// each reconnection of the listener (notifications sent meanwhile are
// lost), and every PollInterval as a fallback; a poll only signals Wake. The idle listener
// is pinged every 15 s so that a dead connection is noticed.
//
// LISTEN belongs to a session: through PgBouncer (or another pooler) in
// transaction or statement mode the listener receives nothing, and
// wake-ups fall back to the poll. Point the DSN at PostgreSQL directly or
// at a pooler in session mode.
//
// # Costs
//
// Claim, ClaimID, Save and the like touch a few index entries per
// message. Stats is one statement that scans spool_messages sequentially
// (count, sum of pending, held, min(arrival) of the rows not being
// received): its cost grows with the queue, 80 to 140 ms for 100 000
// messages on a 2-core machine (BenchmarkStats). An index could not spare
// the scan: counting needs every row, and an index-only scan would still
// visit the heap of a table whose rows change on every claim, while every
// write would pay for one more index. Call it at metrics-scrape
// intervals, not per message. Walk reads 256 rows per
// statement, ordered by id, so no transaction spans the table.
//
// # Why not River
//
// River (github.com/riverqueue/river) claims jobs with the same kind of
// SKIP LOCKED statement, but its completion (JobSetStateIfRunningMany)
// matches a job by its state being 'running' only, with no attempt number
// or token, and its rescuer hands jobs that ran too long to another
// worker without any lease the first could have renewed. A worker that
// lost a job to a rescue can still complete it while the new holder runs
// it: the stale outcome is taken and the current holder's refused. That
// missing fencing ruled River out: a mail queue must never let a late
// outcome overwrite a newer one. Recipients' state and content would in
// any case live in our own tables, written in the same transaction as the
// outcome.
package postgres
