package pgtest

import (
	"os"
	"testing"
)

func TestMain(m *testing.M) { os.Exit(Main(m)) }

func TestClusterStopStart(t *testing.T) {
	Require(t)
	c, err := New(Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.CreateDatabase("x"); err != nil {
		t.Fatal(err)
	}
	if out, err := c.Psql("x", "SELECT 1+1"); err != nil || out != "2" {
		t.Fatalf("psql: %q %v", out, err)
	}
	if err := c.Stop("immediate"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Psql("x", "SELECT 1"); err == nil {
		t.Fatal("query answered with the server stopped")
	}
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	if out, err := c.Psql("x", "SELECT 3"); err != nil || out != "3" {
		t.Fatalf("psql after restart: %q %v", out, err)
	}
}

func TestSharedDatabase(t *testing.T) {
	a, b := Database(t), Database(t)
	if a == b {
		t.Fatal("two tests got the same database")
	}
}
