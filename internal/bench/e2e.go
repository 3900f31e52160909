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
	// Dir is the server's state directory; the queue lives in Dir/outq
	// (see E2EQueueDir), where a backlog may have been generated.
	Dir      string
	Messages int
	Clients  int
	BodySize int
	Timeout  time.Duration
}

// E2EResult is what one end-to-end measurement saw.
type E2EResult struct {
	// Ready is the time from starting the process until the SMTP port
	// accepted a connection.
	Ready time.Duration
	// Accepted is the number of messages the server accepted, and
	// AcceptTook the time from the first MAIL until the last DATA reply.
	Accepted   int
	AcceptTook time.Duration
	// Delivered counts messages the sink received, and DeliverTook the
	// time from the first MAIL until the last one arrived.
	Delivered   int
	DeliverTook time.Duration
	// Latency holds, per delivered message, the time from MAIL to the
	// sink's receipt.
	Latency []time.Duration
	// CPU is the server's user and system CPU time over the load (from the
	// first MAIL until everything was delivered).
	User, System time.Duration
}

// CPUPerMessage is the server's CPU time per accepted message.
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

// writeE2EConfig writes the server configuration: an smtp endpoint
// delivering to the queue under test ("outq"), which hands mail to
// target.smtp without STARTTLS, pointed at the sink. Both queues get the
// same directives.
func writeE2EConfig(c E2EConfig, smtpPort, sinkPort int) (string, error) {
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
    target &next_hop
    max_parallelism 16
}

smtp tcp://127.0.0.1:%[4]d {
    default_source {
        deliver_to &outq
    }
}
`, c.Dir, sinkPort, c.Kind.ModName(), smtpPort)
	if err := os.MkdirAll(filepath.Join(c.Dir, "run"), 0o700); err != nil {
		return "", err
	}
	path := filepath.Join(c.Dir, "maddy.conf")
	return path, os.WriteFile(path, []byte(conf), 0o600)
}

// RunE2E starts the maddy binary with the kind's queue in front of an
// in-process go-smtp sink, sends c.Messages through c.Clients concurrent
// SMTP connections, waits until the sink has them all, and stops the
// server.
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
	smtpPort, err := freePort()
	if err != nil {
		return res, err
	}
	cfg, err := writeE2EConfig(c, smtpPort, sink.Port())
	if err != nil {
		return res, err
	}
	logf, err := os.Create(filepath.Join(c.Dir, "maddy.log"))
	if err != nil {
		return res, err
	}
	defer logf.Close()
	cmd := exec.Command(c.Bin, "--config", cfg, "run")
	cmd.Stdout = logf
	cmd.Stderr = logf
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return res, err
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(30 * time.Second):
			cmd.Process.Kill()
			<-exited
		}
	}()

	addr := "127.0.0.1:" + strconv.Itoa(smtpPort)
	for {
		conn, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			conn.Close()
			break
		}
		select {
		case err := <-exited:
			exited <- err
			return res, fmt.Errorf("maddy exited before listening (%v); see %s", err, logf.Name())
		case <-time.After(10 * time.Millisecond):
		}
		if time.Since(start) > c.Timeout {
			return res, fmt.Errorf("maddy did not listen within %v; see %s", c.Timeout, logf.Name())
		}
	}
	res.Ready = time.Since(start)

	pid := cmd.Process.Pid
	u0, s0, err := ReadCPUTime(pid)
	if err != nil {
		return res, err
	}
	loadStart := time.Now()
	accepted, err := sendSMTP(addr, c.Clients, c.Messages, c.BodySize)
	res.Accepted = int(accepted)
	res.AcceptTook = time.Since(loadStart)
	if err != nil {
		return res, err
	}
	deadline := time.Now().Add(c.Timeout)
	for delivered.Load() < accepted && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	u1, s1, err := ReadCPUTime(pid)
	if err != nil {
		return res, err
	}
	res.User, res.System = u1-u0, s1-s0
	latMu.Lock()
	res.Delivered = int(delivered.Load())
	if !lastRcv.IsZero() {
		res.DeliverTook = lastRcv.Sub(loadStart)
	}
	latMu.Unlock()
	return res, nil
}

// sendSMTP sends n messages over clients concurrent connections, each
// reusing its connection for message after message.
func sendSMTP(addr string, clients, n, bodySize int) (int64, error) {
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
			for next.Add(1) <= int64(n) {
				id := "e" + strconv.FormatInt(msgSeq.Add(1), 36)
				if err := sendOne(c, id, body); err != nil {
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

func sendOne(c *smtp.Client, id string, body []byte) error {
	sent := time.Now()
	if err := c.Mail(Sender, nil); err != nil {
		return err
	}
	if err := c.Rcpt(Rcpt(0), nil); err != nil {
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
