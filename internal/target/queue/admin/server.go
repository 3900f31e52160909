package admin

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/maddy-spool/spool/internal/target/queue/store"
)

// Timeouts of one control connection. A client that stops reading or
// writing is dropped; it never holds a server goroutine for long.
var (
	requestTimeout = 10 * time.Second
	writeTimeout   = 30 * time.Second
)

const (
	// changeTimeout bounds how long a change waits for attempts in
	// flight before answering "deferred" without their final state.
	changeTimeout = 30 * time.Second
	contentChunk  = 64 << 10
)

// Peer is who sent a request, as the kernel reports it. PID is 0 where
// the system reports only the user (FreeBSD, DragonFly).
type Peer struct {
	UID, PID int
	Known    bool
}

func (p Peer) String() string {
	switch {
	case !p.Known:
		return "unknown peer"
	case p.PID == 0:
		return fmt.Sprintf("uid %d", p.UID)
	}
	return fmt.Sprintf("uid %d pid %d", p.UID, p.PID)
}

// Logger receives one line per change an operator made.
type Logger func(instance string, op Op, peer Peer, f Filter, res Result)

// server is one control socket and the queues it serves.
type server struct {
	path   string
	ln     *net.UnixListener
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu     sync.Mutex
	queues map[string]registered
}

type registered struct {
	q   Queue
	log Logger
}

var (
	serversMu sync.Mutex
	servers   = map[string]*server{}
)

// Register serves q under name on the control socket at path, creating
// the socket when the first queue registers on it. The returned function
// removes q again; the socket is closed (and its file removed) with the
// last queue.
func Register(path, name string, q Queue, log Logger) (unregister func(), err error) {
	path, err = filepath.Abs(path)
	if err != nil {
		return nil, err
	}
	serversMu.Lock()
	defer serversMu.Unlock()
	s := servers[path]
	if s == nil {
		s, err = listen(path)
		if err != nil {
			return nil, err
		}
		servers[path] = s
	}
	s.mu.Lock()
	if _, dup := s.queues[name]; dup {
		s.mu.Unlock()
		return nil, fmt.Errorf("admin socket %s: instance %q registered twice", path, name)
	}
	s.queues[name] = registered{q: q, log: log}
	s.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			serversMu.Lock()
			defer serversMu.Unlock()
			s.mu.Lock()
			delete(s.queues, name)
			empty := len(s.queues) == 0
			s.mu.Unlock()
			if empty {
				delete(servers, path)
				s.close()
			}
		})
	}, nil
}

// listen creates the socket. A socket file left by a server that died is
// replaced; one that a live server answers on is not.
func listen(path string) (*server, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("admin socket: %w", err)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("admin socket: %s exists and is not a socket; not touching it", path)
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("admin socket: another server is listening on %s", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("admin socket: removing stale %s: %w", path, err)
		}
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("admin socket: %w", err)
	}
	// Only the server's user may connect. Between bind and chmod the
	// socket has the umask's mode; the peer check in serve covers that
	// moment.
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("admin socket: %w", err)
	}
	ln.SetUnlinkOnClose(true)
	s := &server{path: path, ln: ln, queues: map[string]registered{}}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	s.wg.Add(1)
	go s.accept()
	return s, nil
}

func (s *server) close() {
	s.cancel()
	s.ln.Close()
	s.wg.Wait()
}

func (s *server) accept() {
	defer s.wg.Done()
	for {
		c, err := s.ln.AcceptUnix()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of file descriptors and the like: back off briefly.
			select {
			case <-time.After(100 * time.Millisecond):
				continue
			case <-s.ctx.Done():
				return
			}
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer c.Close()
			s.serve(c)
		}()
	}
}

// respWriter writes response lines with a deadline per line.
type respWriter struct {
	c   net.Conn
	buf *bufio.Writer
	enc *json.Encoder
}

func (w *respWriter) send(r Response) error {
	r.V = Version
	w.c.SetWriteDeadline(time.Now().Add(writeTimeout))
	if err := w.enc.Encode(r); err != nil {
		return err
	}
	if w.buf.Buffered() > 32<<10 || r.Done || r.Error != "" {
		return w.buf.Flush()
	}
	return nil
}

func (s *server) serve(c *net.UnixConn) {
	bw := bufio.NewWriter(c)
	w := &respWriter{c: c, buf: bw, enc: json.NewEncoder(bw)}
	peer, err := peerLookup(c)
	if err == nil && !peer.Known {
		err = errors.New("the system did not say who it is")
	}
	if err != nil {
		// Without the kernel's word on who connected, the socket's mode
		// is the only guard left, and a socket reachable through a
		// directory with looser permissions (or on a system that ignores
		// socket modes) would let anyone steer the queue.
		logger.Error("control socket: refused a connection from an unidentified process", err, "socket", s.path)
		w.send(Response{Error: "refused: cannot identify the connecting process: " + err.Error() +
			"; the control socket serves only processes whose user the system reports (see docs/reference/spool-admin.md)"})
		return
	}
	if peer.UID != 0 && peer.UID != os.Geteuid() {
		logger.Msg("control socket: refused a connection from another user", "socket", s.path, "peer", peer.String())
		w.send(Response{Error: fmt.Sprintf("permission denied: uid %d is neither the server's user nor root", peer.UID)})
		return
	}
	c.SetReadDeadline(time.Now().Add(requestTimeout))
	line, err := readLine(c, MaxRequestSize)
	if err != nil {
		w.send(Response{Error: err.Error()})
		return
	}
	req, err := ParseRequest(line)
	if err != nil {
		w.send(Response{Error: err.Error()})
		return
	}
	if err := s.handle(w, req, peer); err != nil {
		w.send(Response{Error: err.Error()})
		return
	}
	w.send(Response{Done: true})
}

// readLine reads up to the first newline, refusing lines over max bytes.
func readLine(r io.Reader, max int) ([]byte, error) {
	br := bufio.NewReaderSize(io.LimitReader(r, int64(max)+1), 4096)
	var line []byte
	for {
		chunk, err := br.ReadSlice('\n')
		line = append(line, chunk...)
		if len(line) > max {
			return nil, fmt.Errorf("request larger than %d bytes", max)
		}
		switch {
		case err == nil:
			return bytes.TrimRight(line, "\r\n"), nil
		case errors.Is(err, bufio.ErrBufferFull):
			continue
		case errors.Is(err, io.EOF) && len(line) > 0:
			return line, nil // no final newline: take what came
		default:
			return nil, fmt.Errorf("reading request: %v", err)
		}
	}
}

// pick returns the queues a request addresses, sorted by name.
func (s *server) pick(req Request) ([]string, []registered, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var names []string
	for n := range s.queues {
		names = append(names, n)
	}
	sort.Strings(names)
	if req.Instance != "" {
		r, ok := s.queues[req.Instance]
		if !ok {
			return nil, nil, fmt.Errorf("no target.spool instance %q here (have: %s)", req.Instance, strings.Join(names, ", "))
		}
		return []string{req.Instance}, []registered{r}, nil
	}
	if len(names) > 1 && req.Filter.Explicit() {
		return nil, nil, fmt.Errorf("message IDs are per instance and there are several (%s): name one with --instance", strings.Join(names, ", "))
	}
	regs := make([]registered, len(names))
	for i, n := range names {
		regs[i] = s.queues[n]
	}
	return names, regs, nil
}

func (s *server) handle(w *respWriter, req Request, peer Peer) error {
	names, regs, err := s.pick(req)
	if err != nil {
		return err
	}
	switch req.Op {
	case OpInstances:
		if names == nil {
			names = []string{}
		}
		return w.send(Response{Instances: names})
	case OpList:
		for i, r := range regs {
			err := List(r.q, names[i], req.Filter, r.q.Now(), func(mi MessageInfo) error {
				return w.send(Response{Message: &mi})
			})
			if err != nil {
				return err
			}
		}
		return nil
	case OpStats:
		for i, r := range regs {
			st, err := ComputeStats(r.q, names[i], r.q.Now())
			if err != nil {
				return err
			}
			st.Suspended = r.q.Suspended()
			if err := w.send(Response{Stats: &st}); err != nil {
				return err
			}
		}
		return nil
	case OpShow:
		for i, r := range regs {
			err := Show(r.q, names[i], req.Filter.IDs[0], req.Headers, req.Body, func(resp Response) error {
				return w.send(resp)
			})
			if errors.Is(err, store.ErrNotFound) && len(regs) > 1 {
				continue
			}
			return err
		}
		return fmt.Errorf("message %v: not queued", req.Filter.IDs[0])
	}
	op, _ := ParseOp(req.Op)
	ctx, cancel := context.WithTimeout(s.ctx, changeTimeout)
	defer cancel()
	for i, r := range regs {
		res, err := r.q.Apply(ctx, op, req.Filter)
		res.Instance, res.Op = names[i], op
		if r.log != nil {
			r.log(names[i], op, peer, req.Filter, res)
		}
		if err != nil {
			return err
		}
		if err := w.send(Response{Result: &res}); err != nil {
			return err
		}
	}
	return nil
}

// Show sends the detail of one message and, when asked, its stored
// header and body in pieces (never the whole body in memory).
func Show(r Reader, instance string, id store.ID, headers, body bool, send func(Response) error) error {
	m, err := r.Get(id)
	if err != nil {
		if errors.Is(err, store.ErrNotFound) {
			return fmt.Errorf("message %v: %w", id, err)
		}
		return err
	}
	d := DetailOf(instance, m)
	var content store.Content
	if headers || body {
		content, err = r.Content(m)
		if err != nil {
			return fmt.Errorf("message %v: reading content: %w", id, err)
		}
		d.Header = string(content.Header)
	}
	if err := send(Response{Detail: &d}); err != nil {
		return err
	}
	if !body {
		return nil
	}
	rc, err := content.Body.Open()
	if err != nil {
		return err
	}
	defer rc.Close()
	buf := make([]byte, contentChunk)
	for {
		n, err := io.ReadFull(rc, buf)
		if n > 0 {
			if err := send(Response{Content: append([]byte(nil), buf[:n]...)}); err != nil {
				return err
			}
		}
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			return nil
		}
		if err != nil {
			return err
		}
	}
}
