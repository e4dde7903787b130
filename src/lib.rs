//! conveyor: continuously loads rows from a RabbitMQ queue into PostgreSQL.
//!
//! Where a message goes: [`source`] receives it → [`decode`] turns it into a COPY line or a
//! reject → [`pack`] groups rows into batches → [`sink`] commits each batch (good rows, error
//! rows, robust mark) in one transaction → the [`worker`] acks the batch's deliveries. Start
//! reading at [`worker`]; [`daemon`] wires workers, HTTP and shutdown together. ARCHITECTURE.md
//! has the map and the guarantees.

pub mod backoff;
pub mod changes;
pub mod cli;
pub mod config;
pub mod consolidate;
pub mod daemon;
pub mod db;
pub mod decode;
pub mod faults;
pub mod feed;
pub mod http;
pub mod job;
pub mod metrics;
pub mod monitor;
pub mod pack;
pub mod params;
pub mod replay;
pub mod report;
pub mod rotator;
pub mod sink;
pub mod source;
pub mod spool;
pub mod stats;
pub mod steps;
pub mod worker;
