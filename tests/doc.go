// Package tests holds Spool's end-to-end tests.
//
// TestMain builds the maddy binary from ./cmd/maddy once per run; every test
// then writes its own configuration into a temporary directory, starts the
// binary as a separate process (maddy --config FILE run) with target.spool
// between an SMTP endpoint and a target.smtp next hop, and talks to it over
// real SMTP on 127.0.0.1. The next hop is an in-process SMTP sink
// (internal/testutils) whose replies are scripted per test, so retries,
// bounces and crash recovery can be observed from the outside: through the
// sink, the process's log and its Prometheus metrics endpoint.
//
// Set SPOOL_E2E_RACE=1 to build the binary with the race detector (much
// slower to build and run; meant for occasional local runs).
package tests
