//go:build !linux && !darwin && !dragonfly && !freebsd && !netbsd && !openbsd

package main

import "os"

// isTerminal reports false: progress is shown only where terminals can be
// told apart from files.
func isTerminal(*os.File) bool { return false }
