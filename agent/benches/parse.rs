//! Parser throughput over 1M generated lines (`genlog`, seed 1), one core;
//! and the Dovecot parser's over 1M lines of Dovecot's login log
//! ([`dovecot_log`]: the real shapes of `agent/tests/data/dovecot/` in its
//! three prefixes, with varied addresses and users), for the comparison
//! (`*/dovecot_parse_line` against `*/parse_line`).
//!
//! `cargo bench -p fleetban-agent --bench parse` reports lines/s (`elem/s`)
//! and bytes/s for `parse_line`, and lines/s for the stateful `Parser` with
//! a real time zone (offset cache on the hot path). The `cpu_*` groups
//! measure the benchmark thread's CPU time instead of wall time, so the
//! figure is per core even when other processes compete for the machine.

use std::hint::black_box;
use std::time::Duration;

use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use fleetban_agent::parse::{LogKind, Parser, Timezone, genlog, parse_line, parse_line_as};

const LINES: u64 = 1_000_000;

fn log() -> Vec<u8> {
    let mut buf = Vec::with_capacity(200 * LINES as usize);
    genlog::write_log(LINES, 1, &mut buf).expect("writing to a Vec cannot fail");
    buf
}

/// 1M Dovecot lines: logins, auth failures with attempts, sessions without
/// authentication, bad commands and the post-login processes' noise, in
/// `log_path`, BSD syslog and RFC 5424 prefixes.
fn dovecot_log() -> Vec<u8> {
    use std::io::Write as _;
    let mut buf = Vec::with_capacity(220 * LINES as usize);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in 0..LINES {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let ip = format!("{}.{}.{}.{}", 1 + (x >> 56) % 223, (x >> 48) & 255, (x >> 40) & 255, 1 + (x >> 32) % 254);
        let prefix = match i % 3 {
            0 => "Nov 28 14:40:27 ",
            1 => "Nov 28 14:40:27 mail dovecot[812]: ",
            _ => "<22>1 2026-11-28T14:40:27.003Z mail dovecot 812 - - ",
        };
        let info = if i % 3 == 0 { "Info: " } else { "" };
        let service = if x.is_multiple_of(3) { "pop3" } else { "imap" };
        let user = format!("user{}@example.org", x % 5000);
        let _ = match (x >> 8) % 10 {
            0..=2 => writeln!(
                buf,
                "{prefix}{service}-login: {info}Login: user=<{user}>, method=PLAIN, rip={ip}, lip=192.0.2.11, mpid={}, TLS, session=<L4PsHFdheaTLAHEy>",
                x % 99_999
            ),
            3..=4 => writeln!(
                buf,
                "{prefix}{service}-login: {info}Disconnected: Aborted login by logging out (auth failed, {} attempts in 13 secs): user=<{user}>, method=PLAIN, rip={ip}, lip=192.0.2.11, TLS, session=<PD+wJldh7aDGM2Qo>",
                1 + x % 3
            ),
            5 => writeln!(
                buf,
                "{prefix}{service}-login: {info}Disconnected: Connection closed (no auth attempts in 0 secs): user=<>, rip={ip}, lip=192.0.2.11, TLS handshaking: SSL_accept() failed: error:0A000416:SSL routines::sslv3 alert certificate unknown: SSL alert number 46, session=<B2jSjlZhKth/AAAB>"
            ),
            6 => writeln!(
                buf,
                "{prefix}{service}-login: {info}Disconnected: Too many invalid commands (no auth attempts in 0 secs): user=<>, rip={ip}, lip=192.0.2.11, session=<B2jSjlZhKth/AAAB>"
            ),
            _ => writeln!(
                buf,
                "{prefix}{service}({user})<24606><prhPjlZhWLF/AAAB>: {info}Disconnected: Logged out in=12 out=477 deleted=0 expunged=0 trashed=0 hdr_count=0 hdr_bytes=0 body_count=0 body_bytes=0"
            ),
        };
    }
    buf
}

fn dovecot(line: &[u8]) -> bool {
    parse_line_as(LogKind::Dovecot, line).is_some()
}

fn count_events(buf: &[u8], mut f: impl FnMut(&[u8]) -> bool) -> u64 {
    let mut events = 0;
    for line in buf.split(|b| *b == b'\n') {
        events += u64::from(f(line));
    }
    events
}

fn bench(c: &mut Criterion) {
    let buf = log();
    let events = count_events(&buf, |l| parse_line(l).is_some());
    eprintln!("input: {LINES} lines, {} bytes, {events} events", buf.len());
    let dove = dovecot_log();
    let events = count_events(&dove, dovecot);
    eprintln!("dovecot input: {LINES} lines, {} bytes, {events} events", dove.len());

    let mut g = c.benchmark_group("parse_1m_lines");
    g.sampling_mode(SamplingMode::Flat).sample_size(10).measurement_time(Duration::from_secs(8));
    g.throughput(Throughput::Elements(LINES));
    g.bench_function("parse_line", |b| b.iter(|| count_events(black_box(&buf), |l| parse_line(l).is_some())));
    g.bench_function("dovecot_parse_line", |b| b.iter(|| count_events(black_box(&dove), dovecot)));
    g.bench_function("parser_feed_europe_berlin", |b| {
        let tz = Timezone::from_config("Europe/Berlin").expect("zone in tzdb");
        b.iter(|| {
            let mut p = Parser::new(tz.clone());
            count_events(black_box(&buf), |l| p.feed(l).is_some())
        })
    });
    g.finish();

    let mut g = c.benchmark_group("parse_1m_bytes");
    g.sampling_mode(SamplingMode::Flat).sample_size(10).measurement_time(Duration::from_secs(8));
    g.throughput(Throughput::Bytes(buf.len() as u64));
    g.bench_function("parse_line", |b| b.iter(|| count_events(black_box(&buf), |l| parse_line(l).is_some())));
    g.finish();
}

/// CPU time consumed by the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant
    // Linux supports. On failure `ts` stays zero.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Criterion measurement of thread CPU time.
struct ThreadCpu;

static WALL: WallTime = WallTime;

impl Measurement for ThreadCpu {
    type Intermediate = Duration;
    type Value = Duration;

    fn start(&self) -> Duration {
        thread_cpu()
    }

    fn end(&self, start: Duration) -> Duration {
        thread_cpu().saturating_sub(start)
    }

    fn add(&self, a: &Duration, b: &Duration) -> Duration {
        *a + *b
    }

    fn zero(&self) -> Duration {
        Duration::ZERO
    }

    fn to_f64(&self, value: &Duration) -> f64 {
        value.as_nanos() as f64
    }

    fn formatter(&self) -> &dyn ValueFormatter {
        WALL.formatter()
    }
}

fn bench_cpu(c: &mut Criterion<ThreadCpu>) {
    let buf = log();
    let dove = dovecot_log();
    let mut g = c.benchmark_group("cpu_parse_1m_lines");
    g.sampling_mode(SamplingMode::Flat).sample_size(10).measurement_time(Duration::from_secs(8));
    g.throughput(Throughput::Elements(LINES));
    g.bench_function("parse_line", |b| b.iter(|| count_events(black_box(&buf), |l| parse_line(l).is_some())));
    g.bench_function("dovecot_parse_line", |b| b.iter(|| count_events(black_box(&dove), dovecot)));
    g.finish();
    let mut g = c.benchmark_group("cpu_parse_1m_bytes");
    g.sampling_mode(SamplingMode::Flat).sample_size(10).measurement_time(Duration::from_secs(8));
    g.throughput(Throughput::Bytes(buf.len() as u64));
    g.bench_function("parse_line", |b| b.iter(|| count_events(black_box(&buf), |l| parse_line(l).is_some())));
    g.finish();
    let mut g = c.benchmark_group("cpu_parse_dovecot_1m_bytes");
    g.sampling_mode(SamplingMode::Flat).sample_size(10).measurement_time(Duration::from_secs(8));
    g.throughput(Throughput::Bytes(dove.len() as u64));
    g.bench_function("dovecot_parse_line", |b| b.iter(|| count_events(black_box(&dove), dovecot)));
    g.finish();
}

criterion_group!(benches, bench);
criterion_group! {
    name = cpu;
    config = Criterion::default().with_measurement(ThreadCpu);
    targets = bench_cpu
}
criterion_main!(benches, cpu);
