package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/urfave/cli/v2"

	"github.com/maddy-spool/spool/internal/target/queue/migrate"
	"github.com/maddy-spool/spool/internal/target/queue/store"
	"github.com/maddy-spool/spool/internal/target/queue/store/embedded"
	"github.com/maddy-spool/spool/internal/target/queue/store/postgres"
)

// importDest is where `spool import` puts messages: an embedded store's
// directory, or the PostgreSQL store of a target.spool instance.
type importDest struct {
	name  string // the instance, or the directory
	dir   string // embedded store directory; "" for PostgreSQL
	pgDSN string
}

// importOpenTimeout bounds connecting to a PostgreSQL destination.
const importOpenTimeout = 30 * time.Second

func spoolImport(c *cli.Context) error {
	setup, err := loadSpoolSetup(c)
	if err != nil {
		return err
	}
	to, err := importTarget(setup, c.String("to"))
	if err != nil {
		return err
	}
	from := c.Path("from")
	dryRun := c.Bool("dry-run")
	isStore, err := migrate.IsSpoolStore(from)
	if err != nil {
		return fmt.Errorf("--from %s: %w", from, err)
	}
	// A Spool store in the destination directory itself is the
	// destination, not something to import: only target.queue entries
	// there are (the two modules' default locations are the same).
	sameDir := to.dir != "" && sameDirectory(from, to.dir)
	runStore := isStore && !sameDir
	runQueue := !runStore || hasQueueEntries(from)

	ctx, cancel := signalContext(0)
	defer cancel()
	dst, closeDst, err := openImportDest(ctx, to, dryRun)
	if err != nil {
		return err
	}
	defer closeDst()

	opts := migrate.Options{DryRun: dryRun}
	// Progress on a terminal only: in a file or a pipe it would be noise
	// (the summary at the end says what happened).
	var meter *progressMeter
	if isTerminal(os.Stderr) {
		meter = newProgressMeter(os.Stderr, time.Now)
		opts.Progress = func(p migrate.Progress) {
			phase := p.Phase
			if p.Phase == migrate.PhaseReading {
				phase = "reading metadata"
			}
			meter.update(phase, p.Done, p.Total)
		}
	}
	failed := 0
	report := func(res migrate.Result, err error) error {
		if meter != nil {
			// Before the report, which may go to the same terminal.
			meter.done()
		}
		if werr := res.Write(os.Stdout); werr != nil && err == nil {
			err = werr
		}
		failed += len(res.Failed)
		return err
	}
	if runQueue {
		if err := report(migrate.Import(ctx, from, dst, opts)); err != nil {
			return err
		}
	}
	if runStore {
		err := report(migrate.ImportStore(ctx, from, dst, opts))
		if err != nil {
			return fmt.Errorf("%w (run the import again once this is fixed: it carries on where it stopped)", err)
		}
	}
	if failed > 0 {
		return cli.Exit(fmt.Sprintf("%d entries were not imported; they are left in %s (see above; run the import again once fixed)", failed, from), 1)
	}
	return nil
}

// hasQueueEntries reports whether dir holds files of maddy's target.queue
// format, or of an interrupted import of them.
func hasQueueEntries(dir string) bool {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return false
	}
	for _, e := range entries {
		n := e.Name()
		if e.IsDir() {
			continue
		}
		for _, suf := range []string{".meta", ".meta.importing", ".meta_broken", ".meta.new", ".header", ".body"} {
			if strings.HasSuffix(n, suf) {
				return true
			}
		}
	}
	return false
}

// sameDirectory reports whether a and b name the same existing directory.
func sameDirectory(a, b string) bool {
	sa, err := os.Stat(a)
	if err != nil {
		return false
	}
	sb, err := os.Stat(b)
	if err != nil {
		return false
	}
	return os.SameFile(sa, sb)
}

// openImportDest opens the destination store. A dry run changes nothing:
// an embedded store is opened read-only (or stands in as an empty one if
// it does not exist yet), a PostgreSQL store is read without joining the
// cluster.
func openImportDest(ctx context.Context, to importDest, dryRun bool) (migrate.Destination, func(), error) {
	if to.pgDSN != "" {
		octx, cancel := context.WithTimeout(ctx, importOpenTimeout)
		defer cancel()
		if dryRun {
			r, err := postgres.OpenReader(octx, to.pgDSN)
			var pgErr *pgconn.PgError
			if errors.As(err, &pgErr) && pgErr.Code == "42P01" { // undefined_table
				// No node has started on this database yet.
				return readOnlyDest{walk: func(func(*store.Message) error) error { return nil }}, func() {}, nil
			}
			if err != nil {
				return nil, nil, fmt.Errorf("instance %s: %w", to.name, err)
			}
			return readOnlyDest{walk: r.Walk}, func() { r.Close() }, nil
		}
		node := importNodeName()
		st, err := postgres.Open(octx, postgres.Options{
			DSN:  to.pgDSN,
			Node: node,
			Logf: func(format string, args ...any) {
				fmt.Fprintf(os.Stderr, "postgres: "+format+"\n", args...)
			},
		})
		if err != nil {
			return nil, nil, fmt.Errorf("instance %s: store postgres (node %s): %w", to.name, node, err)
		}
		return migrate.BackendDestination(st), func() { st.Close() }, nil
	}

	dir := to.dir
	var cleanup []func()
	readOnly := dryRun
	if _, err := os.Stat(filepath.Join(dir, "queue.db")); dryRun && errors.Is(err, fs.ErrNotExist) {
		// Nothing imported yet: a dry run checks against an empty store
		// rather than create one in dir.
		tmp, err := os.MkdirTemp("", "spool-import-dry-run-")
		if err != nil {
			return nil, nil, err
		}
		cleanup = append(cleanup, func() { os.RemoveAll(tmp) })
		dir, readOnly = tmp, false
	}
	st, err := embedded.OpenDir(dir, embedded.DirOptions{LockTimeout: 2 * time.Second, ReadOnly: readOnly})
	if err != nil {
		for _, f := range cleanup {
			f()
		}
		return nil, nil, fmt.Errorf("opening %s: %w (stop maddy before importing into a queue directory)", dir, err)
	}
	return st, func() {
		st.Close()
		for _, f := range cleanup {
			f()
		}
	}, nil
}

// importNodeName is the node name the import takes in a PostgreSQL store:
// its own, so that it never takes over a running node's name (and two
// imports from one host exclude each other).
func importNodeName() string {
	host, err := os.Hostname()
	if err != nil || host == "" {
		host = "localhost"
	}
	name := "import@" + host
	if len(name) > 64 {
		name = name[:64]
	}
	return name
}

// readOnlyDest is a dry run's view of a PostgreSQL store: it can be read,
// and refuses writes (a dry run makes none).
type readOnlyDest struct {
	walk func(func(*store.Message) error) error
}

var errDryRun = errors.New("dry run: the destination is read-only")

func (d readOnlyDest) Create(context.Context, *store.Message, []byte, io.Reader, int64) error {
	return errDryRun
}
func (d readOnlyDest) Update(context.Context, *store.Message) error { return errDryRun }
func (d readOnlyDest) Delete(context.Context, store.ID) error       { return errDryRun }
func (d readOnlyDest) Walk(fn func(*store.Message) error) error     { return d.walk(fn) }

// importTarget resolves --to: an instance name from the configuration
// (its directory, or its PostgreSQL store), or a directory; by default the
// only instance.
func importTarget(setup *spoolSetup, to string) (importDest, error) {
	of := func(inst spoolInstance) importDest {
		if inst.pgDSN != "" {
			return importDest{name: inst.name, pgDSN: inst.pgDSN}
		}
		return importDest{name: inst.name, dir: inst.location}
	}
	if to == "" {
		if len(setup.instances) != 1 {
			return importDest{}, fmt.Errorf("name the target.spool instance or directory with --to (instances in %s: %s)", setup.configPath, setup.names())
		}
		return of(setup.instances[0]), nil
	}
	for _, inst := range setup.instances {
		if inst.name == to {
			return of(inst), nil
		}
	}
	if strings.ContainsRune(to, os.PathSeparator) {
		return importDest{name: to, dir: to}, nil
	}
	return importDest{}, fmt.Errorf("--to %q: no such target.spool instance in %s (have: %s); give a path for a directory", to, setup.configPath, setup.names())
}
