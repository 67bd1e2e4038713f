//! Encoder for PostgreSQL's binary `COPY` format.
//!
//! Ingest writes each batch's events with `COPY events (...) FROM STDIN WITH
//! (FORMAT binary)`: one message for the whole batch, no per-row statement
//! and no array decoding on the server, and Postgres inserts the rows in
//! multi-row groups. The format is documented in the `COPY` reference
//! ("Binary Format"); each value is the type's binary send representation.
//!
//! The caller writes every field of a row, in the column order of its `COPY`
//! statement; the field count given to [`CopyBuf::row`] must match (checked
//! in debug builds).

use std::net::IpAddr;

use time::OffsetDateTime;
use uuid::Uuid;

/// Signature, flags (no OIDs) and header extension length (none).
const HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
/// Microseconds between the Unix epoch and Postgres' epoch (2000-01-01 UTC).
const PG_EPOCH_OFFSET_US: i128 = 946_684_800_000_000;
/// `inet` address families as Postgres encodes them (`PGSQL_AF_INET`,
/// `PGSQL_AF_INET6`).
const PGSQL_AF_INET: u8 = 2;
const PGSQL_AF_INET6: u8 = 3;
/// Type OIDs of array elements (`pg_type.oid`).
const TEXT_OID: u32 = 25;
const INT4_OID: u32 = 23;

/// A binary `COPY` stream being built in memory.
#[derive(Debug)]
pub struct CopyBuf {
    buf: Vec<u8>,
    #[cfg(debug_assertions)]
    fields_left: usize,
}

impl CopyBuf {
    /// An empty stream (just the header) with room for about `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> Self {
        let mut buf = Vec::with_capacity(capacity.max(HEADER.len() + 2));
        buf.extend_from_slice(HEADER);
        CopyBuf {
            buf,
            #[cfg(debug_assertions)]
            fields_left: 0,
        }
    }

    /// Starts a row of `fields` fields.
    pub fn row(&mut self, fields: u16) {
        #[cfg(debug_assertions)]
        {
            debug_assert_eq!(self.fields_left, 0, "previous COPY row is incomplete");
            self.fields_left = usize::from(fields);
        }
        self.buf.extend_from_slice(&(fields as i16).to_be_bytes());
    }

    /// A field's length word; -1 is NULL.
    fn length(&mut self, len: i32) {
        #[cfg(debug_assertions)]
        {
            debug_assert!(self.fields_left > 0, "more COPY fields than the row declared");
            self.fields_left -= 1;
        }
        self.buf.extend_from_slice(&len.to_be_bytes());
    }

    fn field(&mut self, len: usize) {
        // Every value written here is far below 2 GiB (strings are bounded
        // by ingest validation), so the length fits an i32.
        self.length(len as i32);
    }

    /// A NULL.
    pub fn null(&mut self) {
        self.length(-1);
    }

    /// A `uuid`.
    pub fn uuid(&mut self, value: Uuid) {
        self.field(16);
        self.buf.extend_from_slice(value.as_bytes());
    }

    /// An `int4`.
    pub fn i32(&mut self, value: i32) {
        self.field(4);
        self.buf.extend_from_slice(&value.to_be_bytes());
    }

    /// An `int8`.
    pub fn i64(&mut self, value: i64) {
        self.field(8);
        self.buf.extend_from_slice(&value.to_be_bytes());
    }

    /// A `timestamptz`, to the microsecond.
    pub fn timestamptz(&mut self, value: OffsetDateTime) {
        let us = value.unix_timestamp_nanos() / 1_000 - PG_EPOCH_OFFSET_US;
        // OffsetDateTime spans years ±9999, well inside i64 microseconds.
        self.i64(us as i64);
    }

    /// A `text` (UTF-8; the caller has ruled out NUL bytes).
    pub fn text(&mut self, value: &str) {
        self.field(value.len());
        self.buf.extend_from_slice(value.as_bytes());
    }

    /// An `inet` host address (full mask).
    pub fn inet(&mut self, value: IpAddr) {
        match value {
            IpAddr::V4(v4) => {
                self.field(8);
                self.buf.extend_from_slice(&[PGSQL_AF_INET, 32, 0, 4]);
                self.buf.extend_from_slice(&v4.octets());
            }
            IpAddr::V6(v6) => {
                self.field(20);
                self.buf.extend_from_slice(&[PGSQL_AF_INET6, 128, 0, 16]);
                self.buf.extend_from_slice(&v6.octets());
            }
        }
    }

    /// An optional `int4`.
    pub fn opt_i32(&mut self, value: Option<i32>) {
        match value {
            Some(v) => self.i32(v),
            None => self.null(),
        }
    }

    /// An optional `int8`.
    pub fn opt_i64(&mut self, value: Option<i64>) {
        match value {
            Some(v) => self.i64(v),
            None => self.null(),
        }
    }

    /// An optional `text`.
    pub fn opt_text(&mut self, value: Option<&str>) {
        match value {
            Some(v) => self.text(v),
            None => self.null(),
        }
    }

    /// An optional `inet`.
    pub fn opt_inet(&mut self, value: Option<IpAddr>) {
        match value {
            Some(v) => self.inet(v),
            None => self.null(),
        }
    }

    /// A one-dimensional `text[]` without NULLs (the caller has ruled out
    /// NUL bytes).
    pub fn text_array(&mut self, values: &[&str]) {
        let body: usize = values.iter().map(|v| 4 + v.len()).sum();
        self.array_header(values.len(), TEXT_OID, body);
        for v in values {
            self.buf.extend_from_slice(&(v.len() as i32).to_be_bytes());
            self.buf.extend_from_slice(v.as_bytes());
        }
    }

    /// A one-dimensional `int4[]` without NULLs.
    pub fn i32_array(&mut self, values: &[i32]) {
        self.array_header(values.len(), INT4_OID, values.len() * 8);
        for v in values {
            self.buf.extend_from_slice(&4i32.to_be_bytes());
            self.buf.extend_from_slice(&v.to_be_bytes());
        }
    }

    /// The field length and the array header (`array_send`): dimensions,
    /// has-nulls flag, element type, then size and lower bound per
    /// dimension; an empty array has no dimension.
    fn array_header(&mut self, len: usize, element_oid: u32, body: usize) {
        let dims = if len == 0 { 0 } else { 1 };
        self.field(12 + dims * 8 + body);
        self.buf.extend_from_slice(&(dims as i32).to_be_bytes());
        self.buf.extend_from_slice(&0i32.to_be_bytes());
        self.buf.extend_from_slice(&element_oid.to_be_bytes());
        if len > 0 {
            self.buf.extend_from_slice(&(len as i32).to_be_bytes());
            self.buf.extend_from_slice(&1i32.to_be_bytes());
        }
    }

    /// The finished stream, trailer included.
    pub fn finish(mut self) -> Vec<u8> {
        #[cfg(debug_assertions)]
        debug_assert_eq!(self.fields_left, 0, "last COPY row is incomplete");
        self.buf.extend_from_slice(&(-1i16).to_be_bytes());
        self.buf
    }
}

/// One binary `COPY` stream with the rows of every finished stream of
/// `streams`, in order; `None` when there are none.
pub fn concat<'a>(streams: impl Iterator<Item = &'a [u8]>) -> Option<Vec<u8>> {
    let streams: Vec<&[u8]> = streams.filter(|s| s.len() > HEADER.len() + 2).collect();
    match streams.as_slice() {
        [] => None,
        [one] => Some(one.to_vec()),
        _ => {
            let rows: usize = streams.iter().map(|s| s.len() - HEADER.len() - 2).sum();
            let mut out = Vec::with_capacity(HEADER.len() + rows + 2);
            out.extend_from_slice(HEADER);
            for s in &streams {
                out.extend_from_slice(&s[HEADER.len()..s.len() - 2]);
            }
            out.extend_from_slice(&(-1i16).to_be_bytes());
            Some(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::PgPool;

    #[test]
    fn header_and_trailer_frame_an_empty_stream() {
        let bytes = CopyBuf::with_capacity(0).finish();
        assert_eq!(&bytes[..11], b"PGCOPY\n\xff\r\n\0");
        assert_eq!(bytes.len(), 19 + 2);
        assert_eq!(&bytes[19..], &[0xff, 0xff]);
    }

    #[test]
    fn timestamps_count_from_the_postgres_epoch() {
        let mut c = CopyBuf::with_capacity(0);
        c.row(1);
        c.timestamptz(time::macros::datetime!(2000-01-01 00:00:01.5 UTC));
        let bytes = c.finish();
        // header, field count, length 8, then 1.5 s in microseconds.
        assert_eq!(&bytes[19..21], &1i16.to_be_bytes());
        assert_eq!(&bytes[21..25], &8i32.to_be_bytes());
        assert_eq!(&bytes[25..33], &1_500_000i64.to_be_bytes());
    }

    /// Streams joined by [`concat`] read back as all their rows, in order;
    /// empty streams are left out and nothing at all gives `None`.
    #[sqlx::test(migrations = false)]
    async fn concatenated_streams_read_back_every_row(pool: PgPool) {
        let stream = |rows: std::ops::Range<i32>| {
            let mut c = CopyBuf::with_capacity(64);
            for n in rows {
                c.row(2);
                c.i32(n);
                c.text(&format!("row {n}"));
            }
            c.finish()
        };
        let empty = stream(0..0);
        assert_eq!(concat([empty.as_slice()].into_iter()), None);
        assert_eq!(concat(std::iter::empty()), None);
        let (a, b, c) = (stream(0..3), stream(3..4), stream(4..9));
        let one = concat([empty.as_slice(), a.as_slice()].into_iter()).unwrap();
        assert_eq!(one, a);
        let all = concat([a.as_slice(), empty.as_slice(), b.as_slice(), c.as_slice()].into_iter()).unwrap();
        let mut conn = pool.acquire().await.unwrap();
        sqlx::query("create temp table t (n int4, s text)").execute(&mut *conn).await.unwrap();
        let mut copy = conn.copy_in_raw("copy t (n, s) from stdin with (format binary)").await.unwrap();
        copy.send(all).await.unwrap();
        copy.finish().await.unwrap();
        let rows: Vec<(i32, String)> =
            sqlx::query_as("select n, s from t order by n").fetch_all(&mut *conn).await.unwrap();
        let want: Vec<(i32, String)> = (0..9).map(|n| (n, format!("row {n}"))).collect();
        assert_eq!(rows, want);
    }

    /// Arrays (empty, one and several elements, non-ASCII) read back as
    /// written.
    #[sqlx::test(migrations = false)]
    async fn postgres_reads_back_arrays(pool: PgPool) {
        let mut conn = pool.acquire().await.unwrap();
        sqlx::query("create temp table t (n int4, s text[], i int4[])").execute(&mut *conn).await.unwrap();
        let cases: Vec<(Vec<&str>, Vec<i32>)> =
            vec![(vec![], vec![]), (vec!["connect"], vec![7]), (vec!["a", "", "Usér"], vec![1, -2, i32::MAX])];
        let mut c = CopyBuf::with_capacity(256);
        for (n, (texts, ints)) in cases.iter().enumerate() {
            c.row(3);
            c.i32(n as i32);
            c.text_array(texts);
            c.i32_array(ints);
        }
        let bytes = c.finish();
        let mut copy = conn.copy_in_raw("copy t (n, s, i) from stdin with (format binary)").await.unwrap();
        copy.send(bytes).await.unwrap();
        copy.finish().await.unwrap();
        let rows: Vec<(i32, Vec<String>, Vec<i32>)> =
            sqlx::query_as("select n, s, i from t order by n").fetch_all(&mut *conn).await.unwrap();
        for (n, (texts, ints)) in cases.iter().enumerate() {
            assert_eq!(rows[n].1, *texts);
            assert_eq!(rows[n].2, *ints);
        }
    }

    /// Every encoder against a real server: what Postgres reads back equals
    /// what was written, NULLs, IPv6, non-ASCII text and pre-2000 times
    /// included.
    #[sqlx::test(migrations = false)]
    async fn postgres_reads_back_every_type(pool: PgPool) {
        let mut conn = pool.acquire().await.unwrap();
        sqlx::query(
            "create temp table t (u uuid, a int4, b int8, ts timestamptz, s text, ip inet, \
             oa int4, ob int8, os text, oip inet)",
        )
        .execute(&mut *conn)
        .await
        .unwrap();
        let id = Uuid::new_v4();
        let t1 = time::macros::datetime!(2026-11-27 10:00:00.123 UTC);
        let t2 = time::macros::datetime!(1999-12-31 23:59:59.999999 UTC);
        let v6: IpAddr = "2001:db8::bad:1".parse().unwrap();
        let v4: IpAddr = "203.0.113.9".parse().unwrap();
        let mut c = CopyBuf::with_capacity(256);
        c.row(10);
        c.uuid(id);
        c.i32(-7);
        c.i64(1 << 40);
        c.timestamptz(t1);
        c.text("dovecot_login authenticator failed for (Usér) [203.0.113.9]");
        c.inet(v4);
        c.opt_i32(Some(25));
        c.opt_i64(None);
        c.opt_text(None);
        c.opt_inet(Some(v6));
        c.row(10);
        c.uuid(id);
        c.i32(i32::MAX);
        c.i64(i64::MIN);
        c.timestamptz(t2);
        c.text("");
        c.inet(v6);
        c.opt_i32(None);
        c.opt_i64(Some(-1));
        c.opt_text(Some("x"));
        c.opt_inet(None);
        let mut copy = conn.copy_in_raw("copy t from stdin with (format binary)").await.unwrap();
        copy.send(c.finish()).await.unwrap();
        assert_eq!(copy.finish().await.unwrap(), 2);

        type Back =
            (Uuid, i32, i64, OffsetDateTime, String, IpAddr, Option<i32>, Option<i64>, Option<String>, Option<IpAddr>);
        let rows: Vec<Back> = sqlx::query_as("select * from t order by ts desc").fetch_all(&mut *conn).await.unwrap();
        assert_eq!(
            rows[0],
            (
                id,
                -7,
                1 << 40,
                t1,
                "dovecot_login authenticator failed for (Usér) [203.0.113.9]".to_owned(),
                v4,
                Some(25),
                None,
                None,
                Some(v6)
            )
        );
        assert_eq!(
            rows[1],
            (id, i32::MAX, i64::MIN, t2, String::new(), v6, None, Some(-1), Some("x".to_owned()), None)
        );
        // The addresses are host addresses, as the range lookups assume.
        let masks: Vec<i32> =
            sqlx::query_scalar("select masklen(ip) from t order by ts desc").fetch_all(&mut *conn).await.unwrap();
        assert_eq!(masks, [32, 128]);
    }
}
