//! Load tools for `hack/bench/apiprism.sh` (plain TCP: the proxies under test are TCP pass-through).
//!
//! ```text
//! apiprism-bench echo LISTEN                 echo server (1 KiB RR, connection rate, failover, idle conns)
//! apiprism-bench source LISTEN               writes 256 KiB buffers to every client until it goes away
//! apiprism-bench bulk ADDR SECS STREAMS      reads from a `source` through ADDR: prints Gbit/s
//! apiprism-bench rr ADDRS COUNT SIZE         COUNT request/response round trips of SIZE bytes on one
//!                                            connection to each of the comma-separated ADDRS, taking turns
//!                                            (one round trip on each in order, then again), so that noise
//!                                            from the rest of the machine hits every address alike: prints
//!                                            a line per address with p50, p90, p99, p99.9 and the maximum
//!                                            in microseconds
//! apiprism-bench connrate ADDR SECS CONC     new connections (connect, 64 B echo, close): prints conns/s
//! apiprism-bench failover ADDR SECS EVERY_MS FAULT_AT_MS CMD
//!                                            a new connection (1 KiB echo, 2 s timeout) every EVERY_MS, and
//!                                            one long-lived connection pinging every 100 ms; runs `sh -c CMD`
//!                                            at FAULT_AT_MS: prints failed connections, time from the fault
//!                                            to the last failure, and when the long-lived one was cut
//! apiprism-bench idle ADDR COUNT HOLD_SECS   opens COUNT idle connections, prints `open`, holds them
//! ```
//! Every loop is bounded in count and time.
#![allow(clippy::print_stdout)] // a command-line tool

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn arg<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> Res<T> {
    args.get(i)
        .ok_or_else(|| format!("missing {what}"))?
        .parse::<T>()
        .map_err(|_| format!("bad {what}").into())
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = args.first().cloned().unwrap_or_default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match mode.as_str() {
            "echo" => serve(arg(&args, 1, "LISTEN")?, false).await,
            "source" => serve(arg(&args, 1, "LISTEN")?, true).await,
            "bulk" => {
                bulk(
                    arg(&args, 1, "ADDR")?,
                    arg(&args, 2, "SECS")?,
                    arg(&args, 3, "STREAMS")?,
                )
                .await
            }
            "rr" => {
                rr(
                    arg(&args, 1, "ADDRS")?,
                    arg(&args, 2, "COUNT")?,
                    arg(&args, 3, "SIZE")?,
                )
                .await
            }
            "connrate" => {
                connrate(
                    arg(&args, 1, "ADDR")?,
                    arg(&args, 2, "SECS")?,
                    arg(&args, 3, "CONC")?,
                )
                .await
            }
            "failover" => {
                failover(
                    arg(&args, 1, "ADDR")?,
                    arg(&args, 2, "SECS")?,
                    arg(&args, 3, "EVERY_MS")?,
                    arg(&args, 4, "FAULT_AT_MS")?,
                    arg(&args, 5, "CMD")?,
                )
                .await
            }
            "idle" => {
                idle(
                    arg(&args, 1, "ADDR")?,
                    arg(&args, 2, "COUNT")?,
                    arg(&args, 3, "HOLD_SECS")?,
                )
                .await
            }
            _ => Err("usage: see the source (echo|source|bulk|rr|connrate|failover|idle)".into()),
        }
    })
}

async fn serve(listen: SocketAddr, source: bool) -> Res<()> {
    let listener = TcpListener::bind(listen).await?;
    println!("listening {}", listener.local_addr()?);
    loop {
        let (mut s, _) = listener.accept().await?;
        s.set_nodelay(true)?;
        tokio::spawn(async move {
            if source {
                let buf = vec![0x5a_u8; 256 * 1024];
                while s.write_all(&buf).await.is_ok() {}
            } else {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            }
        });
    }
}

async fn connect(addr: SocketAddr) -> Res<TcpStream> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

async fn bulk(addr: SocketAddr, secs: f64, streams: usize) -> Res<()> {
    let total = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for _ in 0..streams {
        let total = Arc::clone(&total);
        let mut s = connect(addr).await?;
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 256 * 1024];
            while Instant::now() < deadline {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => total.fetch_add(n as u64, Ordering::Relaxed),
                };
            }
        }));
    }
    let start = Instant::now();
    for t in tasks {
        t.await?;
    }
    let gbit = total.load(Ordering::Relaxed) as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9;
    println!("gbit_per_s {gbit:.2}");
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e6)
}

async fn rr(addrs: String, count: usize, size: usize) -> Res<()> {
    let addrs: Vec<SocketAddr> = addrs
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .map_err(|_| "bad ADDRS")?;
    let mut conns = Vec::with_capacity(addrs.len());
    for addr in &addrs {
        conns.push(connect(*addr).await?);
    }
    let req = vec![1u8; size];
    let mut resp = vec![0u8; size];
    let mut times = vec![Vec::with_capacity(count); addrs.len()];
    for i in 0..count + count / 10 {
        for (s, t) in conns.iter_mut().zip(times.iter_mut()) {
            let start = Instant::now();
            s.write_all(&req).await?;
            s.read_exact(&mut resp).await?;
            if i >= count / 10 {
                t.push(start.elapsed()); // the first 10% warm up
            }
        }
    }
    for (addr, mut t) in addrs.iter().zip(times) {
        t.sort();
        println!(
            "{addr} p50_us {:.1} p90_us {:.1} p99_us {:.1} p999_us {:.1} max_us {:.1}",
            percentile(&t, 0.5),
            percentile(&t, 0.9),
            percentile(&t, 0.99),
            percentile(&t, 0.999),
            percentile(&t, 1.0)
        );
    }
    Ok(())
}

async fn echo_once(addr: SocketAddr, size: usize) -> Res<()> {
    let mut s = connect(addr).await?;
    let req = vec![1u8; size];
    let mut resp = vec![0u8; size];
    s.write_all(&req).await?;
    s.read_exact(&mut resp).await?;
    Ok(())
}

async fn connrate(addr: SocketAddr, secs: f64, conc: usize) -> Res<()> {
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (done, failed) = (Arc::clone(&done), Arc::clone(&failed));
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                match echo_once(addr, 64).await {
                    Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let rate = done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    println!(
        "conns_per_s {rate:.0} failed {}",
        failed.load(Ordering::Relaxed)
    );
    Ok(())
}

async fn failover(
    addr: SocketAddr,
    secs: f64,
    every_ms: u64,
    fault_at_ms: u64,
    cmd: String,
) -> Res<()> {
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let fault_at = start + Duration::from_millis(fault_at_ms);
    // The long-lived connection: a 1 KiB ping every 100 ms. Cut: the proxy closed or reset it (EOF or error).
    // Stalled: no answer within 2 s, not closed (then it waits for a close until the end of the run).
    let long = tokio::spawn(async move {
        let Ok(mut s) = connect(addr).await else {
            return (None, None);
        };
        let mut buf = [0u8; 1024];
        let mut stalled = None;
        while Instant::now() < end {
            let ping = async {
                s.write_all(&[2u8; 1024]).await?;
                s.read_exact(&mut buf).await?;
                Ok::<_, std::io::Error>(())
            };
            match tokio::time::timeout(Duration::from_secs(2), ping).await {
                Ok(Ok(())) => tokio::time::sleep(Duration::from_millis(100)).await,
                Ok(Err(_)) => return (Some(Instant::now()), stalled),
                Err(_) => {
                    stalled = Some(Instant::now() - Duration::from_secs(2));
                    let left = end.saturating_duration_since(Instant::now());
                    return match tokio::time::timeout(left, s.read(&mut buf)).await {
                        Ok(_) => (Some(Instant::now()), stalled),
                        Err(_) => (None, stalled),
                    };
                }
            }
        }
        (None, stalled)
    });
    let fault = tokio::spawn(async move {
        tokio::time::sleep_until(fault_at.into()).await;
        let t = Instant::now();
        let status = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(&cmd)
            .status()
            .await;
        (t, status.map(|s| s.success()).unwrap_or(false))
    });
    let mut tasks = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(every_ms.max(1)));
    while Instant::now() < end {
        tick.tick().await;
        let t = Instant::now();
        tasks.push(tokio::spawn(async move {
            let ok = matches!(
                tokio::time::timeout(Duration::from_secs(2), echo_once(addr, 1024)).await,
                Ok(Ok(()))
            );
            (t, ok)
        }));
    }
    let (fault_t, fault_ok) = fault.await?;
    let mut failed = 0;
    let mut last_failure: Option<Instant> = None;
    let mut total = 0;
    for t in tasks {
        let (at, ok) = t.await?;
        total += 1;
        if !ok {
            failed += 1;
            last_failure = Some(last_failure.map_or(at, |l: Instant| l.max(at)));
        }
    }
    let full_success_ms = last_failure.map_or(0.0, |l| {
        l.saturating_duration_since(fault_t).as_secs_f64() * 1e3 + every_ms as f64
    });
    let ms = |t: Instant| {
        format!(
            "{:.0}",
            t.saturating_duration_since(fault_t).as_secs_f64() * 1e3
        )
    };
    let (cut, stalled) = long.await?;
    let cut = cut.map_or_else(|| "never".to_owned(), ms);
    let stalled = stalled.map_or_else(|| "no".to_owned(), ms);
    println!(
        "total {total} failed {failed} full_success_ms {full_success_ms:.0} long_lived_cut_ms {cut} \
         long_lived_stalled_ms {stalled} fault_ok {fault_ok}"
    );
    Ok(())
}

async fn idle(addr: SocketAddr, count: usize, hold_secs: u64) -> Res<()> {
    let mut conns = Vec::with_capacity(count);
    let deadline = Instant::now() + Duration::from_secs(60);
    while conns.len() < count && Instant::now() < deadline {
        match TcpStream::connect(addr).await {
            Ok(s) => conns.push(s),
            Err(e) => return Err(format!("after {} connections: {e}", conns.len()).into()),
        }
    }
    // Let the proxy dial its side of each.
    tokio::time::sleep(Duration::from_secs(1)).await;
    println!("open {}", conns.len());
    tokio::time::sleep(Duration::from_secs(hold_secs)).await;
    Ok(())
}
