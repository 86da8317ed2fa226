//! `hangar bench load`: HTTP/1.1 requests at a fixed rate (open loop), for
//! latency at a given load rather than at saturation.
//!
//! A ticker schedules one request every 1/rate seconds; `--conns` keep-alive
//! connections take the scheduled requests in turn. Each latency runs from
//! the request's scheduled time, not from when a connection was free, so a
//! stall shows up in the percentiles instead of silently lowering the rate
//! (no coordinated omission, as wrk2 measures).

use super::{Tally, Target, percentile};
use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Mutex, mpsc};
use tokio::time::{Instant, MissedTickBehavior};

#[derive(clap::Args)]
pub struct LoadArgs {
    #[command(flatten)]
    target: Target,
    /// Requests per second.
    #[arg(long, default_value_t = 5000)]
    rate: u32,
}

pub async fn load(LoadArgs { target: args, rate }: LoadArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        rate > 0 && args.conns > 0,
        "--rate and --conns must be positive"
    );
    let warmup = Duration::from_secs(1);
    let measured = Duration::from_secs(args.secs);
    // Each entry is a request's scheduled time; a bounded channel, so a
    // target that falls far behind makes the ticker wait (and the latency
    // from the scheduled times grow) rather than queue without limit.
    let (tx, rx) = mpsc::channel::<Instant>(args.conns * 64);
    let rx = Arc::new(Mutex::new(rx));
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..args.conns {
        let rx = rx.clone();
        let (addr, host, path) = (args.addr, args.host.clone(), args.path.clone());
        workers.push(tokio::spawn(async move {
            connection(addr, &host, &path, rx, start + warmup).await
        }));
    }
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
    tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let end = start + warmup + measured;
    loop {
        let at = tick.tick().await;
        if at >= end || tx.send(at).await.is_err() {
            break;
        }
    }
    drop(tx);
    let mut tallies = Vec::new();
    for w in workers {
        tallies.push(w.await.context("load worker")??);
    }
    let all = Tally::merge(tallies);
    let ms = |q| percentile(&all.micros, q) / 1000.0;
    let done = all.micros.len() as f64 / measured.as_secs_f64();
    println!(
        "fixed rate {} req/s for {}s over {} connections: achieved {done:.0} req/s, {} errors",
        rate, args.secs, args.conns, all.errors
    );
    println!(
        "latency ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
        ms(0.5),
        ms(0.9),
        ms(0.99),
        ms(0.999),
        ms(1.0)
    );
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "bench": "load",
                "rate": rate,
                "secs": args.secs,
                "conns": args.conns,
                "achieved_rps": done,
                "errors": all.errors,
                "p50_ms": ms(0.5),
                "p90_ms": ms(0.9),
                "p99_ms": ms(0.99),
                "p999_ms": ms(0.999),
                "max_ms": ms(1.0),
            })
        );
    }
    Ok(())
}

/// One keep-alive connection taking scheduled requests until the schedule
/// ends; reconnects after a failure. Requests scheduled before `measure_from`
/// warm up and are not recorded.
async fn connection(
    addr: SocketAddr,
    host: &str,
    path: &str,
    schedule: Arc<Mutex<mpsc::Receiver<Instant>>>,
    measure_from: Instant,
) -> anyhow::Result<Tally> {
    let mut tally = Tally::default();
    let mut sender = None;
    loop {
        let Some(at) = schedule.lock().await.recv().await else {
            return Ok(tally);
        };
        if sender.is_none() {
            let tcp = tokio::net::TcpStream::connect(addr)
                .await
                .with_context(|| format!("connecting to {addr}"))?;
            tcp.set_nodelay(true)?;
            let (s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
            tokio::spawn(conn);
            sender = Some(s);
        }
        let s = sender.as_mut().expect("connected above");
        let req = Request::get(path)
            .header(hyper::header::HOST, host)
            .body(Empty::<Bytes>::new())?;
        let ok = match s.send_request(req).await {
            Ok(resp) => {
                let status = resp.status();
                resp.into_body().collect().await.is_ok() && status.is_success()
            }
            Err(_) => false,
        };
        if !ok {
            tally.errors += 1;
            sender = None;
        } else if at >= measure_from {
            tally.micros.push(at.elapsed().as_secs_f64() * 1e6);
        }
    }
}
