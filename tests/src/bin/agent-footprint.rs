//! Measures valkey-agent's footprint (RSS, CPU) against a real valkey-server and a hub on
//! loopback: idle, at 1 report/s and at 10 reports/s. Prints a Markdown table.
//!
//! Run: `cargo run --release -p valkey-e2e --bin agent-footprint [-- SECONDS]`
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::time::{Duration, Instant};

use redis::AsyncCommands;
use valkey_controller::{
    hub::tls::ServerCert,
    tls::{CA_LIFETIME, Ca},
};
use valkey_e2e::{
    hub::{Event, TestHub},
    procs::{Agent, AgentOpts, Valkey},
};

/// utime + stime in clock ticks, and RSS / peak RSS in KiB, from /proc.
fn sample(pid: i32) -> (u64, u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after_comm = stat.rsplit_once(')').expect("stat format").1;
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let ticks = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (ticks, kib("VmRSS:"), kib("VmHWM:"))
}

struct Row {
    scenario: &'static str,
    tls: bool,
    reports_per_s: f64,
    cpu_percent: f64,
    rss_mib: f64,
    peak_mib: f64,
}

/// TLS material for one run: a CA, and a certificate for 127.0.0.1 in `tls.crt`/`tls.key`.
struct Tls {
    dir: tempfile::TempDir,
    ca: Ca,
}

impl Tls {
    fn new() -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let ca = Ca::generate("footprint CA", CA_LIFETIME).expect("CA");
        let issued = ca
            .issue(&["127.0.0.1".into()], CA_LIFETIME)
            .expect("certificate");
        let dir = tempfile::tempdir().expect("temp dir");
        for (file, text) in [
            ("ca.crt", &ca.0.cert_pem),
            ("tls.crt", &issued.cert_pem),
            ("tls.key", &issued.key_pem),
        ] {
            std::fs::write(dir.path().join(file), text).expect("write");
        }
        Self { dir, ca }
    }

    fn file(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
}

async fn measure(
    scenario: &'static str,
    heartbeat_ms: u64,
    writes: bool,
    tls: bool,
    seconds: u64,
) -> Row {
    let tls = tls.then(Tls::new);
    // With TLS, the hub and Valkey serve TLS only, and the agent verifies both.
    let hub = match &tls {
        None => TestHub::start("t0ken").await,
        Some(t) => {
            let issued =
                t.ca.issue(&["127.0.0.1".into()], CA_LIFETIME)
                    .expect("issue");
            TestHub::start_tls("t0ken", ServerCert::new(&issued).expect("cert")).await
        }
    };
    let valkey = match &tls {
        None => Valkey::start("bench"),
        Some(t) => {
            let port = valkey_e2e::free_port().to_string();
            let (cert, key, ca) = (t.file("tls.crt"), t.file("tls.key"), t.file("ca.crt"));
            Valkey::start_at(
                "bench",
                port.parse().expect("port"),
                &[
                    "--port",
                    "0",
                    "--tls-port",
                    &port,
                    "--tls-cert-file",
                    &cert,
                    "--tls-key-file",
                    &key,
                    "--tls-ca-cert-file",
                    &ca,
                    "--tls-auth-clients",
                    "no",
                ],
            )
        }
    };
    let mut opts = AgentOpts::for_valkey(&valkey, Some(hub.url()));
    // The production probe interval; the heartbeat sets the report rate.
    opts.probe_interval_ms = 100;
    opts.heartbeat_interval_ms = heartbeat_ms;
    if let Some(t) = &tls {
        opts.extra = [
            ("--controller-ca-file", "ca.crt"),
            ("--valkey-tls-ca-file", "ca.crt"),
            ("--valkey-tls-cert-file", "tls.crt"),
            ("--valkey-tls-key-file", "tls.key"),
        ]
        .into_iter()
        .flat_map(|(flag, file)| [flag.to_owned(), t.file(file)])
        .collect();
    }
    let mut agent = Agent::start(opts);
    let pid = agent.proc_mut().pid().as_raw();
    let writer = writes.then(|| {
        let client = match &tls {
            None => valkey.client(),
            Some(t) => valkey_e2e::local::tls_client(
                &t.dir.path().join("ca.crt"),
                &valkey.addr(),
                Some(valkey_e2e::procs::PASSWORD),
            ),
        };
        tokio::spawn(async move {
            let mut conn = client
                .get_multiplexed_async_connection()
                .await
                .expect("conn");
            let mut i = 0u64;
            loop {
                // A new key each time: the key count changes, so every heartbeat is a report.
                let _: () = conn.set(format!("k{i}"), i).await.expect("SET");
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    });
    // Warm up, then measure.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let count_reports = || {
        hub.events()
            .iter()
            .filter(|e| matches!(e, Event::Report { .. }))
            .count()
    };
    let (t0, _, _) = sample(pid);
    let r0 = count_reports();
    let start = Instant::now();
    let mut rss_max = 0;
    while start.elapsed() < Duration::from_secs(seconds) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        rss_max = rss_max.max(sample(pid).1);
    }
    let wall = start.elapsed().as_secs_f64();
    if std::env::var_os("FOOTPRINT_DEBUG").is_some() {
        let events = hub.events();
        let heartbeats = events
            .iter()
            .filter(|e| matches!(e, Event::Heartbeat { .. }))
            .count();
        let keys = hub
            .latest_report("bench")
            .and_then(|r| r.data)
            .map(|d| d.key_count);
        eprintln!(
            "{scenario}: {} events, {heartbeats} heartbeats, keys {keys:?}",
            events.len()
        );
    }
    let (t1, _, peak) = sample(pid);
    let ticks_per_s = 100.0; // USER_HZ on Linux
    let row = Row {
        scenario,
        tls: tls.is_some(),
        reports_per_s: (count_reports() - r0) as f64 / wall,
        cpu_percent: (t1 - t0) as f64 / ticks_per_s / wall * 100.0,
        rss_mib: rss_max as f64 / 1024.0,
        peak_mib: peak as f64 / 1024.0,
    };
    if let Some(writer) = writer {
        writer.abort();
    }
    row
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let seconds = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    // Plaintext and TLS (to Valkey and to the hub) side by side, in one run.
    let mut rows = Vec::new();
    for tls in [false, true] {
        rows.push(measure("idle (no writes, heartbeat 1 s)", 1000, false, tls, seconds).await);
        rows.push(
            measure(
                "1 report/s (writes, heartbeat 1 s)",
                1000,
                true,
                tls,
                seconds,
            )
            .await,
        );
        rows.push(
            measure(
                "10 reports/s (writes, heartbeat 100 ms)",
                100,
                true,
                tls,
                seconds,
            )
            .await,
        );
    }
    println!("valkey-agent footprint, {seconds} s per scenario, probe every 100 ms\n");
    println!("| scenario | TLS | reports/s | CPU (% of a core) | RSS (MiB) | peak RSS (MiB) |");
    println!("|---|---|---|---|---|---|");
    for row in rows {
        println!(
            "| {} | {} | {:.1} | {:.2} | {:.1} | {:.1} |",
            row.scenario,
            if row.tls { "yes" } else { "no" },
            row.reports_per_s,
            row.cpu_percent,
            row.rss_mib,
            row.peak_mib
        );
    }
}
