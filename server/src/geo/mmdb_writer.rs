//! A minimal writer of MaxMind DB files for tests (the `maxminddb` crate
//! only reads): an IPv4 tree with 24-bit records whose networks map to
//! `{"country": {"iso_code": CODE}}`, as DB-IP's and MaxMind's country
//! databases do, and the metadata the reader requires. Format:
//! <https://maxmind.github.io/MaxMind-DB/>.

use ipnet::Ipv4Net;

#[derive(Clone, Copy)]
enum Record {
    Empty,
    Node(u32),
    Data(u32),
}

fn control(kind: u8, size: usize, out: &mut Vec<u8>) {
    assert!(size < 29, "the test writer only writes small values");
    if kind <= 7 {
        out.push((kind << 5) | size as u8);
    } else {
        out.push(size as u8);
        out.push(kind - 7);
    }
}

fn string(s: &str, out: &mut Vec<u8>) {
    control(2, s.len(), out);
    out.extend_from_slice(s.as_bytes());
}

fn uint(kind: u8, value: u64, out: &mut Vec<u8>) {
    let bytes = value.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    control(kind, 8 - skip, out);
    out.extend_from_slice(&bytes[skip..]);
}

/// A country database of `networks` (non-overlapping).
pub(crate) fn country_db(networks: &[(Ipv4Net, &str)]) -> Vec<u8> {
    let mut nodes: Vec<[Record; 2]> = vec![[Record::Empty; 2]];
    let mut data = Vec::new();
    for (net, code) in networks {
        let offset = data.len() as u32;
        control(7, 1, &mut data);
        string("country", &mut data);
        control(7, 1, &mut data);
        string("iso_code", &mut data);
        string(code, &mut data);
        let bits = u32::from(net.network());
        let len = usize::from(net.prefix_len());
        let mut current = 0usize;
        for i in 0..len {
            let bit = ((bits >> (31 - i)) & 1) as usize;
            if i == len - 1 {
                nodes[current][bit] = Record::Data(offset);
            } else {
                current = match nodes[current][bit] {
                    Record::Node(n) => n as usize,
                    _ => {
                        nodes.push([Record::Empty; 2]);
                        let n = nodes.len() - 1;
                        nodes[current][bit] = Record::Node(n as u32);
                        n
                    }
                };
            }
        }
    }
    let node_count = nodes.len() as u32;
    let mut out = Vec::new();
    for node in &nodes {
        for record in node {
            let value = match *record {
                Record::Empty => node_count,
                Record::Node(n) => n,
                Record::Data(offset) => node_count + 16 + offset,
            };
            out.extend_from_slice(&value.to_be_bytes()[1..]);
        }
    }
    out.extend_from_slice(&[0; 16]);
    out.extend_from_slice(&data);
    out.extend_from_slice(b"\xAB\xCD\xEFMaxMind.com");
    control(7, 9, &mut out);
    string("binary_format_major_version", &mut out);
    uint(5, 2, &mut out);
    string("binary_format_minor_version", &mut out);
    uint(5, 0, &mut out);
    string("build_epoch", &mut out);
    uint(9, 1_764_288_000, &mut out);
    string("database_type", &mut out);
    string("fleetban-test-country", &mut out);
    string("description", &mut out);
    control(7, 1, &mut out);
    string("en", &mut out);
    string("test", &mut out);
    string("ip_version", &mut out);
    uint(5, 4, &mut out);
    string("languages", &mut out);
    control(11, 1, &mut out);
    string("en", &mut out);
    string("node_count", &mut out);
    uint(6, u64::from(node_count), &mut out);
    string("record_size", &mut out);
    uint(5, 24, &mut out);
    out
}
