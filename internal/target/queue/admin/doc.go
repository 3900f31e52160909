// Package admin is how an operator inspects and steers target.spool queues:
// a typed Filter that selects messages, the operations over it (each one
// function that returns how many messages it touched), the read-only views
// (list, show, stats) shared by the live server and the offline mode, and
// the control socket protocol that carries them between `maddy spool` and
// the running server.
//
// # Control socket protocol (version 1)
//
// The server listens on a Unix socket (default RUNTIME_DIR/spool.sock,
// mode 0600, and only peers that the kernel reports as the server's own
// user or root are served; a peer it cannot identify is refused with an
// error line before the request is read). A client connects, sends one request as a single JSON object
// terminated by a newline, at most MaxRequestSize bytes, and reads response
// lines until one has "done": true or "error" set; then the server closes
// the connection.
//
// Request:
//
//	{"v":1, "op":"list", "instance":"outbound", "filter":{...}, ...}
//
// Responses, one JSON object per line:
//
//	{"v":1, "message":{...}}            one per listed message (op list)
//	{"v":1, "detail":{...}}             op show
//	{"v":1, "stats":{...}}              op stats
//	{"v":1, "result":{...}}             ops hold, release, retry, delete, bounce
//	{"v":1, "done":true}                end of a successful response
//	{"v":1, "error":"text"}             failure; nothing follows
//
// The JSON field names of Request, Response, Filter, MessageInfo, Detail,
// Stats and Result are the stable, documented schema; fields are only ever
// added. A request with an unknown "v" is refused.
package admin
