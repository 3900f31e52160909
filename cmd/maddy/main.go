// Command maddy is the maddy mail server with Spool (target.spool)
// compiled in. It accepts upstream maddy 0.8.1's invocations unchanged:
//
//	maddy [--config FILE] run [--debug] [--log TARGET] [--libexec DIR] [-v]
//	maddy [--config FILE] [--debug] [--log TARGET]   (older form, also starts the server)
//	maddy version
//
// plus the `maddy spool` admin commands. Without --config (or
// MADDY_CONFIG) and with no /etc/maddy/maddy.conf, the server starts on a
// built-in quickstart configuration; see quickstart.go.
package main

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/foxcpp/maddy"
	"github.com/foxcpp/maddy/framework/config"
	"github.com/foxcpp/maddy/framework/log"
	"github.com/urfave/cli/v2"

	_ "github.com/maddy-spool/spool/internal/target/queue"
)

func main() {
	if err := newApp().Run(os.Args); err != nil {
		log.DefaultLogger.Error("maddy failed", err)
		os.Exit(1)
	}
}

// runFlags are the flags of `maddy run`; as upstream, they are accepted
// before the subcommand too, for the older bare `maddy` invocation.
func runFlags() []cli.Flag {
	return []cli.Flag{
		&cli.BoolFlag{
			Name:        "debug",
			Usage:       "enable debug logging early",
			Destination: &log.DefaultLogger.Debug,
		},
		&cli.StringFlag{
			Name:        "libexec",
			Value:       maddy.DefaultLibexecDirectory,
			Usage:       "path to the libexec directory",
			Destination: &config.LibexecDirectory,
		},
		&cli.StringSliceFlag{
			Name:  "log",
			Usage: "default logging target(s)",
			Value: cli.NewStringSlice("stderr"),
		},
		&cli.BoolFlag{
			Name:   "v",
			Usage:  "print version and build metadata, then exit",
			Hidden: true,
		},
	}
}

func newApp() *cli.App {
	app := cli.NewApp()
	app.Name = "maddy"
	app.Usage = "composable all-in-one mail server, with the Spool delivery queue (target.spool)"
	app.Flags = append([]cli.Flag{
		&cli.PathFlag{
			Name:    "config",
			Usage:   "configuration file to use",
			EnvVars: []string{"MADDY_CONFIG"},
			Value:   filepath.Join(maddy.ConfigDirectory, "maddy.conf"),
		},
	}, runFlags()...)
	app.ExitErrHandler = func(c *cli.Context, err error) {
		if err == nil {
			return
		}
		if _, ok := err.(cli.ExitCoder); !ok {
			fmt.Fprintln(os.Stderr, "maddy:", err)
			cli.OsExiter(1)
			return
		}
		cli.HandleExitCoder(err)
	}
	run := func(c *cli.Context) error {
		if err := useQuickstartIfNoConfig(c); err != nil {
			return cli.Exit(err.Error(), 2)
		}
		return maddy.Run(c)
	}
	app.Action = run
	app.Commands = []*cli.Command{
		{
			Name:   "run",
			Usage:  "Start the server",
			Flags:  runFlags(),
			Action: run,
		},
		{
			Name:  "version",
			Usage: "Print version and build metadata, then exit",
			Action: func(c *cli.Context) error {
				fmt.Println(maddy.BuildInfo())
				return nil
			},
		},
		spoolCommand(),
	}
	return app
}
