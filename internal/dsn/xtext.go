package dsn

import (
	"fmt"
	"strconv"
	"strings"
	"unicode/utf8"
)

// DecodeXtext decodes RFC 3461 xtext ("+2B" -> "+").
//
// xtext consists of the printable ASCII characters "!" through "~" except
// "+" and "=", and of "+" followed by two upper-case hexadecimal digits that
// stand for one octet. Anything else (space, control characters, 8-bit
// octets, "=", a "+" not followed by two upper-case hex digits) is an error.
// The decoded string may contain any octet; the caller judges whether the
// result is acceptable for its use.
func DecodeXtext(s string) (string, error) {
	var b strings.Builder
	b.Grow(len(s))
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '+':
			if i+2 >= len(s) {
				return "", fmt.Errorf("dsn: malformed xtext: truncated hexchar at offset %d", i)
			}
			hi, ok1 := upperHexVal(s[i+1])
			lo, ok2 := upperHexVal(s[i+2])
			if !ok1 || !ok2 {
				return "", fmt.Errorf("dsn: malformed xtext: %q at offset %d is not \"+\" and two upper-case hex digits", s[i:i+3], i)
			}
			b.WriteByte(hi<<4 | lo)
			i += 2
		case c >= '!' && c <= '~' && c != '=':
			b.WriteByte(c)
		default:
			return "", fmt.Errorf("dsn: malformed xtext: character %q at offset %d is not allowed", c, i)
		}
	}
	return b.String(), nil
}

// EncodeXtext encodes s as RFC 3461 xtext: every octet outside "!".."~",
// and "+" and "=", becomes "+" and two upper-case hex digits. It works on
// octets, so a UTF-8 character becomes one hexchar per octet.
//
// go-smtp hands servers the ENVID parameter already decoded; pass it through
// EncodeXtext before putting it into Report.EnvelopeID.
func EncodeXtext(s string) string {
	var b strings.Builder
	b.Grow(len(s))
	const hex = "0123456789ABCDEF"
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c >= '!' && c <= '~' && c != '+' && c != '=' {
			b.WriteByte(c)
			continue
		}
		b.WriteByte('+')
		b.WriteByte(hex[c>>4])
		b.WriteByte(hex[c&0xF])
	}
	return b.String()
}

func upperHexVal(c byte) (byte, bool) {
	switch {
	case c >= '0' && c <= '9':
		return c - '0', true
	case c >= 'A' && c <= 'F':
		return c - 'A' + 10, true
	}
	return 0, false
}

// encodeUTF8AddrXtext renders addr in the utf-8-addr-xtext form of RFC 6533
// section 3, the form a "utf-8" address type takes in a 7-bit
// message/delivery-status part: QCHAR (printable ASCII except "+", "=" and
// "\") stays as it is, every other character becomes \x{HEX} with the
// code point in upper-case hex without leading zeros.
//
// The grammar has no form for U+000A..U+000F and U+001A..U+001F; callers
// remove control characters before encoding (see cleanAddress).
func encodeUTF8AddrXtext(addr string) string {
	var b strings.Builder
	b.Grow(len(addr))
	for _, r := range addr {
		if r >= '!' && r <= '~' && r != '+' && r != '=' && r != '\\' {
			b.WriteRune(r)
			continue
		}
		b.WriteString(`\x{`)
		b.WriteString(strings.ToUpper(strconv.FormatUint(uint64(r), 16)))
		b.WriteByte('}')
	}
	return b.String()
}

// isASCII reports whether s has only octets below 0x80.
func isASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] >= utf8.RuneSelf {
			return false
		}
	}
	return true
}
