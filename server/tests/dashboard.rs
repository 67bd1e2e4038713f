//! The dashboard end to end in real headless Chromium, driven over the
//! WebDriver protocol (chromedriver) by a small client written here. Attacks
//! are ingested through the real ingest path; the test checks what the page
//! draws (the chart's bars and their values after a reload, slot usage, the
//! host map), searches an address and reads the decision's "why", unblocks
//! with a confirmation (cancel keeps the block, accept removes it, both
//! checked through the API), and checks that a read token gets no write
//! controls. It saves a screenshot of every page as PNG under
//! `<target>/dashboard-screenshots/` (`$CARGO_TARGET_DIR` or the workspace's
//! `target/`), at 1280 px and at phone width.
//!
//! Needs the Debian packages `chromium` and `chromium-driver`; without them
//! the test fails and says so.

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use fleetban_proto::v1::{Event, EventBatch, EventKind, Service};
use fleetban_server::blocks::{self, BlockSource, NewBlock};
use fleetban_server::correlate::CorrelateConfig;
use fleetban_server::ingest::Ingest;
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";
const WAIT: Duration = Duration::from_secs(20);

fn find_binary(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in names {
        for dir in std::env::split_paths(&path).chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/lib/chromium")]) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    None
}

/// A chromedriver process, killed on drop.
struct Driver {
    child: tokio::process::Child,
    url: String,
}

impl Driver {
    async fn start() -> Driver {
        let missing = "headless Chromium is needed for the dashboard test: install the Debian packages \
                       `chromium` and `chromium-driver` (apt-get install -y chromium chromium-driver)";
        let chromedriver =
            find_binary(&["chromedriver"]).unwrap_or_else(|| panic!("chromedriver not found; {missing}"));
        find_binary(&["chromium", "chromium-browser"]).unwrap_or_else(|| panic!("chromium not found; {missing}"));
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = tokio::process::Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .process_group(0)
            .spawn()
            .expect("start chromedriver");
        let url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(r) = http.get(format!("{url}/status")).send().await
                && let Ok(v) = r.json::<Value>().await
                && v["value"]["ready"] == true
            {
                break;
            }
            assert!(Instant::now() < deadline, "chromedriver did not become ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Driver { child, url }
    }
}

impl Drop for Driver {
    /// Kills chromedriver and every Chromium process it started (they share
    /// its process group), even when the test failed half-way.
    fn drop(&mut self) {
        if let Some(pid) = self.child.id().and_then(|pid| i32::try_from(pid).ok()) {
            // SAFETY: kill(2) with a negative pid signals that process group;
            // it is ours, created by `process_group(0)` above.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
        let _ = self.child.start_kill();
    }
}

/// A WebDriver session: the handful of calls the test needs.
struct Browser {
    http: reqwest::Client,
    base: String,
}

impl Browser {
    async fn new(driver: &Driver, profile: &std::path::Path) -> Browser {
        let binary = find_binary(&["chromium", "chromium-browser"]).unwrap();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": binary,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    format!("--user-data-dir={}", profile.display()),
                ]
            }
        }}});
        let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
        let reply: Value =
            http.post(format!("{}/session", driver.url)).json(&caps).send().await.unwrap().json().await.unwrap();
        let id = reply["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no WebDriver session: {reply}"));
        Browser { http, base: format!("{}/session/{id}", driver.url) }
    }

    /// Sets the window's outer size, pixels.
    async fn resize(&self, width: u32, height: u32) {
        self.call(reqwest::Method::POST, "/window/rect", json!({"width": width, "height": height})).await;
    }

    /// Saves a PNG of the viewport as `<target>/dashboard-screenshots/<name>.png`.
    async fn screenshot(&self, name: &str) -> PathBuf {
        let encoded = self.call(reqwest::Method::GET, "/screenshot", Value::Null).await;
        let png = base64_decode(encoded.as_str().unwrap_or_default());
        assert!(png.starts_with(b"\x89PNG"), "the screenshot of {name} is not a PNG");
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        path
    }

    /// Waits until `script` (a function body) returns `true`; a script
    /// that fails (the page is being replaced) counts as `false`.
    async fn wait_until(&self, script: &str, what: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            let body = json!({"script": script, "args": []});
            if self.try_call(reqwest::Method::POST, "/execute/sync", body).await == Ok(json!(true)) {
                return;
            }
            if Instant::now() >= deadline {
                let status = self.script("return document.getElementById('status').textContent;").await;
                panic!("{what}: not within {WAIT:?} (status line: {status})");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Reloads the page and waits until the new one is complete.
    async fn reload(&self) {
        self.script("window.fleetbanBeforeReload = true; setTimeout(() => location.reload(), 0);").await;
        self.wait_until("return window.fleetbanBeforeReload !== true && document.readyState === 'complete';", "reload")
            .await;
    }

    /// Navigates to `#/<page>` and waits until the page drew its data.
    async fn page(&self, page: &str) {
        self.script(&format!(
            "const c = document.getElementById('content'); delete c.dataset.loaded; \
             if (location.hash === '#/{page}') window.dispatchEvent(new HashChangeEvent('hashchange')); \
             else location.hash = '#/{page}';"
        ))
        .await;
        let view = page.split('/').next().unwrap_or(page);
        self.wait_until(
            &format!("return document.getElementById('content').dataset.loaded === '{view}';"),
            &format!("page {page} loaded"),
        )
        .await;
    }

    async fn try_call(&self, method: reqwest::Method, path: &str, body: Value) -> Result<Value, String> {
        let request = self.http.request(method, format!("{}{path}", self.base));
        let request = if body.is_null() { request } else { request.json(&body) };
        let reply: Value = request.send().await.unwrap().json().await.unwrap();
        match reply["value"]["error"].as_str() {
            Some(error) => Err(format!("WebDriver {path}: {error}: {}", reply["value"]["message"])),
            None => Ok(reply["value"].clone()),
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        self.try_call(method, path, body).await.unwrap_or_else(|error| panic!("{error}"))
    }

    async fn navigate(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", json!({ "url": url })).await;
    }

    /// Waits until an element matching `css` exists.
    async fn wait_for(&self, css: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let reply: Value = self
                .http
                .post(format!("{}/elements", self.base))
                .json(&json!({"using": "css selector", "value": css}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if let Some(id) = reply["value"].as_array().and_then(|a| a.first()).and_then(|e| e[ELEMENT_KEY].as_str()) {
                return id.to_owned();
            }
            if Instant::now() >= deadline {
                let url = self.call(reqwest::Method::GET, "/url", Value::Null).await;
                let source = self.call(reqwest::Method::GET, "/source", Value::Null).await;
                let source: String = source.as_str().unwrap_or_default().chars().take(2000).collect();
                panic!("no element {css} within {WAIT:?} at {url} ({reply}); page source: {source}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn send_keys(&self, element: &str, text: &str) {
        self.call(reqwest::Method::POST, &format!("/element/{element}/value"), json!({ "text": text })).await;
    }

    /// Clicks the element `css`, found afresh (retried if it went stale).
    async fn click(&self, css: &str) {
        loop {
            let element = self.wait_for(css).await;
            match self.try_call(reqwest::Method::POST, &format!("/element/{element}/click"), json!({})).await {
                Ok(_) => return,
                Err(error) if error.contains("stale element") => continue,
                Err(error) => panic!("{error}"),
            }
        }
    }

    /// The text of the element `css`, found afresh: the dashboard replaces
    /// its table bodies on every refresh, so an element found earlier may be
    /// stale by the time its text is read; that read is retried.
    async fn text_of(&self, css: &str) -> String {
        loop {
            let element = self.wait_for(css).await;
            match self.try_call(reqwest::Method::GET, &format!("/element/{element}/text"), Value::Null).await {
                Ok(text) => return text.as_str().unwrap_or_default().to_owned(),
                Err(error) if error.contains("stale element") => continue,
                Err(error) => panic!("{error}"),
            }
        }
    }

    /// Waits until the text of `css` contains `needle`.
    async fn wait_text(&self, css: &str, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let text = self.text_of(css).await;
            if text.contains(needle) {
                return text;
            }
            assert!(Instant::now() < deadline, "{css} never showed {needle:?}; last text: {text}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn script(&self, script: &str) -> Value {
        self.call(reqwest::Method::POST, "/execute/sync", json!({"script": script, "args": []})).await
    }

    async fn quit(self) {
        let _ = self.http.delete(&self.base).send().await;
    }
}

/// `<target>/dashboard-screenshots`: `$CARGO_TARGET_DIR` if set, else the
/// workspace's `target/`.
fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("dashboard-screenshots")
}

/// Standard base64 (WebDriver screenshots), padding and whitespace ignored.
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let (mut out, mut acc, mut bits) = (Vec::with_capacity(text.len() * 3 / 4), 0u32, 0);
    for v in text.bytes().filter_map(value) {
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

fn event(kind: EventKind, remote: &str, minutes_ago: i64, count: u32, raw: &str) -> Event {
    let now_ms = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
    Event {
        time_ms: now_ms - minutes_ago * 60_000,
        kind: kind as i32,
        remote: Some(remote.parse::<std::net::IpAddr>().unwrap().into()),
        remote_port: 40000,
        local_port: 25,
        connection_count: count,
        raw: raw.to_owned(),
        ..Default::default()
    }
}

/// An overnight attack on two hosts, through the real ingest path:
/// 203.0.113.66 fails logins on both (6 + 3 over SMTP, then 1 over IMAP
/// on the second, a Dovecot line), 203.0.113.67 probes
/// recipients on one (4); mx-dash-1 fills its 100 slots and refuses; a
/// legitimate sender connects and delivers (context, never abuse).
async fn seed_overnight(pool: &PgPool, mx1: Uuid, mx2: Uuid) {
    let ingest = Ingest::new(pool.clone());
    let auth = |ip: &str| {
        format!(
            "dovecot_login authenticator failed for (x) [{ip}]:41000: 535 Incorrect authentication data (set_id=info)"
        )
    };
    let mut one = Vec::new();
    for i in 0..6 {
        one.push(event(EventKind::AuthFailed, "203.0.113.66", 40 - i, 0, &auth("203.0.113.66")));
    }
    for i in 0..4 {
        one.push(event(EventKind::RcptRejected, "203.0.113.67", 20 - i, 0, "F=<> rejected RCPT <nobody@example.org>"));
    }
    for (i, count) in [60, 85, 100].into_iter().enumerate() {
        one.push(event(
            EventKind::Connect,
            "198.51.100.9",
            15 - i as i64,
            count,
            "SMTP connection from [198.51.100.9]",
        ));
    }
    one.push(event(EventKind::RefusedTooMany, "198.51.100.10", 13, 0, "refused: too many connections"));
    one.push(event(EventKind::Accepted, "198.51.100.9", 12, 0, "<= sender@example.com H=(mail) [198.51.100.9]"));
    let mut two = Vec::new();
    for i in 0..3 {
        two.push(event(EventKind::AuthFailed, "203.0.113.66", 38 - i, 0, &auth("203.0.113.66")));
    }
    two.push(Event {
        service: Service::Imap as i32,
        local_port: 143,
        ..event(
            EventKind::AuthFailed,
            "203.0.113.66",
            30,
            0,
            "imap-login: Disconnected (auth failed, 1 attempts in 2 secs): user=<alice>, method=PLAIN, \
             rip=203.0.113.66, lip=192.0.2.22, session=<k3Xq2bFv>",
        )
    });
    two.push(event(EventKind::Connect, "198.51.100.9", 10, 20, "SMTP connection from [198.51.100.9]"));
    for (agent, events) in [(mx1, one), (mx2, two)] {
        let outcome =
            ingest.store(agent, EventBatch { seq: 1, events, position: None, summaries: Vec::new() }).await.unwrap();
        assert_eq!(outcome.rejected, 0, "{outcome:?}");
    }
}

/// The ids of the live blocks, read through the API.
async fn live_blocks(api: &reqwest::Client, base: &str, token: &str) -> Vec<i64> {
    let live: Value = api
        .get(format!("{base}/api/v1/blocks?active=true"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    live.as_array().unwrap().iter().filter_map(|b| b["id"].as_i64()).collect()
}

async fn sign_in(browser: &Browser, base: &str, token: &str) {
    browser.navigate(&format!("{base}/#/overview")).await;
    browser.script("sessionStorage.clear();").await;
    browser.reload().await;
    let field = browser.wait_for("#login-panel:not([hidden]) #token").await;
    browser.send_keys(&field, token).await;
    browser.click("#login").await;
    browser
        .wait_until("return document.getElementById('content').dataset.loaded === 'overview';", "overview loaded")
        .await;
}

/// Sum of the drawn bars' values per series key.
async fn drawn(browser: &Browser, chart: &str) -> Value {
    browser
        .script(&format!(
            "const out = {{}}; for (const r of document.querySelectorAll('#{chart} rect.bar')) \
             {{ out[r.dataset.key] = (out[r.dataset.key] || 0) + Number(r.dataset.value); }} return out;"
        ))
        .await
}

/// The page does not scroll sideways: nothing reaches past the window's
/// right edge (the failure names what does).
async fn assert_fits(browser: &Browser, page: &str) {
    let wide = browser
        .script(
            "if (document.documentElement.scrollWidth <= window.innerWidth + 1) return []; \
             return [...document.querySelectorAll('body *')] \
               .filter(e => e.getBoundingClientRect().right > window.innerWidth + 1) \
               .map(e => e.tagName + '#' + e.id + '.' + e.className + ' ' + Math.round(e.getBoundingClientRect().right)) \
               .slice(0, 12);",
        )
        .await;
    assert_eq!(wide, json!([]), "the {page} page scrolls sideways on a phone");
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn dashboard_shows_the_night_explains_and_unblocks_with_confirmation(pool: PgPool) {
    let driver = Driver::start().await;
    let profile = tempfile::tempdir().unwrap();
    let server = common::Server::start(&pool).await;
    let base = server.url.clone();
    let t = common::tokens(&pool).await;
    let mx1 = common::agent(&pool, "mx-dash-1", "mx-dash-1.example.net", true, &["192.0.2.21"]).await;
    let mx2 = common::agent(&pool, "mx-dash-2", "mx-dash-2.example.net", true, &["192.0.2.22"]).await;
    seed_overnight(&pool, mx1, mx2).await;
    // The fleet rule's block of the login attacker, with the evidence the
    // correlation records.
    let auto = blocks::create(
        &pool,
        &CorrelateConfig::default(),
        NewBlock {
            cidr: "203.0.113.66/32".parse().unwrap(),
            reason: "fleet_correlation".into(),
            source: BlockSource::Auto,
            evidence: json!({
                "rule": "fleet_correlation", "scenario": "auth",
                "verdict": "auth: 9 weighted events across the fleet within 600 s (threshold 6)",
                "agents": [mx1, mx2], "kinds": {"auth_failed": 9}, "events": 9, "good_standing": false,
            }),
            ttl: Some(Duration::from_secs(3600)),
            created_by: None,
            force: false,
        },
    )
    .await
    .unwrap();
    let api = reqwest::Client::new();
    let manual: Value = api
        .post(format!("{base}/api/v1/blocks"))
        .bearer_auth(&t.admin)
        .json(&json!({"cidr": "203.0.113.77", "reason": "dashboard test", "ttl_secs": 3600}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let manual = manual["id"].as_i64().unwrap_or_else(|| panic!("block not created: {manual}"));

    let browser = Browser::new(&driver, profile.path()).await;
    browser.resize(1280, 1000).await;
    sign_in(&browser, &base, &t.admin).await;
    let stored = browser.script("return sessionStorage.getItem('fleetban_token');").await;
    assert_eq!(stored, json!(t.admin), "the token is kept in session storage");
    browser.wait_text("#whoami", "ops-admin (admin)").await;

    // The chart draws the ingested abuse by kind, and only abuse; it comes
    // from the server, so a reload draws it again.
    browser.click("#range-picker input[value='1h']").await;
    browser
        .wait_until("return document.querySelector('#abuse-chart svg')?.dataset.buckets === '60';", "1 h chart")
        .await;
    browser.reload().await;
    browser.wait_until("return document.getElementById('content').dataset.loaded === 'overview';", "reloaded").await;
    let checked = browser.script("return document.querySelector('#range-picker input:checked').value;").await;
    assert_eq!(checked, "1h", "the chosen range survives a reload");
    assert_eq!(drawn(&browser, "abuse-chart").await, json!({"auth_failed": 10, "rcpt_rejected": 4}));
    let bars = browser.script("return document.querySelectorAll('#abuse-chart rect.bar').length;").await;
    assert!(bars.as_u64().unwrap() >= 2, "{bars}");
    let summary = browser.text_of("#attacks-summary").await;
    assert!(summary.contains("14 abuse events in the last 1h"), "{summary}");
    // Split by host instead: the same events, per host, kept across a reload.
    browser
        .script("const s = document.getElementById('split'); s.value = 'host'; s.dispatchEvent(new Event('change'));")
        .await;
    browser
        .wait_until(
            "return !!document.querySelector('#abuse-chart rect.bar[data-key=\"mx-dash-1\"]');",
            "split by host",
        )
        .await;
    browser.reload().await;
    browser.wait_until("return document.getElementById('content').dataset.loaded === 'overview';", "reloaded").await;
    assert_eq!(drawn(&browser, "abuse-chart").await, json!({"mx-dash-1": 10, "mx-dash-2": 4}));
    browser
        .script("const s = document.getElementById('split'); s.value = 'kind'; s.dispatchEvent(new Event('change'));")
        .await;
    browser
        .wait_until(
            "return !!document.querySelector('#abuse-chart rect.bar[data-key=\"auth_failed\"]');",
            "split by kind",
        )
        .await;
    let blocks_drawn = drawn(&browser, "blocks-chart").await;
    assert_eq!(blocks_drawn["made"], 2, "{blocks_drawn}");
    let slots = browser.text_of("#slots li[data-agent='mx-dash-1']").await;
    assert!(slots.contains("peak 100 / 100") && slots.contains("1 refused while full"), "{slots}");
    let attackers = browser.wait_text("#attackers tbody", "203.0.113.66").await;
    assert!(
        !attackers.contains("198.51.100.9") && !attackers.contains("198.51.100.10"),
        "a legitimate sender, delivering or refused while the host was full, is not an attacker: {attackers}"
    );
    browser.screenshot("overview").await;

    browser.page("hosts").await;
    let map = browser.text_of("#hostmap li[data-agent-id='{mx1}']".replace("{mx1}", &mx1.to_string()).as_str()).await;
    assert!(map.contains("mx-dash-1") && map.contains("online") && map.contains("firewall entries"), "{map}");
    // The test agents report blocklist version 0; the fleet is at 2.
    assert!(map.contains("2 versions behind (v0)") && map.contains("oldest change waiting"), "{map}");
    browser.screenshot("hosts").await;

    // Search finds the attacker; its page says why it was blocked.
    let search = browser.wait_for("#search").await;
    browser.send_keys(&search, "203.0.113.66").await;
    browser.click("#search-go").await;
    browser
        .wait_until("return document.getElementById('content').dataset.loaded === 'attacker';", "attacker page")
        .await;
    let why = browser.text_of("#attacker-why").await;
    assert!(
        why.contains(
            "auth_failed ×9 on 2 hosts, decided by the fleet rule: auth: 9 weighted events across the fleet \
             within 600 s (threshold 6)"
        ),
        "{why}"
    );
    let hosts = browser.text_of("#attacker-hosts tbody").await;
    assert!(hosts.contains("mx-dash-1") && hosts.contains("mx-dash-2") && hosts.contains("auth_failed"), "{hosts}");
    let timeline = browser.text_of("#attacker-timeline").await;
    assert!(timeline.contains("mx-dash-1 — 6 events") && timeline.contains("mx-dash-2 — 4 events"), "{timeline}");
    // Every event is labelled with its service: the Dovecot line as IMAP,
    // Exim's as SMTP.
    let labels = browser
        .script(
            "return [...document.querySelectorAll('#attacker-timeline li[data-kind]')]\
             .map(l => [l.dataset.service, l.querySelector('strong').textContent.trim()]);",
        )
        .await;
    let labels: Vec<(String, String)> = serde_json::from_value(labels).unwrap();
    let imap: Vec<&str> = labels.iter().filter(|(s, _)| s == "imap").map(|(_, l)| l.as_str()).collect();
    assert_eq!(imap, ["auth_failed · IMAP"], "{labels:?}");
    let smtp = labels.iter().filter(|(s, l)| s == "smtp" && l == "auth_failed · SMTP").count();
    assert_eq!((smtp, labels.len()), (9, 10), "{labels:?}");
    browser.screenshot("attacker").await;

    // A range shows the addresses inside it.
    browser.page("attacker/203.0.113.0%2F24").await;
    let inside = browser.text_of("#range-attackers tbody").await;
    assert!(inside.contains("203.0.113.66") && inside.contains("203.0.113.67"), "{inside}");

    // Unblock asks first: cancel keeps the block, accept removes it.
    browser.page("blocks").await;
    browser.wait_text("#blocks tbody", "203.0.113.77/32").await;
    let row = browser.text_of(&format!("#blocks tr[data-block-id='{}']", auto.id)).await;
    assert!(row.contains("decided by the fleet rule"), "{row}");
    browser.screenshot("blocks").await;
    // The filters: the fleet rule's block only, then back to all.
    browser
        .script("const f = document.getElementById('f-rule'); f.value = 'fleet_correlation'; f.dispatchEvent(new Event('change'));")
        .await;
    browser
        .wait_until("return !document.querySelector('#blocks tbody').textContent.includes('203.0.113.77');", "filtered")
        .await;
    browser.wait_text("#blocks tbody", "203.0.113.66/32").await;
    browser
        .script("const f = document.getElementById('f-rule'); f.value = ''; f.dispatchEvent(new Event('change'));")
        .await;
    browser.wait_text("#blocks tbody", "203.0.113.77/32").await;
    browser.click(&format!("button.unblock[data-id=\"{manual}\"]")).await;
    browser.wait_until("return document.getElementById('confirm').open;", "confirmation dialog").await;
    let focused = browser.script("return document.activeElement.id;").await;
    assert_eq!(focused, "confirm-cancel", "the dialog opens with the safe choice focused");
    browser.screenshot("unblock-confirmation").await;
    browser.click("#confirm-cancel").await;
    browser.wait_until("return !document.getElementById('confirm').open;", "dialog closed").await;
    browser.wait_text("#status", "cancelled").await;
    assert!(live_blocks(&api, &base, &t.read).await.contains(&manual), "cancel keeps the block");
    browser.click(&format!("button.unblock[data-id=\"{manual}\"]")).await;
    browser.wait_until("return document.getElementById('confirm').open;", "confirmation dialog").await;
    browser.click("#confirm-ok").await;
    let deadline = Instant::now() + WAIT;
    while live_blocks(&api, &base, &t.read).await.contains(&manual) {
        assert!(Instant::now() < deadline, "block {manual} still live after a confirmed unblock");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    browser
        .wait_until("return !document.querySelector('#blocks tbody').textContent.includes('203.0.113.77');", "row gone")
        .await;
    let actor: String =
        sqlx::query_scalar("select actor from audit_log where action = 'block.delete'").fetch_one(&pool).await.unwrap();
    assert_eq!(actor, "ops-admin");

    // Shadow decisions and the live feed, abuse only unless asked.
    sqlx::query(
        "insert into shadow_decisions (cidr, rule, source, evidence) values \
         ('203.0.113.67/32', 'dictionary', 'auto', '{\"verdict\": \"dictionary: 4 weighted events on one host within 600 s (threshold 3)\"}')",
    )
    .execute(&pool)
    .await
    .unwrap();
    browser.page("shadow").await;
    let shadow = browser.wait_text("#shadow tbody", "203.0.113.67/32").await;
    assert!(shadow.contains("dictionary: 4 weighted events on one host"), "{shadow}");
    browser.screenshot("shadow").await;
    browser.page("live").await;
    browser.wait_text("#feed", "auth_failed").await;
    let kinds =
        browser.script("return [...document.querySelectorAll('#feed li[data-kind]')].map(l => l.dataset.kind);").await;
    let kinds: Vec<&str> = kinds.as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert!(kinds.iter().all(|k| ["auth_failed", "rcpt_rejected"].contains(k)), "{kinds:?}");
    let imap = browser.text_of("#feed li[data-service='imap'] strong").await;
    assert_eq!(imap, "auth_failed · IMAP");
    let smtp = browser.text_of("#feed li[data-service='smtp'][data-kind='rcpt_rejected'] strong").await;
    assert_eq!(smtp, "rcpt_rejected · SMTP");
    browser.screenshot("live").await;
    browser.click("#feed-all").await;
    browser
        .wait_until("return !!document.querySelector('#feed li[data-kind=\"connect\"]');", "every event shown")
        .await;

    // A read token sees no write control, on the blocks list or the
    // attacker page.
    sign_in(&browser, &base, &t.read).await;
    browser.wait_text("#whoami", "ops-read (read only)").await;
    browser.page("blocks").await;
    browser.wait_text("#blocks tbody", "203.0.113.66/32").await;
    let buttons = browser.script("return document.querySelectorAll('button.unblock').length;").await;
    assert_eq!(buttons, json!(0), "a read token must not see Unblock");
    browser.page("attacker/203.0.113.66").await;
    browser.wait_text("#attacker-blocks tbody", "203.0.113.66/32").await;
    let buttons = browser.script("return document.querySelectorAll('button.unblock').length;").await;
    assert_eq!(buttons, json!(0), "a read token must not see Unblock");

    // Every form control has a label.
    let unlabelled = browser
        .script(
            "return [...document.querySelectorAll('input, select, button')] \
               .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim()) \
               .map(e => e.id || e.name);",
        )
        .await;
    assert_eq!(unlabelled, json!([]), "controls without a label");

    // A phone: the page fits the screen's width.
    browser.resize(390, 844).await;
    browser.page("overview").await;
    assert_fits(&browser, "overview").await;
    browser.screenshot("overview-phone").await;
    browser.page("attacker/203.0.113.66").await;
    assert_fits(&browser, "attacker").await;
    browser.screenshot("attacker-phone").await;

    browser.quit().await;
    drop(driver);
    server.stop().await;
}
