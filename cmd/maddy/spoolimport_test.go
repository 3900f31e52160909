package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestImportTarget(t *testing.T) {
	setup := &spoolSetup{configPath: "maddy.conf", instances: []spoolInstance{
		{name: "local", location: "/var/lib/maddy/local"},
		{name: "shared", location: "postgres", pgDSN: "host=/run/postgresql dbname=spool"},
	}}
	tests := []struct {
		to   string
		want importDest
		err  string
	}{
		{to: "local", want: importDest{name: "local", dir: "/var/lib/maddy/local"}},
		{to: "shared", want: importDest{name: "shared", pgDSN: "host=/run/postgresql dbname=spool"}},
		{to: "/srv/queue", want: importDest{name: "/srv/queue", dir: "/srv/queue"}},
		{to: "", err: "name the target.spool instance"},
		{to: "nosuch", err: "no such target.spool instance"},
	}
	for _, tc := range tests {
		got, err := importTarget(setup, tc.to)
		switch {
		case tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)):
			t.Errorf("--to %q: error %v, want one saying %q", tc.to, err, tc.err)
		case tc.err == "" && (err != nil || got != tc.want):
			t.Errorf("--to %q = %+v, %v; want %+v", tc.to, got, err, tc.want)
		}
	}
	one := &spoolSetup{instances: setup.instances[1:]}
	if got, err := importTarget(one, ""); err != nil || got.pgDSN == "" {
		t.Errorf("the only instance: %+v, %v", got, err)
	}
}

func TestHasQueueEntries(t *testing.T) {
	dir := t.TempDir()
	if err := os.Mkdir(filepath.Join(dir, "imported-x.meta"), 0o700); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"queue.db", "lock"} {
		if err := os.WriteFile(filepath.Join(dir, f), nil, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if hasQueueEntries(dir) {
		t.Error("a Spool store taken for target.queue entries")
	}
	if err := os.WriteFile(filepath.Join(dir, "0000aaaa.meta.importing"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if !hasQueueEntries(dir) {
		t.Error("an interrupted target.queue import not seen")
	}
	if len(importNodeName()) > 64 || !strings.HasPrefix(importNodeName(), "import@") {
		t.Errorf("node name %q", importNodeName())
	}
}
