package bench

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// ProbeAppendFsync measures the disk's own rate of durable appends: one
// file, 512-byte writes each followed by fsync, for duration. It returns
// operations per second.
func ProbeAppendFsync(dir string, duration time.Duration) (float64, error) {
	f, err := os.CreateTemp(dir, "probe-append-")
	if err != nil {
		return 0, err
	}
	defer os.Remove(f.Name())
	defer f.Close()
	rec := make([]byte, 512)
	n := 0
	start := time.Now()
	for time.Since(start) < duration {
		if _, err := f.Write(rec); err != nil {
			return 0, err
		}
		if err := f.Sync(); err != nil {
			return 0, err
		}
		n++
	}
	return float64(n) / time.Since(start).Seconds(), nil
}

// ProbeCreateRename measures the rate of the classic durable file publish:
// create a temporary file, write 4 KiB, fsync it, rename it to its final
// name and fsync the directory, by parallel workers in one directory for
// duration. It returns publishes per second (all workers together).
func ProbeCreateRename(dir string, parallel int, duration time.Duration) (float64, error) {
	pdir, err := os.MkdirTemp(dir, "probe-rename-")
	if err != nil {
		return 0, err
	}
	defer os.RemoveAll(pdir)
	content := Body(4096)
	var (
		total    atomic.Int64
		wg       sync.WaitGroup
		errOnce  sync.Once
		firstErr error
	)
	start := time.Now()
	for w := 0; w < parallel; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			d, err := os.Open(pdir)
			if err != nil {
				errOnce.Do(func() { firstErr = err })
				return
			}
			defer d.Close()
			for i := 0; time.Since(start) < duration; i++ {
				name := filepath.Join(pdir, strconv.Itoa(w)+"-"+strconv.Itoa(i))
				if err := publish(d, name, content); err != nil {
					errOnce.Do(func() { firstErr = err })
					return
				}
				total.Add(1)
			}
		}(w)
	}
	wg.Wait()
	if firstErr != nil {
		return 0, fmt.Errorf("create+rename probe: %w", firstErr)
	}
	return float64(total.Load()) / time.Since(start).Seconds(), nil
}

func publish(dir *os.File, name string, content []byte) error {
	f, err := os.Create(name + ".tmp")
	if err != nil {
		return err
	}
	if _, err := f.Write(content); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(name+".tmp", name); err != nil {
		return err
	}
	return dir.Sync()
}
