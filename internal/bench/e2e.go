package bench

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/emersion/go-message/textproto"
	"github.com/emersion/go-smtp"

	"github.com/maddy-spool/spool/internal/testutils"
)

// BuildMaddy builds this module's cmd/maddy (maddy with target.spool
// compiled in) into outDir and returns the binary's path. moduleRoot is
// the directory holding go.mod.
func BuildMaddy(moduleRoot, outDir string) (string, error) {
	bin := filepath.Join(outDir, "maddy")
	cmd := exec.Command("go", "build", "-o", bin, "./cmd/maddy")
	cmd.Dir = moduleRoot
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build ./cmd/maddy: %v\n%s", err, out)
	}
	return bin, nil
}

// ModuleRoot finds the directory of go.mod through `go env GOMOD`.
func ModuleRoot() (string, error) {
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	p := strings.TrimSpace(string(out))
	if p == "" || p == os.DevNull {
		return "", errors.New("not inside the spool module (go env GOMOD is empty); run from the source tree or pass the maddy binary")
	}
	return filepath.Dir(p), nil
}

// E2EConfig describes one end-to-end measurement.
type E2EConfig struct {
	Bin  string // maddy binary
	Kind Kind
	// Dir is the server's state directory; the queue of maddy and spool
	// lives in Dir/outq (see E2EQueueDir), where a backlog may have been
	// generated. With several nodes, node i (from 1) has Dir/node<i>.
	Dir string
	// DSN is the database of the SpoolPG queue.
	DSN string
	// Nodes is the number of maddy processes sharing the SpoolPG queue,
	// named n1, n2, ...; the clients are spread over them. Default 1.
	Nodes int
	// Lease is the PostgreSQL store's lease (0: the module's default).
	Lease    time.Duration
	Messages int
	Clients  int
	BodySize int
	Timeout  time.Duration
	// PG, if set, is the database server whose CPU time is measured.
	PG *PGServer
	// QueueDefaults leaves out the queue block's "max_parallelism 16",
	// so the module runs with its own default; QueueExtra are more
	// directives for the block (the destinations section).
	QueueDefaults bool
	QueueExtra    []string
}

// E2EResult is what one end-to-end measurement saw.
type E2EResult struct {
	// Ready is the time from starting the processes until the SMTP port
	// of every node accepted a connection.
	Ready time.Duration
	// Accepted is the number of messages the servers accepted, and
	// AcceptTook the time from the first MAIL until the last DATA reply.
	Accepted   int
	AcceptTook time.Duration
	// Delivered counts messages the sink received, and DeliverTook the
	// time from the first MAIL until the last one arrived.
	Delivered   int
	DeliverTook time.Duration
	// Duplicates counts messages the sink received more than once.
	Duplicates int
	// Latency holds, per delivered message, the time from MAIL to the
	// sink's receipt.
	Latency []time.Duration
	// CPU is the servers' user and system CPU time over the load (from
	// the first MAIL until everything was delivered), summed over nodes.
	User, System time.Duration
	// DBCPU is the database server's CPU time over the same span (when
	// E2EConfig.PG is set).
	DBCPU time.Duration
}

// CPUPerMessage is the servers' CPU time per accepted message.
func (r E2EResult) CPUPerMessage() time.Duration {
	if r.Accepted == 0 {
		return 0
	}
	return (r.User + r.System) / time.Duration(r.Accepted)
}

func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// E2EQueueDir is where the server configured by RunE2E keeps its queue.
func E2EQueueDir(stateDir string) string { return filepath.Join(stateDir, "outq") }

// e2eNode is the configuration of one maddy process.
type e2eNode struct {
	name     string // node name (SpoolPG)
	stateDir string
	smtpPort int
	sinkPort int
}

func (c E2EConfig) nodes() int { return max(c.Nodes, 1) }

// nodeConf is the configuration of node i (from 0) delivering to
// sinkPort.
func (c E2EConfig) nodeConf(i, sinkPort int) (e2eNode, error) {
	n := e2eNode{name: "n" + strconv.Itoa(i+1), stateDir: c.Dir, sinkPort: sinkPort}
	if c.nodes() > 1 {
		n.stateDir = filepath.Join(c.Dir, "node"+strconv.Itoa(i+1))
	}
	var err error
	n.smtpPort, err = freePort()
	return n, err
}

// writeE2EConfig writes a node's configuration: an smtp endpoint
// delivering to the queue under test ("outq"), which hands mail to
// target.smtp without STARTTLS, pointed at the sink. Every queue gets the
// same directives; SpoolPG adds its store block.
func writeE2EConfig(c E2EConfig, n e2eNode) (string, error) {
	store := ""
	if c.Kind.InDatabase() {
		lease := ""
		if c.Lease > 0 {
			lease = "\n        lease " + c.Lease.String()
		}
		store = fmt.Sprintf(`
    store postgres {
        dsn "%s"
        node %s%s
    }`, c.DSN, n.name, lease)
	}
	queue := "\n    max_parallelism 16"
	if c.QueueDefaults {
		queue = ""
	}
	for _, d := range c.QueueExtra {
		queue += "\n    " + d
	}
	conf := fmt.Sprintf(`hostname mx.bench.example
state_dir %[1]s
runtime_dir %[1]s/run
tls off
log stderr

target.smtp next_hop {
    targets tcp://127.0.0.1:%[2]d
    starttls no
}

%[3]s outq {
    target &next_hop%[6]s%[5]s
}

smtp tcp://127.0.0.1:%[4]d {
    default_source {
        deliver_to &outq
    }
}
`, n.stateDir, n.sinkPort, c.Kind.ModName(), n.smtpPort, store, queue)
	if err := os.MkdirAll(filepath.Join(n.stateDir, "run"), 0o700); err != nil {
		return "", err
	}
	path := filepath.Join(n.stateDir, "maddy.conf")
	return path, os.WriteFile(path, []byte(conf), 0o600)
}

// server is one running maddy process.
type server struct {
	cmd    *exec.Cmd
	exited chan error
	log    *os.File
	addr   string
}

// startServer starts the binary on a node's configuration; its output
// goes to maddy.log in the node's state directory.
func startServer(bin string, c E2EConfig, n e2eNode) (*server, error) {
	cfg, err := writeE2EConfig(c, n)
	if err != nil {
		return nil, err
	}
	logf, err := os.Create(filepath.Join(n.stateDir, "maddy.log"))
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, "--config", cfg, "run")
	cmd.Stdout = logf
	cmd.Stderr = logf
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, err
	}
	s := &server{cmd: cmd, exited: make(chan error, 1), log: logf, addr: "127.0.0.1:" + strconv.Itoa(n.smtpPort)}
	go func() { s.exited <- cmd.Wait() }()
	return s, nil
}

// waitListening waits until the server's SMTP port accepts a connection.
func (s *server) waitListening(deadline time.Time) error {
	for {
		conn, err := net.DialTimeout("tcp", s.addr, time.Second)
		if err == nil {
			conn.Close()
			return nil
		}
		select {
		case err := <-s.exited:
			s.exited <- err
			return fmt.Errorf("maddy exited before listening (%v); see %s", err, s.log.Name())
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("maddy did not listen in time; see %s", s.log.Name())
		}
	}
}

// stop ends the server with SIGTERM (SIGKILL after 30 s).
func (s *server) stop() {
	s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-s.exited:
		s.exited <- err
	case <-time.After(30 * time.Second):
		s.kill()
	}
	s.log.Close()
}

// kill ends the server with SIGKILL and waits until it is gone.
func (s *server) kill() {
	s.cmd.Process.Kill()
	err := <-s.exited
	s.exited <- err
}

func (s *server) pid() int { return s.cmd.Process.Pid }

// startServers starts a server per node and waits until all listen.
func startServers(c E2EConfig, nodes []e2eNode) ([]*server, error) {
	var servers []*server
	stopAll := func() {
		for _, s := range servers {
			s.stop()
		}
	}
	for _, n := range nodes {
		s, err := startServer(c.Bin, c, n)
		if err != nil {
			stopAll()
			return nil, err
		}
		servers = append(servers, s)
	}
	deadline := time.Now().Add(c.Timeout)
	for _, s := range servers {
		if err := s.waitListening(deadline); err != nil {
			stopAll()
			return nil, err
		}
	}
	return servers, nil
}

// startNodes starts a server for each of c's nodes, node i (from 0)
// delivering to sinkPort(i), waits until all listen, and returns them with
// a function that stops them all.
func startNodes(c E2EConfig, sinkPort func(i int) int) ([]*server, func(), error) {
	var nodes []e2eNode
	for i := range c.nodes() {
		n, err := c.nodeConf(i, sinkPort(i))
		if err != nil {
			return nil, nil, err
		}
		nodes = append(nodes, n)
	}
	servers, err := startServers(c, nodes)
	if err != nil {
		return nil, nil, err
	}
	return servers, func() {
		for _, s := range servers {
			s.stop()
		}
	}, nil
}

// RunE2E starts the maddy binary (c.Nodes processes for SpoolPG) with the
// kind's queue in front of an in-process go-smtp sink, sends c.Messages
// through c.Clients concurrent SMTP connections spread over the nodes,
// waits until the sink has them all, and stops the servers.
func RunE2E(c E2EConfig) (E2EResult, error) {
	var res E2EResult
	var (
		latMu   sync.Mutex
		lastRcv time.Time
	)
	var delivered atomic.Int64
	sink, err := testutils.StartSMTPSink(testutils.WithoutRecording(), testutils.WithOnMessage(func(m *testutils.Message) error {
		now := time.Now()
		h, err := m.Header()
		if err != nil {
			return nil
		}
		if v := h.Get(SentHeader); v != "" {
			if ns, err := strconv.ParseInt(v, 10, 64); err == nil {
				latMu.Lock()
				res.Latency = append(res.Latency, now.Sub(time.Unix(0, ns)))
				lastRcv = now
				latMu.Unlock()
				delivered.Add(1)
			}
		}
		return nil
	}))
	if err != nil {
		return res, err
	}
	defer sink.Close()
	start := time.Now()
	servers, stop, err := startNodes(c, func(int) int { return sink.Port() })
	if err != nil {
		return res, err
	}
	defer stop()
	res.Ready = time.Since(start)

	cpu := func() (u, s time.Duration, db PGSample, err error) {
		for _, srv := range servers {
			su, ss, err := ReadCPUTime(srv.pid())
			if err != nil {
				return 0, 0, db, err
			}
			u, s = u+su, s+ss
		}
		if c.PG != nil {
			db.CPU, err = c.PG.serverCPU()
		}
		return u, s, db, err
	}
	u0, s0, db0, err := cpu()
	if err != nil {
		return res, err
	}
	var addrs []string
	for _, s := range servers {
		addrs = append(addrs, s.addr)
	}
	loadStart := time.Now()
	accepted, err := sendSMTP(addrs, c.Clients, c.Messages, c.BodySize)
	res.Accepted = int(accepted)
	res.AcceptTook = time.Since(loadStart)
	if err != nil {
		return res, err
	}
	deadline := time.Now().Add(c.Timeout)
	for delivered.Load() < accepted && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	u1, s1, db1, err := cpu()
	if err != nil {
		return res, err
	}
	res.User, res.System = u1-u0, s1-s0
	res.DBCPU = db1.CPU - db0.CPU
	res.Duplicates = len(sink.Duplicates())
	latMu.Lock()
	res.Delivered = int(delivered.Load())
	if !lastRcv.IsZero() {
		res.DeliverTook = lastRcv.Sub(loadStart)
	}
	latMu.Unlock()
	return res, nil
}

// sendSMTP sends n messages over clients concurrent connections, client i
// to addrs[i%len(addrs)], each reusing its connection for message after
// message.
func sendSMTP(addrs []string, clients, n, bodySize int) (int64, error) {
	return sendSMTPTo(addrs, clients, n, bodySize, func(int64) string { return Rcpt(0) })
}

// sendSMTPTo is sendSMTP with the recipient of the seq-th message (from
// 1) given by rcpt.
func sendSMTPTo(addrs []string, clients, n, bodySize int, rcpt func(seq int64) string) (int64, error) {
	body := Body(bodySize)
	var (
		next, accepted atomic.Int64
		wg             sync.WaitGroup
		errMu          sync.Mutex
		firstErr       error
	)
	fail := func(err error) {
		errMu.Lock()
		if firstErr == nil {
			firstErr = err
		}
		errMu.Unlock()
	}
	for i := 0; i < clients; i++ {
		wg.Add(1)
		addr := addrs[i%len(addrs)]
		go func() {
			defer wg.Done()
			c, err := smtp.Dial(addr)
			if err != nil {
				fail(err)
				return
			}
			defer c.Close()
			if err := c.Hello("client.bench.example"); err != nil {
				fail(err)
				return
			}
			for seq := next.Add(1); seq <= int64(n); seq = next.Add(1) {
				id := "e" + strconv.FormatInt(msgSeq.Add(1), 36)
				if err := sendOne(c, id, rcpt(seq), body); err != nil {
					fail(err)
					return
				}
				accepted.Add(1)
			}
			c.Quit()
		}()
	}
	wg.Wait()
	return accepted.Load(), firstErr
}

func sendOne(c *smtp.Client, id, rcpt string, body []byte) error {
	sent := time.Now()
	if err := c.Mail(Sender, nil); err != nil {
		return err
	}
	if err := c.Rcpt(rcpt, nil); err != nil {
		return err
	}
	w, err := c.Data()
	if err != nil {
		return err
	}
	var msg bytes.Buffer
	if err := textproto.WriteHeader(&msg, Header(id, sent)); err != nil {
		return err
	}
	msg.Write(body)
	if _, err := w.Write(msg.Bytes()); err != nil {
		return err
	}
	return w.Close()
}
