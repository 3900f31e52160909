package tests

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/maddy-spool/spool/internal/testutils"
)

// metricsPendingInServer lists the metric families that the alert rules
// and the dashboard already use but that the server does not export yet
// (they are being added in parallel). The drift test tolerates the absence
// of these, and only these. Remove each entry once the server exports it;
// the test fails while an entry is listed that the scrape does contain.
var metricsPendingInServer = map[string]bool{}

// metricsOnlyWhen lists the metric families that have series only in some
// states, which the scrape of an idle server does not reach; the drift
// test tolerates their absence.
var metricsOnlyWhen = map[string]string{
	"maddy_spool_destination_suspended": "a destination is suspended as dead",
}

// upstreamLintExceptions are metric families of upstream maddy 0.8.1 that
// `promtool check metrics` flags (counters without the _total suffix).
// They are maddy's own names, which dashboards in the wild use, so Spool
// does not rename them; lint findings on them, and only on them, are
// ignored.
var upstreamLintExceptions = map[string]bool{
	"maddy_smtp_failed_commands":      true,
	"maddy_smtp_started_transactions": true,
}

// Files under docs/monitoring.
const (
	alertRulesFile = "spool-alerts.yml"
	alertTestsFile = "spool-alerts.test.yml"
	dashboardFile  = "spool-dashboard.json"
	runbookFile    = "README.md"
)

// requireTool returns the path of a Prometheus program. Outside CI a
// missing program skips the test; in CI (.ci/run sets CI and installs the
// Debian package prometheus) it is a failure.
func requireTool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err == nil {
		return p
	}
	msg := fmt.Sprintf("%s not found in PATH; it comes with the Debian package prometheus "+
		"(apt-get install prometheus), which .ci/run installs", name)
	if os.Getenv("CI") != "" {
		t.Fatal(msg)
	}
	t.Skip(msg + "; skipping outside CI")
	return ""
}

// monitoringPath returns the path of a file in docs/monitoring.
func monitoringPath(t *testing.T, name string) string {
	t.Helper()
	root, err := moduleRoot()
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Join(root, "docs", "monitoring", name)
}

func readMonitoringFile(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile(monitoringPath(t, name))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// runTool runs a program with stdin and returns its combined output.
func runTool(stdin []byte, name string, args ...string) (string, error) {
	cmd := exec.Command(name, args...)
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	out, err := cmd.CombinedOutput()
	return string(out), err
}

var (
	alertNameRe = regexp.MustCompile(`(?m)^\s*- alert: (\w+)\s*$`)
	// A unit test case: the alert name and what follows exp_alerts: on
	// the same line ("[]" for a case where the alert must not fire).
	alertCaseRe = regexp.MustCompile(`(?m)^\s*alertname: (\w+)\s*\n\s*exp_alerts:(.*)$`)
	runbookRe   = regexp.MustCompile(`(?m)^\s*runbook: "docs/monitoring/README\.md#(\w+)"\s*$`)
)

// TestAlertRules: the rules load in promtool, their unit tests pass, every
// alert has a case where it fires and one where it does not, and every
// alert has a runbook paragraph its annotation links to.
func TestAlertRules(t *testing.T) {
	t.Parallel()
	t.Run("promtool", func(t *testing.T) {
		promtool := requireTool(t, "promtool")
		if out, err := runTool(nil, promtool, "check", "rules", monitoringPath(t, alertRulesFile)); err != nil {
			t.Fatalf("promtool check rules %s: %v\n%s", alertRulesFile, err, out)
		}
		// promtool resolves rule_files relative to the test file.
		if out, err := runTool(nil, promtool, "test", "rules", monitoringPath(t, alertTestsFile)); err != nil {
			t.Fatalf("promtool test rules %s: %v\n%s", alertTestsFile, err, out)
		}
	})

	rules := readMonitoringFile(t, alertRulesFile)
	var alerts []string
	for _, m := range alertNameRe.FindAllStringSubmatch(rules, -1) {
		alerts = append(alerts, m[1])
	}
	if len(alerts) == 0 {
		t.Fatalf("no alerts found in %s", alertRulesFile)
	}

	firing, quiet := map[string]int{}, map[string]int{}
	for _, m := range alertCaseRe.FindAllStringSubmatch(readMonitoringFile(t, alertTestsFile), -1) {
		if strings.TrimSpace(m[2]) == "[]" {
			quiet[m[1]]++
		} else {
			firing[m[1]]++
		}
	}
	runbook := readMonitoringFile(t, runbookFile)
	for _, a := range alerts {
		if firing[a] == 0 {
			t.Errorf("alert %s has no unit test case where it fires", a)
		}
		if quiet[a] == 0 {
			t.Errorf("alert %s has no unit test case where it must not fire", a)
		}
		if !strings.Contains(runbook, "\n### "+a+"\n") {
			t.Errorf("%s has no runbook section \"### %s\"", runbookFile, a)
		}
	}

	// Each alert's runbook annotation points at its own section (GitHub
	// anchors are the lowercased heading).
	links := runbookRe.FindAllStringSubmatch(rules, -1)
	if len(links) != len(alerts) {
		t.Fatalf("%d runbook annotations for %d alerts", len(links), len(alerts))
	}
	for i, a := range alerts {
		if got, want := links[i][1], strings.ToLower(a); got != want {
			t.Errorf("alert %s links to runbook anchor #%s, want #%s", a, got, want)
		}
	}
}

// grafanaDashboard is the part of the dashboard JSON the tests look at.
type grafanaDashboard struct {
	Title      string `json:"title"`
	UID        string `json:"uid"`
	Templating struct {
		List []struct {
			Name       string          `json:"name"`
			Type       string          `json:"type"`
			Query      json.RawMessage `json:"query"`
			Datasource *grafanaDS      `json:"datasource"`
		} `json:"list"`
	} `json:"templating"`
	Panels []grafanaPanel `json:"panels"`
}

type grafanaDS struct {
	Type string `json:"type"`
	UID  string `json:"uid"`
}

type grafanaPanel struct {
	ID         int        `json:"id"`
	Type       string     `json:"type"`
	Title      string     `json:"title"`
	Datasource *grafanaDS `json:"datasource"`
	Targets    []struct {
		RefID      string     `json:"refId"`
		Expr       string     `json:"expr"`
		Datasource *grafanaDS `json:"datasource"`
	} `json:"targets"`
}

// dashboardQuery is one query of a dashboard panel.
type dashboardQuery struct {
	Panel string
	RefID string
	Expr  string
}

func loadDashboard(t *testing.T) (*grafanaDashboard, []dashboardQuery) {
	t.Helper()
	var d grafanaDashboard
	if err := json.Unmarshal([]byte(readMonitoringFile(t, dashboardFile)), &d); err != nil {
		t.Fatalf("%s: %v", dashboardFile, err)
	}
	var qs []dashboardQuery
	for _, p := range d.Panels {
		for _, tg := range p.Targets {
			qs = append(qs, dashboardQuery{Panel: p.Title, RefID: tg.RefID, Expr: tg.Expr})
		}
	}
	return &d, qs
}

// expandDashboardVars replaces Grafana's variables in a query with values
// Prometheus accepts, matching the module (and instance) given.
func expandDashboardVars(expr, module string) string {
	return strings.NewReplacer(
		"$__rate_interval", "1m",
		"$__range", "1h",
		"$module", module,
		"$instance", ".*",
	).Replace(expr)
}

const datasourceRef = "${datasource}"

// spoolSelectorRe finds a Spool metric name with its label matchers.
var spoolSelectorRe = regexp.MustCompile(`maddy_spool_\w+(\{[^}]*\})?`)

// TestDashboard: the dashboard is importable as a template (datasource
// and module variables, every query on the datasource variable and
// filtered by module) and every query is valid PromQL to promtool.
func TestDashboard(t *testing.T) {
	t.Parallel()
	d, queries := loadDashboard(t)
	if d.Title == "" || d.UID == "" {
		t.Errorf("dashboard title %q, uid %q: both must be set", d.Title, d.UID)
	}

	vars := map[string]string{}
	for _, v := range d.Templating.List {
		vars[v.Name] = v.Type
		if v.Type == "query" && (v.Datasource == nil || v.Datasource.UID != datasourceRef) {
			t.Errorf("variable %s does not query the datasource variable (%+v)", v.Name, v.Datasource)
		}
	}
	if vars["datasource"] != "datasource" {
		t.Errorf("no variable \"datasource\" of type datasource (variables: %v)", vars)
	}
	if vars["module"] != "query" {
		t.Errorf("no query variable \"module\" (variables: %v)", vars)
	}

	ids := map[int]string{}
	for _, p := range d.Panels {
		if prev, dup := ids[p.ID]; dup {
			t.Errorf("panels %q and %q share id %d", prev, p.Title, p.ID)
		}
		ids[p.ID] = p.Title
		if p.Type == "row" {
			continue
		}
		if p.Datasource == nil || p.Datasource.UID != datasourceRef {
			t.Errorf("panel %q: datasource %+v, want uid %s", p.Title, p.Datasource, datasourceRef)
		}
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no queries", p.Title)
		}
		for _, tg := range p.Targets {
			if tg.Datasource == nil || tg.Datasource.UID != datasourceRef {
				t.Errorf("panel %q query %s: datasource %+v, want uid %s", p.Title, tg.RefID, tg.Datasource, datasourceRef)
			}
		}
	}
	for _, q := range queries {
		for _, sel := range spoolSelectorRe.FindAllString(q.Expr, -1) {
			if !strings.Contains(sel, `module=~"$module"`) {
				t.Errorf("panel %q query %s: %s is not filtered by the module variable", q.Panel, q.RefID, sel)
			}
		}
	}

	// promtool parses every query as a recording rule. JSON is YAML, so
	// the rule file is written with encoding/json.
	promtool := requireTool(t, "promtool")
	type rule struct {
		Record string `json:"record"`
		Expr   string `json:"expr"`
	}
	var rules []rule
	for i, q := range queries {
		rules = append(rules, rule{Record: fmt.Sprintf("dashboard:query_%d", i), Expr: expandDashboardVars(q.Expr, ".*")})
	}
	file := map[string]any{"groups": []any{map[string]any{"name": "dashboard", "rules": rules}}}
	b, err := json.Marshal(file)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "dashboard-queries.yml")
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := runTool(nil, promtool, "check", "rules", path); err != nil {
		t.Fatalf("promtool check rules on the dashboard's queries: %v\n%s", err, out)
	}
}

// metricNameRe finds the maddy metric names in PromQL, rule files and
// dashboard queries. Names only: maddy's metrics all start with maddy_,
// and the files use no other metric but `up`.
var metricNameRe = regexp.MustCompile(`\bmaddy_\w+`)

// familyOf maps a series name to its metric family (a histogram's
// _bucket, _sum and _count series belong to the histogram).
func familyOf(name string, families map[string]bool) string {
	for _, suffix := range []string{"_bucket", "_sum", "_count"} {
		if base, ok := strings.CutSuffix(name, suffix); ok && families[base] {
			return base
		}
	}
	return name
}

// usedMetricNames returns the maddy metric names in the rules and the
// dashboard queries, each with where it is used.
func usedMetricNames(t *testing.T) map[string][]string {
	t.Helper()
	used := map[string][]string{}
	for _, n := range metricNameRe.FindAllString(readMonitoringFile(t, alertRulesFile), -1) {
		used[n] = appendOnce(used[n], alertRulesFile)
	}
	_, queries := loadDashboard(t)
	for _, q := range queries {
		for _, n := range metricNameRe.FindAllString(q.Expr, -1) {
			used[n] = appendOnce(used[n], fmt.Sprintf("%s panel %q", dashboardFile, q.Panel))
		}
	}
	return used
}

func appendOnce(list []string, s string) []string {
	for _, x := range list {
		if x == s {
			return list
		}
	}
	return append(list, s)
}

// scrapeText fetches the metrics endpoint's exposition as served.
func scrapeText(url string) ([]byte, error) {
	resp, err := metricsClient.Get(url)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return io.ReadAll(resp.Body)
}

// largeBody is bigger than the 64 KiB the store keeps inline in queue.db,
// so the message's content goes to a file in bodies/.
var largeBody = strings.Repeat("0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ\r\n", 1200)

// TestMetricsScrape drives a real server through every event the Spool
// metrics count (delivery, deferral, bounce, a report to the null sender,
// a damaged entry, a failed enqueue), then checks its metrics endpoint
// with `promtool check metrics` and against the names the rules and the
// dashboard use.
func TestMetricsScrape(t *testing.T) {
	t.Parallel()

	const (
		okRcpt    = "ok@remote.test"
		badRcpt   = "bad@remote.test"   // 550 at RCPT: bounced
		laterRcpt = "later@remote.test" // 451 at RCPT, always: stays queued
		from      = "sender@origin.test"
	)
	sink := newSink(t, testutils.WithScript(testutils.SinkRcptReplies(map[string]*smtp.SMTPError{
		badRcpt:   testutils.SinkReply(550, [3]int{5, 1, 1}, "No such user"),
		laterRcpt: testutils.SinkReply(451, [3]int{4, 4, 1}, "Try again later"),
	})))
	e := newEnv(t, sink, func(p *params) { p.MaxTries = "1000" })

	// Delivered, permanent failure and a failure DSN to the sender.
	if err := submit(t, e.smtpAddr(), from, []string{okRcpt, badRcpt}, msgID(t, 1)); err != nil {
		t.Fatal(err)
	}
	// A bounce of a bounce is never sent: dsn_not_sent{reason=null_sender}.
	if err := submit(t, e.smtpAddr(), "", []string{badRcpt}, msgID(t, 2)); err != nil {
		t.Fatal(err)
	}
	// Deferred again and again, with its content in bodies/.
	if err := submitData(e.smtpAddr(), from, []string{laterRcpt}, newMessage(from, []string{laterRcpt}, msgID(t, 3), largeBody)); err != nil {
		t.Fatal(err)
	}
	e.waitMetric("maddy_spool_attempts_total", atLeast(1), "result", "delivered")
	e.waitMetric("maddy_spool_attempts_total", atLeast(2), "result", "permanent")
	e.waitMetric("maddy_spool_attempts_total", atLeast(1), "result", "temporary")
	e.waitMetric("maddy_spool_dsn_generated_total", eq(1), "action", "failed")
	e.waitMetric("maddy_spool_dsn_not_sent_total", eq(1), "reason", "null_sender")

	// Outside damage: the deferred message's content file disappears, so
	// its next attempt finds the entry corrupt and quarantines it.
	bodies := filepath.Join(e.queueDir(), "bodies")
	files, err := os.ReadDir(bodies)
	if err != nil {
		t.Fatal(err)
	}
	if len(files) != 1 {
		t.Fatalf("%s holds %d files, want the deferred message's content only", bodies, len(files))
	}
	if err := os.Remove(filepath.Join(bodies, files[0].Name())); err != nil {
		t.Fatal(err)
	}
	e.waitMetric("maddy_spool_quarantined_total", eq(1))
	e.waitMetric("maddy_spool_messages_queued", eq(0))

	// bodies/ turned into a plain file: a large message cannot be stored
	// (permissions would not stop root), so it is refused with 451.
	if err := os.Remove(bodies); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bodies, []byte("not a directory\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	err = submitData(e.smtpAddr(), from, []string{okRcpt}, newMessage(from, []string{okRcpt}, msgID(t, 4), largeBody))
	var smtpErr *smtp.SMTPError
	if !errors.As(err, &smtpErr) || smtpErr.Code != 451 {
		t.Fatalf("submitting with bodies/ not a directory: %v, want a 451 reply", err)
	}
	e.waitMetric("maddy_spool_enqueue_failures_total", eq(1))

	text, err := scrapeText(e.metricsURL())
	if err != nil {
		t.Fatal(err)
	}

	t.Run("promtool check metrics", func(t *testing.T) {
		promtool := requireTool(t, "promtool")
		out, err := runTool(text, promtool, "check", "metrics")
		var problems []string
		for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
			if line == "" {
				continue
			}
			if f := strings.Fields(line); upstreamLintExceptions[f[0]] {
				t.Logf("ignored (upstream maddy metric): %s", line)
				continue
			}
			problems = append(problems, line)
		}
		if len(problems) > 0 {
			t.Errorf("promtool check metrics: %v\n%s", err, strings.Join(problems, "\n"))
		} else if err != nil && !isExitCode(err, 3) {
			// Exit code 3 means lint findings only, all of them ignored above.
			t.Errorf("promtool check metrics: %v\n%s", err, out)
		}
	})

	fams, err := parseExposition(text)
	if err != nil {
		t.Fatal(err)
	}
	used := usedMetricNames(t)

	t.Run("rules and dashboard use exported metrics", func(t *testing.T) {
		if len(used) == 0 {
			t.Fatal("found no maddy metric names in the rules and the dashboard")
		}
		names := sortedKeys(used)
		for _, n := range names {
			fam := familyOf(n, fams)
			switch {
			case fams[fam] && metricsPendingInServer[fam]:
				t.Errorf("%s is exported now: remove it from metricsPendingInServer", fam)
			case !fams[fam] && metricsOnlyWhen[fam] != "":
				t.Logf("%s is exported only while %s", fam, metricsOnlyWhen[fam])
			case !fams[fam] && !metricsPendingInServer[fam]:
				t.Errorf("%s is used by %s but the server does not export it", n, strings.Join(used[n], ", "))
			}
		}
	})

	t.Run("dashboard shows every Spool metric", func(t *testing.T) {
		_, queries := loadDashboard(t)
		shown := map[string]bool{}
		for _, q := range queries {
			for _, n := range metricNameRe.FindAllString(q.Expr, -1) {
				shown[familyOf(n, fams)] = true
			}
		}
		for _, fam := range sortedKeys(fams) {
			if strings.HasPrefix(fam, "maddy_spool_") && !shown[fam] {
				t.Errorf("the server exports %s but no dashboard panel shows it", fam)
			}
		}
	})
}

// parseExposition returns the metric family names in a text exposition.
func parseExposition(text []byte) (map[string]bool, error) {
	fams := map[string]bool{}
	for _, line := range strings.Split(string(text), "\n") {
		// Every family has a TYPE line, the only reliable source of the
		// family name (series of a histogram carry suffixes).
		if rest, ok := strings.CutPrefix(line, "# TYPE "); ok {
			f := strings.Fields(rest)
			if len(f) != 2 {
				return nil, fmt.Errorf("malformed TYPE line %q", line)
			}
			fams[f[0]] = true
		}
	}
	if len(fams) == 0 {
		return nil, errors.New("no metric families in the scrape")
	}
	return fams, nil
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// TestPrometheusScrapesQueue: a real Prometheus server scrapes the running
// binary every second with the alert rules loaded; messages held back by a
// next hop answering 451 show up as maddy_spool_messages_queued through
// Prometheus's query API, every rule evaluates without error, and every
// dashboard query runs.
func TestPrometheusScrapesQueue(t *testing.T) {
	t.Parallel()
	prometheusBin := requireTool(t, "prometheus")

	sink := newSink(t, testutils.WithScript(func(stage, _, _ string, _ int) *smtp.SMTPError {
		if stage == testutils.StageRCPT {
			return testutils.SinkReply(451, [3]int{4, 4, 1}, "Try again later")
		}
		return nil
	}))
	// Enough tries that nothing gives up while the test runs.
	e := newEnv(t, sink, func(p *params) { p.MaxTries = "1000" })

	const queued = 3
	rcpts := []string{"alice@remote.test", "bob@remote.test"}
	for i := 1; i <= queued; i++ {
		if err := submit(t, e.smtpAddr(), "sender@origin.test", rcpts, msgID(t, i)); err != nil {
			t.Fatal(err)
		}
	}

	prom := startPrometheus(t, prometheusBin, fmt.Sprintf("127.0.0.1:%d", e.p.MetricsPort), monitoringPath(t, alertRulesFile))

	query := `maddy_spool_messages_queued{job="maddy",module="outq"}`
	pollUntil(t, "Prometheus query "+query+" returns "+strconv.Itoa(queued), func() (bool, string) {
		res, err := prom.query(query)
		return err == nil && len(res) == 1 && res[0].value == strconv.Itoa(queued), fmt.Sprintf("%+v (err %v)", res, err)
	})
	if res, err := prom.query(`maddy_spool_recipients_queued{job="maddy",module="outq"}`); err != nil || len(res) != 1 || res[0].value != strconv.Itoa(queued*len(rcpts)) {
		t.Errorf("maddy_spool_recipients_queued through Prometheus: %+v (err %v), want %d", res, err, queued*len(rcpts))
	}

	// The rules have been evaluated on real data at least once (they run
	// every second): none failed.
	prom.waitRulesEvaluated(t)

	// The dashboard's queries run on the real data; the queue size
	// panel's sum shows the queued messages.
	_, queries := loadDashboard(t)
	for _, q := range queries {
		if _, err := prom.query(expandDashboardVars(q.Expr, "outq")); err != nil {
			t.Errorf("dashboard panel %q query %s: %v", q.Panel, q.RefID, err)
		}
	}
	total := `sum(maddy_spool_messages_queued{module=~"$module", instance=~"$instance"})`
	found := false
	for _, q := range queries {
		if q.Expr != total {
			continue
		}
		found = true
		res, err := prom.query(expandDashboardVars(q.Expr, "outq"))
		if err != nil || len(res) != 1 || res[0].value != strconv.Itoa(queued) {
			t.Errorf("dashboard panel %q: %+v (err %v), want %d", q.Panel, res, err, queued)
		}
	}
	if !found {
		t.Errorf("no dashboard query %s", total)
	}
}

// prometheusServer is a Prometheus process started by startPrometheus.
type prometheusServer struct {
	base string // http://127.0.0.1:PORT
}

// startPrometheus runs Prometheus on a free loopback port with its own
// storage, scraping target every second and evaluating ruleFile every
// second, and waits until it is ready. It retries with another port if the
// chosen one was taken meanwhile.
func startPrometheus(t *testing.T, bin, target, ruleFile string) *prometheusServer {
	t.Helper()
	dir := t.TempDir()
	cfg := filepath.Join(dir, "prometheus.yml")
	conf := fmt.Sprintf(`global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - %q
scrape_configs:
  - job_name: maddy
    static_configs:
      - targets: [%q]
`, ruleFile, target)
	if err := os.WriteFile(cfg, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	for try := 1; ; try++ {
		port := freePorts(t, 1)[0]
		srv := &prometheusServer{base: fmt.Sprintf("http://127.0.0.1:%d", port)}
		logPath := filepath.Join(dir, fmt.Sprintf("prometheus-%d.log", try))
		logf, err := os.Create(logPath)
		if err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command(bin,
			"--config.file="+cfg,
			"--storage.tsdb.path="+filepath.Join(dir, fmt.Sprintf("data-%d", try)),
			fmt.Sprintf("--web.listen-address=127.0.0.1:%d", port),
		)
		cmd.Stdout, cmd.Stderr = logf, logf
		if err := cmd.Start(); err != nil {
			logf.Close()
			t.Fatal(err)
		}
		exited := make(chan struct{})
		go func() {
			_ = cmd.Wait()
			logf.Close()
			close(exited)
		}()
		stop := func() {
			_ = cmd.Process.Kill()
			<-exited
		}
		t.Cleanup(func() {
			stop()
			if t.Failed() {
				b, _ := os.ReadFile(logPath)
				t.Logf("prometheus log %s:\n%s", logPath, tailLines(string(b), 40))
			}
		})

		ready := pollFor(waitTimeout, func() bool {
			select {
			case <-exited:
				return true // give up: it will not become ready
			default:
			}
			resp, err := metricsClient.Get(srv.base + "/-/ready")
			if err != nil {
				return false
			}
			resp.Body.Close()
			return resp.StatusCode == http.StatusOK
		})
		select {
		case <-exited:
			ready = false
		default:
		}
		if ready {
			return srv
		}
		stop()
		b, _ := os.ReadFile(logPath)
		if try < 3 && strings.Contains(string(b), "address already in use") {
			t.Logf("port %d taken, retrying with another", port)
			continue
		}
		t.Fatalf("prometheus did not become ready within %v; log:\n%s", waitTimeout, tailLines(string(b), 40))
	}
}

func tailLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// promSample is one series of an instant query's result.
type promSample struct {
	labels map[string]string
	value  string
}

// apiGet calls an endpoint of Prometheus's HTTP API and decodes its data.
func (p *prometheusServer) apiGet(path string, params url.Values, data any) error {
	u := p.base + path
	if params != nil {
		u += "?" + params.Encode()
	}
	resp, err := metricsClient.Get(u)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	var body struct {
		Status string          `json:"status"`
		Error  string          `json:"error"`
		Data   json.RawMessage `json:"data"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
		return fmt.Errorf("GET %s: %s: %w", u, resp.Status, err)
	}
	if body.Status != "success" {
		return fmt.Errorf("GET %s: %s: %s", u, resp.Status, body.Error)
	}
	return json.Unmarshal(body.Data, data)
}

// query runs an instant query through /api/v1/query and returns the
// result vector (a scalar result comes back as one sample without labels).
func (p *prometheusServer) query(q string) ([]promSample, error) {
	var data struct {
		ResultType string          `json:"resultType"`
		Result     json.RawMessage `json:"result"`
	}
	if err := p.apiGet("/api/v1/query", url.Values{"query": {q}}, &data); err != nil {
		return nil, err
	}
	switch data.ResultType {
	case "vector":
		var vec []struct {
			Metric map[string]string `json:"metric"`
			Value  [2]any            `json:"value"`
		}
		if err := json.Unmarshal(data.Result, &vec); err != nil {
			return nil, err
		}
		out := make([]promSample, len(vec))
		for i, s := range vec {
			v, _ := s.Value[1].(string)
			out[i] = promSample{labels: s.Metric, value: v}
		}
		return out, nil
	case "scalar":
		var s [2]any
		if err := json.Unmarshal(data.Result, &s); err != nil {
			return nil, err
		}
		v, _ := s[1].(string)
		return []promSample{{value: v}}, nil
	default:
		return nil, fmt.Errorf("query %s: unexpected result type %q", q, data.ResultType)
	}
}

// waitRulesEvaluated waits until Prometheus has evaluated every alert rule
// of the rules file on scraped data, and fails the test if any evaluation
// failed.
func (p *prometheusServer) waitRulesEvaluated(t *testing.T) {
	t.Helper()
	type ruleState struct {
		Name           string `json:"name"`
		Health         string `json:"health"`
		LastError      string `json:"lastError"`
		LastEvaluation string `json:"lastEvaluation"`
	}
	var data struct {
		Groups []struct {
			Name  string      `json:"name"`
			Rules []ruleState `json:"rules"`
		} `json:"groups"`
	}
	want := len(alertNameRe.FindAllString(readMonitoringFile(t, alertRulesFile), -1))
	// Evaluations after this moment saw data: the queue gauge was already
	// in Prometheus.
	since := time.Now()
	var rules []ruleState
	pollUntil(t, fmt.Sprintf("all %d alert rules evaluated", want), func() (bool, string) {
		data.Groups = nil
		err := p.apiGet("/api/v1/rules", nil, &data)
		rules = rules[:0]
		evaluated := 0
		for _, g := range data.Groups {
			for _, r := range g.Rules {
				rules = append(rules, r)
				if ts, perr := time.Parse(time.RFC3339Nano, r.LastEvaluation); perr == nil && ts.After(since) {
					evaluated++
				}
			}
		}
		return err == nil && len(rules) == want && evaluated == want, fmt.Sprintf("%+v (err %v)", rules, err)
	})
	for _, r := range rules {
		if r.Health != "ok" || r.LastError != "" {
			t.Errorf("rule %s: health %q, error %q", r.Name, r.Health, r.LastError)
		}
	}
}

// pollFor checks cond every 50ms until it holds or timeout passes, and
// reports whether it held. For conditions of other processes only.
func pollFor(timeout time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(timeout)
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		<-tick.C
	}
	return true
}

// pollUntil waits up to waitTimeout for cond to hold, failing the test
// with what and cond's last description of the state if it does not.
func pollUntil(t *testing.T, what string, cond func() (ok bool, state string)) {
	t.Helper()
	var last string
	if !pollFor(waitTimeout, func() bool {
		ok, state := cond()
		last = state
		return ok
	}) {
		t.Fatalf("waiting for %s: not within %v; last state: %s", what, waitTimeout, last)
	}
}

func isExitCode(err error, code int) bool {
	var ee *exec.ExitError
	return errors.As(err, &ee) && ee.ExitCode() == code
}
