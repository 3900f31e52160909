//go:build !linux

package embedded

import bolt "go.etcd.io/bbolt"

// releaseMapped is a no-op here; see unmap_linux.go.
func releaseMapped(*bolt.DB) {}
