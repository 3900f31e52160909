// Command smtpsink is a standalone SMTP/LMTP sink for end-to-end tests that
// run maddy as a separate process and need a scriptable next hop.
//
// It accepts, defers or rejects recipients according to its flags (see
// -help), stores every accepted message verbatim in -dir as
// <unix-nanos>-<counter>.eml (written atomically, before the 250 reply is
// sent) and prints one line per message on stdout. Its policy can be
// switched at runtime by rewriting -mode-file. SIGTERM/SIGINT stop it
// gracefully.
//
// The flag parsing and reply rules live in package testutils, where they
// are unit tested; this file only wires them together.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"os"
	"os/signal"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/maddy-spool/spool/internal/testutils"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	switch {
	case err == nil:
	case errors.Is(err, flag.ErrHelp):
	case errors.Is(err, errUsage):
		os.Exit(2)
	default:
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

var errUsage = errors.New("usage error")

// run serves until ctx is cancelled (the signal), then shuts down.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	cfg, err := testutils.ParseSinkFlags(args, stderr)
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		fmt.Fprintln(stderr, err)
		return errUsage
	}
	if cfg.Dir != "" {
		// Created up front, so a mistyped path fails now rather than
		// turning every message into a 451.
		if err := os.MkdirAll(cfg.Dir, 0o755); err != nil {
			return fmt.Errorf("-dir: %w", err)
		}
	}

	// Lines from concurrent connections must not interleave.
	var outMu sync.Mutex
	say := func(format string, args ...any) {
		outMu.Lock()
		defer outMu.Unlock()
		fmt.Fprintf(stdout, format+"\n", args...)
	}

	var seq atomic.Uint64
	onMessage := func(m *testutils.Message) error {
		path := ""
		if cfg.Dir != "" {
			var err error
			path, err = testutils.SaveSinkMessage(cfg.Dir, seq.Add(1), m, cfg.Envelope)
			if err != nil {
				return err
			}
		}
		say("%s", testutils.SinkLogLine(m, path))
		return nil
	}

	sink, err := testutils.StartSMTPSink(
		testutils.WithListenAddr(cfg.Listen),
		testutils.WithLMTP(cfg.LMTP),
		testutils.WithScript(cfg.Rules.Script()),
		testutils.WithOnMessage(onMessage),
		testutils.WithoutRecording(),
		testutils.WithErrorLog(log.New(stderr, "smtpsink: ", log.LstdFlags)),
	)
	if err != nil {
		return err
	}
	if cfg.AddrFile != "" {
		if err := testutils.WriteFileAtomic(cfg.AddrFile, []byte(sink.Addr()+"\n")); err != nil {
			_ = sink.Close()
			return err
		}
	}
	say("smtpsink: listening on %s", sink.Addr())

	<-ctx.Done()
	say("smtpsink: shutting down")
	sctx, cancel := context.WithTimeout(context.Background(), cfg.ShutdownTimeout)
	defer cancel()
	if err := sink.Shutdown(sctx); err != nil && !errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	say("smtpsink: stopped")
	return nil
}
