package main

import (
	_ "github.com/foxcpp/maddy"
	_ "go.etcd.io/bbolt"
	_ "github.com/prometheus/client_golang/prometheus"
	_ "github.com/urfave/cli/v2"
)

func main() {}
