package testutils

import (
	"bufio"
	"io"
	"net"
	"path/filepath"
	"testing"
	"time"
)

// echoServer answers each line with itself on a Unix socket.
func echoServer(t *testing.T) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "echo.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_, _ = io.Copy(c, c)
			}()
		}
	}()
	return path
}

// roundTrip sends a line over c and reads it back.
func roundTrip(c net.Conn, r *bufio.Reader, line string) error {
	if err := c.SetDeadline(time.Now().Add(5 * time.Second)); err != nil {
		return err
	}
	if _, err := io.WriteString(c, line+"\n"); err != nil {
		return err
	}
	got, err := r.ReadString('\n')
	if err != nil {
		return err
	}
	if got != line+"\n" {
		return io.ErrUnexpectedEOF
	}
	return nil
}

func dialEcho(t *testing.T, p *CutProxy) (net.Conn, *bufio.Reader) {
	t.Helper()
	c, err := net.DialTimeout("tcp", p.Addr(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c, bufio.NewReader(c)
}

func TestCutProxy(t *testing.T) {
	p := NewCutProxy(t, "unix", echoServer(t))

	c1, r1 := dialEcho(t, p)
	if err := roundTrip(c1, r1, "before"); err != nil {
		t.Fatalf("through the proxy: %v", err)
	}

	p.Cut()
	if err := roundTrip(c1, r1, "during"); err == nil {
		t.Fatal("a connection open at the cut still works")
	}
	// Refused: the connect itself may fail, or the connection is reset
	// at once.
	if c2, err := net.DialTimeout("tcp", p.Addr(), 5*time.Second); err == nil {
		err = roundTrip(c2, bufio.NewReader(c2), "during")
		c2.Close()
		if err == nil {
			t.Fatal("a connection made while cut works")
		}
	}
	// The refusal is counted once the proxy has accepted the connection.
	for deadline := time.Now().Add(5 * time.Second); ; {
		if _, _, refused := p.Stats(); refused == 1 || time.Now().After(deadline) {
			break
		}
		time.Sleep(time.Millisecond)
	}

	p.Restore()
	c3, r3 := dialEcho(t, p)
	if err := roundTrip(c3, r3, "after"); err != nil {
		t.Fatalf("after Restore: %v", err)
	}
	const lag = 100 * time.Millisecond
	p.SetLatency(lag)
	start := time.Now()
	if err := roundTrip(c3, r3, "slow"); err != nil {
		t.Fatalf("with latency: %v", err)
	}
	if took := time.Since(start); took < lag {
		t.Errorf("a round trip with %v latency took %v", lag, took)
	}
	p.SetLatency(0)
	fwd, open, refused := p.Stats()
	if fwd != 2 || open != 1 || refused != 1 {
		t.Errorf("Stats() = %d forwarded, %d open, %d refused; want 2, 1, 1", fwd, open, refused)
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	if err := roundTrip(c3, r3, "closed"); err == nil {
		t.Fatal("a connection still works after Close")
	}
}
