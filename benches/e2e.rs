//! End-to-end load benchmark: the real `tollgate` binary (release build) with governance and
//! SQLite recording on, between a closed-loop load generator and a fast mock provider, compared
//! in the same run with the load generator calling the mock directly.
//!
//! Run with `cargo bench --bench e2e` (one to four minutes; Linux only, loopback only). It prints
//! a table and writes the same table to `target/e2e-report.md`. It reports; it never fails on a
//! missed target. Method and latest figures: `BENCHMARKS.md`.
//!
//! Knobs (environment):
//! - `E2E_PHASE_SECS`: measured seconds per row (default 3, in three slices alternating with the
//!   other path);
//! - `E2E_STREAMS`: concurrent streams in the memory test (default 10000; 0 skips it);
//! - `E2E_ONLY`: only the rows whose name contains this (`json c=16 tollgate`), or `streams`;
//! - `E2E_BIN`: another Tollgate binary, to compare builds;
//! - `E2E_WRAP`: a command to run Tollgate under (`valgrind --tool=massif`; see BENCHMARKS.md);
//! - `E2E_REPORT`: the report's path.
//!
//! Three processes share the machine's cores, as the issue asks:
//! - this process: the load generator (one thread, `current_thread` tokio runtime; N keep-alive
//!   connections each sending pre-built request bytes back to back, a minimal HTTP/1.1 response
//!   parser for `Content-Length` and chunked bodies, latencies kept in pre-allocated vectors)
//!   and a sampler thread reading `/proc`;
//! - the mock provider: this same executable re-run with `TOLLGATE_E2E_ROLE=mock` (one thread),
//!   answering the OpenAI chat fixtures from bytes rendered once; a second listener drips one SSE
//!   event per second until told to finish (the memory test);
//! - Tollgate, started with a temp config: SQLite recording, a budget cap, a (high) per-user rate
//!   limit, JSON interception logs on stdout (piped here and discarded).
//!
//! Tollgate's CPU per request is its utime+stime from `/proc/<pid>/stat` over the measured window
//! divided by the requests completed in it; peak RSS is `VmHWM` (reset at the start of each
//! slice through `clear_refs`). "Other load" is CPU the machine spent outside these three
//! processes during the window (from `/proc/stat`): other people's builds. A slice with more than
//! 10 % of the machine busy elsewhere is measured again (twice at most; the quietest is kept).

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// The Tollgate binary: the one this bench was built with, or `E2E_BIN` (to compare builds).
fn bin() -> String {
    std::env::var("E2E_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_tollgate").to_string())
}
const ROLE_ENV: &str = "TOLLGATE_E2E_ROLE";
const CHAT_JSON: &[u8] = include_bytes!("../tests/fixtures/openai-chat.json");
const CHAT_SSE: &[u8] = include_bytes!("../tests/fixtures/openai-chat-stream.sse");
const CENTRAL_KEY: &str = "sk-e2e-central-0123456789abcdef";
/// Warm-up of each measured slice (fresh connections, caches, pools).
const WARMUP: Duration = Duration::from_millis(200);
/// A phase with more than this share of the machine busy elsewhere is repeated.
const DISTURBED_PCT: f64 = 10.0;

fn main() {
    if std::env::var(ROLE_ENV).as_deref() == Ok("mock") {
        mock::run();
        return;
    }
    if !Path::new("/proc/self/stat").exists() {
        println!("e2e: needs Linux /proc; skipped");
        return;
    }
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing we run for.
    if !std::env::args().any(|a| a == "--bench") {
        println!("e2e: run with `cargo bench --bench e2e`; skipped");
        return;
    }
    let opts = Options::from_env();
    let nofile = sys::raise_nofile();
    let clk_tck = sys::clock_ticks();
    let machine = Machine::probe(nofile);
    println!("e2e: {}", machine.one_line());

    let mut mock = MockProcess::start();
    let tollgate = Tollgate::start(mock.fast_port, mock.slow_port);
    // Let start-up work (migrations, first governance refresh) settle before calling it idle.
    std::thread::sleep(Duration::from_secs(1));
    let idle_rss_kb = proc::status_kb(tollgate.pid, "VmRSS").unwrap_or(0);
    let idle_fds = proc::fd_count(tollgate.pid);
    let tollgate_nofile = proc::nofile_limit(tollgate.pid).unwrap_or(nofile);
    println!(
        "e2e: tollgate pid {} idle RSS {:.1} MB, {} fds open, open-files limit {}",
        tollgate.pid,
        idle_rss_kb as f64 / 1024.0,
        idle_fds,
        tollgate_nofile
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("generator runtime");
    let pids = Pids {
        tollgate: tollgate.pid,
        mock: mock.pid,
    };
    let requests = Requests::build(mock.fast_port, tollgate.gateway, &tollgate.key);
    smoke_test(&rt, &requests);

    let mut results = Vec::new();
    for kind in [Kind::Json, Kind::Stream] {
        for conc in [1usize, 16, 64] {
            for result in measure_pair(&rt, &requests, kind, conc, &opts, pids, clk_tck) {
                println!("e2e: {}", result.one_line());
                results.push(result);
            }
        }
    }

    let streams = if opts.streams > 0 && opts.runs("streams") {
        // Each stream holds two descriptors in Tollgate (client side and upstream side); the
        // margin leaves room for the database, logs and the listeners.
        let fit = (tollgate_nofile.saturating_sub(idle_fds as u64 + 256) / 2) as usize;
        let fit = fit.min(nofile.saturating_sub(256) as usize);
        let n = opts.streams.min(fit);
        Some(rt.block_on(streams_test(
            n,
            opts.streams,
            tollgate.gateway,
            &tollgate.key,
            &mut mock,
            tollgate.pid,
            fit,
        )))
    } else {
        None
    };

    let end_rss_kb = proc::status_kb(tollgate.pid, "VmRSS").unwrap_or(0);
    let recorder = rt.block_on(scrape_recorder(tollgate.admin));
    let report = render_report(&Report {
        machine: &machine,
        opts: &opts,
        idle_rss_kb,
        end_rss_kb,
        results: &results,
        streams: streams.as_ref(),
        recorder,
    });
    println!("\n{report}");
    let path = opts.report_path();
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    match std::fs::write(&path, &report) {
        Ok(()) => println!("e2e: report written to {}", path.display()),
        Err(e) => println!("e2e: cannot write {}: {e}", path.display()),
    }
    drop(tollgate);
    drop(mock);
}

// ---------------------------------------------------------------------------------------------
// Options and machine
// ---------------------------------------------------------------------------------------------

struct Options {
    phase: Duration,
    streams: usize,
    only: Option<String>,
    report: Option<PathBuf>,
}

impl Options {
    fn from_env() -> Options {
        let secs = std::env::var("E2E_PHASE_SECS")
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|s| *s > 0.0 && *s <= 120.0)
            .unwrap_or(3.0);
        Options {
            phase: Duration::from_secs_f64(secs),
            streams: std::env::var("E2E_STREAMS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(10_000),
            only: std::env::var("E2E_ONLY").ok().filter(|s| !s.is_empty()),
            report: std::env::var("E2E_REPORT").ok().map(PathBuf::from),
        }
    }

    /// Whether the phase (or "streams", the memory test) is selected by `E2E_ONLY`.
    fn runs(&self, name: &str) -> bool {
        self.only.as_deref().is_none_or(|f| name.contains(f))
    }

    fn report_path(&self) -> PathBuf {
        if let Some(p) = &self.report {
            return p.clone();
        }
        let target = std::env::var("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
        target.join("e2e-report.md")
    }
}

struct Machine {
    cpus: usize,
    model: String,
    mem_mb: u64,
    kernel: String,
    load_at_start: String,
    nofile: u64,
}

impl Machine {
    fn probe(nofile: u64) -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let mem_kb = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse::<u64>().ok())
            })
            .unwrap_or(0);
        Machine {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            model,
            mem_mb: mem_kb / 1024,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            load_at_start: load_average(),
            nofile,
        }
    }

    fn one_line(&self) -> String {
        format!(
            "{} CPUs ({}), {} MB RAM, Linux {}, load average {}, open-files limit {}",
            self.cpus, self.model, self.mem_mb, self.kernel, self.load_at_start, self.nofile
        )
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// libc bits std does not expose (std links libc already)
// ---------------------------------------------------------------------------------------------

mod sys {
    use std::os::raw::{c_int, c_long};

    #[repr(C)]
    struct RLimit {
        cur: u64,
        max: u64,
    }

    const RLIMIT_NOFILE: c_int = 7;
    const SC_CLK_TCK: c_int = 2;

    extern "C" {
        fn getrlimit(resource: c_int, rlim: *mut RLimit) -> c_int;
        fn setrlimit(resource: c_int, rlim: *const RLimit) -> c_int;
        fn sysconf(name: c_int) -> c_long;
        fn kill(pid: c_int, sig: c_int) -> c_int;
    }

    /// Sends SIGTERM to a child this process started.
    pub fn terminate(pid: u32) {
        const SIGTERM: c_int = 15;
        // SAFETY: kill has no memory-safety preconditions; `pid` is our own child.
        unsafe {
            kill(pid as c_int, SIGTERM);
        }
    }

    /// Raises this process's soft open-files limit to its hard limit (children inherit it) and
    /// returns the soft limit now in force.
    pub fn raise_nofile() -> u64 {
        let mut lim = RLimit { cur: 0, max: 0 };
        // SAFETY: plain libc calls on a properly sized, initialised struct.
        unsafe {
            if getrlimit(RLIMIT_NOFILE, &mut lim) != 0 {
                return 1024;
            }
            let raised = RLimit {
                cur: lim.max,
                max: lim.max,
            };
            if setrlimit(RLIMIT_NOFILE, &raised) == 0 {
                return raised.cur;
            }
        }
        lim.cur
    }

    /// Clock ticks per second (`getconf CLK_TCK`); 100 when unknown.
    pub fn clock_ticks() -> u64 {
        // SAFETY: sysconf has no preconditions.
        let t = unsafe { sysconf(SC_CLK_TCK) };
        if t > 0 {
            t as u64
        } else {
            100
        }
    }
}

// ---------------------------------------------------------------------------------------------
// /proc readers
// ---------------------------------------------------------------------------------------------

mod proc {
    /// utime + stime of every thread of `pid`, in clock ticks. `None` for "self".
    pub fn cpu_ticks(pid: Option<u32>) -> u64 {
        let path = match pid {
            Some(p) => format!("/proc/{p}/stat"),
            None => "/proc/self/stat".to_string(),
        };
        let Ok(stat) = std::fs::read_to_string(path) else {
            return 0;
        };
        let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            return 0;
        };
        // Fields after the command name start at field 3 (state); utime is 14, stime 15.
        let fields: Vec<&str> = after.split_whitespace().collect();
        let get = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        get(11) + get(12)
    }

    /// user + nice + system ticks of the whole machine (irq and softirq time belongs to no
    /// process and is left out on both sides of the "other load" subtraction).
    pub fn machine_busy_ticks() -> u64 {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
            return 0;
        };
        line.split_whitespace()
            .skip(1)
            .take(3)
            .filter_map(|v| v.parse::<u64>().ok())
            .sum()
    }

    /// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`).
    pub fn status_kb(pid: u32, key: &str) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find(|l| l.starts_with(key) && l[key.len()..].starts_with(':'))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }

    /// Resets `VmHWM` to the current RSS (`echo 5 > clear_refs`).
    pub fn reset_peak(pid: u32) -> bool {
        std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
    }

    pub fn fd_count(pid: u32) -> usize {
        std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
    }

    /// The soft "Max open files" of `pid`.
    pub fn nofile_limit(pid: u32) -> Option<u64> {
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
        let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
        line["Max open files".len()..]
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }
}

// ---------------------------------------------------------------------------------------------
// The mock provider (a child process: this executable with TOLLGATE_E2E_ROLE=mock)
// ---------------------------------------------------------------------------------------------

struct MockProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    pid: u32,
    fast_port: u16,
    slow_port: u16,
}

impl MockProcess {
    fn start() -> MockProcess {
        let exe = std::env::current_exe().expect("current executable");
        let mut child = Command::new(exe)
            .env(ROLE_ENV, "mock")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the mock process");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("mock stdout"))
            .read_line(&mut line)
            .expect("mock ports");
        let mut ports = line
            .split_whitespace()
            .map(|p| p.parse::<u16>().expect("port"));
        let (fast_port, slow_port) = (ports.next().expect("fast"), ports.next().expect("slow"));
        MockProcess {
            pid: child.id(),
            stdin: child.stdin.take(),
            child,
            fast_port,
            slow_port,
        }
    }

    /// Tells the dripping listener to finish (`true`) or hold (`false`) its streams.
    fn release_streams(&mut self, release: bool) {
        if let Some(stdin) = self.stdin.as_mut() {
            let _ = stdin.write_all(if release { b"release\n" } else { b"hold\n" });
            let _ = stdin.flush();
        }
    }
}

impl Drop for MockProcess {
    fn drop(&mut self) {
        // EOF on stdin ends the mock; kill it if it does not.
        self.stdin = None;
        for _ in 0..50 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

mod mock {
    use super::*;
    use tokio::sync::watch;

    /// Every response byte, rendered once.
    pub struct Responses {
        json: Vec<u8>,
        /// Head + first event (one write), then the rest of the events and the terminator
        /// (a second write), so the first event reaches the client as its own segment.
        stream_first: Vec<u8>,
        stream_rest: Vec<u8>,
        /// The dripping stream: head + first event, one event per second, then the tail.
        drip_event: Vec<u8>,
        drip_tail: Vec<u8>,
    }

    fn chunk(out: &mut Vec<u8>, data: &[u8]) {
        out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
    }

    impl Responses {
        pub fn render() -> Responses {
            let mut json = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
                 x-request-id: req_e2e\r\nopenai-processing-ms: 1\r\n\r\n",
                CHAT_JSON.len()
            )
            .into_bytes();
            json.extend_from_slice(CHAT_JSON);
            let events: Vec<Vec<u8>> = CHAT_SSE
                .split(|&b| b == b'\n')
                .filter(|l| !l.is_empty())
                .map(|l| {
                    let mut e = l.to_vec();
                    e.extend_from_slice(b"\n\n");
                    e
                })
                .collect();
            let head: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                cache-control: no-cache\r\nx-request-id: req_e2e\r\ntransfer-encoding: chunked\r\n\r\n";
            let mut stream_first = head.to_vec();
            chunk(&mut stream_first, &events[0]);
            let mut stream_rest = Vec::new();
            for e in &events[1..] {
                chunk(&mut stream_rest, e);
            }
            stream_rest.extend_from_slice(b"0\r\n\r\n");
            let mut drip_event = Vec::new();
            chunk(&mut drip_event, &events[1]);
            let mut drip_tail = Vec::new();
            for e in &events[events.len().saturating_sub(3)..] {
                chunk(&mut drip_tail, e);
            }
            drip_tail.extend_from_slice(b"0\r\n\r\n");
            Responses {
                json,
                stream_first,
                stream_rest,
                drip_event,
                drip_tail,
            }
        }
    }

    pub fn run() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("mock runtime");
        rt.block_on(async {
            let fast = super::listen();
            let slow = super::listen();
            println!(
                "{} {}",
                fast.local_addr().expect("addr").port(),
                slow.local_addr().expect("addr").port()
            );
            let _ = std::io::stdout().flush();
            let responses: &'static Responses = Box::leak(Box::new(Responses::render()));
            let (release_tx, release_rx) = watch::channel(false);
            // Commands on stdin; EOF (the bench is gone) ends the process.
            std::thread::spawn(move || {
                for line in std::io::stdin().lock().lines() {
                    match line.as_deref().map(str::trim) {
                        Ok("release") => {
                            let _ = release_tx.send(true);
                        }
                        Ok("hold") => {
                            let _ = release_tx.send(false);
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
                std::process::exit(0);
            });
            tokio::spawn(async move {
                loop {
                    if let Ok((s, _)) = slow.accept().await {
                        tokio::spawn(serve(s, responses, Some(release_rx.clone())));
                    }
                }
            });
            loop {
                if let Ok((s, _)) = fast.accept().await {
                    tokio::spawn(serve(s, responses, None));
                }
            }
        });
    }

    /// Serves keep-alive requests on one connection. `drip` makes streams slow (memory test).
    async fn serve(
        mut s: TcpStream,
        r: &'static Responses,
        mut drip: Option<watch::Receiver<bool>>,
    ) {
        let _ = s.set_nodelay(true);
        let mut buf = vec![0u8; if drip.is_some() { 2048 } else { 16 * 1024 }];
        let mut filled = 0usize;
        loop {
            match request_len(&buf[..filled]) {
                Parsed::Complete { len, streaming } => {
                    let sent = match (&mut drip, streaming) {
                        (None, false) => s.write_all(&r.json).await,
                        (None, true) => match s.write_all(&r.stream_first).await {
                            Ok(()) => s.write_all(&r.stream_rest).await,
                            e => e,
                        },
                        (Some(release), _) => drip_stream(&mut s, r, release).await,
                    };
                    if sent.is_err() {
                        return;
                    }
                    buf.copy_within(len..filled, 0);
                    filled -= len;
                    continue;
                }
                Parsed::Bad => return,
                Parsed::Partial => {}
            }
            if filled == buf.len() {
                if buf.len() >= 1 << 20 {
                    return;
                }
                buf.resize(buf.len() * 2, 0);
            }
            match s.read(&mut buf[filled..]).await {
                Ok(0) | Err(_) => return,
                Ok(n) => filled += n,
            }
        }
    }

    async fn drip_stream(
        s: &mut TcpStream,
        r: &Responses,
        release: &mut watch::Receiver<bool>,
    ) -> std::io::Result<()> {
        s.write_all(&r.stream_first).await?;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        // Bounded: a stream ends after two minutes even if the bench never says so.
        for _ in 0..120 {
            if *release.borrow() {
                break;
            }
            tokio::select! {
                _ = tick.tick() => s.write_all(&r.drip_event).await?,
                changed = release.changed() => if changed.is_err() { break },
            }
        }
        s.write_all(&r.drip_tail).await
    }

    enum Parsed {
        Complete { len: usize, streaming: bool },
        Partial,
        Bad,
    }

    fn request_len(data: &[u8]) -> Parsed {
        if data.is_empty() {
            return Parsed::Partial;
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        let head = match req.parse(data) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Parsed::Partial,
            Err(_) => return Parsed::Bad,
        };
        let length = req
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        if data.len() < head + length {
            return Parsed::Partial;
        }
        let body = &data[head..head + length];
        let streaming = body.windows(13).any(|w| w == b"\"stream\":true");
        Parsed::Complete {
            len: head + length,
            streaming,
        }
    }
}

/// A loopback listener with a deep accept backlog (the memory test opens thousands at once).
fn listen() -> tokio::net::TcpListener {
    let socket = TcpSocket::new_v4().expect("socket");
    let _ = socket.set_reuseaddr(true);
    socket
        .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .expect("bind 127.0.0.1:0");
    socket.listen(8192).expect("listen")
}

// ---------------------------------------------------------------------------------------------
// Tollgate (the real release binary, temp config)
// ---------------------------------------------------------------------------------------------

struct Tollgate {
    child: Child,
    pid: u32,
    gateway: SocketAddr,
    admin: SocketAddr,
    key: String,
    _dir: tempfile::TempDir,
}

impl Tollgate {
    fn start(fast_port: u16, slow_port: u16) -> Tollgate {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = dir.path().join("tollgate.db");
        let config = format!(
            "[server]\ngateway_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             grace_period_seconds = 0\n\
             max_connections = 20000\nmax_connections_per_client = 0\n\n\
             [database]\nurl = \"sqlite://{}\"\n\n\
             [providers.openai]\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:{fast_port}\"\n\
             api_key_env = \"E2E_OPENAI_KEY\"\n\n\
             [providers.slow]\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:{slow_port}\"\n\
             api_key_env = \"E2E_OPENAI_KEY\"\n\n\
             [budgets]\ndefault_limit_usd = \"1000000.00\"\n\n\
             [limits]\nrequests_per_minute = 1000000\n\n\
             [logging]\nstructured = true\nlevel = \"info\"\n",
            db.display()
        );
        let config_path = dir.path().join("tollgate.toml");
        std::fs::write(&config_path, config).expect("write config");
        // E2E_WRAP runs Tollgate under a tool (e.g. `valgrind --tool=massif`), for profiling.
        let wrap: Vec<String> = std::env::var("E2E_WRAP")
            .map(|w| w.split_whitespace().map(String::from).collect())
            .unwrap_or_default();
        let mut command = match wrap.split_first() {
            Some((tool, args)) => {
                let mut c = Command::new(tool);
                c.args(args).arg(bin());
                c
            }
            None => Command::new(bin()),
        };
        let mut child = command
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .current_dir(dir.path())
            .env("E2E_OPENAI_KEY", CENTRAL_KEY)
            .env_remove("TOLLGATE_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tollgate");
        let pid = child.id();
        let (tx, rx) = mpsc::channel::<String>();
        // stdout: look for the two "listening" lines, then read and discard everything (the
        // interception logs) so Tollgate never blocks on a full pipe.
        let stdout = child.stdout.take().expect("stdout");
        let tx_out = tx.clone();
        std::thread::spawn(move || drain_logs(stdout, tx_out));
        let stderr = child.stderr.take().expect("stderr");
        std::thread::spawn(move || drain_logs(stderr, tx));

        let deadline = Instant::now() + Duration::from_secs(60);
        let (mut gateway, mut admin) = (None, None);
        let mut seen = Vec::new();
        while gateway.is_none() || admin.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                        if v["message"] == "listening" {
                            let addr = v["addr"].as_str().and_then(|a| a.parse().ok());
                            match v["listener"].as_str() {
                                Some("gateway") => gateway = addr,
                                Some("admin") => admin = addr,
                                _ => {}
                            }
                        }
                    }
                    seen.push(line);
                }
                Err(_) => {
                    let _ = child.kill();
                    panic!("tollgate did not start:\n{}", seen.join("\n"));
                }
            }
        }
        let (gateway, admin): (SocketAddr, SocketAddr) = (gateway.unwrap(), admin.unwrap());
        // pingora binds after the log line.
        while std::net::TcpStream::connect(gateway).is_err() {
            assert!(Instant::now() < deadline, "gateway port never opened");
            std::thread::sleep(Duration::from_millis(20));
        }
        let cli = |args: &[&str]| {
            let out = Command::new(bin())
                .args(args)
                .arg("--config")
                .arg(&config_path)
                .current_dir(dir.path())
                .output()
                .expect("run tollgate cli");
            assert!(out.status.success(), "tollgate {args:?}: {out:?}");
            String::from_utf8(out.stdout).expect("utf-8")
        };
        cli(&["users", "create", "bench"]);
        let key = cli(&["keys", "create", "--user", "bench", "--name", "e2e"])
            .trim()
            .to_string();
        Tollgate {
            child,
            pid,
            gateway,
            admin,
            key,
            _dir: dir,
        }
    }
}

impl Drop for Tollgate {
    fn drop(&mut self) {
        // SIGTERM first (a profiler wrapping Tollgate writes its output on a clean exit).
        sys::terminate(self.pid);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Forwards lines until the listeners are known (the receiver hangs up after start), then
/// discards in large reads.
fn drain_logs(stream: impl Read, tx: mpsc::Sender<String>) {
    let mut reader = BufReader::with_capacity(1 << 16, stream);
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                if tx.send(line.trim_end().to_string()).is_err() {
                    break;
                }
            }
        }
    }
    let mut sink = vec![0u8; 1 << 16];
    while matches!(reader.read(&mut sink), Ok(n) if n > 0) {}
}

// ---------------------------------------------------------------------------------------------
// Requests and the minimal HTTP/1.1 client
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Json,
    Stream,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Target {
    Direct,
    Tollgate,
}

#[derive(Clone, Copy, Debug)]
struct PhaseSpec {
    kind: Kind,
    target: Target,
    conc: usize,
}

impl PhaseSpec {
    fn name(&self) -> String {
        format!(
            "{} c={} {}",
            match self.kind {
                Kind::Json => "json",
                Kind::Stream => "stream",
            },
            self.conc,
            match self.target {
                Target::Direct => "direct",
                Target::Tollgate => "tollgate",
            }
        )
    }
}

/// Pre-built request bytes for each (kind, target).
struct Requests {
    direct: SocketAddr,
    tollgate: SocketAddr,
    direct_json: Arc<[u8]>,
    direct_stream: Arc<[u8]>,
    tollgate_json: Arc<[u8]>,
    tollgate_stream: Arc<[u8]>,
}

const JSON_BODY: &str = r#"{"model":"gpt-4o","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Why did the build fail?"}],"max_tokens":256}"#;
const STREAM_BODY: &str = r#"{"model":"gpt-4o","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Why did the build fail?"}],"max_tokens":256,"stream":true}"#;

fn http_request(addr: SocketAddr, path: &str, key: &str, body: &str) -> Arc<[u8]> {
    format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\nuser-agent: tollgate-e2e/1\r\n\
         accept: application/json\r\ncontent-type: application/json\r\n\
         authorization: Bearer {key}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
    .into()
}

impl Requests {
    fn build(mock_port: u16, tollgate: SocketAddr, key: &str) -> Requests {
        let direct = SocketAddr::from(([127, 0, 0, 1], mock_port));
        let up = "/v1/chat/completions";
        let via = "/api/v2/aibridge/openai/v1/chat/completions";
        Requests {
            direct,
            tollgate,
            direct_json: http_request(direct, up, CENTRAL_KEY, JSON_BODY),
            direct_stream: http_request(direct, up, CENTRAL_KEY, STREAM_BODY),
            tollgate_json: http_request(tollgate, via, key, JSON_BODY),
            tollgate_stream: http_request(tollgate, via, key, STREAM_BODY),
        }
    }

    fn for_spec(&self, spec: PhaseSpec) -> (SocketAddr, Arc<[u8]>) {
        match (spec.target, spec.kind) {
            (Target::Direct, Kind::Json) => (self.direct, self.direct_json.clone()),
            (Target::Direct, Kind::Stream) => (self.direct, self.direct_stream.clone()),
            (Target::Tollgate, Kind::Json) => (self.tollgate, self.tollgate_json.clone()),
            (Target::Tollgate, Kind::Stream) => (self.tollgate, self.tollgate_stream.clone()),
        }
    }
}

/// A reusable read buffer: grows to the largest response once, then never allocates.
struct ReadBuf {
    buf: Vec<u8>,
    filled: usize,
    last_read: Instant,
}

impl ReadBuf {
    fn new(capacity: usize) -> ReadBuf {
        ReadBuf {
            buf: vec![0; capacity],
            filled: 0,
            last_read: Instant::now(),
        }
    }

    async fn read_more(&mut self, s: &mut TcpStream) -> std::io::Result<()> {
        if self.filled == self.buf.len() {
            if self.buf.len() >= 8 << 20 {
                return Err(std::io::Error::other("response too large"));
            }
            self.buf.resize(self.buf.len() * 2, 0);
        }
        let n = s.read(&mut self.buf[self.filled..]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.filled += n;
        self.last_read = Instant::now();
        Ok(())
    }
}

enum Framing {
    Length(usize),
    Chunked,
    Close,
}

struct Head {
    status: u16,
    len: usize,
    framing: Framing,
    keep_alive: bool,
}

fn parse_head(data: &[u8]) -> std::io::Result<Option<Head>> {
    let mut headers = [httparse::EMPTY_HEADER; 48];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(data) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(std::io::Error::other(e)),
    };
    let mut framing = Framing::Close;
    let mut keep_alive = resp.version == Some(1);
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| std::io::Error::other("bad content-length"))?;
            if !matches!(framing, Framing::Chunked) {
                framing = Framing::Length(n);
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            if h.value.eq_ignore_ascii_case(b"chunked") {
                framing = Framing::Chunked;
            }
        } else if h.name.eq_ignore_ascii_case("connection")
            && h.value.eq_ignore_ascii_case(b"close")
        {
            keep_alive = false;
        }
    }
    Ok(Some(Head {
        status: resp.code.unwrap_or(0),
        len,
        framing,
        keep_alive,
    }))
}

enum ChunkStep {
    /// One whole chunk is in the buffer; the next starts here.
    Next(usize),
    /// The terminating chunk (and the empty trailer) is in.
    Done,
    NeedMore,
}

/// One step of a chunked body starting at `pos`; `data_seen` is set when payload bytes are in.
fn chunk_step(data: &[u8], pos: usize, data_seen: &mut bool) -> std::io::Result<ChunkStep> {
    let Some(nl) = data[pos..].windows(2).position(|w| w == b"\r\n") else {
        return Ok(ChunkStep::NeedMore);
    };
    let line = &data[pos..pos + nl];
    let hex = line.split(|&b| b == b';').next().unwrap_or_default();
    let size = std::str::from_utf8(hex)
        .ok()
        .and_then(|h| usize::from_str_radix(h.trim(), 16).ok())
        .ok_or_else(|| std::io::Error::other("bad chunk size"))?;
    let start = pos + nl + 2;
    if size == 0 {
        return Ok(if data.len() >= start + 2 {
            ChunkStep::Done
        } else {
            ChunkStep::NeedMore
        });
    }
    if data.len() > start {
        *data_seen = true;
    }
    Ok(if data.len() >= start + size + 2 {
        ChunkStep::Next(start + size + 2)
    } else {
        ChunkStep::NeedMore
    })
}

struct Response {
    status: u16,
    keep_alive: bool,
    /// When the first body byte arrived.
    first_body: Option<Instant>,
}

/// Reads one response; `on_first_body` runs once when the first body byte is in.
async fn read_response(
    s: &mut TcpStream,
    rb: &mut ReadBuf,
    mut on_first_body: impl FnMut(),
) -> std::io::Result<Response> {
    rb.filled = 0;
    let head = loop {
        if let Some(h) = parse_head(&rb.buf[..rb.filled])? {
            break h;
        }
        rb.read_more(s).await?;
    };
    let mut first_body = None;
    let mut keep_alive = head.keep_alive;
    match head.framing {
        Framing::Length(n) => {
            while rb.filled < head.len + n {
                if first_body.is_none() && rb.filled > head.len {
                    first_body = Some(rb.last_read);
                    on_first_body();
                }
                rb.read_more(s).await?;
            }
            if first_body.is_none() && n > 0 {
                first_body = Some(rb.last_read);
                on_first_body();
            }
        }
        Framing::Chunked => {
            let mut pos = head.len;
            let mut seen = false;
            loop {
                let step = chunk_step(&rb.buf[..rb.filled], pos, &mut seen)?;
                if seen && first_body.is_none() {
                    first_body = Some(rb.last_read);
                    on_first_body();
                }
                match step {
                    ChunkStep::Next(next) => pos = next,
                    ChunkStep::Done => break,
                    ChunkStep::NeedMore => rb.read_more(s).await?,
                }
            }
        }
        Framing::Close => {
            keep_alive = false;
            loop {
                match rb.read_more(s).await {
                    Ok(()) => {
                        if first_body.is_none() {
                            first_body = Some(rb.last_read);
                            on_first_body();
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                    Err(e) => return Err(e),
                }
            }
        }
    }
    Ok(Response {
        status: head.status,
        keep_alive,
        first_body,
    })
}

async fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// One request on a fresh connection; panics with what came back unless it is a 200.
fn smoke_test(rt: &tokio::runtime::Runtime, requests: &Requests) {
    for target in [Target::Direct, Target::Tollgate] {
        for kind in [Kind::Json, Kind::Stream] {
            let spec = PhaseSpec {
                kind,
                target,
                conc: 1,
            };
            let (addr, req) = requests.for_spec(spec);
            rt.block_on(async {
                let mut s = connect(addr).await.expect("connect");
                s.write_all(&req).await.expect("write");
                let mut rb = ReadBuf::new(16 * 1024);
                let r = read_response(&mut s, &mut rb, || {})
                    .await
                    .expect("response");
                assert_eq!(
                    r.status,
                    200,
                    "{}: {}",
                    spec.name(),
                    String::from_utf8_lossy(&rb.buf[..rb.filled])
                );
            });
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Load phases
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
struct Pids {
    tollgate: u32,
    mock: u32,
}

#[derive(Clone, Copy)]
struct Window {
    start: Instant,
    end: Instant,
}

#[derive(Default)]
struct ConnStats {
    latencies: Vec<u64>,
    ttfb: Vec<u64>,
    errors: usize,
    bad_status: usize,
}

/// One closed-loop connection: request, whole response, next request, until the window ends.
/// Only requests completed inside the window are counted.
async fn client_loop(
    addr: SocketAddr,
    req: Arc<[u8]>,
    window: Window,
    stream: bool,
    conc: usize,
) -> ConnStats {
    // Room for this connection's share of 400k requests/s, so recording never reallocates.
    let expected = ((window.end - window.start).as_secs_f64() * 400_000.0 / conc as f64) as usize;
    let mut st = ConnStats {
        latencies: Vec::with_capacity(expected.min(1 << 20)),
        ttfb: Vec::with_capacity(if stream { expected.min(1 << 20) } else { 0 }),
        ..ConnStats::default()
    };
    let mut rb = ReadBuf::new(16 * 1024);
    let mut conn: Option<TcpStream> = None;
    while Instant::now() < window.end {
        if conn.is_none() {
            match connect(addr).await {
                Ok(s) => conn = Some(s),
                Err(_) => {
                    st.errors += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
            }
        }
        let Some(s) = conn.as_mut() else { continue };
        let t0 = Instant::now();
        let result = match s.write_all(&req).await {
            Ok(()) => read_response(s, &mut rb, || {}).await,
            Err(e) => Err(e),
        };
        let t1 = Instant::now();
        match result {
            Ok(r) => {
                if r.status != 200 {
                    st.bad_status += 1;
                }
                if !r.keep_alive {
                    conn = None;
                }
                if t1 >= window.start && t1 <= window.end && r.status == 200 {
                    st.latencies.push((t1 - t0).as_nanos() as u64);
                    if stream {
                        if let Some(fb) = r.first_body {
                            st.ttfb.push((fb - t0).as_nanos() as u64);
                        }
                    }
                }
            }
            Err(_) => {
                st.errors += 1;
                conn = None;
            }
        }
    }
    st
}

#[derive(Clone, Copy, Default)]
struct Snapshot {
    at: Option<Instant>,
    tollgate: u64,
    mock: u64,
    bench: u64,
    machine: u64,
}

impl Snapshot {
    fn take(pids: Pids) -> Snapshot {
        Snapshot {
            at: Some(Instant::now()),
            tollgate: proc::cpu_ticks(Some(pids.tollgate)),
            mock: proc::cpu_ticks(Some(pids.mock)),
            bench: proc::cpu_ticks(None),
            machine: proc::machine_busy_ticks(),
        }
    }
}

#[derive(Clone, Copy, Default)]
struct Pct {
    p50: f64,
    p99: f64,
}

/// Percentiles in milliseconds.
fn percentiles(v: &mut [u64]) -> Option<Pct> {
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)] as f64 / 1e6;
    Some(Pct {
        p50: at(0.50),
        p99: at(0.99),
    })
}

struct PhaseResult {
    spec: PhaseSpec,
    requests: usize,
    errors: usize,
    secs: f64,
    latency: Pct,
    ttfb: Option<Pct>,
    /// ms of CPU per request.
    tollgate_cpu: f64,
    mock_cpu: f64,
    bench_cpu: f64,
    peak_rss_kb: u64,
    /// % of the machine busy outside the three processes.
    other_load: f64,
    attempts: usize,
}

impl PhaseResult {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.secs
    }

    fn one_line(&self) -> String {
        let mut s = format!(
            "{:<22} {:>8.0} req/s  p50 {:.3} ms  p99 {:.3} ms",
            self.spec.name(),
            self.rps(),
            self.latency.p50,
            self.latency.p99
        );
        if let Some(t) = self.ttfb {
            let _ = write!(s, "  ttfb p50 {:.3} p99 {:.3}", t.p50, t.p99);
        }
        if self.spec.target == Target::Tollgate {
            let _ = write!(
                s,
                "  tollgate {:.3} ms CPU/req  peak RSS {:.1} MB",
                self.tollgate_cpu,
                self.peak_rss_kb as f64 / 1024.0
            );
        }
        let _ = write!(
            s,
            "  (mock {:.3}, generator {:.3} ms CPU/req; other load {:.0} %{}{})",
            self.mock_cpu,
            self.bench_cpu,
            self.other_load,
            if self.attempts > ROUNDS as usize {
                format!(", {} slices for {ROUNDS}", self.attempts)
            } else {
                String::new()
            },
            if self.errors > 0 {
                format!(", {} errors", self.errors)
            } else {
                String::new()
            }
        );
        s
    }
}

/// What one measured slice of a phase saw.
#[derive(Default)]
struct Slice {
    latencies: Vec<u64>,
    ttfb: Vec<u64>,
    errors: usize,
    secs: f64,
    /// CPU ticks over the window: Tollgate, mock, this process, the whole machine (busy).
    ticks: [u64; 4],
    peak_rss_kb: u64,
}

impl Slice {
    /// % of the machine busy outside the three processes.
    fn other_load(&self, clk_tck: u64) -> f64 {
        let ours = self.ticks[0] + self.ticks[1] + self.ticks[2];
        let capacity = self.secs * clk_tck as f64 * cpus() as f64;
        if capacity <= 0.0 {
            return 0.0;
        }
        self.ticks[3].saturating_sub(ours) as f64 / capacity * 100.0
    }

    fn absorb(&mut self, other: Slice) {
        self.latencies.extend_from_slice(&other.latencies);
        self.ttfb.extend_from_slice(&other.ttfb);
        self.errors += other.errors;
        self.secs += other.secs;
        for (a, b) in self.ticks.iter_mut().zip(other.ticks) {
            *a += b;
        }
        self.peak_rss_kb = self.peak_rss_kb.max(other.peak_rss_kb);
    }

    fn into_result(mut self, spec: PhaseSpec, clk_tck: u64, attempts: usize) -> PhaseResult {
        let n = self.latencies.len();
        let per_req = |ticks: u64| {
            if n == 0 {
                0.0
            } else {
                ticks as f64 * 1000.0 / clk_tck as f64 / n as f64
            }
        };
        PhaseResult {
            spec,
            requests: n,
            errors: self.errors,
            secs: self.secs,
            latency: percentiles(&mut self.latencies).unwrap_or_default(),
            ttfb: percentiles(&mut self.ttfb),
            tollgate_cpu: per_req(self.ticks[0]),
            mock_cpu: per_req(self.ticks[1]),
            bench_cpu: per_req(self.ticks[2]),
            peak_rss_kb: self.peak_rss_kb,
            other_load: self.other_load(clk_tck),
            attempts,
        }
    }
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Slices per path and phase: direct and Tollgate alternate, so both see the same conditions.
const ROUNDS: u32 = 3;

/// Measures one (requests, concurrency) pair: `ROUNDS` slices through each path, alternating
/// direct and Tollgate, each on fresh connections after a short warm-up. A slice measured while
/// more than `DISTURBED_PCT` of the machine was busy elsewhere is measured again (twice at most;
/// the quietest attempt is kept).
fn measure_pair(
    rt: &tokio::runtime::Runtime,
    requests: &Requests,
    kind: Kind,
    conc: usize,
    opts: &Options,
    pids: Pids,
    clk_tck: u64,
) -> Vec<PhaseResult> {
    let targets: Vec<Target> = [Target::Direct, Target::Tollgate]
        .into_iter()
        .filter(|&target| opts.runs(&PhaseSpec { kind, target, conc }.name()))
        .collect();
    let mut totals: Vec<(Slice, usize)> = targets.iter().map(|_| (Slice::default(), 0)).collect();
    for _ in 0..ROUNDS {
        for (i, &target) in targets.iter().enumerate() {
            let spec = PhaseSpec { kind, target, conc };
            let mut best: Option<Slice> = None;
            for attempt in 1..=3 {
                let slice = run_slice(rt, requests, spec, opts.phase / ROUNDS, pids);
                let load = slice.other_load(clk_tck);
                totals[i].1 += 1;
                if best.as_ref().is_none_or(|b| load < b.other_load(clk_tck)) {
                    best = Some(slice);
                }
                if load <= DISTURBED_PCT || attempt == 3 {
                    break;
                }
                println!(
                    "e2e: {} disturbed ({load:.0} % of the machine busy elsewhere); again",
                    spec.name()
                );
                std::thread::sleep(Duration::from_secs(1));
            }
            totals[i].0.absorb(best.expect("one attempt"));
        }
    }
    targets
        .iter()
        .zip(totals)
        .map(|(&target, (slice, attempts))| {
            slice.into_result(PhaseSpec { kind, target, conc }, clk_tck, attempts)
        })
        .collect()
}

/// One slice: `conc` closed-loop connections for a warm-up, then `length` measured.
fn run_slice(
    rt: &tokio::runtime::Runtime,
    requests: &Requests,
    spec: PhaseSpec,
    length: Duration,
    pids: Pids,
) -> Slice {
    let (addr, req) = requests.for_spec(spec);
    proc::reset_peak(pids.tollgate);
    let start = Instant::now() + WARMUP;
    let window = Window {
        start,
        end: start + length,
    };
    // The sampler thread reads /proc exactly at the window's edges and RSS in between.
    let sampler = std::thread::spawn(move || {
        std::thread::sleep(window.start.saturating_duration_since(Instant::now()));
        let before = Snapshot::take(pids);
        let mut peak = 0;
        while Instant::now() < window.end {
            peak = peak.max(proc::status_kb(pids.tollgate, "VmRSS").unwrap_or(0));
            let left = window.end.saturating_duration_since(Instant::now());
            std::thread::sleep(left.min(Duration::from_millis(100)));
        }
        let after = Snapshot::take(pids);
        let hwm = proc::status_kb(pids.tollgate, "VmHWM").unwrap_or(0);
        (before, after, peak.max(hwm))
    });
    let stats: Vec<ConnStats> = rt.block_on(async {
        let tasks: Vec<_> = (0..spec.conc)
            .map(|_| {
                tokio::spawn(client_loop(
                    addr,
                    req.clone(),
                    window,
                    spec.kind == Kind::Stream,
                    spec.conc,
                ))
            })
            .collect();
        let mut out = Vec::with_capacity(tasks.len());
        for t in tasks {
            out.push(t.await.expect("client task"));
        }
        out
    });
    let (before, after, peak_rss_kb) = sampler.join().expect("sampler");
    let mut slice = Slice {
        secs: match (before.at, after.at) {
            (Some(a), Some(b)) => (b - a).as_secs_f64(),
            _ => length.as_secs_f64(),
        },
        ticks: [
            after.tollgate.saturating_sub(before.tollgate),
            after.mock.saturating_sub(before.mock),
            after.bench.saturating_sub(before.bench),
            after.machine.saturating_sub(before.machine),
        ],
        peak_rss_kb,
        ..Slice::default()
    };
    for s in stats {
        slice.latencies.extend_from_slice(&s.latencies);
        slice.ttfb.extend_from_slice(&s.ttfb);
        slice.errors += s.errors + s.bad_status;
    }
    slice
}

// ---------------------------------------------------------------------------------------------
// Memory test: thousands of concurrent open streams
// ---------------------------------------------------------------------------------------------

struct StreamsResult {
    wanted: usize,
    attempted: usize,
    fd_fit: usize,
    opened: usize,
    completed: usize,
    failed: usize,
    open_secs: f64,
    rss_before_kb: u64,
    rss_open_kb: u64,
    hwm_kb: u64,
    rss_after_kb: u64,
    /// `AFTER_CLOSE_LATER_SECS` later.
    rss_later_kb: u64,
    fds_open: usize,
}

/// The memory test's second RSS sample after the streams closed, this many seconds after the
/// first (one second after they closed).
const AFTER_CLOSE_LATER_SECS: u64 = 6;

impl StreamsResult {
    fn per_stream_kb(&self) -> f64 {
        if self.opened == 0 {
            return 0.0;
        }
        self.rss_open_kb.saturating_sub(self.rss_before_kb) as f64 / self.opened as f64
    }

    /// RSS at 10,000 streams: measured, or the measured per-stream cost scaled up.
    fn rss_at_10k_mb(&self) -> f64 {
        (self.rss_before_kb as f64 + self.per_stream_kb() * 10_000.0) / 1024.0
    }
}

#[derive(Clone, Copy, PartialEq)]
enum StreamOutcome {
    Completed,
    FailedToOpen,
    FailedMidway,
}

async fn one_stream(
    addr: SocketAddr,
    req: Arc<[u8]>,
    gate: Arc<tokio::sync::Semaphore>,
    opened: Arc<AtomicUsize>,
) -> StreamOutcome {
    let permit = gate.acquire_owned().await.ok();
    let mut s = match tokio::time::timeout(Duration::from_secs(30), connect(addr)).await {
        Ok(Ok(s)) => s,
        _ => return StreamOutcome::FailedToOpen,
    };
    if s.write_all(&req).await.is_err() {
        return StreamOutcome::FailedToOpen;
    }
    let mut rb = ReadBuf::new(4096);
    let mut permit = permit;
    let was_open = AtomicBool::new(false);
    let read = read_response(&mut s, &mut rb, || {
        opened.fetch_add(1, Ordering::Relaxed);
        was_open.store(true, Ordering::Relaxed);
        // The next stream may start connecting.
        permit = None;
    });
    let result = tokio::time::timeout(Duration::from_secs(180), read).await;
    match result {
        Ok(Ok(r)) if r.status == 200 => StreamOutcome::Completed,
        _ if was_open.load(Ordering::Relaxed) => StreamOutcome::FailedMidway,
        _ => StreamOutcome::FailedToOpen,
    }
}

async fn streams_test(
    n: usize,
    wanted: usize,
    gateway: SocketAddr,
    key: &str,
    mock: &mut MockProcess,
    tollgate_pid: u32,
    fd_fit: usize,
) -> StreamsResult {
    let via = "/api/v2/aibridge/slow/v1/chat/completions";
    let req = http_request(gateway, via, key, STREAM_BODY);
    mock.release_streams(false);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before_kb = proc::status_kb(tollgate_pid, "VmRSS").unwrap_or(0);
    proc::reset_peak(tollgate_pid);
    println!("e2e: opening {n} concurrent streams through tollgate (one event per second each)");
    let gate = Arc::new(tokio::sync::Semaphore::new(256));
    let opened = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            tokio::spawn(one_stream(
                gateway,
                req.clone(),
                gate.clone(),
                opened.clone(),
            ))
        })
        .collect();
    // Wait until every stream has its first event (or the opening stalls for good).
    let mut last = (0, Instant::now());
    loop {
        let now_open = opened.load(Ordering::Relaxed);
        let finished = tasks.iter().filter(|t| t.is_finished()).count();
        if now_open + finished >= n {
            break;
        }
        if now_open != last.0 {
            last = (now_open, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(15) {
            println!("e2e: stream opening stalled at {now_open} of {n}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let open_secs = started.elapsed().as_secs_f64();
    let opened_n = opened.load(Ordering::Relaxed);
    // Hold them all open for five seconds (each receives five more events), watching RSS.
    let mut rss_open_kb = 0;
    let hold = Instant::now();
    while hold.elapsed() < Duration::from_secs(5) {
        rss_open_kb = rss_open_kb.max(proc::status_kb(tollgate_pid, "VmRSS").unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let fds_open = proc::fd_count(tollgate_pid);
    let hwm_kb = proc::status_kb(tollgate_pid, "VmHWM").unwrap_or(0);
    println!(
        "e2e: {opened_n} streams open after {open_secs:.1} s; tollgate RSS {:.1} MB ({} fds)",
        rss_open_kb as f64 / 1024.0,
        fds_open
    );
    mock.release_streams(true);
    let mut completed = 0;
    let mut failed = 0;
    for t in tasks {
        match t.await {
            Ok(StreamOutcome::Completed) => completed += 1,
            Ok(StreamOutcome::FailedToOpen | StreamOutcome::FailedMidway) | Err(_) => failed += 1,
        }
    }
    mock.release_streams(false);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after_kb = proc::status_kb(tollgate_pid, "VmRSS").unwrap_or(0);
    // Tollgate hands freed heap back to the OS every few seconds (glibc keeps it otherwise).
    tokio::time::sleep(Duration::from_secs(AFTER_CLOSE_LATER_SECS)).await;
    StreamsResult {
        wanted,
        attempted: n,
        fd_fit,
        opened: opened_n,
        completed,
        failed,
        open_secs,
        rss_before_kb,
        rss_open_kb,
        hwm_kb,
        rss_after_kb,
        rss_later_kb: proc::status_kb(tollgate_pid, "VmRSS").unwrap_or(0),
        fds_open,
    }
}

/// Recorder counters from the admin listener's /metrics (written, dropped).
async fn scrape_recorder(admin: SocketAddr) -> Option<(f64, f64)> {
    // Give the writer a moment to catch up with the last phase.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut s = connect(admin).await.ok()?;
    s.write_all(
        format!("GET /metrics HTTP/1.1\r\nhost: {admin}\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .ok()?;
    let mut body = Vec::new();
    s.read_to_end(&mut body).await.ok()?;
    let text = String::from_utf8_lossy(&body);
    let value = |name: &str| {
        text.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .fold(0.0, |a, b| a + b)
    };
    Some((
        value("tollgate_recorder_written_total"),
        value("tollgate_recorder_dropped_total"),
    ))
}

// ---------------------------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------------------------

struct Report<'a> {
    machine: &'a Machine,
    opts: &'a Options,
    idle_rss_kb: u64,
    end_rss_kb: u64,
    results: &'a [PhaseResult],
    streams: Option<&'a StreamsResult>,
    recorder: Option<(f64, f64)>,
}

fn find(results: &[PhaseResult], kind: Kind, conc: usize, target: Target) -> Option<&PhaseResult> {
    results
        .iter()
        .find(|r| r.spec.kind == kind && r.spec.conc == conc && r.spec.target == target)
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "**missed**"
    }
}

fn render_report(r: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "## End-to-end results\n");
    let _ = writeln!(
        out,
        "Machine: {}. Each row: {:.1} s measured, in {ROUNDS} slices alternating with the other \
         path, each after a {:.1} s warm-up on fresh connections; load average at start {}, at \
         end {}.\n",
        r.machine.one_line(),
        r.opts.phase.as_secs_f64(),
        WARMUP.as_secs_f64(),
        r.machine.load_at_start,
        load_average()
    );
    let _ = writeln!(
        out,
        "| requests | conc | path | req/s | vs direct | p50 ms | p99 ms | added p50 ms | added p99 ms \
         | TTFB p50 ms | TTFB p99 ms | TTFB added p99 ms | Tollgate CPU/req ms | Tollgate peak RSS MB \
         | other load |"
    );
    let _ = writeln!(
        out,
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for p in r.results {
        let direct = find(r.results, p.spec.kind, p.spec.conc, Target::Direct);
        let via = p.spec.target == Target::Tollgate;
        let d = direct.filter(|_| via);
        let dash = || "–".to_string();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.0} | {} | {:.3} | {:.3} | {} | {} | {} | {} | {} | {} | {} | {:.0} %{} |",
            match p.spec.kind {
                Kind::Json => "non-streaming",
                Kind::Stream => "streaming",
            },
            p.spec.conc,
            if via { "Tollgate" } else { "direct" },
            p.rps(),
            d.map_or_else(dash, |d| format!("{:.0} %", p.rps() / d.rps() * 100.0)),
            p.latency.p50,
            p.latency.p99,
            d.map_or_else(dash, |d| format!("{:+.3}", p.latency.p50 - d.latency.p50)),
            d.map_or_else(dash, |d| format!("{:+.3}", p.latency.p99 - d.latency.p99)),
            p.ttfb.map_or_else(dash, |t| format!("{:.3}", t.p50)),
            p.ttfb.map_or_else(dash, |t| format!("{:.3}", t.p99)),
            match (p.ttfb, d.and_then(|d| d.ttfb)) {
                (Some(t), Some(dt)) => format!("{:+.3}", t.p99 - dt.p99),
                _ => dash(),
            },
            if via { format!("{:.3}", p.tollgate_cpu) } else { dash() },
            if via { format!("{:.1}", p.peak_rss_kb as f64 / 1024.0) } else { dash() },
            p.other_load,
            if p.errors > 0 { format!(", {} errors", p.errors) } else { String::new() },
        );
    }
    let _ = writeln!(
        out,
        "\nCPU per request of the other two processes (ms): {}\n",
        r.results
            .iter()
            .map(|p| format!(
                "{} mock {:.3} / generator {:.3}",
                p.spec.name(),
                p.mock_cpu,
                p.bench_cpu
            ))
            .collect::<Vec<_>>()
            .join("; ")
    );
    let _ = writeln!(
        out,
        "Tollgate RSS: idle after start {:.1} MB; after all phases {:.1} MB.",
        r.idle_rss_kb as f64 / 1024.0,
        r.end_rss_kb as f64 / 1024.0
    );
    if let Some((written, dropped)) = r.recorder {
        let _ = writeln!(
            out,
            "Recorder: {written:.0} interceptions written to SQLite, {dropped:.0} dropped."
        );
    }
    if let Some(s) = r.streams {
        let _ = writeln!(
            out,
            "\nConcurrent streams: {} of {} wanted{} opened through Tollgate in {:.1} s and held \
             5 s ({} completed, {} failed; {} Tollgate fds open). Tollgate RSS {:.1} MB before, \
             {:.1} MB with all open (peak {:.1} MB), {:.1} MB 1 s after they closed, {:.1} MB {} s later: \
             {:.1} KB per stream{}.",
            s.opened,
            s.wanted,
            if s.attempted < s.wanted {
                format!(" (the open-files limit fits {} here)", s.fd_fit)
            } else {
                String::new()
            },
            s.open_secs,
            s.completed,
            s.failed,
            s.fds_open,
            s.rss_before_kb as f64 / 1024.0,
            s.rss_open_kb as f64 / 1024.0,
            s.hwm_kb as f64 / 1024.0,
            s.rss_after_kb as f64 / 1024.0,
            s.rss_later_kb as f64 / 1024.0,
            AFTER_CLOSE_LATER_SECS,
            s.per_stream_kb(),
            if s.opened < 10_000 {
                format!(", {:.1} MB scaled to 10,000 streams", s.rss_at_10k_mb())
            } else {
                String::new()
            }
        );
    }

    // Targets (issue 9).
    let _ = writeln!(out, "\n| target | figure | result |\n|---|---|---|");
    let cpu: Vec<(usize, f64)> = [1, 16, 64]
        .iter()
        .filter_map(|&c| {
            find(r.results, Kind::Json, c, Target::Tollgate).map(|p| (c, p.tollgate_cpu))
        })
        .collect();
    if !cpu.is_empty() {
        let all = cpu.iter().all(|(_, v)| *v <= 0.1);
        let _ = writeln!(
            out,
            "| CPU per non-streaming request ≤ 0.1 ms | {} | {} |",
            cpu.iter()
                .map(|(c, v)| format!("c={c}: {v:.3} ms"))
                .collect::<Vec<_>>()
                .join(", "),
            if all {
                "met".to_string()
            } else {
                let met: Vec<String> = cpu
                    .iter()
                    .filter(|(_, v)| *v <= 0.1)
                    .map(|(c, _)| format!("c={c}"))
                    .collect();
                if met.is_empty() {
                    "**missed**".to_string()
                } else {
                    format!("**missed** (met at {})", met.join(", "))
                }
            }
        );
    }
    if let (Some(t), Some(d)) = (
        find(r.results, Kind::Json, 1, Target::Tollgate),
        find(r.results, Kind::Json, 1, Target::Direct),
    ) {
        let p50 = t.latency.p50 - d.latency.p50;
        let p99 = t.latency.p99 - d.latency.p99;
        let _ = writeln!(
            out,
            "| Added latency at c=1, p50 ≤ 0.15 ms | {p50:.3} ms (non-streaming) | {} |",
            verdict(p50 <= 0.15)
        );
        let _ = writeln!(
            out,
            "| Added latency at c=1, p99 ≤ 0.5 ms | {p99:.3} ms (non-streaming) | {} |",
            verdict(p99 <= 0.5)
        );
    }
    for kind in [Kind::Json, Kind::Stream] {
        if let (Some(t), Some(d)) = (
            find(r.results, kind, 16, Target::Tollgate),
            find(r.results, kind, 16, Target::Direct),
        ) {
            let ratio = t.rps() / d.rps() * 100.0;
            let _ = writeln!(
                out,
                "| Throughput at c=16 ≥ 50 % of direct ({}) | {:.0} of {:.0} req/s = {ratio:.0} % | {} |",
                if kind == Kind::Json { "non-streaming" } else { "streaming" },
                t.rps(),
                d.rps(),
                verdict(ratio >= 50.0)
            );
        }
    }
    for conc in [1usize, 16, 64] {
        if let (Some(t), Some(d)) = (
            find(r.results, Kind::Stream, conc, Target::Tollgate),
            find(r.results, Kind::Stream, conc, Target::Direct),
        ) {
            if let (Some(tt), Some(dt)) = (t.ttfb, d.ttfb) {
                let added = tt.p99 - dt.p99;
                let _ = writeln!(
                    out,
                    "| Streaming TTFB added ≤ 0.5 ms p99 (c={conc}) | {added:.3} ms | {} |",
                    if conc == 1 {
                        verdict(added <= 0.5).to_string()
                    } else {
                        format!(
                            "{} (under load; the target is read at c=1)",
                            if added <= 0.5 { "met" } else { "over" }
                        )
                    }
                );
            }
        }
    }
    if let Some(s) = r.streams {
        let mb = if s.opened >= 10_000 {
            s.rss_open_kb as f64 / 1024.0
        } else {
            s.rss_at_10k_mb()
        };
        let _ = writeln!(
            out,
            "| 10,000 concurrent streams ≤ 512 MB RSS | {mb:.1} MB{} | {} |",
            if s.opened >= 10_000 {
                String::new()
            } else {
                format!(" (scaled from {} streams)", s.opened)
            },
            verdict(mb <= 512.0 && s.failed == 0)
        );
    }
    let idle = r.idle_rss_kb as f64 / 1024.0;
    let _ = writeln!(
        out,
        "| Idle RSS ≤ 30 MB | {idle:.1} MB | {} |",
        verdict(idle <= 30.0)
    );
    out
}
