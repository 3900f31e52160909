package testutils

import (
	"fmt"
	"strings"
	"sync"

	"github.com/foxcpp/maddy/framework/exterrors"
)

// Temp returns a temporary SMTP error as a delivery target would produce it.
// The spool classifies errors with exterrors.IsTemporaryOrUnspec, which for
// *exterrors.SMTPError is decided by the code class, so code must be 4xx;
// Temp panics otherwise to catch mistakes in test tables early.
func Temp(code int, enh [3]int, msg string) error {
	if code < 400 || code > 499 {
		panic(fmt.Sprintf("testutils.Temp: code %d is not 4xx", code))
	}
	return &exterrors.SMTPError{Code: code, EnhancedCode: exterrors.EnhancedCode(enh), Message: msg}
}

// Perm returns a permanent SMTP error. code must be 5xx; Perm panics
// otherwise.
func Perm(code int, enh [3]int, msg string) error {
	if code < 500 || code > 599 {
		panic(fmt.Sprintf("testutils.Perm: code %d is not 5xx", code))
	}
	return &exterrors.SMTPError{Code: code, EnhancedCode: exterrors.EnhancedCode(enh), Message: msg}
}

// RcptScript decides the outcome for one recipient in one attempt. attempt
// is the 1-based number of the FakeTarget.Start call the recipient belongs
// to; a nil result accepts the recipient.
type RcptScript func(attempt int, rcpt string) error

// AttemptScript decides the outcome of one stage (Start, Body or Commit) of
// an attempt. A nil result lets the stage succeed.
type AttemptScript func(attempt int) error

// AttemptErrors returns an AttemptScript that fails attempt i (1-based) with
// errs[i-1] and lets every later attempt succeed. nil entries mean success,
// so AttemptErrors(nil, Temp(...)) fails only the second attempt.
func AttemptErrors(errs ...error) AttemptScript {
	errs = append([]error(nil), errs...)
	return func(attempt int) error {
		if attempt >= 1 && attempt <= len(errs) {
			return errs[attempt-1]
		}
		return nil
	}
}

// FailRcpts returns a RcptScript that always fails the listed recipients
// with their error and accepts everybody else. Addresses are compared
// case-insensitively.
func FailRcpts(errs map[string]error) RcptScript {
	m := make(map[string]error, len(errs))
	for k, v := range errs {
		m[strings.ToLower(k)] = v
	}
	return func(_ int, rcpt string) error {
		return m[strings.ToLower(rcpt)]
	}
}

// FailFirst returns a RcptScript that fails the first n evaluations of each
// listed recipient with err and accepts it afterwards; with no rcpts listed
// it applies to every recipient. It counts evaluations per recipient rather
// than using the global attempt number, so it behaves the same when several
// messages share the target. Addresses are compared case-insensitively.
func FailFirst(n int, err error, rcpts ...string) RcptScript {
	var only map[string]bool
	if len(rcpts) > 0 {
		only = make(map[string]bool, len(rcpts))
		for _, r := range rcpts {
			only[strings.ToLower(r)] = true
		}
	}
	var mu sync.Mutex
	seen := make(map[string]int)
	return func(_ int, rcpt string) error {
		key := strings.ToLower(rcpt)
		if only != nil && !only[key] {
			return nil
		}
		mu.Lock()
		seen[key]++
		k := seen[key]
		mu.Unlock()
		if k <= n {
			return err
		}
		return nil
	}
}

// ChainRcpt combines scripts: each recipient gets the first non-nil error.
// Every script is evaluated, so stateful scripts such as FailFirst keep
// counting even when an earlier one already failed the recipient.
func ChainRcpt(scripts ...RcptScript) RcptScript {
	scripts = append([]RcptScript(nil), scripts...)
	return func(attempt int, rcpt string) error {
		var first error
		for _, s := range scripts {
			if s == nil {
				continue
			}
			if err := s(attempt, rcpt); err != nil && first == nil {
				first = err
			}
		}
		return first
	}
}
