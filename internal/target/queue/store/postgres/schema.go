package postgres

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"
)

// startupLockKey is the advisory lock that serializes the start-up
// transaction (migrations, node registration) of every node of a database.
// Any fixed number works; this one spells "spool" in ASCII.
const startupLockKey int64 = 0x73706f6f6c

// migrations are the schema changes, in order: migrations[i] brings the
// schema from version i to version i+1. Released entries are never
// edited; a change is a new entry.
var migrations = []string{
	// 1: the initial schema (see the package documentation).
	`
	CREATE SEQUENCE spool_message_ids;

	CREATE TABLE spool_messages (
		id           bigint PRIMARY KEY DEFAULT nextval('spool_message_ids'),
		meta         bytea NOT NULL,
		arrival      timestamptz NOT NULL,
		next_attempt timestamptz NOT NULL,
		claimable_at timestamptz NOT NULL,
		held         boolean NOT NULL,
		pending      integer NOT NULL,
		receiving    boolean NOT NULL,
		lease_owner  text,
		lease_expiry timestamptz,
		lease_token  bigint NOT NULL,
		request      smallint NOT NULL DEFAULT 0,
		header       bytea NOT NULL,
		body         bytea,
		body_len     bigint NOT NULL,
		CHECK ((lease_owner IS NULL) = (lease_expiry IS NULL)),
		CHECK (lease_owner IS NOT NULL OR NOT receiving)
	);
	ALTER SEQUENCE spool_message_ids OWNED BY spool_messages.id;
	CREATE INDEX spool_messages_claimable ON spool_messages (claimable_at, id) WHERE NOT held;
	CREATE INDEX spool_messages_lease_owner ON spool_messages (lease_owner) WHERE lease_owner IS NOT NULL;

	CREATE TABLE spool_chunks (
		message_id bigint NOT NULL,
		seq        integer NOT NULL,
		data       bytea NOT NULL,
		PRIMARY KEY (message_id, seq)
	);
	ALTER TABLE spool_chunks ALTER COLUMN data SET STORAGE EXTERNAL;

	CREATE TABLE spool_nodes (
		name      text PRIMARY KEY,
		host      text NOT NULL,
		pid       integer NOT NULL,
		instance  text NOT NULL,
		started   timestamptz NOT NULL,
		heartbeat timestamptz NOT NULL
	);

	CREATE TABLE spool_quarantine (
		id             bigint PRIMARY KEY,
		meta           bytea,
		header         bytea,
		body           bytea,
		body_len       bigint,
		chunked        boolean NOT NULL,
		arrival        timestamptz,
		next_attempt   timestamptz,
		held           boolean,
		lease_owner    text,
		lease_token    bigint,
		request        smallint,
		reason         text NOT NULL,
		quarantined_at timestamptz NOT NULL,
		quarantined_by text NOT NULL
	);

	-- spool_wake notifies channel when cond holds, and returns cond. A
	-- statement that makes a message claimable calls it in RETURNING;
	-- PostgreSQL folds the notifications of one transaction into one.
	CREATE FUNCTION spool_wake(channel text, cond boolean) RETURNS boolean
	LANGUAGE plpgsql VOLATILE AS $$
	BEGIN
		IF cond THEN
			PERFORM pg_notify(channel, '');
		END IF;
		RETURN cond;
	END $$;
	`,
	// Version 2: each message's destination, for per-destination
	// delivery: claims leave out busy destinations, a suspended one is
	// probed and released as a whole.
	`
	ALTER TABLE spool_messages ADD COLUMN destination text NOT NULL DEFAULT '';
	CREATE INDEX spool_messages_destination ON spool_messages (destination, claimable_at, id) WHERE NOT held;
	`,
	// Version 3: compress header and inline body with LZ4 rather than
	// pglz, where the server has it (PostgreSQL 14 or later, built with
	// lz4, as Debian's and the PGDG packages are). pglz was the largest
	// single cost in the server's profile of an enqueue load; LZ4
	// compresses several times faster. Values stored before keep their
	// compression; both read alike.
	`
	DO $$
	BEGIN
		IF EXISTS (SELECT FROM pg_settings
		           WHERE name = 'default_toast_compression' AND 'lz4' = ANY(enumvals)) THEN
			ALTER TABLE spool_messages
				ALTER COLUMN header SET COMPRESSION lz4,
				ALTER COLUMN body SET COMPRESSION lz4;
		END IF;
	END $$;
	`,
}

// schemaVersion is the schema version this build writes.
var schemaVersion = len(migrations)

// migrate brings the schema up to schemaVersion inside tx, which holds the
// start-up lock. A database of a newer version is refused.
func migrate(ctx context.Context, tx pgx.Tx) error {
	_, err := tx.Exec(ctx, `CREATE TABLE IF NOT EXISTS spool_schema (
		version    integer PRIMARY KEY,
		applied_at timestamptz NOT NULL DEFAULT now()
	)`)
	if err != nil {
		return fmt.Errorf("postgres: create spool_schema: %w", err)
	}
	var v int
	if err := tx.QueryRow(ctx, "SELECT coalesce(max(version), 0) FROM spool_schema").Scan(&v); err != nil {
		return fmt.Errorf("postgres: read schema version: %w", err)
	}
	if v > schemaVersion {
		return fmt.Errorf("postgres: schema version %d is newer than this build supports (%d); upgrade maddy on this node",
			v, schemaVersion)
	}
	for ; v < schemaVersion; v++ {
		if _, err := tx.Exec(ctx, migrations[v]); err != nil {
			return fmt.Errorf("postgres: migrate schema to version %d: %w", v+1, err)
		}
		if _, err := tx.Exec(ctx, "INSERT INTO spool_schema (version) VALUES ($1)", v+1); err != nil {
			return fmt.Errorf("postgres: migrate schema to version %d: %w", v+1, err)
		}
	}
	return nil
}
