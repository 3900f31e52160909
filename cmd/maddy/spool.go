package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/maddy-spool/spool/internal/target/queue"
	"github.com/maddy-spool/spool/internal/target/queue/admin"
	"github.com/maddy-spool/spool/internal/target/queue/store"
	"github.com/maddy-spool/spool/internal/target/queue/store/embedded"
	"github.com/maddy-spool/spool/internal/target/queue/store/postgres"
)

// changeTimeout bounds a change command; the server itself waits at most
// 30 seconds for attempts in flight.
const changeTimeout = 2 * time.Minute

// spoolCommand groups the queue admin commands. They talk to the running
// server over its control socket; list, show and stats fall back to
// reading the queue directory read-only when the server is down.
func spoolCommand() *cli.Command {
	return &cli.Command{
		Name:  "spool",
		Usage: "Inspect and steer target.spool queues",
		Description: `Commands talk to the running server over its control socket
(RUNTIME_DIR/spool.sock unless admin_socket or --socket say otherwise).
list, show and stats read the queue directory read-only when the server
is not running; the other commands need the running server.`,
		Subcommands: []*cli.Command{
			{
				Name:      "list",
				Aliases:   []string{"ls"},
				Usage:     "List queued messages with their pending recipients (like mailq)",
				ArgsUsage: "[ID ...]",
				Flags:     append(filterFlags(), readFlags()...),
				Action:    spoolList,
			},
			{
				Name:      "show",
				Usage:     "Show one message: envelope, recipients, attempt history; --headers/--body print the stored message",
				ArgsUsage: "ID",
				Flags: append([]cli.Flag{
					&cli.BoolFlag{Name: "headers", Usage: "print the stored header block"},
					&cli.BoolFlag{Name: "body", Usage: "print the stored body (with --headers: the whole message)"},
				}, readFlags()...),
				Action: spoolShow,
			},
			{
				Name:   "stats",
				Usage:  "Counts by state, oldest message, top destination domains and errors (like qshape)",
				Flags:  readFlags(),
				Action: spoolStats,
			},
			changeCommand(admin.OpRetry, "Make messages due now (flush); held messages stay held"),
			changeCommand(admin.OpHold, "Keep messages from being attempted (or expiring) until released"),
			changeCommand(admin.OpRelease, "Release held messages; they are due at once"),
			changeCommand(admin.OpDelete, "Remove messages without telling their senders"),
			changeCommand(admin.OpBounce, "Fail the pending recipients now, with a DSN to the sender (status 5.0.0)"),
			{
				Name:  "import",
				Usage: "Move the messages of a stopped maddy's target.queue directory or Spool store into a target.spool queue (its directory, or its PostgreSQL store)",
				Flags: append([]cli.Flag{
					&cli.PathFlag{Name: "from", Required: true, Usage: "target.queue directory, or Spool store directory (with queue.db), to import (e.g. /var/lib/maddy/remote_queue)"},
					&cli.StringFlag{Name: "to", Usage: "target.spool instance name (a directory, or store postgres), or queue directory (default: the only instance)"},
					&cli.BoolFlag{Name: "dry-run", Usage: "check every entry and say what would be done, change nothing"},
				}, socketFlag()),
				Action: spoolImport,
			},
		},
	}
}

func socketFlag() cli.Flag {
	return &cli.PathFlag{Name: "socket", Usage: "control socket of the running server", EnvVars: []string{"SPOOL_SOCKET"}}
}

// readFlags are shared by the read commands.
func readFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "instance", Usage: "target.spool block name (default: all)"},
		&cli.BoolFlag{Name: "json", Usage: "machine-readable output, one JSON object per line"},
		&cli.PathFlag{Name: "dir", Usage: "read this queue directory directly (server must be stopped)"},
		socketFlag(),
	}
}

func filterFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "from", Usage: "sender address, or @domain"},
		&cli.StringFlag{Name: "to", Usage: "pending recipient address, or @domain"},
		&cli.StringFlag{Name: "older-than", Usage: "arrived longer ago than this (e.g. 30m, 2h, 3d)"},
		&cli.BoolFlag{Name: "held", Usage: "only held messages"},
	}
}

func changeCommand(op admin.Op, usage string) *cli.Command {
	return &cli.Command{
		Name:      string(op),
		Usage:     usage,
		ArgsUsage: "ID ... | --all | filters",
		Flags: append(filterFlags(),
			&cli.BoolFlag{Name: "all", Usage: "every message (with filters: every matching one)"},
			&cli.BoolFlag{Name: "yes", Aliases: []string{"y"}, Usage: "confirm a delete or bounce of more than one message selected without IDs (other verbs need no confirmation)"},
			&cli.StringFlag{Name: "instance", Usage: "target.spool block name (needed with IDs when there are several)"},
			&cli.BoolFlag{Name: "json", Usage: "print the result as JSON"},
			socketFlag(),
		),
		Action: func(c *cli.Context) error { return spoolChange(c, op) },
	}
}

// positionalArgs returns the command's arguments that are not flags.
// urfave/cli stops reading flags at the first argument, so in
// `maddy spool show ID --json` it would take "--json" for an ID; flags
// found among the arguments are applied here instead, as operators used
// to mailq and postsuper expect. "--" ends the flags.
func positionalArgs(c *cli.Context) ([]string, error) {
	var pos []string
	args := c.Args().Slice()
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			pos = append(pos, args[i+1:]...)
			break
		}
		if len(a) < 2 || a[0] != '-' {
			pos = append(pos, a)
			continue
		}
		name, value, hasValue := strings.Cut(strings.TrimLeft(a, "-"), "=")
		fl := commandFlag(c.Command, name)
		if fl == nil {
			return nil, fmt.Errorf("flag provided but not defined: %s", a)
		}
		if _, isBool := fl.(*cli.BoolFlag); isBool {
			if !hasValue {
				value = "true"
			}
		} else if !hasValue {
			if i+1 == len(args) {
				return nil, fmt.Errorf("flag needs an argument: %s", a)
			}
			i++
			value = args[i]
		}
		if err := c.Set(fl.Names()[0], value); err != nil {
			return nil, fmt.Errorf("%s: %w", a, err)
		}
	}
	return pos, nil
}

// commandFlag finds one of cmd's flags by any of its names.
func commandFlag(cmd *cli.Command, name string) cli.Flag {
	for _, fl := range cmd.Flags {
		for _, n := range fl.Names() {
			if n == name {
				return fl
			}
		}
	}
	return nil
}

// filterFrom builds the filter from the arguments and flags.
func filterFrom(c *cli.Context) (admin.Filter, error) {
	f := admin.Filter{From: c.String("from"), To: c.String("to")}
	if c.IsSet("held") {
		held := c.Bool("held")
		f.Held = &held
	}
	if s := c.String("older-than"); s != "" {
		d, err := queue.ParseDuration(s)
		if err != nil || d < 0 {
			return f, fmt.Errorf("--older-than %q: want a duration such as 30m, 2h or 3d", s)
		}
		f.OlderThan = d
	}
	args, err := positionalArgs(c)
	if err != nil {
		return f, err
	}
	for _, a := range args {
		id, err := store.ParseID(a)
		if err != nil {
			return f, err
		}
		f.IDs = append(f.IDs, id)
	}
	return f, f.Validate()
}

func signalContext(timeout time.Duration) (context.Context, context.CancelFunc) {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	if timeout <= 0 {
		return ctx, stop
	}
	tctx, cancel := context.WithTimeout(ctx, timeout)
	return tctx, func() { cancel(); stop() }
}

// readOnline runs a read request on the server; ok is false when the
// server is down and the caller should read the directory instead.
func readOnline(c *cli.Context, setup *spoolSetup, req admin.Request, fn func(admin.Response) error) (ok bool, err error) {
	if c.String("dir") != "" {
		return false, nil
	}
	ctx, cancel := signalContext(0)
	defer cancel()
	req.Instance = c.String("instance")
	err = admin.Do(ctx, setup.socket, req, fn)
	if errors.Is(err, admin.ErrServerDown) {
		return false, nil
	}
	return true, err
}

// withOffline opens each selected queue read-only, for reads while the
// server is down: an embedded store's directory, or a PostgreSQL store's
// database (read without joining the cluster).
func withOffline(c *cli.Context, setup *spoolSetup, fn func(name string, st admin.Reader) error) error {
	insts, err := setup.pick(c)
	if err != nil {
		return err
	}
	for _, inst := range insts {
		st, err := openOffline(c, setup, inst)
		if err != nil {
			return err
		}
		err = fn(inst.name, st)
		st.Close()
		if err != nil {
			return err
		}
	}
	return nil
}

// offlineReader is a queue read without the server.
type offlineReader interface {
	admin.Reader
	Close() error
}

func openOffline(c *cli.Context, setup *spoolSetup, inst spoolInstance) (offlineReader, error) {
	if inst.pgDSN != "" {
		fmt.Fprintf(os.Stderr, "maddy is not running here (nothing listens on %s): reading instance %s from its PostgreSQL store\n", setup.socket, inst.name)
		ctx, cancel := signalContext(30 * time.Second)
		defer cancel()
		r, err := postgres.OpenReader(ctx, inst.pgDSN)
		if err != nil {
			return nil, fmt.Errorf("instance %s: %w", inst.name, err)
		}
		return r, nil
	}
	if c.String("dir") == "" {
		fmt.Fprintf(os.Stderr, "maddy is not running (nothing listens on %s): reading %s read-only\n", setup.socket, inst.location)
	}
	if _, err := os.Stat(inst.location); err != nil {
		return nil, fmt.Errorf("instance %s: %w", inst.name, err)
	}
	st, err := embedded.OpenDir(inst.location, embedded.DirOptions{ReadOnly: true, LockTimeout: 2 * time.Second})
	if err != nil {
		// A running server holds the lock; it is then reachable only
		// on another socket, or not at all (admin_socket off).
		return nil, fmt.Errorf("instance %s: %w (if maddy is running, its control socket is elsewhere: --socket, or admin_socket off in its configuration)", inst.name, err)
	}
	return st, nil
}

func spoolList(c *cli.Context) error {
	// Flags after the IDs are applied by filterFrom: read them first.
	f, err := filterFrom(c)
	if err != nil {
		return err
	}
	setup, err := loadSpoolSetup(c)
	if err != nil {
		return err
	}
	out := newListPrinter(os.Stdout, c.Bool("json"))
	ok, err := readOnline(c, setup, admin.Request{Op: admin.OpList, Filter: f}, func(r admin.Response) error {
		if r.Message == nil {
			return nil
		}
		return out.message(*r.Message)
	})
	if !ok && err == nil {
		err = withOffline(c, setup, func(name string, st admin.Reader) error {
			return admin.List(st, name, f, time.Now(), out.message)
		})
	}
	if err != nil {
		return err
	}
	return out.finish()
}

func spoolShow(c *cli.Context) error {
	args, err := positionalArgs(c)
	if err != nil {
		return err
	}
	if len(args) != 1 {
		return errors.New("show takes exactly one message ID")
	}
	if c.Bool("json") && c.Bool("body") {
		return errors.New("--body prints raw content: use it without --json")
	}
	id, err := store.ParseID(args[0])
	if err != nil {
		return err
	}
	setup, err := loadSpoolSetup(c)
	if err != nil {
		return err
	}
	raw := c.Bool("headers") || c.Bool("body")
	onResp := func(r admin.Response) error {
		switch {
		case r.Detail != nil && c.Bool("json"):
			return json.NewEncoder(os.Stdout).Encode(r.Detail)
		case r.Detail != nil && raw:
			if c.Bool("headers") {
				_, err := os.Stdout.WriteString(r.Detail.Header)
				return err
			}
			return nil
		case r.Detail != nil:
			return printDetail(os.Stdout, r.Detail)
		case r.Content != nil:
			_, err := os.Stdout.Write(r.Content)
			return err
		}
		return nil
	}
	req := admin.Request{Op: admin.OpShow, Filter: admin.Filter{IDs: []store.ID{id}},
		Headers: c.Bool("headers") || c.Bool("json"), Body: c.Bool("body")}
	ok, err := readOnline(c, setup, req, onResp)
	if ok || err != nil {
		return err
	}
	found := false
	err = withOffline(c, setup, func(name string, st admin.Reader) error {
		if found {
			return nil
		}
		err := admin.Show(st, name, id, req.Headers, req.Body, onResp)
		if errors.Is(err, store.ErrNotFound) {
			return nil
		}
		found = err == nil
		return err
	})
	if err == nil && !found {
		err = fmt.Errorf("message %v: not queued", id)
	}
	return err
}

func spoolStats(c *cli.Context) error {
	setup, err := loadSpoolSetup(c)
	if err != nil {
		return err
	}
	print := func(st admin.Stats) error {
		if c.Bool("json") {
			return json.NewEncoder(os.Stdout).Encode(st)
		}
		return printStats(os.Stdout, st)
	}
	ok, err := readOnline(c, setup, admin.Request{Op: admin.OpStats}, func(r admin.Response) error {
		if r.Stats == nil {
			return nil
		}
		return print(*r.Stats)
	})
	if ok || err != nil {
		return err
	}
	return withOffline(c, setup, func(name string, st admin.Reader) error {
		s, err := admin.ComputeStats(st, name, time.Now())
		if err != nil {
			return err
		}
		return print(s)
	})
}

func spoolChange(c *cli.Context, op admin.Op) error {
	f, err := filterFrom(c)
	if err != nil {
		return err
	}
	if !f.Explicit() && f.Empty() && !c.Bool("all") {
		return fmt.Errorf("%s: name messages by ID, or select them with --from/--to/--older-than/--held or --all", op)
	}
	if f.Explicit() && c.Bool("all") {
		return fmt.Errorf("%s: give either IDs or --all, not both", op)
	}
	setup, err := loadSpoolSetup(c)
	if err != nil {
		return err
	}
	ctx, cancel := signalContext(changeTimeout)
	defer cancel()
	instance := c.String("instance")
	if !f.Explicit() && !c.Bool("yes") && needsConfirmation(op) {
		n := 0
		err := admin.Do(ctx, setup.socket, admin.Request{Op: admin.OpList, Instance: instance, Filter: f}, func(r admin.Response) error {
			if r.Message != nil {
				n++
			}
			return nil
		})
		if err != nil {
			return changeErr(op, setup, err)
		}
		if n > 1 {
			return fmt.Errorf("%s would change %d messages: run again with --yes to confirm", op, n)
		}
	}
	var results []admin.Result
	err = admin.Do(ctx, setup.socket, admin.Request{Op: string(op), Instance: instance, Filter: f}, func(r admin.Response) error {
		if r.Result != nil {
			results = append(results, *r.Result)
		}
		return nil
	})
	if err != nil {
		return changeErr(op, setup, err)
	}
	if c.Bool("json") {
		enc := json.NewEncoder(os.Stdout)
		for _, r := range results {
			if err := enc.Encode(r); err != nil {
				return err
			}
		}
	} else {
		printResults(os.Stdout, f, results)
	}
	for _, r := range results {
		if r.Failed > 0 {
			return cli.Exit("", 1)
		}
	}
	if f.Explicit() && len(missingIDs(f, results)) > 0 {
		return cli.Exit("", 1)
	}
	return nil
}

// needsConfirmation says whether a change of several messages selected
// without IDs needs --yes: only when it cannot be undone. A deleted message
// is gone and a bounce has failed its recipients and told the sender;
// retry (a flush, like postqueue -f), hold and release lose nothing, and
// hold is undone by release.
func needsConfirmation(op admin.Op) bool {
	return op == admin.OpDelete || op == admin.OpBounce
}

func changeErr(op admin.Op, setup *spoolSetup, err error) error {
	if errors.Is(err, admin.ErrServerDown) {
		return fmt.Errorf("%s: no server listens on %s: maddy is not running, or runs with another socket (--socket) or with admin_socket off; changes are made by the running server", op, setup.socket)
	}
	return fmt.Errorf("%s: %w", op, err)
}

// missingIDs returns the explicit IDs the server reported nothing about:
// they are not queued.
func missingIDs(f admin.Filter, results []admin.Result) []string {
	seen := map[string]bool{}
	for _, r := range results {
		for _, it := range r.Items {
			seen[it.ID] = true
		}
	}
	var missing []string
	for _, id := range f.IDs {
		if !seen[id.String()] {
			missing = append(missing, id.String())
		}
	}
	return missing
}
