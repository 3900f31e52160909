package main

import (
	_ "embed"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/foxcpp/maddy/framework/log"
	"github.com/urfave/cli/v2"
)

// quickstartConf is the configuration used when no configuration file
// exists: every listener on loopback, state under ./spool-data, outgoing
// mail through target.spool to a next hop on 127.0.0.1:2526.
//
//go:embed quickstart.conf
var quickstartConf []byte

// quickstartDirEnv names the directory the quickstart keeps its state in
// (default ./spool-data).
const quickstartDirEnv = "SPOOL_QUICKSTART_DIR"

// useQuickstartIfNoConfig switches to the built-in configuration when the
// user named no configuration file and the default one does not exist, so
// `maddy run` works on a fresh machine without any setup. A configuration
// the user named explicitly is never replaced.
func useQuickstartIfNoConfig(c *cli.Context) error {
	path := c.Path("config")
	if c.IsSet("config") {
		return nil
	}
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		return nil
	}
	dir, err := quickstartDir()
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Join(dir, "run"), 0o700); err != nil {
		return fmt.Errorf("quickstart: %w", err)
	}
	confPath := filepath.Join(dir, "quickstart.conf")
	if err := os.WriteFile(confPath, quickstartConf, 0o600); err != nil {
		return fmt.Errorf("quickstart: %w", err)
	}
	log.Printf("no configuration file at %s: using the built-in quickstart configuration (%s, state in %s)", path, confPath, dir)
	return c.Set("config", confPath)
}

// quickstartDir resolves the quickstart's state directory to an absolute
// path and exports it for the configuration's {env:...} placeholder.
func quickstartDir() (string, error) {
	dir := os.Getenv(quickstartDirEnv)
	if dir == "" {
		dir = "spool-data"
	}
	dir, err := filepath.Abs(dir)
	if err != nil {
		return "", err
	}
	// maddy resolves {env:...} in the configuration; the state directory
	// must be absolute.
	os.Setenv(quickstartDirEnv, dir)
	return dir, nil
}
