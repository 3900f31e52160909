// Package pgtest runs throwaway PostgreSQL clusters for tests: initdb in a
// temporary directory and a server listening only on a Unix socket there,
// started with Debian's server binaries (/usr/lib/postgresql/<version>/bin).
//
// PostgreSQL refuses to run as root, so when the tests run as root (as in
// CI) the server runs as the "postgres" user that Debian's package
// creates. Outside CI a machine without the server binaries skips the
// tests that need them and says how to get them; with the environment
// variable CI set, they fail instead.
package pgtest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Port is the port number in the socket's name (.s.PGSQL.<Port>); nothing
// listens on TCP.
const Port = 5432

// BinDir returns the directory of the newest installed PostgreSQL server
// binaries, or an error saying how to install them.
func BinDir() (string, error) {
	if d := os.Getenv("SPOOL_PG_BINDIR"); d != "" {
		return d, nil
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	var found []string
	for _, d := range dirs {
		if _, err := os.Stat(filepath.Join(d, "initdb")); err == nil {
			found = append(found, d)
		}
	}
	if len(found) == 0 {
		return "", errors.New("PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin " +
			"(install Debian's postgresql package: apt-get install postgresql; or set SPOOL_PG_BINDIR)")
	}
	sort.Slice(found, func(i, j int) bool { return version(found[i]) < version(found[j]) })
	return found[len(found)-1], nil
}

func version(binDir string) int {
	v, _ := strconv.Atoi(filepath.Base(filepath.Dir(binDir)))
	return v
}

// Require returns the binary directory, or skips t (fails it under CI)
// when PostgreSQL is not installed.
func Require(t testing.TB) string {
	t.Helper()
	dir, err := BinDir()
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("CI is set and %v", err)
		}
		t.Skip(err)
	}
	return dir
}

// Cluster is one PostgreSQL server and its data directory.
type Cluster struct {
	bin  string
	dir  string // data directory, and the socket directory
	cred *syscall.Credential
	log  string

	mu      sync.Mutex
	running bool
}

// Options configure a new cluster.
type Options struct {
	// Settings are extra postgresql.conf lines, e.g. "fsync = off".
	Settings []string
	// WALDir, if set, is where the cluster keeps its WAL (initdb -X),
	// e.g. a lazyfs mount for a power-loss test. initdb then syncs what it
	// wrote, so that the state it leaves is durable: the first checkpoint
	// record is in the WAL a crash must not lose.
	WALDir string
}

// New creates and starts a cluster. The caller stops it with Close.
func New(opts Options) (*Cluster, error) {
	bin, err := BinDir()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "spool-pg-")
	if err != nil {
		return nil, err
	}
	c := &Cluster{bin: bin, dir: dir, log: filepath.Join(dir, "server.log")}
	if os.Geteuid() == 0 {
		u, err := user.Lookup("postgres")
		if err != nil {
			os.RemoveAll(dir)
			return nil, fmt.Errorf("running as root, and no postgres user to run the server as: %w", err)
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		c.cred = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
		if err := os.Chown(dir, uid, gid); err != nil {
			os.RemoveAll(dir)
			return nil, err
		}
	}
	data := c.dataDir()
	args := []string{"-D", data, "-A", "trust", "-U", "postgres", "-E", "UTF8"}
	if opts.WALDir != "" {
		args = append(args, "-X", opts.WALDir)
	} else {
		args = append(args, "--no-sync") // throwaway: nothing to keep
	}
	if out, err := c.run("initdb", args...); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("initdb: %v\n%s", err, out)
	}
	conf := []string{
		"listen_addresses = ''",
		"unix_socket_directories = '" + dir + "'",
		fmt.Sprintf("port = %d", Port),
		"max_connections = 200",
		"shared_buffers = 64MB",
	}
	conf = append(conf, opts.Settings...)
	f, err := os.OpenFile(filepath.Join(data, "postgresql.conf"), os.O_APPEND|os.O_WRONLY, 0)
	if err == nil {
		_, err = f.WriteString("\n" + strings.Join(conf, "\n") + "\n")
		if cerr := f.Close(); err == nil {
			err = cerr
		}
	}
	if err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	if err := c.Start(); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	return c, nil
}

func (c *Cluster) dataDir() string { return filepath.Join(c.dir, "data") }

// run runs one of the server binaries as the cluster's owner.
func (c *Cluster) run(name string, args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(c.bin, name), args...)
	cmd.Dir = c.dir
	if c.cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: c.cred}
	}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	return out.Bytes(), err
}

// SocketDir is the directory holding the server's Unix socket.
func (c *Cluster) SocketDir() string { return c.dir }

// DSN returns a connection string for database db as the superuser.
func (c *Cluster) DSN(db string) string {
	return fmt.Sprintf("host=%s port=%d user=postgres dbname=%s sslmode=disable", c.dir, Port, db)
}

// Start starts the server (again, after Stop) and waits until it accepts
// connections.
func (c *Cluster) Start() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.running {
		return nil
	}
	if out, err := c.run("pg_ctl", "-D", c.dataDir(), "-l", c.log, "-w", "-t", "60", "start"); err != nil {
		log, _ := os.ReadFile(c.log)
		return fmt.Errorf("pg_ctl start: %v\n%s\n%s", err, out, log)
	}
	c.running = true
	return nil
}

// Stop stops the server: "fast" disconnects clients and shuts down
// cleanly, "immediate" is a crash (recovery runs at the next start).
func (c *Cluster) Stop(mode string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.running {
		return nil
	}
	if out, err := c.run("pg_ctl", "-D", c.dataDir(), "-m", mode, "-w", "-t", "60", "stop"); err != nil {
		return fmt.Errorf("pg_ctl stop: %v\n%s", err, out)
	}
	c.running = false
	return nil
}

// CreateDatabase creates database name and returns its DSN.
func (c *Cluster) CreateDatabase(name string) (string, error) {
	if out, err := c.run("createdb", "-h", c.dir, "-p", strconv.Itoa(Port), "-U", "postgres", name); err != nil {
		return "", fmt.Errorf("createdb %s: %v\n%s", name, err, out)
	}
	return c.DSN(name), nil
}

// Psql runs one SQL command in database db and returns its output.
func (c *Cluster) Psql(db, sql string) (string, error) {
	psql := filepath.Join(c.bin, "psql")
	if _, err := os.Stat(psql); err != nil {
		psql = "psql"
	}
	cmd := exec.Command(psql, "-h", c.dir, "-p", strconv.Itoa(Port), "-U", "postgres", "-d", db, "-XAtqc", sql)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("psql: %v\n%s", err, out)
	}
	return strings.TrimSpace(string(out)), nil
}

// Close stops the server and removes its files.
func (c *Cluster) Close() error {
	err := c.Stop("immediate")
	if rerr := os.RemoveAll(c.dir); err == nil {
		err = rerr
	}
	return err
}

var (
	sharedOnce sync.Once
	shared     *Cluster
	sharedErr  error
	dbSeq      struct {
		sync.Mutex
		n int
	}
)

// Database returns the DSN of a new, empty database in a cluster shared
// by the tests of this process (started on first use). It skips t when
// PostgreSQL is not installed (fails under CI). Call Main from TestMain to
// stop the shared cluster when the tests end.
func Database(t testing.TB) string {
	t.Helper()
	Require(t)
	sharedOnce.Do(func() { shared, sharedErr = New(Options{}) })
	if sharedErr != nil {
		t.Fatal(sharedErr)
	}
	dbSeq.Lock()
	dbSeq.n++
	name := fmt.Sprintf("t%d", dbSeq.n)
	dbSeq.Unlock()
	dsn, err := shared.CreateDatabase(name)
	if err != nil {
		t.Fatal(err)
	}
	return dsn
}

// Main runs the tests and then stops the shared cluster, if one was
// started: func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }.
func Main(m *testing.M) int {
	code := m.Run()
	if shared != nil {
		shared.Close()
	}
	return code
}
