package testutils

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"
)

// CutProxy forwards TCP connections accepted on 127.0.0.1 to another
// address (any network net.Dial knows, e.g. the Unix socket of a
// PostgreSQL server), and can cut them: Cut closes every forwarded
// connection and refuses new ones until Restore. It stands in for a
// network partition between one client and its server.
//
// While cut, the proxy keeps its port (so that Restore cannot lose it to
// another process) and refuses a connection by accepting it and resetting
// it at once, which a client sees as a failed connect just as promptly as
// a closed port.
type CutProxy struct {
	ln              net.Listener
	network, target string
	acceptDone      chan struct{}

	mu       sync.Mutex
	cut      bool
	latency  time.Duration // added before each chunk forwarded to the target
	closed   bool
	conns    map[net.Conn]struct{} // both ends of every forwarded connection
	forwards int                   // connections forwarded so far
	refused  int                   // connections refused while cut
	wg       sync.WaitGroup        // copy goroutines
}

// StartCutProxy listens on a free port of 127.0.0.1 and forwards each
// connection to target on network ("unix", "tcp"). Close it when done.
func StartCutProxy(network, target string) (*CutProxy, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("testutils: proxy listen: %w", err)
	}
	p := &CutProxy{
		ln:         ln,
		network:    network,
		target:     target,
		acceptDone: make(chan struct{}),
		conns:      make(map[net.Conn]struct{}),
	}
	go p.accept()
	return p, nil
}

// NewCutProxy starts a proxy for a test and closes it in t.Cleanup.
func NewCutProxy(t testing.TB, network, target string) *CutProxy {
	t.Helper()
	p, err := StartCutProxy(network, target)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.Close() })
	return p
}

// Addr is the address clients connect to, e.g. "127.0.0.1:34567".
func (p *CutProxy) Addr() string { return p.ln.Addr().String() }

// Port is the listening port.
func (p *CutProxy) Port() int { return p.ln.Addr().(*net.TCPAddr).Port }

// Cut closes every forwarded connection and refuses new ones until
// Restore.
func (p *CutProxy) Cut() {
	p.mu.Lock()
	p.cut = true
	conns := p.takeConnsLocked()
	p.mu.Unlock()
	for _, c := range conns {
		reset(c)
	}
}

// Restore forwards new connections again.
func (p *CutProxy) Restore() {
	p.mu.Lock()
	p.cut = false
	p.mu.Unlock()
}

// SetLatency delays every chunk of data forwarded to the target by d (0:
// none) from now on, as a slow network path would: the client's requests
// reach the server d later.
func (p *CutProxy) SetLatency(d time.Duration) {
	p.mu.Lock()
	p.latency = d
	p.mu.Unlock()
}

func (p *CutProxy) getLatency() time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.latency
}

// Stats returns how many connections were forwarded, are open now, and
// were refused while cut.
func (p *CutProxy) Stats() (forwarded, open, refused int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.forwards, len(p.conns) / 2, p.refused
}

// Close stops listening and closes every connection.
func (p *CutProxy) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	conns := p.takeConnsLocked()
	p.mu.Unlock()
	err := p.ln.Close()
	for _, c := range conns {
		reset(c)
	}
	<-p.acceptDone
	p.wg.Wait()
	return err
}

func (p *CutProxy) takeConnsLocked() []net.Conn {
	out := make([]net.Conn, 0, len(p.conns))
	for c := range p.conns {
		out = append(out, c)
	}
	clear(p.conns)
	return out
}

// reset closes c, with a TCP reset rather than an orderly close where it
// can, as a broken network path would end it.
func reset(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetLinger(0)
	}
	_ = c.Close()
}

func (p *CutProxy) accept() {
	defer close(p.acceptDone)
	for {
		c, err := p.ln.Accept()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return
		}
		p.mu.Lock()
		refuse := p.cut || p.closed
		if refuse {
			p.refused++
		}
		p.mu.Unlock()
		if refuse {
			reset(c)
			continue
		}
		p.wg.Add(1)
		go p.forward(c)
	}
}

// forward dials the target for client connection c and copies both ways
// until either side ends or the proxy cuts them.
func (p *CutProxy) forward(c net.Conn) {
	defer p.wg.Done()
	s, err := net.Dial(p.network, p.target)
	if err != nil {
		reset(c)
		return
	}
	p.mu.Lock()
	if p.cut || p.closed {
		p.refused++
		p.mu.Unlock()
		reset(c)
		_ = s.Close()
		return
	}
	p.forwards++
	p.conns[c] = struct{}{}
	p.conns[s] = struct{}{}
	p.mu.Unlock()

	done := make(chan struct{}, 2)
	go func() {
		p.copyDelayed(s, c)
		done <- struct{}{}
	}()
	go func() {
		_, _ = io.Copy(c, s)
		done <- struct{}{}
	}()
	<-done
	// One direction ended: end the other too, and forget the pair unless
	// a Cut took it already.
	p.mu.Lock()
	delete(p.conns, c)
	delete(p.conns, s)
	p.mu.Unlock()
	_ = c.Close()
	_ = s.Close()
	<-done
}

// copyDelayed copies src to dst, holding each chunk back by the latency
// set at the time it was read.
func (p *CutProxy) copyDelayed(dst, src net.Conn) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if d := p.getLatency(); d > 0 {
				time.Sleep(d) // the simulated network delay
			}
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}
