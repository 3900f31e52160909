package bench

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// MemStatus is what /proc/PID/status says about a process's memory, in
// bytes.
type MemStatus struct {
	RSS     int64 // VmRSS: resident memory, anonymous and file-backed
	RSSAnon int64 // RssAnon: resident anonymous memory (heap, stacks)
	HWM     int64 // VmHWM: peak RSS
}

// ReadMemStatus reads /proc/PID/status ("self" for this process).
func ReadMemStatus(pid string) (MemStatus, error) {
	f, err := os.Open("/proc/" + pid + "/status")
	if err != nil {
		return MemStatus{}, err
	}
	defer f.Close()
	var m MemStatus
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		key, val, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		var dst *int64
		switch key {
		case "VmRSS":
			dst = &m.RSS
		case "RssAnon":
			dst = &m.RSSAnon
		case "VmHWM":
			dst = &m.HWM
		default:
			continue
		}
		fields := strings.Fields(val)
		if len(fields) != 2 || fields[1] != "kB" {
			return m, fmt.Errorf("unexpected %s line %q", key, sc.Text())
		}
		kb, err := strconv.ParseInt(fields[0], 10, 64)
		if err != nil {
			return m, err
		}
		*dst = kb * 1024
	}
	return m, sc.Err()
}

// clockTicks is USER_HZ, the unit of utime and stime in /proc/PID/stat; it
// is 100 on every Linux architecture Go supports.
const clockTicks = 100

// ReadCPUTime returns user and system CPU time of process pid from
// /proc/PID/stat.
func ReadCPUTime(pid int) (user, system time.Duration, err error) {
	st, err := readProcStat(pid)
	return st.user, st.system, err
}

// procStat is what this package reads from /proc/PID/stat.
type procStat struct {
	ppid int
	// user and system are the process's own CPU time; childUser and
	// childSystem those of its children it has waited for.
	user, system, childUser, childSystem time.Duration
}

func readProcStat(pid int) (procStat, error) {
	var st procStat
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return st, err
	}
	// The command name is in parentheses and may contain spaces; fields
	// are counted after its closing parenthesis.
	s := string(data)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return st, fmt.Errorf("unexpected /proc/%d/stat: %q", pid, s)
	}
	fields := strings.Fields(s[i+1:])
	// fields[0] is field 3 (state); ppid is field 4, utime field 14,
	// stime 15, cutime 16, cstime 17.
	if len(fields) < 15 {
		return st, fmt.Errorf("short /proc/%d/stat: %q", pid, s)
	}
	var v [5]int64
	for k, f := range []int{1, 11, 12, 13, 14} {
		if v[k], err = strconv.ParseInt(fields[f], 10, 64); err != nil {
			return st, fmt.Errorf("unexpected /proc/%d/stat: %q", pid, s)
		}
	}
	tick := time.Second / clockTicks
	st.ppid = int(v[0])
	st.user, st.system = time.Duration(v[1])*tick, time.Duration(v[2])*tick
	st.childUser, st.childSystem = time.Duration(v[3])*tick, time.Duration(v[4])*tick
	return st, nil
}

// TreeCPU is the CPU time (user plus system) of process pid, of its
// children running now, and of those that ended and were waited for: the
// whole of a server that forks a process per connection, as PostgreSQL
// does. Grandchildren are not counted.
func TreeCPU(pid int) (time.Duration, error) {
	root, err := readProcStat(pid)
	if err != nil {
		return 0, err
	}
	total := root.user + root.system + root.childUser + root.childSystem
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return 0, err
	}
	for _, e := range ents {
		child, err := strconv.Atoi(e.Name())
		if err != nil || child == pid {
			continue
		}
		st, err := readProcStat(child)
		if err != nil || st.ppid != pid {
			continue // gone meanwhile, or not a child
		}
		total += st.user + st.system
	}
	return total, nil
}

// SelfCPU is this process's CPU time, user plus system.
func SelfCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
