//! Criterion micro-benchmarks of the per-row hot path, no broker and no database: decode +
//! validate, pack, the key-ordered sending order, spool framing and scan, and the per-batch
//! latency summary. Every subject is measured twice, once reporting rows/s
//! (`Throughput::Elements`) and once bytes/s (`Throughput::Bytes`), as `<subject>/rows` and
//! `<subject>/bytes` of the subject's group.
//!
//! `cargo bench --bench hotpath` (≈ 1 min; add `-- --quick` for a rougher, shorter run);
//! under `cargo test --all-targets` criterion runs each benchmark once as a smoke test.
//!
//! Inputs are seed-like `person` rows from `conveyor::feed::person_row` (the drain bench's
//! rows), decoded for the 33 columns of `deploy/sql/person.sql` (read from the file, so the
//! bench follows the DDL) with the defaults of a minimal pipeline config.

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use conveyor::config::{Config, PipelineConfig};
use conveyor::decode::{Column, Decoder};
use conveyor::pack::{Batch, Packer};
use conveyor::sink::catalog::column_kind;
use conveyor::sink::keys::{insertion_order, UniqueKey};
use conveyor::spool::{frame, record};
use conveyor::stats::{BatchLatency, DEFAULT_BUCKETS};
use criterion::measurement::WallTime;
use criterion::{
    criterion_group, criterion_main, BatchSize, BenchmarkGroup, Criterion, Throughput,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use rand::{Rng, SeedableRng};

/// Distinct generated rows; the per-row benchmarks cycle through them.
const ROWS: usize = 4_096;
/// Rows per batch: the default `pack`.
const PACK: usize = 2_500;
/// Records in the scanned spool buffer.
const SCAN_RECORDS: usize = 10_000;
/// Microseconds since the epoch of the first generated queue time (2026-01-01T00:00:00Z).
const T0_US: i64 = 1_767_225_600_000_000;

/// One generated delivery as the worker sees it.
struct Delivery {
    body: Vec<u8>,
    message_id: String,
    queue_time_us: i64,
    received_us: i64,
    props: BasicProperties,
}

fn deliveries(n: usize) -> Vec<Delivery> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    (0..n as u64)
        .map(|i| {
            let id = 10_000_000 + i;
            let body = conveyor::feed::person_row(id, &mut rng, None, None);
            let message_id = format!("1-{id}");
            // Published 0.2 ms apart, received 1–5 ms after publication.
            let queue_time_us = T0_US + 200 * i as i64;
            let received_us = queue_time_us + rng.random_range(1_000..5_000);
            // The properties the feed publishes with (src/feed/publish.rs).
            let mut headers = FieldTable::default();
            headers.insert(
                conveyor::feed::QUEUE_TIME_HEADER.into(),
                AMQPValue::LongLongInt(queue_time_us),
            );
            let props = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_message_id(message_id.as_str().into())
                .with_headers(headers);
            Delivery {
                body,
                message_id,
                queue_time_us,
                received_us,
                props,
            }
        })
        .collect()
}

/// The pipeline section the daemon would run the `person` demo with: every default.
fn pipeline() -> PipelineConfig {
    let text = "[amqp]\nurl = \"amqp://guest:guest@127.0.0.1:5672/%2f\"\n\
                [database]\nurl = \"postgres://postgres@127.0.0.1:5432/test\"\n\
                [[pipeline]]\nname = \"bench\"\nqueue = \"conveyor.bench\"\n\
                target = \"public.person\"\nqueue_time_column = \"queue_time\"\n";
    let mut config =
        Config::from_toml(Path::new("hotpath.toml"), text, |_| None).expect("bench config");
    config.pipelines.remove(0)
}

/// The columns of `deploy/sql/person.sql` as `sink::catalog` would read them: PostgreSQL type
/// name and type modifier through `column_kind`, NOT NULL from the primary key, database-filled
/// from a DEFAULT.
fn person_columns() -> Vec<Column> {
    let ddl = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/sql/person.sql"
    ))
    .expect("deploy/sql/person.sql");
    let table = &ddl[ddl.find("CREATE TABLE").expect("CREATE TABLE")..];
    let body = &table[table.find('(').expect("CREATE TABLE … (") + 1..];
    let mut columns = Vec::new();
    for line in body.lines().map(str::trim) {
        if line.is_empty() || line.starts_with("--") {
            continue;
        }
        if line.starts_with(')') {
            break;
        }
        let mut words = line.split_whitespace();
        let name = words.next().expect("column name");
        let ty = words.next().expect("column type").trim_end_matches(',');
        let (base, args) = match ty.split_once('(') {
            Some((b, a)) => (b, Some(a.trim_end_matches(')'))),
            None => (ty, None),
        };
        let arg = |i: usize| -> i32 {
            args.and_then(|a| a.split(',').nth(i))
                .map(|v| v.trim().parse().expect("type modifier"))
                .unwrap_or(0)
        };
        let (typname, typmod) = match base {
            "char" | "character" | "bpchar" => ("bpchar", arg(0) + 4),
            "varchar" => ("varchar", args.map_or(-1, |_| arg(0) + 4)),
            "integer" | "int" | "int4" => ("int4", -1),
            "bigint" | "int8" => ("int8", -1),
            "smallint" | "int2" => ("int2", -1),
            "numeric" | "decimal" => (
                "numeric",
                args.map_or(-1, |_| ((arg(0) << 16) | arg(1)) + 4),
            ),
            "date" => ("date", -1),
            "timestamp" => ("timestamp", args.map_or(-1, |_| arg(0))),
            "text" => ("text", -1),
            other => panic!("person.sql: type {other:?} not mapped in benches/hotpath.rs"),
        };
        let rest = line.to_ascii_uppercase();
        columns.push(Column {
            name: name.to_string(),
            kind: column_kind(typname, typmod),
            not_null: rest.contains("PRIMARY KEY") || rest.contains("NOT NULL"),
            db_filled: rest.contains("DEFAULT"),
        });
    }
    assert_eq!(columns.len(), 33, "person has 33 columns");
    columns
}

fn decoder() -> Decoder {
    Decoder::new(&person_columns(), &pipeline()).expect("decoder for person")
}

/// Registers `f` twice in `group`: `<name>/rows` (rows/s) and `<name>/bytes` (bytes/s).
fn both(
    group: &mut BenchmarkGroup<'_, WallTime>,
    rows: u64,
    bytes: u64,
    mut f: impl FnMut(&mut criterion::Bencher<'_, WallTime>),
) {
    group.throughput(Throughput::Elements(rows));
    group.bench_function("rows", &mut f);
    group.throughput(Throughput::Bytes(bytes));
    group.bench_function("bytes", &mut f);
}

fn configure(group: &mut BenchmarkGroup<'_, WallTime>) {
    group
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
}

/// Sum of `len` over `items`.
fn total<T>(items: &[T], len: impl Fn(&T) -> usize) -> u64 {
    items.iter().map(|x| len(x) as u64).sum()
}

/// A batch of the first `PACK` deliveries, packed as the worker does.
fn packed_batch(decoder: &mut Decoder, ds: &[Delivery]) -> Batch {
    let mut packer = Packer::new(PACK, Duration::from_millis(500));
    let now = Instant::now();
    for (seq, d) in (1..).zip(&ds[..PACK]) {
        packer.open(now, seq).push_message(
            decoder,
            d.body.clone(),
            seq,
            Some(d.queue_time_us),
            d.received_us,
            Some(d.message_id.clone()),
            false,
        );
    }
    packer.take_if_full().expect("a full batch")
}

fn hotpath(c: &mut Criterion) {
    let ds = deliveries(ROWS);
    let body_bytes = total(&ds, |d| d.body.len());
    let mut dec = decoder();

    // 1. Decode + validate one row into COPY text (bytes = JSON body bytes, mean over the
    // cycled rows).
    {
        let mut group = c.benchmark_group("decode_row");
        configure(&mut group);
        let mut out = Vec::with_capacity(4096);
        let mut i = 0;
        both(&mut group, 1, body_bytes / ROWS as u64, |b| {
            b.iter(|| {
                let d = &ds[i % ROWS];
                i += 1;
                out.clear();
                let r = dec.decode(
                    black_box(&d.body),
                    Some(d.queue_time_us),
                    d.received_us,
                    &mut out,
                );
                black_box(r.expect("a good row"));
            })
        });
        group.finish();
    }

    // 2. Pack a batch of PACK rows: decode into the batch buffer, good-row bookkeeping. The
    // owned bodies and message ids a delivery would hand over are cloned outside the timing,
    // and the finished batch is dropped outside it.
    {
        let mut group = c.benchmark_group("pack_batch_2500");
        configure(&mut group);
        // ≈ 5 ms an iteration: 30 linearly sampled iterations need more than 2 s.
        group.measurement_time(Duration::from_secs(3));
        let inputs = &ds[..PACK];
        // One packer for the whole run, as a worker keeps one per job: its batches after the
        // first are sized from the previous one.
        let mut packer = Packer::new(PACK, Duration::from_millis(500));
        both(
            &mut group,
            PACK as u64,
            total(inputs, |d| d.body.len()),
            |b| {
                b.iter_batched(
                    || {
                        inputs
                            .iter()
                            .map(|d| (d.body.clone(), d.message_id.clone()))
                            .collect::<Vec<_>>()
                    },
                    |owned| {
                        let now = Instant::now();
                        for ((seq, (body, id)), d) in (1..).zip(owned).zip(inputs) {
                            packer.open(now, seq).push_message(
                                &mut dec,
                                body,
                                seq,
                                Some(d.queue_time_us),
                                d.received_us,
                                Some(id),
                                false,
                            );
                        }
                        packer.take_if_full().expect("a full batch")
                    },
                    BatchSize::LargeInput,
                )
            },
        );
        group.finish();
    }

    // 3. The sending order before COPY: rows sorted by the primary key `person_pkey (id)`
    // (bytes = the batch's COPY text, which the key extraction scans).
    {
        let batch = packed_batch(&mut dec, &ds);
        let id_field = dec
            .copy_columns()
            .position(|c| c == "id")
            .expect("id is a COPY column");
        let keys = [UniqueKey {
            name: "person_pkey".into(),
            columns: vec!["id".into()],
            fields: vec![id_field],
            probe_sql: String::new(),
        }];
        let mut group = c.benchmark_group("insertion_order_2500");
        configure(&mut group);
        both(
            &mut group,
            batch.good.len() as u64,
            batch.copy.len() as u64,
            |b| b.iter(|| black_box(insertion_order(black_box(&batch), &keys))),
        );
        group.finish();
    }

    // 4a. Spool append: one delivery's record payload (kind, times, AMQP properties in wire
    // encoding, body) framed onto the write buffer (bytes = framed record bytes, mean).
    let framed: Vec<Vec<u8>> = ds
        .iter()
        .map(|d| {
            let mut v = Vec::new();
            let p = record::delivery(
                record::Kind::Delivery,
                d.received_us,
                false,
                &d.props,
                &d.body,
            );
            frame::append(&mut v, 1, &p);
            v
        })
        .collect();
    {
        let mut group = c.benchmark_group("spool_append");
        configure(&mut group);
        let mut out = Vec::with_capacity(64 << 10);
        let mut i = 0;
        both(&mut group, 1, total(&framed, Vec::len) / ROWS as u64, |b| {
            b.iter(|| {
                let d = &ds[i % ROWS];
                i += 1;
                out.clear();
                let payload = record::delivery(
                    record::Kind::Delivery,
                    d.received_us,
                    false,
                    black_box(&d.props),
                    black_box(&d.body),
                );
                frame::append(&mut out, i as u64, &payload);
                black_box(&out);
            })
        });
        group.finish();
    }

    // 4b. The forgiving scan of a spool file holding SCAN_RECORDS intact delivery records.
    {
        let mut file = frame::MAGIC.to_vec();
        for seq in 1..=SCAN_RECORDS {
            let d = &ds[seq % ROWS];
            let p = record::delivery(
                record::Kind::Delivery,
                d.received_us,
                false,
                &d.props,
                &d.body,
            );
            frame::append(&mut file, seq as u64, &p);
        }
        let mut group = c.benchmark_group("spool_scan_10000");
        configure(&mut group);
        both(&mut group, SCAN_RECORDS as u64, file.len() as u64, |b| {
            b.iter(|| {
                let s = frame::scan(black_box(&file));
                assert_eq!(s.records.len(), SCAN_RECORDS);
                black_box(s)
            })
        });
        group.finish();
    }

    // 5. A committed batch's latency summary (bytes = the i64 queue times read).
    {
        let queue_times: Vec<i64> = ds[..PACK].iter().map(|d| d.queue_time_us).collect();
        let commit_us = queue_times.last().copied().unwrap_or(T0_US) + 250_000;
        let mut group = c.benchmark_group("batch_latency_2500");
        configure(&mut group);
        both(
            &mut group,
            PACK as u64,
            (PACK * std::mem::size_of::<i64>()) as u64,
            |b| {
                b.iter(|| {
                    black_box(BatchLatency::new(
                        black_box(commit_us),
                        DEFAULT_BUCKETS,
                        queue_times.iter().copied(),
                    ))
                })
            },
        );
        group.finish();
    }
}

criterion_group!(benches, hotpath);
criterion_main!(benches);
