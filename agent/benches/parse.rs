//! Parser throughput over 1M generated lines (`genlog`, seed 1), one core.
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
use fleetban_agent::parse::{Parser, Timezone, genlog, parse_line};

const LINES: u64 = 1_000_000;

fn log() -> Vec<u8> {
    let mut buf = Vec::with_capacity(200 * LINES as usize);
    genlog::write_log(LINES, 1, &mut buf).expect("writing to a Vec cannot fail");
    buf
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

    let mut g = c.benchmark_group("parse_1m_lines");
    g.sampling_mode(SamplingMode::Flat).sample_size(10).measurement_time(Duration::from_secs(8));
    g.throughput(Throughput::Elements(LINES));
    g.bench_function("parse_line", |b| b.iter(|| count_events(black_box(&buf), |l| parse_line(l).is_some())));
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
    let mut g = c.benchmark_group("cpu_parse_1m_lines");
    g.sampling_mode(SamplingMode::Flat).sample_size(10).measurement_time(Duration::from_secs(8));
    g.throughput(Throughput::Elements(LINES));
    g.bench_function("parse_line", |b| b.iter(|| count_events(black_box(&buf), |l| parse_line(l).is_some())));
    g.finish();
    let mut g = c.benchmark_group("cpu_parse_1m_bytes");
    g.sampling_mode(SamplingMode::Flat).sample_size(10).measurement_time(Duration::from_secs(8));
    g.throughput(Throughput::Bytes(buf.len() as u64));
    g.bench_function("parse_line", |b| b.iter(|| count_events(black_box(&buf), |l| parse_line(l).is_some())));
    g.finish();
}

criterion_group!(benches, bench);
criterion_group! {
    name = cpu;
    config = Criterion::default().with_measurement(ThreadCpu);
    targets = bench_cpu
}
criterion_main!(benches, cpu);
