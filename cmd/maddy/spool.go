package main

import "github.com/urfave/cli/v2"

// spoolCommand groups the queue admin commands.
func spoolCommand() *cli.Command {
	return &cli.Command{
		Name:  "spool",
		Usage: "Inspect and steer target.spool queues",
	}
}
