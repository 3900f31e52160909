//go:build unix

package tests

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"

	"github.com/maddy-spool/spool/internal/target/queue/admin"
)

// exampleUserHash is the bcrypt hash of examplePassword.
const (
	examplePassword = "example password"
	exampleUserHash = "$2a$10$wCyq31r417xYVg2vSCY1.e8auRwG8lOpwjHfdiebXB5eUleHUpa.O"
)

// writeSelfSignedCert writes a certificate for host and its key as PEM.
func writeSelfSignedCert(t *testing.T, host, certPath, keyPath string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: host},
		DNSNames:     []string{host},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Dir(certPath), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(certPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyPath, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		t.Fatal(err)
	}
}

// readRepoFile reads a file of the repository.
func readRepoFile(t *testing.T, rel string) string {
	t.Helper()
	root, err := moduleRoot()
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(root, rel))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// exampleSetup is docs/examples/maddy.conf made runnable here: its
// listeners on free loopback ports, /etc/maddy in a temporary directory
// (with a certificate and a users file), state and runtime directories of
// its own.
type exampleSetup struct {
	cfg                          string
	tlsPort, starttlsPort, mPort int
	queueAddr                    string
}

func setUpExample(t *testing.T) exampleSetup {
	t.Helper()
	conf := readRepoFile(t, "docs/examples/maddy.conf")
	dir := t.TempDir()
	etc := filepath.Join(dir, "etc")
	ports := freePorts(t, 3)
	s := exampleSetup{tlsPort: ports[0], starttlsPort: ports[1], mPort: ports[2]}
	// Every line the test changes must be there as written: if the
	// example changes, this test is changed with it.
	for _, r := range []struct{ old, new string }{
		{"/etc/maddy/", etc + "/"},
		{"tls://0.0.0.0:465", fmt.Sprintf("tls://127.0.0.1:%d", s.tlsPort)},
		{"tcp://0.0.0.0:587", fmt.Sprintf("tcp://127.0.0.1:%d", s.starttlsPort)},
		{"tcp://127.0.0.1:9749", fmt.Sprintf("tcp://127.0.0.1:%d", s.mPort)},
	} {
		if !strings.Contains(conf, r.old) {
			t.Fatalf("docs/examples/maddy.conf no longer contains %q; update this test", r.old)
		}
		conf = strings.ReplaceAll(conf, r.old, r.new)
	}
	if regexp.MustCompile(`(?m)^\s*(state_dir|runtime_dir)\s`).MatchString(conf) {
		t.Fatal("docs/examples/maddy.conf sets state_dir or runtime_dir; update this test")
	}
	conf = fmt.Sprintf("state_dir %s/state\nruntime_dir %s/run\n", dir, dir) + conf
	for _, d := range []string{"state", "run"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	writeSelfSignedCert(t, "mx.example.org", filepath.Join(etc, "certs", "fullchain.pem"), filepath.Join(etc, "certs", "privkey.pem"))
	if err := os.WriteFile(filepath.Join(etc, "users"), []byte("alice@example.org: bcrypt:"+exampleUserHash+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	s.cfg = filepath.Join(dir, "maddy.conf")
	if err := os.WriteFile(s.cfg, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	return s
}

// submitAuth submits a message on the submission port with STARTTLS and
// AUTH PLAIN, or on the TLS port.
func submitAuth(addr string, implicitTLS bool, user, pass, from string, to []string, data []byte) error {
	tlsCfg := &tls.Config{ServerName: "mx.example.org", InsecureSkipVerify: true}
	var conn net.Conn
	var err error
	if implicitTLS {
		conn, err = tls.DialWithDialer(&net.Dialer{Timeout: 10 * time.Second}, "tcp", addr, tlsCfg)
	} else {
		conn, err = net.DialTimeout("tcp", addr, 10*time.Second)
	}
	if err != nil {
		return err
	}
	conn.SetDeadline(time.Now().Add(waitTimeout))
	c := smtp.NewClient(conn)
	defer c.Close()
	if err := c.Hello("client.e2e.test"); err != nil {
		return fmt.Errorf("EHLO: %w", err)
	}
	if !implicitTLS {
		if err := c.StartTLS(tlsCfg); err != nil {
			return fmt.Errorf("STARTTLS: %w", err)
		}
	}
	if err := c.Auth(sasl.NewPlainClient("", user, pass)); err != nil {
		return fmt.Errorf("AUTH: %w", err)
	}
	if err := c.SendMail(from, to, strings.NewReader(string(data))); err != nil {
		return err
	}
	return c.Quit()
}

// TestExampleConfig: the configuration in docs/examples/maddy.conf, which
// the README shows, starts with the built binary as it is; its users can
// submit mail, which lands in its target.spool queue; and `maddy spool`
// finds that queue from the same file.
func TestExampleConfig(t *testing.T) {
	t.Parallel()
	s := setUpExample(t)
	srv, err := launch(t, "--config", s.cfg, "run")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range []string{
		fmt.Sprintf("submission: listening on tls://127.0.0.1:%d", s.tlsPort),
		fmt.Sprintf("submission: listening on tcp://127.0.0.1:%d", s.starttlsPort),
	} {
		srv.waitLog(l)
	}
	e := &env{t: t, cfg: s.cfg, srv: srv, p: params{MetricsPort: s.mPort}}

	id := msgID(t, 1)
	data := newMessage("alice@example.org", []string{"bob@example.net"}, id, testBody(id))
	if err := submitAuth(fmt.Sprintf("127.0.0.1:%d", s.tlsPort), true, "alice@example.org", "wrong", "alice@example.org", []string{"bob@example.net"}, data); err == nil || !strings.Contains(err.Error(), "AUTH") {
		t.Fatalf("submission with a wrong password: %v, want AUTH refused", err)
	}
	if err := submitAuth(fmt.Sprintf("127.0.0.1:%d", s.starttlsPort), false, "alice@example.org", examplePassword, "alice@example.org", []string{"bob@example.net"}, data); err != nil {
		t.Fatalf("submission on the STARTTLS port: %v", err)
	}
	if err := submitAuth(fmt.Sprintf("127.0.0.1:%d", s.tlsPort), true, "alice@example.org", examplePassword, "alice@example.org", []string{"bob@example.net"}, data); err != nil {
		t.Fatalf("submission on the TLS port: %v", err)
	}
	// Both went into the queue, and the metrics endpoint says so. What
	// target.remote makes of example.net depends on this machine's DNS;
	// the DSNs it may cause go into the same queue, so there can be more.
	if v, ok := scrapeMetric(t, e.metricsURL(), "maddy_spool_enqueued_total", map[string]string{"module": "remote_queue"}); !ok || v < 2 {
		t.Errorf("maddy_spool_enqueued_total{module=\"remote_queue\"} = %v (present: %v), want at least 2", v, ok)
	}
	var st admin.Stats
	if err := strictDecode(e.spoolOK("stats", "--json").stdout, &st); err != nil || st.Instance != "remote_queue" {
		t.Errorf("spool stats --json: %+v, %v", st, err)
	}
}

// TestREADMEConfigIsTheExample: the README's configuration is
// docs/examples/maddy.conf without its opening comment, so what the README
// shows is what TestExampleConfig starts.
func TestREADMEConfigIsTheExample(t *testing.T) {
	conf := readRepoFile(t, "docs/examples/maddy.conf")
	body := conf[strings.Index(conf, "\nhostname ")+1:]
	readme := readRepoFile(t, "README.md")
	if !strings.Contains(readme, "```\n"+body+"```\n") {
		t.Fatalf("README.md has no code block equal to docs/examples/maddy.conf from its hostname line on:\n%s", body)
	}
}
