//! Notifications end to end against a fresh database per test: events
//! recorded by triggers and the monitor, routed and composed under filters,
//! rate limits and digests, delivered to a webhook receiver and an SMTP sink
//! on 127.0.0.1 inside the test, with retries, dead letters, a restart and
//! two dispatchers (replicas) on one database.

mod common;

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use axum::routing::post;
use fleetban_server::alerts::dispatch::{Dispatcher, Outcome};
use fleetban_server::alerts::{
    self, Alert, AlertKind, AlertsConfig, ChannelConfig, ChannelKind, Channels, Severity, SmtpTls,
};
use fleetban_server::api::{self, AppState};
use fleetban_server::blocks::{self, BlockSource, NewBlock};
use fleetban_server::correlate::CorrelateConfig;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use sqlx::PgPool;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tower::ServiceExt;

const SECRET: &str = "a-webhook-secret-of-some-length";
/// Upper bound of every wait in these tests.
const DEADLINE: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------- receiver

#[derive(Debug, Clone)]
struct Hit {
    headers: HeaderMap,
    body: Bytes,
}

impl Hit {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
    fn header(&self, name: &str) -> String {
        self.headers.get(name).map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default()
    }
}

#[derive(Debug, Default)]
struct ReceiverState {
    requests: Vec<Hit>,
    /// Statuses of the next answers; then `otherwise`.
    plan: VecDeque<u16>,
    otherwise: u16,
    delay: Duration,
}

/// A webhook receiver on 127.0.0.1.
#[derive(Debug, Clone)]
struct Receiver {
    url: String,
    state: Arc<Mutex<ReceiverState>>,
}

impl Receiver {
    async fn start(plan: &[u16], otherwise: u16, delay: Duration) -> Receiver {
        let state = Arc::new(Mutex::new(ReceiverState {
            requests: Vec::new(),
            plan: plan.iter().copied().collect(),
            otherwise,
            delay,
        }));
        let app = Router::new().route("/hook", post(hook)).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Receiver { url, state }
    }

    fn requests(&self) -> Vec<Hit> {
        self.state.lock().unwrap().requests.clone()
    }

    fn count(&self) -> usize {
        self.state.lock().unwrap().requests.len()
    }
}

async fn hook(State(state): State<Arc<Mutex<ReceiverState>>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let (status, delay) = {
        let mut s = state.lock().unwrap();
        s.requests.push(Hit { headers, body });
        let status = s.plan.pop_front().unwrap_or(s.otherwise);
        (status, s.delay)
    };
    tokio::time::sleep(delay).await;
    StatusCode::from_u16(status).unwrap()
}

// ---------------------------------------------------------------- SMTP sink

#[derive(Debug, Default, Clone)]
struct Mail {
    auth: Option<String>,
    from: String,
    to: Vec<String>,
    data: String,
    /// The session was encrypted when the mail was sent.
    tls: bool,
}

type Mails = Arc<Mutex<Vec<Mail>>>;

/// How the SMTP sink secures its sessions.
#[derive(Clone)]
enum SinkTls {
    /// Plain text, no STARTTLS offered.
    None,
    /// STARTTLS offered.
    Starttls(tokio_rustls::TlsAcceptor),
    /// TLS from the first byte.
    Implicit(tokio_rustls::TlsAcceptor),
}

/// A minimal SMTP server on 127.0.0.1 that accepts everything (AUTH PLAIN
/// advertised) and keeps each mail.
async fn smtp_sink_with(tls: SinkTls) -> (u16, Mails) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mails = Arc::new(Mutex::new(Vec::new()));
    let kept = mails.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let (kept, tls) = (kept.clone(), tls.clone());
            tokio::spawn(async move {
                match tls {
                    SinkTls::None => {
                        smtp_session(stream, &kept, true, false, false).await;
                    }
                    SinkTls::Implicit(acceptor) => {
                        let Ok(stream) = acceptor.accept(stream).await else { return };
                        smtp_session(stream, &kept, true, false, true).await;
                    }
                    SinkTls::Starttls(acceptor) => {
                        if let Some(plain) = smtp_session(stream, &kept, true, true, false).await {
                            let Ok(stream) = acceptor.accept(plain).await else { return };
                            smtp_session(stream, &kept, false, false, true).await;
                        }
                    }
                }
            });
        }
    });
    (port, mails)
}

async fn smtp_sink() -> (u16, Mails) {
    smtp_sink_with(SinkTls::None).await
}

/// One SMTP session; returns the stream when the client asked for STARTTLS.
async fn smtp_session<S>(stream: S, kept: &Mails, greet: bool, offer_starttls: bool, secure: bool) -> Option<S>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut stream = BufReader::new(stream);
    if greet {
        stream.get_mut().write_all(b"220 sink.example ESMTP\r\n").await.ok()?;
    }
    let mut mail = Mail { tls: secure, ..Mail::default() };
    let mut line = String::new();
    loop {
        line.clear();
        if stream.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        let command = line.trim_end().to_owned();
        let upper = command.to_ascii_uppercase();
        let reply: &[u8] = if upper.starts_with("EHLO") {
            if offer_starttls {
                b"250-sink.example\r\n250-STARTTLS\r\n250 8BITMIME\r\n"
            } else {
                b"250-sink.example\r\n250-AUTH PLAIN LOGIN\r\n250 8BITMIME\r\n"
            }
        } else if upper == "STARTTLS" && offer_starttls {
            stream.get_mut().write_all(b"220 2.0.0 go ahead\r\n").await.ok()?;
            return Some(stream.into_inner());
        } else if upper.starts_with("AUTH PLAIN ") {
            mail.auth = Some(command[11..].to_owned());
            b"235 2.7.0 ok\r\n"
        } else if upper.starts_with("MAIL FROM:") {
            mail.from = command[10..].to_owned();
            b"250 ok\r\n"
        } else if upper.starts_with("RCPT TO:") {
            mail.to.push(command[8..].to_owned());
            b"250 ok\r\n"
        } else if upper == "DATA" {
            stream.get_mut().write_all(b"354 go on\r\n").await.ok()?;
            loop {
                line.clear();
                if stream.read_line(&mut line).await.ok()? == 0 {
                    return None;
                }
                let data = line.trim_end_matches(['\r', '\n']);
                if data == "." {
                    break;
                }
                mail.data.push_str(data);
                mail.data.push('\n');
            }
            kept.lock().unwrap().push(std::mem::replace(&mut mail, Mail { tls: secure, ..Mail::default() }));
            b"250 queued\r\n"
        } else if upper == "QUIT" {
            let _ = stream.get_mut().write_all(b"221 bye\r\n").await;
            return None;
        } else {
            b"250 ok\r\n"
        };
        stream.get_mut().write_all(reply).await.ok()?;
    }
}

/// A private CA and a TLS acceptor for `localhost` signed by it; the CA's
/// PEM file is in the returned directory.
fn private_tls() -> (tempfile::TempDir, std::path::PathBuf, tokio_rustls::TlsAcceptor) {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let dir = tempfile::tempdir().unwrap();
    let files = fleetban_server::tls::pki_init(dir.path(), "localhost").unwrap();
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(&files.server_cert).unwrap().map(Result::unwrap).collect();
    let key = PrivateKeyDer::from_pem_file(&files.server_key).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let ca = files.ca_cert.clone();
    (dir, ca, tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

// ---------------------------------------------------------------- helpers

fn webhook(name: &str, url: &str) -> ChannelConfig {
    let mut c = ChannelConfig::new(name, ChannelKind::Webhook);
    c.url = Some(url.to_owned());
    c.secret = Some(SECRET.to_owned());
    c.retry_initial_ms = 20;
    c.retry_max_secs = 1;
    c.max_messages_per_hour = 1000;
    c.timeout_secs = 5;
    c
}

fn alert(kind: AlertKind, host: Option<&str>, summary: &str) -> Alert {
    Alert {
        kind,
        severity: Severity::Warning,
        host: host.map(str::to_owned),
        dedupe_key: None,
        summary: summary.to_owned(),
        details: json!({ "note": summary }),
    }
}

fn dispatcher(pool: &PgPool, channels: Vec<ChannelConfig>) -> Dispatcher {
    Dispatcher::new(pool.clone(), Channels::new(channels)).unwrap()
}

/// Ticks until `done` holds (bounded by [`DEADLINE`]).
async fn drive(d: &Dispatcher, mut done: impl AsyncFnMut() -> bool) {
    let start = std::time::Instant::now();
    loop {
        d.tick().await.unwrap();
        if done().await {
            return;
        }
        assert!(start.elapsed() < DEADLINE, "condition not met within {DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn states(pool: &PgPool) -> Vec<(String, i32)> {
    sqlx::query_as("select state, attempts from notify_messages order by id").fetch_all(pool).await.unwrap()
}

fn verify_signature(request: &Hit) {
    let timestamp = request.header("x-fleetban-timestamp");
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(&request.body);
    let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    assert_eq!(request.header("x-fleetban-signature"), expected, "HMAC over <timestamp>.<body>");
    let age = time::OffsetDateTime::now_utc().unix_timestamp() - timestamp.parse::<i64>().unwrap();
    assert!((0..60).contains(&age), "timestamp is now: {age}");
}

// ---------------------------------------------------------------- tests

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn a_block_is_signed_and_retried_until_accepted(pool: PgPool) {
    let receiver = Receiver::start(&[500, 503], 200, Duration::ZERO).await;
    common::agent(&pool, "mx1", "mx1.example.net", true, &["192.0.2.11"]).await;
    let mx2 = common::agent(&pool, "mx2", "mx2.example.net", true, &["192.0.2.12"]).await;
    let block = blocks::create(
        &pool,
        &CorrelateConfig::default(),
        NewBlock {
            cidr: "203.0.113.7/32".parse().unwrap(),
            reason: "auth flood".into(),
            source: BlockSource::Manual,
            evidence: json!({ "rule": "fleet_correlation", "verdict": "auth: 16 weighted events", "events": 16,
                              "agents": [mx2] }),
            ttl: None,
            created_by: Some("ops".into()),
            force: false,
        },
    )
    .await
    .unwrap();
    // mx1 has applied the block's version, mx2 not yet.
    sqlx::query(
        "update agents set blocklist_version = (select created_version from blocks where id = $1) where name = 'mx1'",
    )
    .bind(block.id)
    .execute(&pool)
    .await
    .unwrap();
    let d = dispatcher(&pool, vec![webhook("hook", &receiver.url)]);
    drive(&d, async || states(&pool).await.first().is_some_and(|s| s.0 == "delivered")).await;

    assert_eq!(states(&pool).await, [("delivered".to_owned(), 3)]);
    let requests = receiver.requests();
    assert_eq!(requests.len(), 3, "two failures, then accepted");
    let ids: BTreeSet<String> = requests.iter().map(|r| r.header("x-fleetban-message-id")).collect();
    assert_eq!(ids.len(), 1, "every attempt carries the same message id");
    for request in &requests {
        verify_signature(request);
        assert_eq!(request.header("idempotency-key"), request.header("x-fleetban-message-id"));
    }
    let body = requests[2].json();
    assert_eq!(body["id"].as_str().unwrap(), requests[2].header("x-fleetban-message-id"));
    assert_eq!(body["digest"], false);
    let event = &body["events"][0];
    assert_eq!(event["type"], "block");
    assert_eq!(event["details"]["cidr"], "203.0.113.7/32");
    assert_eq!(event["details"]["reason"], "auth flood");
    assert_eq!(event["details"]["enforced_by"], json!(["mx1"]));
    assert_eq!(event["details"]["pending_on"], json!(["mx2"]));
    assert_eq!(event["details"]["seen_by"], json!(["mx2"]), "evidence agents by name");
    assert_eq!(event["details"]["evidence"]["verdict"], "auth: 16 weighted events");
    assert!(uuid::Uuid::parse_str(event["id"].as_str().unwrap()).is_ok(), "each event has an id");
    // Nothing more to send.
    assert!(d.tick().await.unwrap().is_empty());
    assert_eq!(receiver.count(), 3);
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn a_message_is_dead_lettered_after_max_attempts(pool: PgPool) {
    let handle = api::metrics::install().expect("recorder");
    let receiver = Receiver::start(&[], 500, Duration::ZERO).await;
    let mut channel = webhook("deadhook", &receiver.url);
    channel.max_attempts = 3;
    alerts::record(&pool, &alert(AlertKind::AgentOffline, Some("mx1"), "mx1 offline")).await.unwrap();
    let d = dispatcher(&pool, vec![channel.clone()]);
    drive(&d, async || states(&pool).await.first().is_some_and(|s| s.0 == "dead")).await;
    assert_eq!(states(&pool).await, [("dead".to_owned(), 3)]);
    assert_eq!(receiver.count(), 3, "exactly max_attempts attempts");
    // A dead message is never sent again.
    assert!(d.tick().await.unwrap().is_empty());
    assert_eq!(receiver.count(), 3);
    let metrics = handle.render();
    assert!(metrics.contains("fleetban_notify_dead_letters_total{channel=\"deadhook\"} 1"), "{metrics}");
    assert!(metrics.contains("fleetban_notify_attempt_failures_total{channel=\"deadhook\"} 3"), "{metrics}");
    // The API counts it.
    let app = api::router(
        AppState::new(pool.clone(), CorrelateConfig::default()).with_channels(Channels::new(vec![channel])),
    );
    let t = common::tokens(&pool).await;
    let request = Request::get("/api/v1/notify").header("authorization", format!("Bearer {}", t.read));
    let response = app.clone().oneshot(request.body(Body::empty()).unwrap()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let list: Value =
        serde_json::from_slice(&axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap()).unwrap();
    assert_eq!(list[0]["name"], "deadhook");
    assert_eq!(list[0]["dead_messages"], 1);
    assert_eq!(list[0]["pending_messages"], 0);
    assert_eq!(list[0]["last_error"], "HTTP 500");
    // And /metrics shows the fleet-wide queue.
    let response = app.clone().oneshot(Request::get("/metrics").body(Body::empty()).unwrap()).await.unwrap();
    let text = String::from_utf8(axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap().to_vec()).unwrap();
    assert!(text.contains("fleetban_notify_messages{channel=\"deadhook\",state=\"dead\"} 1"), "{text}");
    assert!(text.contains("fleetban_notify_messages{channel=\"deadhook\",state=\"pending\"} 0"), "{text}");
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn slack_gets_a_text_body(pool: PgPool) {
    let receiver = Receiver::start(&[], 200, Duration::ZERO).await;
    let mut channel = ChannelConfig::new("chat", ChannelKind::Slack);
    channel.url = Some(receiver.url.clone());
    let mut a = alert(AlertKind::SlotExhaustion, Some("mx1"), "mx1 refused everyone: all 100 connection slots taken");
    a.details = json!({ "slots": 100, "holders": [{"address": "198.51.100.9", "connections": 60}] });
    alerts::record(&pool, &a).await.unwrap();
    let d = dispatcher(&pool, vec![channel]);
    drive(&d, async || receiver.count() == 1).await;
    let body = receiver.requests()[0].json();
    let object = body.as_object().unwrap();
    assert_eq!(object.keys().collect::<Vec<_>>(), ["text"], "Slack/Mattermost take {{\"text\": ...}}");
    let text = body["text"].as_str().unwrap();
    assert!(text.contains("all 100 connection slots taken"), "{text}");
    assert!(text.contains("198.51.100.9 (60)"), "holders are listed: {text}");
    let message_id: uuid::Uuid =
        sqlx::query_scalar("select message_id from notify_messages").fetch_one(&pool).await.unwrap();
    assert!(text.contains(&message_id.to_string()), "the message id is in the text: {text}");
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn email_goes_through_smtp_with_auth(pool: PgPool) {
    let (port, mails) = smtp_sink().await;
    let mut channel = ChannelConfig::new("mail", ChannelKind::Email);
    channel.smtp_host = Some("127.0.0.1".into());
    channel.smtp_port = Some(port);
    channel.smtp_tls = Some(SmtpTls::None);
    channel.smtp_username = Some("fleetban".into());
    channel.smtp_password = Some("s3cret".into());
    channel.from = Some("fleetban <fleetban@example.net>".into());
    channel.to = vec!["ops@example.net".into(), "Oncall <oncall@example.org>".into()];
    channel.validate().unwrap();
    alerts::record(&pool, &alert(AlertKind::PropagationLag, Some("mx3"), "mx3 has not applied version 7"))
        .await
        .unwrap();
    let d = dispatcher(&pool, vec![channel]);
    drive(&d, async || states(&pool).await.first().is_some_and(|s| s.0 == "delivered")).await;
    let mails = mails.lock().unwrap().clone();
    assert_eq!(mails.len(), 1);
    let mail = &mails[0];
    assert_eq!(mail.from, "<fleetban@example.net>");
    assert_eq!(mail.to, ["<ops@example.net>", "<oncall@example.org>"]);
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.decode(mail.auth.as_deref().unwrap()).unwrap();
    assert_eq!(auth, b"\0fleetban\0s3cret");
    assert!(mail.data.contains("Subject: [fleetban] warning: mx3 has not applied version 7"), "{}", mail.data);
    let message_id: uuid::Uuid =
        sqlx::query_scalar("select message_id from notify_messages").fetch_one(&pool).await.unwrap();
    assert!(mail.data.contains(&format!("Message-ID: <{message_id}@fleetban>")), "{}", mail.data);
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn starttls_is_never_skipped(pool: PgPool) {
    // The sink does not offer STARTTLS: a `starttls` channel must not fall
    // back to plain text.
    let (port, mails) = smtp_sink().await;
    let mut channel = ChannelConfig::new("mail", ChannelKind::Email);
    channel.smtp_host = Some("127.0.0.1".into());
    channel.smtp_port = Some(port);
    channel.smtp_tls = Some(SmtpTls::Starttls);
    channel.from = Some("fleetban@example.net".into());
    channel.to = vec!["ops@example.net".into()];
    channel.max_attempts = 1;
    alerts::record(&pool, &alert(AlertKind::Block, None, "203.0.113.0/24 blocked")).await.unwrap();
    let d = dispatcher(&pool, vec![channel]);
    assert_eq!(d.tick().await.unwrap(), [Outcome::Dead]);
    assert!(mails.lock().unwrap().is_empty());
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn email_over_starttls_and_tls_checks_the_certificate(pool: PgPool) {
    let (_dir, ca, acceptor) = private_tls();
    let (starttls_port, starttls_mails) = smtp_sink_with(SinkTls::Starttls(acceptor.clone())).await;
    let (tls_port, tls_mails) = smtp_sink_with(SinkTls::Implicit(acceptor)).await;
    let mail_channel = |name: &str, mode: SmtpTls, port: u16, ca: Option<&std::path::Path>| {
        let mut c = ChannelConfig::new(name, ChannelKind::Email);
        c.smtp_host = Some("localhost".into());
        c.smtp_port = Some(port);
        c.smtp_tls = Some(mode);
        c.smtp_ca_file = ca.map(Into::into);
        c.smtp_username = Some("fleetban".into());
        c.smtp_password = Some("s3cret".into());
        c.from = Some("fleetban@example.net".into());
        c.to = vec!["ops@example.net".into()];
        c.max_attempts = 1;
        c.validate().unwrap();
        c
    };
    let channels = vec![
        mail_channel("starttls", SmtpTls::Starttls, starttls_port, Some(&ca)),
        mail_channel("tls", SmtpTls::Tls, tls_port, Some(&ca)),
        // Without the private CA the certificate is refused.
        mail_channel("untrusted", SmtpTls::Tls, tls_port, None),
    ];
    alerts::record(&pool, &alert(AlertKind::Block, None, "203.0.113.0/24 blocked")).await.unwrap();
    let d = dispatcher(&pool, channels);
    let mut outcomes = Vec::new();
    let start = std::time::Instant::now();
    while outcomes.len() < 3 {
        assert!(start.elapsed() < DEADLINE, "three attempts within {DEADLINE:?}");
        outcomes.extend(d.tick().await.unwrap());
    }
    let by_channel: Vec<(String, String)> =
        sqlx::query_as("select channel, state from notify_messages order by channel").fetch_all(&pool).await.unwrap();
    let expected = [("starttls", "delivered"), ("tls", "delivered"), ("untrusted", "dead")];
    assert_eq!(by_channel, expected.map(|(c, s)| (c.to_owned(), s.to_owned())));
    for mails in [starttls_mails, tls_mails] {
        let mails = mails.lock().unwrap();
        assert_eq!(mails.len(), 1);
        assert!(mails[0].tls, "sent encrypted");
        assert!(mails[0].auth.is_some(), "authenticated inside TLS");
        assert!(mails[0].data.contains("203.0.113.0/24 blocked"));
    }
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn the_rate_limit_holds_events_and_then_summarises_them(pool: PgPool) {
    let receiver = Receiver::start(&[], 200, Duration::ZERO).await;
    let mut channel = webhook("hook", &receiver.url);
    channel.max_messages_per_hour = 2;
    let d = dispatcher(&pool, vec![channel]);
    for i in 0..2 {
        alerts::record(&pool, &alert(AlertKind::Block, None, &format!("first {i}"))).await.unwrap();
        assert_eq!(d.tick().await.unwrap(), [Outcome::Delivered]);
    }
    for i in 0..3 {
        alerts::record(&pool, &alert(AlertKind::Block, None, &format!("held {i}"))).await.unwrap();
    }
    assert!(d.tick().await.unwrap().is_empty(), "the hour's two messages are used");
    assert_eq!(receiver.count(), 2);
    let queued: i64 = sqlx::query_scalar("select count(*) from notify_outbox where message_id is null")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(queued, 3, "held, not dropped");
    // An hour later, the held events go out as one message.
    sqlx::query("update notify_messages set created_at = created_at - interval '61 minutes'")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(d.tick().await.unwrap(), [Outcome::Delivered]);
    let requests = receiver.requests();
    assert_eq!(requests.len(), 3);
    let body = requests[2].json();
    assert_eq!(body["digest"], true);
    let summaries: Vec<&str> =
        body["events"].as_array().unwrap().iter().map(|e| e["summary"].as_str().unwrap()).collect();
    assert_eq!(summaries, ["held 0", "held 1", "held 2"]);
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn a_digest_is_one_message_for_a_campaign(pool: PgPool) {
    let receiver = Receiver::start(&[], 200, Duration::ZERO).await;
    let mut channel = ChannelConfig::new("chat", ChannelKind::Slack);
    channel.url = Some(receiver.url.clone());
    channel.digest_interval_secs = Some(300);
    let d = dispatcher(&pool, vec![channel]);
    for i in 0..120 {
        alerts::record(&pool, &alert(AlertKind::Block, None, &format!("198.51.100.{i}/32 blocked fleet-wide")))
            .await
            .unwrap();
    }
    assert!(d.tick().await.unwrap().is_empty(), "the oldest event has not waited the interval yet");
    sqlx::query("update notify_outbox set queued_at = queued_at - interval '301 seconds'")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(d.tick().await.unwrap(), [Outcome::Delivered]);
    assert!(d.tick().await.unwrap().is_empty());
    assert_eq!(receiver.count(), 1, "120 events, one message");
    let text = receiver.requests()[0].json()["text"].as_str().unwrap().to_owned();
    assert!(text.starts_with("[fleetban] 120 events: block ×120"), "{text}");
    assert!(text.contains("198.51.100.0/32 blocked") && text.contains("198.51.100.49/32 blocked"), "{text}");
    assert!(text.contains("and 70 more"), "{text}");
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn filters_route_events_to_the_channels_that_want_them(pool: PgPool) {
    let mut slots_mx1 = webhook("slots-mx1", "http://127.0.0.1:9/");
    slots_mx1.events = vec![AlertKind::SlotExhaustion];
    slots_mx1.hosts = vec!["mx1".into()];
    let mut urgent = webhook("urgent", "http://127.0.0.1:9/");
    urgent.min_severity = Severity::Critical;
    let everything = webhook("everything", "http://127.0.0.1:9/");
    let mut slot_mx1 = alert(AlertKind::SlotExhaustion, Some("mx1"), "a");
    slot_mx1.severity = Severity::Critical;
    let mut slot_mx2 = alert(AlertKind::SlotExhaustion, Some("mx2"), "b");
    slot_mx2.severity = Severity::Critical;
    let offline_mx1 = alert(AlertKind::AgentOffline, Some("mx1"), "c");
    for a in [&slot_mx1, &slot_mx2, &offline_mx1] {
        alerts::record(&pool, a).await.unwrap();
    }
    let d = dispatcher(&pool, vec![slots_mx1, urgent, everything]);
    assert_eq!(d.route().await.unwrap(), 3);
    let routed: Vec<(String, String)> = sqlx::query_as(
        "select o.channel, a.summary from notify_outbox o join alert_events a on a.id = o.alert_id \
         order by o.channel, a.summary",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let expected = [
        ("everything", "a"),
        ("everything", "b"),
        ("everything", "c"),
        ("slots-mx1", "a"),
        ("urgent", "a"),
        ("urgent", "b"),
    ];
    assert_eq!(routed, expected.map(|(c, s)| (c.to_owned(), s.to_owned())));
    assert_eq!(d.route().await.unwrap(), 0, "each event is routed once");
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn a_shadow_decision_records_an_event_in_its_transaction(pool: PgPool) {
    let agent = common::agent(&pool, "mx1", "mx1.example.net", true, &[]).await;
    let mut tx = pool.begin().await.unwrap();
    sqlx::query(
        "insert into shadow_decisions (cidr, rule, source, agent_id) values ('198.51.100.7/32', 'auth', 'agent', $1)",
    )
    .bind(agent)
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    let none: i64 = sqlx::query_scalar("select count(*) from alert_events").fetch_one(&pool).await.unwrap();
    assert_eq!(none, 0, "a rolled-back decision leaves no event");
    sqlx::query(
        "insert into shadow_decisions (cidr, rule, source, agent_id) values ('198.51.100.7/32', 'auth', 'agent', $1)",
    )
    .bind(agent)
    .execute(&pool)
    .await
    .unwrap();
    let (kind, severity, host, summary): (String, String, Option<String>, String) =
        sqlx::query_as("select kind, severity, host, summary from alert_events").fetch_one(&pool).await.unwrap();
    assert_eq!((kind.as_str(), severity.as_str(), host.as_deref()), ("shadow_block", "info", Some("mx1")));
    assert!(summary.contains("198.51.100.7/32") && summary.contains("auth"), "{summary}");
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn the_monitor_raises_offline_lag_and_slot_exhaustion_once(pool: PgPool) {
    let mx1 = common::agent(&pool, "mx1", "mx1.example.net", true, &[]).await;
    let mx2 = common::agent(&pool, "mx2", "mx2.example.net", false, &[]).await;
    let _mx3 = common::agent(&pool, "mx3", "mx3.example.net", true, &[]).await;
    sqlx::query("update agents set last_seen = now() - interval '1 hour' where id = $1")
        .bind(mx2)
        .execute(&pool)
        .await
        .unwrap();
    // A block change mx1 has not applied for five minutes; mx3 has.
    blocks::create(
        &pool,
        &CorrelateConfig::default(),
        NewBlock {
            cidr: "203.0.113.9/32".parse().unwrap(),
            reason: "test".into(),
            source: BlockSource::Manual,
            evidence: json!({}),
            ttl: None,
            created_by: None,
            force: false,
        },
    )
    .await
    .unwrap();
    sqlx::query("update block_changes set changed_at = now() - interval '5 minutes'").execute(&pool).await.unwrap();
    sqlx::query("update agents set blocklist_version = (select last from block_version) where name = 'mx3'")
        .execute(&pool)
        .await
        .unwrap();
    // mx1 is full: connects with a count of 100, then refusals.
    let now = time::OffsetDateTime::now_utc() - time::Duration::seconds(5);
    sqlx::query("select fleetban_ensure_event_partition($1::date)").bind(now.date()).execute(&pool).await.unwrap();
    let rows = [
        ("connect", "198.51.100.1", Some(98)),
        ("connect", "198.51.100.1", Some(99)),
        ("connect", "198.51.100.1", Some(100)),
        ("connect", "198.51.100.2", Some(100)),
        ("refused_too_many", "203.0.113.50", None),
        ("refused_too_many", "203.0.113.51", None),
    ];
    for (i, (kind, remote, count)) in rows.iter().enumerate() {
        sqlx::query(
            "insert into events (agent_id, batch_seq, batch_index, time, kind, remote, connection_count) \
             values ($1, 1, $2, $3, $4, $5::inet, $6)",
        )
        .bind(mx1)
        .bind(i as i32)
        .bind(now)
        .bind(kind)
        .bind(remote)
        .bind(count)
        .execute(&pool)
        .await
        .unwrap();
    }
    let config = AlertsConfig::default();
    assert_eq!(alerts::monitor::check(&pool, &config).await.unwrap(), 3);
    assert_eq!(alerts::monitor::check(&pool, &config).await.unwrap(), 0, "the same conditions raise nothing new");
    let events: Vec<(String, String, Option<String>, Value)> =
        sqlx::query_as("select kind, severity, host, details from alert_events where kind <> 'block' order by kind")
            .fetch_all(&pool)
            .await
            .unwrap();
    let kinds: Vec<(&str, &str, Option<&str>)> =
        events.iter().map(|e| (e.0.as_str(), e.1.as_str(), e.2.as_deref())).collect();
    assert_eq!(
        kinds,
        [
            ("agent_offline", "warning", Some("mx2")),
            ("propagation_lag", "warning", Some("mx1")),
            ("slot_exhaustion", "critical", Some("mx1")),
        ]
    );
    let slots = &events[2].3;
    assert_eq!(slots["slots"], 100);
    assert_eq!(slots["refusals"], 2);
    assert_eq!(slots["holders"][0], json!({"address": "198.51.100.1", "connections": 3}));
    assert_eq!(slots["holders"][1], json!({"address": "198.51.100.2", "connections": 1}));
    // mx2 comes back and goes silent again: a new outage, a new event.
    sqlx::query("update agents set last_seen = now() - interval '10 minutes' where id = $1")
        .bind(mx2)
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(alerts::monitor::check(&pool, &config).await.unwrap(), 1);
}

/// Agents that aggregate context send connects and refusals as summaries:
/// the monitor reads them like the single lines (and adds both up).
#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn the_monitor_reads_slot_exhaustion_from_context_summaries(pool: PgPool) {
    let mx1 = common::agent(&pool, "mx1", "mx1.example.net", true, &[]).await;
    let now = time::OffsetDateTime::now_utc() - time::Duration::seconds(5);
    let start = now.replace_second(0).unwrap().replace_nanosecond(0).unwrap();
    sqlx::query("select fleetban_ensure_event_partition($1::date)").bind(start.date()).execute(&pool).await.unwrap();
    // 198.51.100.1: three connects, one of them a single event.
    sqlx::query(
        "insert into events (agent_id, batch_seq, batch_index, time, kind, remote, connection_count) \
         values ($1, 1, 0, $2, 'connect', '198.51.100.1', 97)",
    )
    .bind(mx1)
    .bind(now)
    .execute(&pool)
    .await
    .unwrap();
    let summaries = [
        ("198.51.100.1", 2, 0, Some(100), vec!["connect"], vec![2]),
        ("198.51.100.2", 1, 0, Some(99), vec!["connect"], vec![1]),
        ("203.0.113.50", 0, 2, None, vec!["refused_too_many"], vec![2]),
    ];
    for (i, (remote, connects, refused, max, kinds, counts)) in summaries.into_iter().enumerate() {
        sqlx::query(
            "insert into context_summaries (agent_id, batch_seq, batch_index, interval_start, interval_secs, remote, \
             first_seen, last_seen, lines, connects, refused_full, max_connection_count, kinds, counts) \
             values ($1, 2, $2, $3, 60, $4::inet, $5, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(mx1)
        .bind(i as i32)
        .bind(start)
        .bind(remote)
        .bind(now)
        .bind(connects + refused)
        .bind(connects)
        .bind(refused)
        .bind(max)
        .bind(&kinds)
        .bind(&counts)
        .execute(&pool)
        .await
        .unwrap();
    }
    let config = AlertsConfig::default();
    assert_eq!(alerts::monitor::check(&pool, &config).await.unwrap(), 1);
    let details: Value = sqlx::query_scalar("select details from alert_events where kind = 'slot_exhaustion'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(details["slots"], 100);
    assert_eq!(details["refusals"], 2);
    assert_eq!(details["holders"][0], json!({"address": "198.51.100.1", "connections": 3}));
    assert_eq!(details["holders"][1], json!({"address": "198.51.100.2", "connections": 1}));
}

/// Waits until `count` messages are delivered (bounded).
async fn delivered(pool: &PgPool, count: i64) {
    let start = std::time::Instant::now();
    loop {
        let n: i64 = sqlx::query_scalar("select count(*) from notify_messages where state = 'delivered'")
            .fetch_one(pool)
            .await
            .unwrap();
        if n >= count {
            return;
        }
        assert!(start.elapsed() < DEADLINE, "{n} of {count} delivered within {DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn spawn_run(d: Dispatcher) -> (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(d.run(Duration::from_millis(10), Duration::from_secs(86_400), async move {
        let _ = stopped.await;
    }));
    (stop, task)
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn delivery_survives_a_restart_exactly_once(pool: PgPool) {
    let receiver = Receiver::start(&[], 200, Duration::from_millis(20)).await;
    let channel = webhook("hook", &receiver.url);
    for i in 0..20 {
        alerts::record(&pool, &alert(AlertKind::Block, None, &format!("event {i}"))).await.unwrap();
    }
    // The first server stops after a few messages (clean shutdown mid-queue).
    let (stop, task) = spawn_run(dispatcher(&pool, vec![channel.clone()]));
    let start = std::time::Instant::now();
    while receiver.count() < 5 {
        assert!(start.elapsed() < DEADLINE);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.send(()).unwrap();
    tokio::time::timeout(DEADLINE, task).await.unwrap().unwrap();
    let sent_before = receiver.count();
    let delivered_before: i64 = sqlx::query_scalar("select count(*) from notify_messages where state = 'delivered'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(delivered_before as usize, sent_before, "every request sent was recorded before stopping");
    assert!(sent_before < 20, "stopped mid-queue ({sent_before} sent)");
    // A new dispatcher (the restarted server) finishes the queue.
    let (stop, task) = spawn_run(dispatcher(&pool, vec![channel]));
    delivered(&pool, 20).await;
    stop.send(()).unwrap();
    tokio::time::timeout(DEADLINE, task).await.unwrap().unwrap();
    let requests = receiver.requests();
    let ids: BTreeSet<String> = requests.iter().map(|r| r.header("x-fleetban-message-id")).collect();
    assert_eq!(requests.len(), 20, "each message sent once");
    assert_eq!(ids.len(), 20);
    let summaries: BTreeSet<String> =
        requests.iter().map(|r| r.json()["events"][0]["summary"].as_str().unwrap().to_owned()).collect();
    assert_eq!(summaries.len(), 20, "every event delivered");
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn a_crash_mid_send_resends_with_the_same_message_id(pool: PgPool) {
    // The at-least-once boundary: the receiver got the request, the sender
    // died before recording it; the resend carries the same id.
    let receiver = Receiver::start(&[], 200, Duration::from_millis(500)).await;
    let channel = webhook("hook", &receiver.url);
    alerts::record(&pool, &alert(AlertKind::Block, None, "one")).await.unwrap();
    let crashing = dispatcher(&pool, vec![channel.clone()]);
    let task = tokio::spawn(async move { crashing.tick().await });
    let start = std::time::Instant::now();
    while receiver.count() < 1 {
        assert!(start.elapsed() < DEADLINE);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    let d = dispatcher(&pool, vec![channel]);
    drive(&d, async || states(&pool).await.first().is_some_and(|s| s.0 == "delivered")).await;
    let requests = receiver.requests();
    assert_eq!(requests.len(), 2, "sent again after the crash");
    assert_eq!(requests[0].header("x-fleetban-message-id"), requests[1].header("x-fleetban-message-id"));
    assert_eq!(requests[0].json()["events"][0]["id"], requests[1].json()["events"][0]["id"]);
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn two_replicas_deliver_each_message_once(pool: PgPool) {
    let receiver = Receiver::start(&[], 200, Duration::from_millis(10)).await;
    let channel = webhook("hook", &receiver.url);
    for i in 0..40 {
        alerts::record(&pool, &alert(AlertKind::Block, None, &format!("event {i}"))).await.unwrap();
    }
    let a = spawn_run(dispatcher(&pool, vec![channel.clone()]));
    let b = spawn_run(dispatcher(&pool, vec![channel]));
    delivered(&pool, 40).await;
    for (stop, task) in [a, b] {
        stop.send(()).unwrap();
        tokio::time::timeout(DEADLINE, task).await.unwrap().unwrap();
    }
    let requests = receiver.requests();
    let ids: BTreeSet<String> = requests.iter().map(|r| r.header("x-fleetban-message-id")).collect();
    assert_eq!(ids.len(), 40);
    assert_eq!(requests.len(), 40, "no message sent by both replicas");
    let routed: i64 = sqlx::query_scalar("select count(*) from notify_outbox").fetch_one(&pool).await.unwrap();
    assert_eq!(routed, 40, "each event routed once");
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn the_api_sends_a_test_message_for_admins(pool: PgPool) {
    let receiver = Receiver::start(&[], 200, Duration::ZERO).await;
    let failing = Receiver::start(&[], 500, Duration::ZERO).await;
    let channels = Channels::new(vec![webhook("ops", &receiver.url), webhook("broken", &failing.url)]);
    let app = api::router(AppState::new(pool.clone(), CorrelateConfig::default()).with_channels(channels));
    let t = common::tokens(&pool).await;
    let call = async |uri: &str, token: &str| {
        let request =
            Request::builder().method(Method::POST).uri(uri).header("authorization", format!("Bearer {token}"));
        let response = app.clone().oneshot(request.body(Body::empty()).unwrap()).await.unwrap();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
        (status, serde_json::from_slice::<Value>(&body).unwrap_or(Value::Null))
    };
    assert_eq!(call("/api/v1/notify/ops/test", &t.read).await.0, StatusCode::FORBIDDEN);
    assert_eq!(receiver.count(), 0);
    assert_eq!(call("/api/v1/notify/nope/test", &t.admin).await.0, StatusCode::NOT_FOUND);
    let (status, body) = call("/api/v1/notify/ops/test", &t.admin).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["delivered"], true);
    let request = &receiver.requests()[0];
    verify_signature(request);
    assert_eq!(request.json()["events"][0]["type"], "test");
    assert_eq!(request.header("x-fleetban-message-id"), body["message_id"].as_str().unwrap());
    let (status, body) = call("/api/v1/notify/broken/test", &t.admin).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["delivered"], false);
    assert_eq!(body["error"], "HTTP 500");
    let audited: Vec<String> =
        sqlx::query_scalar("select target from audit_log where action = 'notify.test' order by id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(audited, ["ops", "broken"]);
}

async fn fleetban(url: &str, token: &str, args: &[&str]) -> std::process::Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_fleetban"));
    command.env_remove("FLEETBAN_URL").env_remove("FLEETBAN_TOKEN").args(["--url", url, "--token", token]);
    command.args(args).stdin(std::process::Stdio::null()).output().await.unwrap()
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn the_cli_lists_channels_and_sends_a_test(pool: PgPool) {
    let receiver = Receiver::start(&[], 200, Duration::ZERO).await;
    let failing = Receiver::start(&[], 500, Duration::ZERO).await;
    let mut digest = webhook("digest", &failing.url);
    digest.digest_interval_secs = Some(600);
    digest.events = vec![AlertKind::Block];
    let channels = Channels::new(vec![webhook("ops", &receiver.url), digest]);
    let app = api::router(AppState::new(pool.clone(), CorrelateConfig::default()).with_channels(channels));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let t = common::tokens(&pool).await;
    alerts::record(&pool, &alert(AlertKind::Block, None, "queued")).await.unwrap();
    dispatcher(&pool, vec![webhook("ops", "http://127.0.0.1:9/"), webhook("digest", "http://127.0.0.1:9/")])
        .route()
        .await
        .unwrap();

    let out = fleetban(&url, &t.read, &["notify"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("NAME") && lines[0].contains("QUEUED") && lines[0].contains("DEAD"), "{table}");
    assert!(lines[1].starts_with("ops") && lines[1].contains("each"), "{table}");
    assert!(
        lines[2].starts_with("digest") && lines[2].contains("digest 600s") && lines[2].contains("block"),
        "{table}"
    );
    let json: Value = serde_json::from_slice(&fleetban(&url, &t.read, &["--json", "notify"]).await.stdout).unwrap();
    assert_eq!(json[0]["queued_events"], 1);
    assert_eq!(json[1]["queued_events"], 1);

    let out = fleetban(&url, &t.admin, &["notify", "test", "ops"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8(out.stdout).unwrap();
    let id = receiver.requests()[0].header("x-fleetban-message-id");
    assert_eq!(said, format!("test message {id} delivered through ops\n"));
    let out = fleetban(&url, &t.admin, &["notify", "test", "digest"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.lines().count() == 1, "{stderr}");
    assert!(stderr.contains("not delivered") && stderr.contains("HTTP 500"), "{stderr}");
    let out = fleetban(&url, &t.read, &["notify", "test", "ops"]).await;
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("403"));
    assert_eq!(receiver.count(), 1, "a read token sends nothing");
    server.abort();
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn old_messages_and_events_are_deleted(pool: PgPool) {
    let receiver = Receiver::start(&[], 200, Duration::ZERO).await;
    let d = dispatcher(&pool, vec![webhook("hook", &receiver.url)]);
    alerts::record(&pool, &alert(AlertKind::Block, None, "old, delivered")).await.unwrap();
    assert_eq!(d.tick().await.unwrap(), [Outcome::Delivered]);
    // An event queued for a channel that has since been removed.
    alerts::record(&pool, &alert(AlertKind::Block, None, "old, orphaned")).await.unwrap();
    dispatcher(&pool, vec![webhook("removed", "http://127.0.0.1:9/")]).route().await.unwrap();
    sqlx::query("update notify_messages set created_at = now() - interval '31 days'").execute(&pool).await.unwrap();
    sqlx::query("update notify_outbox set queued_at = now() - interval '31 days'").execute(&pool).await.unwrap();
    sqlx::query("update alert_events set occurred_at = now() - interval '31 days'").execute(&pool).await.unwrap();
    alerts::record(&pool, &alert(AlertKind::Block, None, "new")).await.unwrap();
    alerts::dispatch::cleanup(&pool, Duration::from_secs(30 * 86_400)).await.unwrap();
    let left: Vec<String> = sqlx::query_scalar("select summary from alert_events").fetch_all(&pool).await.unwrap();
    assert_eq!(left, ["new"]);
    let rows: (i64, i64) =
        sqlx::query_as("select (select count(*) from notify_messages), (select count(*) from notify_outbox)")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(rows, (0, 0));
}
