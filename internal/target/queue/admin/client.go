package admin

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"syscall"
)

// ErrServerDown means nothing listens on the control socket: the server is
// not running (or runs with another socket path).
var ErrServerDown = errors.New("the server is not running")

// maxResponseLine bounds one response line read by the client; the largest
// are content pieces (64 KiB, base64) and show's header block.
const maxResponseLine = 16 << 20

// Do sends req to the server listening at path and calls fn for every
// response line until the server says it is done. A response carrying an
// error ends Do with that error.
func Do(ctx context.Context, path string, req Request, fn func(Response) error) error {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		if errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED) {
			return fmt.Errorf("%w (no one listens on %s)", ErrServerDown, path)
		}
		return err
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()

	req.V = Version
	b, err := json.Marshal(req)
	if err != nil {
		return err
	}
	sc := bufio.NewScanner(c)
	sc.Buffer(make([]byte, 64<<10), maxResponseLine)
	if _, err := c.Write(append(b, '\n')); err != nil {
		// A server that refuses the connection answers and closes it
		// without reading the request; its answer says why.
		if refusal := readRefusal(sc); refusal != nil {
			return refusal
		}
		return fmt.Errorf("sending request: %w", err)
	}
	for sc.Scan() {
		var resp Response
		if err := json.Unmarshal(sc.Bytes(), &resp); err != nil {
			return fmt.Errorf("malformed response from server: %v", err)
		}
		if resp.Error != "" {
			return errors.New(resp.Error)
		}
		if resp.Done {
			return nil
		}
		if err := fn(resp); err != nil {
			return err
		}
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("reading response: %w", err)
	}
	return errors.New("the server closed the connection before finishing its answer")
}

// readRefusal returns the error line a server sent before it closed the
// connection, or nil.
func readRefusal(sc *bufio.Scanner) error {
	if !sc.Scan() {
		return nil
	}
	var resp Response
	if json.Unmarshal(sc.Bytes(), &resp) != nil || resp.Error == "" {
		return nil
	}
	return errors.New(resp.Error)
}
