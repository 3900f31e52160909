// Package testutils provides test doubles for exercising the spool module
// without a real maddy instance or a real network peer.
//
// Two fakes and a fault injector live here:
//
//   - FakeTarget is an in-memory module.DeliveryTarget whose answers are
//     scripted per attempt and per recipient. It stands in for the
//     downstream target that the spool hands messages to, records every call
//     it receives, and lets a test hold attempts in flight, wait for
//     deliveries and measure parallelism without sleeping.
//
//   - SMTPSink is an in-process SMTP (or LMTP) server on 127.0.0.1 built on
//     go-smtp. It stands in for the next hop when a real maddy delivers over
//     the network, answers MAIL/RCPT/DATA according to a script, and records
//     what it accepted so tests can check for lost or duplicated mail.
//     Per recipient domain it can stand in for that domain's servers
//     (SetDomain: slow RCPT or DATA, a refusal such as 451 4.4.1 while the
//     domain is down, recovery) and counts what the domain saw: RCPTs,
//     transactions, accepted messages and the most transactions at once
//     (DomainStats, WaitDomain).
//
//   - CutProxy forwards TCP connections to another address (e.g. a
//     PostgreSQL server's Unix socket) and can cut them and refuse new ones
//     until restored: a network partition between one client and its
//     server.
//
// The cmd/smtpsink command wraps SMTPSink for end-to-end tests that run maddy
// as a separate process; its flag parsing and reply rules (SinkRules,
// ParseSinkFlags, SaveSinkMessage) live in this package so they are unit
// tested.
//
// Everything here is safe for concurrent use and meant to be run under
// -race. Waiting helpers block on notifications, never on sleep loops, so
// tests stay fast and deterministic.
package testutils
