//go:build !linux

package bench

import "errors"

// EvictCache is only implemented on Linux.
func EvictCache(dir string) error { return errors.New("bench: evicting the page cache needs Linux") }
