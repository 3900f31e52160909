package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/foxcpp/maddy"
	parser "github.com/foxcpp/maddy/framework/cfgparser"
	"github.com/urfave/cli/v2"

	"github.com/maddy-spool/spool/internal/target/queue"
)

// spoolSetup is what the admin commands need to know of the server's
// configuration: where its control socket is and where each target.spool
// instance keeps its queue (for the offline mode and import).
type spoolSetup struct {
	configPath string
	socket     string
	instances  []spoolInstance
}

type spoolInstance struct {
	name     string // block name; "inline:LOCATION" for inline definitions
	location string
	// pgDSN is set for a queue in a PostgreSQL store (store postgres).
	pgDSN string
}

// loadSpoolSetup reads the configuration the server would use (the same
// quickstart fallback as `maddy run`) and applies --socket.
func loadSpoolSetup(c *cli.Context) (*spoolSetup, error) {
	path := c.Path("config")
	var r io.Reader
	if !c.IsSet("config") {
		if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
			if _, err := quickstartDir(); err != nil {
				return nil, err
			}
			path = "quickstart.conf (built in)"
			r = bytes.NewReader(quickstartConf)
		}
	}
	if r == nil {
		f, err := os.Open(path)
		if err != nil {
			return nil, fmt.Errorf("reading the configuration: %w (name it with --config)", err)
		}
		defer f.Close()
		r = f
	}
	nodes, err := parser.Read(r, path)
	if err != nil {
		return nil, fmt.Errorf("reading the configuration: %w", err)
	}
	s := &spoolSetup{configPath: path}
	stateDir, runtimeDir := maddy.DefaultStateDirectory, maddy.DefaultRuntimeDirectory
	for _, n := range nodes {
		if len(n.Args) == 1 {
			switch n.Name {
			case "state_dir":
				stateDir = n.Args[0]
			case "runtime_dir":
				runtimeDir = n.Args[0]
			}
		}
	}
	var sockets []string
	var walk func(nodes []parser.Node, top bool)
	walk = func(nodes []parser.Node, top bool) {
		for _, n := range nodes {
			if n.Name == queue.ModName {
				inst, socket := instanceOf(n, top, stateDir)
				if inst.location != "" {
					s.instances = append(s.instances, inst)
				}
				if socket != "" {
					sockets = append(sockets, socket)
				}
			}
			walk(n.Children, false)
		}
	}
	walk(nodes, true)
	sort.Slice(s.instances, func(i, j int) bool { return s.instances[i].name < s.instances[j].name })

	switch {
	case c.IsSet("socket"):
		s.socket = c.String("socket")
	case len(sockets) > 0:
		s.socket = sockets[0]
	default:
		s.socket = filepath.Join(runtimeDir, queue.DefaultAdminSocket)
	}
	return s, nil
}

// instanceOf reads a target.spool block's name, location and socket the
// way the module does.
func instanceOf(n parser.Node, top bool, stateDir string) (spoolInstance, string) {
	var inst spoolInstance
	socket := ""
	if top && len(n.Args) > 0 {
		inst.name = n.Args[0]
		inst.location = filepath.Join(stateDir, inst.name)
	} else if len(n.Args) > 0 {
		inst.location = n.Args[0]
	}
	for _, ch := range n.Children {
		if len(ch.Args) != 1 {
			continue
		}
		switch ch.Name {
		case "store":
			if ch.Args[0] == "postgres" {
				for _, sub := range ch.Children {
					if sub.Name == "dsn" && len(sub.Args) == 1 {
						inst.pgDSN = sub.Args[0]
					}
				}
			}
		case "location":
			inst.location = ch.Args[0]
		case "admin_socket":
			if ch.Args[0] != "off" {
				socket = ch.Args[0]
			}
		}
	}
	if inst.name == "" {
		inst.name = "inline:" + inst.location
	}
	// The server runs in its state directory, so relative paths in the
	// configuration are relative to it, not to where this command runs.
	if inst.location != "" && !filepath.IsAbs(inst.location) {
		inst.location = filepath.Join(stateDir, inst.location)
	}
	if socket != "" && !filepath.IsAbs(socket) {
		socket = filepath.Join(stateDir, socket)
	}
	return inst, socket
}

// pick returns the instances an offline command reads: the one named by
// --instance, else every instance; --dir names a queue directory directly.
func (s *spoolSetup) pick(c *cli.Context) ([]spoolInstance, error) {
	if dir := c.String("dir"); dir != "" {
		name := c.String("instance")
		if name == "" {
			name = dir
		}
		return []spoolInstance{{name: name, location: dir}}, nil
	}
	if name := c.String("instance"); name != "" {
		for _, inst := range s.instances {
			if inst.name == name {
				return []spoolInstance{inst}, nil
			}
		}
		return nil, fmt.Errorf("no target.spool instance %q in %s (have: %s)", name, s.configPath, s.names())
	}
	if len(s.instances) == 0 {
		return nil, fmt.Errorf("no target.spool block in %s; name the queue directory with --dir", s.configPath)
	}
	return s.instances, nil
}

func (s *spoolSetup) names() string {
	var names []string
	for _, inst := range s.instances {
		names = append(names, inst.name)
	}
	if len(names) == 0 {
		return "none"
	}
	return strings.Join(names, ", ")
}
