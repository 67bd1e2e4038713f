//! The dashboard end to end in real headless Chromium, driven over the
//! WebDriver protocol (chromedriver) by a small client written here: load
//! the page, enter a token, see an agent and a block created through the
//! API, click unblock, and check that the block is gone from the API.
//!
//! Needs the Debian packages `chromium` and `chromium-driver`; without them
//! the test fails and says so.

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::PgPool;

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

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn dashboard_shows_fleet_and_unblocks(pool: PgPool) {
    let driver = Driver::start().await;
    let profile = tempfile::tempdir().unwrap();

    let server = common::Server::start(&pool).await;
    let base = server.url.clone();

    let t = common::tokens(&pool).await;
    common::agent(&pool, "mx-dash-1", "mx-dash-1.example.net", true, &["192.0.2.21"]).await;
    let api = reqwest::Client::new();
    let block: Value = api
        .post(format!("{base}/api/v1/blocks"))
        .bearer_auth(&t.admin)
        .json(&json!({"cidr": "203.0.113.77", "reason": "dashboard test", "ttl_secs": 3600}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = block["id"].as_i64().unwrap_or_else(|| panic!("block not created: {block}"));

    let browser = Browser::new(&driver, profile.path()).await;
    browser.navigate(&format!("{base}/")).await;
    let token = browser.wait_for("#token").await;
    browser.send_keys(&token, &t.admin).await;
    browser.click("#login").await;

    let agents = browser.wait_text("#agents tbody", "mx-dash-1").await;
    assert!(agents.contains("online"), "{agents}");
    let blocks = browser.wait_text("#blocks tbody", "203.0.113.77/32").await;
    assert!(blocks.contains("dashboard test"), "{blocks}");
    let stored = browser.script("return sessionStorage.getItem('fleetban_token');").await;
    assert_eq!(stored, json!(t.admin), "the token is kept in session storage");

    browser.click(&format!("button.unblock[data-id=\"{id}\"]")).await;

    // The block disappears from the API...
    let deadline = Instant::now() + WAIT;
    loop {
        let live: Value = api
            .get(format!("{base}/api/v1/blocks?active=true"))
            .bearer_auth(&t.read)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if live.as_array().unwrap().iter().all(|b| b["id"] != id) {
            break;
        }
        assert!(Instant::now() < deadline, "block {id} still live after clicking unblock");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // ... and from the page; the write was audited under the token's name.
    let deadline = Instant::now() + WAIT;
    loop {
        if !browser.text_of("#blocks tbody").await.contains("203.0.113.77") {
            break;
        }
        assert!(Instant::now() < deadline, "block row still shown");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let actor: String =
        sqlx::query_scalar("select actor from audit_log where action = 'block.delete'").fetch_one(&pool).await.unwrap();
    assert_eq!(actor, "ops-admin");

    browser.quit().await;
    drop(driver);
    server.stop().await;
}
