//! The embedded database misbehaving under traffic: a SQLite file locked by another process.
//! (PostgreSQL stopping under traffic is in tests/it/replicas.rs.)

use crate::common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::mock::{MockResponse, MockUpstream};
use common::server::{skip_on_postgres, Tollgate};
use serde_json::json;
use sqlx::Connection;

#[tokio::test(flavor = "multi_thread")]
async fn a_locked_sqlite_file_holds_records_reports_not_ready_and_loses_nothing() {
    if skip_on_postgres("locks the SQLite file itself") {
        return;
    }
    let upstream = MockUpstream::always(MockResponse::fixture("openai-chat.json")).await;
    let tg = Tollgate::builder()
        .provider("openai", "openai", &upstream.base_url())
        .extra("[limits]\nrequests_per_minute = 0")
        .start()
        .await;
    let key = tg.user_key("writer");
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    assert_eq!(tg.readyz().await.0, 200);

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let other = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..2 {
        let (client, url, key) = (
            client.clone(),
            format!("{}/openai/v1/chat/completions", tg.gateway),
            key.clone(),
        );
        let (stop, ok, other) = (stop.clone(), ok.clone(), other.clone());
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let status = client
                    .post(&url)
                    .bearer_auth(&key)
                    .json(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}))
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0);
                if status == 200 {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    other.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Another process takes the write lock and keeps it (as a backup tool or a stuck
    // migration would): Tollgate's writes wait out busy_timeout (5 s) and fail.
    let url = format!("sqlite://{}", tg.db_path.display());
    let mut locker = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::query("BEGIN EXCLUSIVE")
        .execute(&mut locker)
        .await
        .unwrap();
    let locked = Instant::now();
    let mut reported = None;
    while locked.elapsed() < Duration::from_secs(8) {
        let (status, body) = tg.readyz().await;
        if status == 503 && reported.is_none() {
            reported = Some(body);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let served_while_locked = ok.load(Ordering::Relaxed);
    sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();
    locker.close().await.unwrap();
    let reported = reported.expect("/readyz reported the failing writes while the file was locked");
    let why = reported["recorder"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(why.contains("cannot write interceptions"), "{reported}");
    assert!(why.contains("locked"), "{reported}");

    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let served = ok.load(Ordering::Relaxed);
    assert_eq!(other.load(Ordering::Relaxed), 0, "traffic was unaffected");
    assert!(
        served_while_locked > 50,
        "served {served_while_locked} while locked"
    );
    // Nothing lost, nothing twice; and readiness comes back.
    tg.wait_for_interceptions(served as i64).await;
    let n: i64 = tg.scalar("SELECT COUNT(*) FROM interceptions", &[]).await;
    assert_eq!(n as usize, served);
    tg.wait_for_readyz(200, Duration::from_secs(10)).await;
    eprintln!("locked for 8 s: {served} served, all recorded; /readyz said: {why}");
}

/// A small tmpfs mounted for the test and unmounted (and removed) on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    /// `None` (the test then says it skipped) where mounting is not allowed (not root).
    fn mount(size: &str) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().ok()?;
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(SmallDisk { dir })
    }

    fn path(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Fills what is left with a file, as another process filling the disk would.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let filler = self.path().join("filler");
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 4096];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_under_the_sqlite_file_holds_records_reports_not_ready_and_loses_nothing() {
    if skip_on_postgres("fills the disk under the SQLite file") {
        return;
    }
    let Some(disk) = SmallDisk::mount("8m") else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root); .ci/run runs as root");
        return;
    };
    let upstream = MockUpstream::always(MockResponse::fixture("openai-chat.json")).await;
    let tg = Tollgate::builder()
        .provider("openai", "openai", &upstream.base_url())
        .database(&disk.path().join("tollgate.db"))
        .extra("[limits]\nrequests_per_minute = 0\n[recorder]\nspill_after_ms = 300")
        .start()
        .await;
    let key = tg.user_key("writer");
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let call = || async {
        client
            .post(format!("{}/openai/v1/chat/completions", tg.gateway))
            .bearer_auth(&key)
            .json(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap()
            .status()
    };
    assert_eq!(call().await, 200);
    tg.wait_for_interceptions(1).await;

    let filler = disk.fill();
    let mut served = 1;
    for _ in 0..150 {
        assert_eq!(
            call().await,
            200,
            "requests are served while the disk is full"
        );
        served += 1;
    }
    let reported = tg.wait_for_readyz(503, Duration::from_secs(15)).await;
    let why = reported["recorder"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(why.contains("full"), "{reported}");
    // Held, not dropped: on disk in the spill directory (another disk) until the database
    // can write again.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !tg.logs().iter().any(|l| l.contains("spilled to disk")) {
        assert!(
            Instant::now() < deadline,
            "records were not spilled:\n{}",
            tg.logs().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    std::fs::remove_file(filler).unwrap();
    tg.wait_for_interceptions(served).await;
    let n: i64 = tg.scalar("SELECT COUNT(*) FROM interceptions", &[]).await;
    assert_eq!(n, served, "every interception recorded once");
    tg.wait_for_readyz(200, Duration::from_secs(10)).await;
    eprintln!("disk full: {served} served, all recorded once space was back; /readyz said: {why}");
    drop(tg);
}
