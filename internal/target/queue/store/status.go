package store

import "fmt"

// String renders the status as an SMTP reply line, e.g.
// "550 5.1.1 No such user".
func (s SMTPStatus) String() string {
	return fmt.Sprintf("%d %d.%d.%d %s", s.Code, s.Enhanced[0], s.Enhanced[1], s.Enhanced[2], s.Message)
}
