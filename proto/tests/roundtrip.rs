//! Every message of the wire contract survives encode → decode unchanged, and
//! the list of messages checked here is compared with the compiled descriptor
//! set, so a message added to the proto without a round-trip case fails.

use std::collections::BTreeSet;
use std::net::IpAddr;

use fleetban_proto::v1::*;
use prost::Message;

fn ip(s: &str) -> IpAddress {
    s.parse::<IpAddr>().unwrap().into()
}

fn cidr(s: &str) -> Cidr {
    s.parse::<ipnet::IpNet>().unwrap().into()
}

fn policy() -> Policy {
    Policy {
        smtp_accept_max: 100,
        slot_alarm_ratio: 0.9,
        slot_share: 0.1,
        slot_window_secs: 60,
        conn_rate: 30,
        auth_failures: 5,
        abuse_events: 10,
        ipv6_block_prefix: 64,
        local_block_ttl_secs: 3600,
        rules: vec![rule_policy()],
        protected_domains: vec!["google.com".into()],
        protected_domains_set: true,
        good_standing_secs: 604_800,
    }
}

fn rule_policy() -> RulePolicy {
    RulePolicy {
        name: "auth".into(),
        per_host: 10,
        window_secs: 3600,
        distinct_users: 5,
        good_standing_factor: 5,
        shadow: true,
    }
}

fn event() -> Event {
    Event {
        time_ms: 1_764_201_600_123,
        kind: EventKind::AuthFailed as i32,
        remote: Some(ip("2001:db8::66")),
        remote_port: 40_123,
        local_port: 587,
        connection_count: 17,
        auth_user: "info@example.com".into(),
        helo: "attacker.example".into(),
        raw: "2026-11-27 01:02:03 dovecot_login authenticator failed for ...".into(),
        local: Some(ip("192.0.2.11")),
        detail: "dovecot_login".into(),
        duration_ms: 1_250,
        host_name: "mail.attacker.example".into(),
        service: fleetban_proto::v1::Service::Imap as i32,
        attempts: 3,
    }
}

fn entry(id: i64, net: &str) -> BlockEntry {
    BlockEntry {
        block_id: id,
        cidr: Some(cidr(net)),
        expires_at_ms: 1_764_205_200_000,
        reason: "fleet_correlation".into(),
    }
}

fn round_trip<M: Message + Default + PartialEq + std::fmt::Debug>(msg: M) -> &'static str {
    let bytes = msg.encode_to_vec();
    let back = M::decode(bytes.as_slice()).expect("decodes");
    assert_eq!(back, msg);
    // Non-default messages must encode to something: a case that encodes to
    // nothing would prove nothing.
    assert!(!bytes.is_empty(), "{msg:?} encoded to zero bytes");
    std::any::type_name::<M>().rsplit("::").next().unwrap()
}

fn summary() -> ContextSummary {
    ContextSummary {
        remote: Some(ip("198.51.100.7")),
        service: Service::Imap as i32,
        interval_start_ms: 1_764_000_000_000,
        interval_secs: 60,
        counts: vec![
            KindCount { kind: EventKind::Connect as i32, lines: 40, last_seen_ms: 1_764_000_059_000 },
            KindCount { kind: EventKind::Login as i32, lines: 2, last_seen_ms: 1_764_000_030_000 },
        ],
        first_seen_ms: 1_764_000_000_100,
        last_seen_ms: 1_764_000_059_000,
        max_connection_count: 17,
        host_name: "relay.example.net".into(),
        samples: vec!["2026-11-27 10:00:00 SMTP connection from [198.51.100.7]".into()],
    }
}

#[test]
fn every_message_round_trips() {
    let mut seen = BTreeSet::new();
    let hello = Hello {
        agent_id: "0d6b5f0e-8f1e-4c1a-9b7e-3f1d2c4b5a69".into(),
        version: "0.1.0".into(),
        hostname: "mx1.example.net".into(),
        addresses: vec![ip("192.0.2.11"), ip("2001:db8::11")],
        blocklist_version: 42,
        next_seq: 7,
    };
    let batch = EventBatch {
        seq: 7,
        events: vec![event(), Event { kind: EventKind::Connect as i32, remote: Some(ip("198.51.100.7")), ..event() }],
        position: Some(SourcePosition {
            path: "/var/log/exim_mainlog".into(),
            fingerprint: u64::MAX - 1,
            offset: 123_456,
            open_from: Some(100_000),
        }),
        summaries: vec![summary()],
    };
    let local_block = LocalBlock {
        cidr: Some(cidr("2001:db8:bad::/64")),
        reason: "slot_exhaustion".into(),
        evidence: "41 of 100 slots".into(),
        time_ms: 1,
        ttl_secs: 3600,
        shadow: true,
    };
    let heartbeat = Heartbeat { blocklist_version: 9, firewall_entries: 100_000, pending_batches: 3 };
    let applied = Applied { blocklist_version: 9, firewall_entries: 12 };
    let loss = SpoolLoss { dropped_events: 1000, dropped_batches: 1 };
    let snapshot =
        BlocklistSnapshot { version: 9, entries: vec![entry(1, "198.51.100.0/24"), entry(2, "2001:db8:bad::/64")] };
    let delta = BlocklistDelta {
        from_version: 9,
        to_version: 11,
        added: vec![entry(3, "203.0.113.9/32")],
        removed: vec![1, 2],
    };
    let agent_frames = [
        agent_frame::Frame::Hello(hello.clone()),
        agent_frame::Frame::Batch(batch.clone()),
        agent_frame::Frame::LocalBlock(local_block.clone()),
        agent_frame::Frame::Heartbeat(heartbeat),
        agent_frame::Frame::Applied(applied),
        agent_frame::Frame::SpoolLoss(loss),
    ];
    for frame in agent_frames {
        seen.insert(round_trip(AgentFrame { frame: Some(frame) }));
    }
    let welcome = Welcome { server_version: "0.1.0".into(), last_acked_seq: 6, heartbeat_secs: 15 };
    let ack = Ack {
        seq: 7,
        rejected_events: 1,
        rejections: vec![Rejection { reason: "too_old".into(), events: 1, detail: "max_event_age_days".into() }],
    };
    let nack = Nack { seq: 8, reason: "batch of 20000 events exceeds 10000".into() };
    let allowlist = Allowlist { ranges: vec![cidr("198.51.100.0/25"), cidr("2001:db8:a::/48")] };
    let revocation = Revocation { block_id: 13, cidr: Some(cidr("198.51.100.5/32")), age_ms: 250 };
    let revocations = Revocations { revocations: vec![revocation.clone()] };
    let server_frames = [
        server_frame::Frame::Welcome(welcome.clone()),
        server_frame::Frame::Ack(ack.clone()),
        server_frame::Frame::Snapshot(snapshot.clone()),
        server_frame::Frame::Delta(delta.clone()),
        server_frame::Frame::Policy(policy()),
        server_frame::Frame::Nack(nack.clone()),
        server_frame::Frame::Allowlist(allowlist.clone()),
        server_frame::Frame::Revocations(revocations.clone()),
    ];
    for frame in server_frames {
        seen.insert(round_trip(ServerFrame { frame: Some(frame) }));
    }
    seen.insert(round_trip(EnrollRequest {
        token: "fbe_0123456789abcdef".into(),
        hostname: "mx1.example.net".into(),
        version: "0.1.0".into(),
        addresses: vec![ip("192.0.2.11")],
        name: "mx1".into(),
        host_id: "9f2c4e1a7b3d5f60a1b2c3d4e5f60718".into(),
    }));
    seen.insert(round_trip(EnrollResponse {
        agent_id: "0d6b5f0e-8f1e-4c1a-9b7e-3f1d2c4b5a69".into(),
        agent_secret: "s3cr3t".into(),
        policy: Some(policy()),
        reenrolled: true,
    }));
    for name in [
        round_trip(hello),
        round_trip(batch),
        round_trip(local_block),
        round_trip(heartbeat),
        round_trip(applied),
        round_trip(loss),
        round_trip(welcome),
        round_trip(ack),
        round_trip(nack),
        round_trip(allowlist),
        round_trip(revocations),
        round_trip(revocation),
        round_trip(snapshot),
        round_trip(delta),
        round_trip(policy()),
        round_trip(rule_policy()),
        round_trip(event()),
        round_trip(entry(5, "192.0.2.0/24")),
        round_trip(cidr("192.0.2.0/24")),
        round_trip(ip("::1")),
        round_trip(SourcePosition { path: "/x".into(), fingerprint: 1, offset: 2, open_from: Some(0) }),
        round_trip(summary()),
        round_trip(KindCount { kind: EventKind::Accepted as i32, lines: 3, last_seen_ms: 5 }),
        round_trip(Rejection { reason: "in_future".into(), events: 2, detail: "check the clock".into() }),
    ] {
        seen.insert(name);
    }

    let fds = prost_types::FileDescriptorSet::decode(fleetban_proto::FILE_DESCRIPTOR_SET).unwrap();
    let declared: BTreeSet<String> =
        fds.file.iter().flat_map(|f| f.message_type.iter().filter_map(|m| m.name.clone())).collect();
    let seen: BTreeSet<String> = seen.into_iter().map(str::to_owned).collect();
    assert_eq!(declared, seen, "every declared message must have a round-trip case");
}

#[test]
fn unknown_enum_values_and_fields_are_tolerated() {
    // A newer agent may send an event kind this server does not know yet.
    let mut ev = event();
    ev.kind = 999;
    let back = Event::decode(ev.encode_to_vec().as_slice()).unwrap();
    assert_eq!(back.kind, 999);
    assert_eq!(back.kind(), EventKind::Unspecified);

    // A field from the future (number 50) is skipped by an older reader.
    let mut bytes = Ack { seq: 3, ..Ack::default() }.encode_to_vec();
    bytes.extend_from_slice(&[0x90, 0x03, 0x01]); // field 50, varint 1
    assert_eq!(Ack::decode(bytes.as_slice()).unwrap().seq, 3);

    // A server frame of a kind this agent does not know (here number 9, as
    // `revocations` = 8 is to an agent older than it) decodes as an empty
    // frame, which agents log and ignore.
    let future = [0x4a, 0x02, 0x08, 0x01]; // field 9, length 2: {1: 1}
    assert_eq!(ServerFrame::decode(future.as_slice()).unwrap().frame, None);
}

/// `Ack` as agents before `Ack.rejections` know it.
#[derive(Clone, PartialEq, prost::Message)]
struct AckBeforeRejections {
    #[prost(uint64, tag = "1")]
    seq: u64,
    #[prost(uint32, tag = "2")]
    rejected_events: u32,
}

#[test]
fn rejection_reasons_are_compatible_both_ways() {
    let ack = Ack {
        seq: 9,
        rejected_events: 5,
        rejections: vec![
            Rejection { reason: "too_old".into(), events: 4, detail: "older than 30 days".into() },
            Rejection { reason: "invalid_remote".into(), events: 1, detail: String::new() },
        ],
    };
    // An older agent reads a newer server's Ack: seq and count intact.
    let old = AckBeforeRejections::decode(ack.encode_to_vec().as_slice()).unwrap();
    assert_eq!((old.seq, old.rejected_events), (9, 5));
    // A newer agent reads an older server's Ack: no reasons, the count stays.
    let new = Ack::decode(AckBeforeRejections { seq: 9, rejected_events: 5 }.encode_to_vec().as_slice()).unwrap();
    assert_eq!((new.seq, new.rejected_events, new.rejections.len()), (9, 5, 0));
}

#[test]
fn garbage_is_an_error_not_a_panic() {
    for bytes in [&[0xff_u8, 0xff, 0xff][..], &[0x0a, 0x10, 0x01], &[0x12]] {
        assert!(AgentFrame::decode(bytes).is_err());
    }
}
