package testutils

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/emersion/go-smtp"
)

// SinkMode is the blanket policy of the smtpsink command.
type SinkMode string

const (
	SinkAccept SinkMode = "accept"
	SinkDefer  SinkMode = "defer"  // 451 4.4.1 to every recipient
	SinkReject SinkMode = "reject" // 550 5.7.1 to every recipient
)

// ParseSinkMode parses "accept", "defer" or "reject" (case and surrounding
// space ignored).
func ParseSinkMode(s string) (SinkMode, error) {
	switch m := SinkMode(strings.ToLower(strings.TrimSpace(s))); m {
	case SinkAccept, SinkDefer, SinkReject:
		return m, nil
	default:
		return "", fmt.Errorf("invalid sink mode %q (want accept, defer or reject)", s)
	}
}

// ReadSinkModeFile reads a mode file. ok is false when the file does not
// exist or is blank, meaning "no override".
func ReadSinkModeFile(path string) (mode SinkMode, ok bool, err error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return "", false, nil
	}
	if err != nil {
		return "", false, err
	}
	if strings.TrimSpace(string(b)) == "" {
		return "", false, nil
	}
	mode, err = ParseSinkMode(string(b))
	if err != nil {
		return "", false, fmt.Errorf("%s: %w", path, err)
	}
	return mode, true, nil
}

// SinkRules is the declarative reply policy of the smtpsink command. All
// decisions are made at RCPT time so that the spool's per-recipient
// handling is exercised; MAIL and DATA are always accepted.
type SinkRules struct {
	// Mode applies when ModeFile is unset, missing or blank.
	Mode SinkMode
	// ModeFile, if set, is re-read for every RCPT command so a test can
	// switch the running sink between accept/defer/reject; write it
	// atomically (temp file + rename). An unreadable or invalid file
	// answers 451 4.3.0 rather than silently accepting.
	ModeFile string
	// DeferFirst answers 451 4.4.1 to each recipient's first DeferFirst
	// RCPT commands (counted over the sink's lifetime).
	DeferFirst int
	// RejectRcpts always get 550 5.1.1 (case-insensitive match).
	RejectRcpts []string
}

// Script turns the rules into a SinkScript. Precedence: RejectRcpts, then
// the mode, then DeferFirst.
func (r SinkRules) Script() SinkScript {
	reject := make(map[string]bool, len(r.RejectRcpts))
	for _, a := range r.RejectRcpts {
		reject[strings.ToLower(a)] = true
	}
	return func(stage, _, rcpt string, attempt int) *smtp.SMTPError {
		if stage != StageRCPT {
			return nil
		}
		if reject[strings.ToLower(rcpt)] {
			return SinkReply(550, [3]int{5, 1, 1}, "mailbox rejected by sink")
		}
		mode := r.Mode
		if r.ModeFile != "" {
			m, ok, err := ReadSinkModeFile(r.ModeFile)
			if err != nil {
				return SinkReply(451, [3]int{4, 3, 0}, "sink mode file unusable: "+err.Error())
			}
			if ok {
				mode = m
			}
		}
		switch mode {
		case SinkDefer:
			return SinkReply(451, [3]int{4, 4, 1}, "deferred by sink (mode defer)")
		case SinkReject:
			return SinkReply(550, [3]int{5, 7, 1}, "rejected by sink (mode reject)")
		}
		if attempt <= r.DeferFirst {
			return SinkReply(451, [3]int{4, 4, 1}, fmt.Sprintf("deferred by sink (attempt %d of %d)", attempt, r.DeferFirst))
		}
		return nil
	}
}

// SinkFlags is the parsed command line of cmd/smtpsink.
type SinkFlags struct {
	Listen          string
	Dir             string // where to write <unix-nanos>-<counter>.eml; empty: don't
	AddrFile        string // if set, the bound address is written there once listening
	LMTP            bool
	Envelope        bool // also write <unix-nanos>-<counter>.json with the envelope
	ShutdownTimeout time.Duration
	Rules           SinkRules
}

// stringList is a repeatable, comma-splitting flag.
type stringList []string

func (l *stringList) String() string { return strings.Join(*l, ",") }

func (l *stringList) Set(v string) error {
	for _, p := range strings.Split(v, ",") {
		if p = strings.TrimSpace(p); p != "" {
			*l = append(*l, p)
		}
	}
	return nil
}

// ParseSinkFlags parses the smtpsink command line (without the program
// name). Usage and errors go to output. It returns flag.ErrHelp for -h.
func ParseSinkFlags(args []string, output io.Writer) (*SinkFlags, error) {
	var (
		f       SinkFlags
		mode    string
		defer_  bool
		rejects stringList
	)
	fset := flag.NewFlagSet("smtpsink", flag.ContinueOnError)
	fset.SetOutput(output)
	fset.StringVar(&f.Listen, "listen", "127.0.0.1:2525", "`address` to listen on (port 0 picks a free one)")
	fset.StringVar(&f.Dir, "dir", "", "`directory` to store received messages in (atomically, as <unix-nanos>-<counter>.eml)")
	fset.StringVar(&f.AddrFile, "addr-file", "", "write the bound address to this `file` once listening")
	fset.BoolVar(&f.LMTP, "lmtp", false, "speak LMTP instead of SMTP")
	fset.BoolVar(&f.Envelope, "envelope", false, "also write the envelope as <unix-nanos>-<counter>.json next to each .eml")
	fset.DurationVar(&f.ShutdownTimeout, "shutdown-timeout", 10*time.Second, "how long to let transactions finish on SIGTERM/SIGINT")
	fset.StringVar(&mode, "mode", string(SinkAccept), "initial `mode`: accept, defer or reject")
	fset.BoolVar(&defer_, "defer-all", false, "answer 451 4.4.1 to every recipient (same as -mode defer)")
	fset.IntVar(&f.Rules.DeferFirst, "defer-first", 0, "answer 451 4.4.1 to each recipient's first `N` attempts")
	fset.Var(&rejects, "reject-rcpt", "answer 550 5.1.1 to this `address` (repeatable, comma-separated)")
	fset.StringVar(&f.Rules.ModeFile, "mode-file", "", "`file` holding accept/defer/reject, re-read for every recipient; overrides -mode when present")

	if err := fset.Parse(args); err != nil {
		return nil, err
	}
	if fset.NArg() > 0 {
		return nil, fmt.Errorf("smtpsink: unexpected arguments: %q", fset.Args())
	}
	m, err := ParseSinkMode(mode)
	if err != nil {
		return nil, fmt.Errorf("smtpsink: -mode: %w", err)
	}
	if defer_ {
		if m == SinkReject {
			return nil, errors.New("smtpsink: -defer-all conflicts with -mode reject")
		}
		m = SinkDefer
	}
	if f.Rules.DeferFirst < 0 {
		return nil, errors.New("smtpsink: -defer-first must not be negative")
	}
	if f.ShutdownTimeout < 0 {
		return nil, errors.New("smtpsink: -shutdown-timeout must not be negative")
	}
	f.Rules.Mode = m
	f.Rules.RejectRcpts = rejects
	return &f, nil
}

// SaveSinkMessage writes m.Data verbatim to dir/<unix-nanos>-<seq>.eml via
// a hidden temp file and rename, so a watcher never sees a partial file.
// With envelope set, the envelope is written first as the matching .json,
// so it exists whenever the .eml does. It returns the .eml path.
func SaveSinkMessage(dir string, seq uint64, m *Message, envelope bool) (string, error) {
	base := strconv.FormatInt(m.Received.UnixNano(), 10) + "-" + strconv.FormatUint(seq, 10)
	if envelope {
		env := struct {
			From     string             `json:"from"`
			Rcpts    []string           `json:"rcpts"`
			MailOpts smtp.MailOptions   `json:"mail_opts"`
			RcptOpts []smtp.RcptOptions `json:"rcpt_opts"`
			Received time.Time          `json:"received"`
			Size     int                `json:"size"`
		}{m.From, m.Rcpts, m.MailOpts, m.RcptOpts, m.Received, len(m.Data)}
		b, err := json.MarshalIndent(env, "", "  ")
		if err != nil {
			return "", err
		}
		if err := WriteFileAtomic(filepath.Join(dir, base+".json"), b); err != nil {
			return "", err
		}
	}
	path := filepath.Join(dir, base+".eml")
	if err := WriteFileAtomic(path, m.Data); err != nil {
		return "", err
	}
	return path, nil
}

// WriteFileAtomic writes data to path via a dot-prefixed temp file in the
// same directory and a rename, so readers see all of it or nothing. There is no fsync: readers need atomicity,
// not crash durability, and tests should stay fast.
func WriteFileAtomic(path string, data []byte) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), ".tmp-"+filepath.Base(path)+"-*")
	if err != nil {
		return err
	}
	_, werr := tmp.Write(data)
	cerr := tmp.Close()
	if werr == nil {
		werr = cerr
	}
	if werr == nil {
		werr = os.Rename(tmp.Name(), path)
	}
	if werr != nil {
		_ = os.Remove(tmp.Name())
		return werr
	}
	return nil
}

// SinkLogLine formats the one-line stdout record the command prints per
// accepted message. path may be empty when messages are not stored.
func SinkLogLine(m *Message, path string) string {
	id := m.MessageID()
	if id == "" {
		id = "-"
	}
	if path == "" {
		path = "-"
	}
	return fmt.Sprintf("smtpsink: accepted from=<%s> rcpts=<%s> message-id=<%s> size=%d file=%s",
		m.From, strings.Join(m.Rcpts, ">,<"), id, len(m.Data), path)
}
