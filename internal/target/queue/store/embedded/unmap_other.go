//go:build !linux

package store

import bolt "go.etcd.io/bbolt"

// releaseMapped is a no-op here; see unmap_linux.go.
func releaseMapped(*bolt.DB) {}
