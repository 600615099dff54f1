use std::fs;
use std::time::Duration;

use tokio::time::{Instant, timeout};

use super::*;
use crate::{MEMBERS, Member, Members, Record, StateDir, atomic_write};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Long enough never to fire on a healthy machine, short enough to fail fast.
const PATIENCE: Duration = Duration::from_secs(10);

fn fast() -> WatchOptions {
    WatchOptions::default()
        .poll_interval(Duration::from_millis(50))
        .debounce(Duration::from_millis(20))
}

fn members(name: &str) -> Members {
    Members {
        members: vec![Member {
            name: name.into(),
            control_plane: true,
            ..Member::default()
        }],
    }
}

fn first_name(record: &Record<Members>) -> &str {
    record.data.members.first().map_or("", |m| m.name.as_str())
}

async fn next_record(
    w: &mut RecordWatcher<Members>,
) -> Result<std::sync::Arc<Record<Members>>, String> {
    timeout(PATIENCE, w.changed())
        .await
        .map_err(|_| format!("no new record within {PATIENCE:?}"))
}

async fn next_change(w: &mut FileWatcher) -> Result<FileChange, String> {
    timeout(PATIENCE, w.next_change())
        .await
        .map_err(|_| format!("no change of the file within {PATIENCE:?}"))
}

/// Lets the watcher run until `done` holds; fails if it loads a new record meanwhile.
async fn settle(
    w: &mut RecordWatcher<Members>,
    done: impl Fn(&RecordWatcher<Members>) -> bool,
) -> TestResult {
    let deadline = Instant::now() + PATIENCE;
    while !done(w) {
        if Instant::now() > deadline {
            return Err(format!("condition not reached; problem: {:?}", w.problem()).into());
        }
        if let Ok(record) = timeout(Duration::from_millis(30), w.changed()).await {
            return Err(format!("unexpected new record seq {}", record.seq).into());
        }
    }
    Ok(())
}

#[tokio::test]
async fn record_watcher_keeps_last_good_through_bad_versions() -> TestResult {
    let dir = tempfile::tempdir()?;
    let state = StateDir::new(dir.path());
    state.write(MEMBERS.0, MEMBERS.1, &members("one"))?;
    let mut w = RecordWatcher::<Members>::new(&state, MEMBERS.0, MEMBERS.1, fast());
    assert!(w.uses_inotify());
    let first = w.latest().ok_or("no first record")?;
    assert_eq!((first.seq, first_name(&first)), (1, "one"));

    let path = w.path().to_path_buf();
    let good = fs::read(&path)?;
    let bad: [&[u8]; 4] = [
        b"{\"schema\":1,\"data\":{",
        &good[..good.len() / 3],
        b"",
        b"{\"schema\":9,\"data\":{}}",
    ];
    for bytes in bad {
        atomic_write(&path, bytes, 0o644)?;
        settle(&mut w, |w| w.problem().is_some()).await?;
        assert_eq!(w.latest().map(|r| r.seq), Some(1));
        // The next good one clears the problem.
        fs::write(&path, &good)?;
        settle(&mut w, |w| w.problem().is_none()).await?;
    }
    fs::remove_file(&path)?;
    settle(&mut w, |w| {
        w.problem().is_some_and(|p| p.contains("missing"))
    })
    .await?;
    assert_eq!(w.latest().map(|r| r.seq), Some(1));

    state.write(MEMBERS.0, MEMBERS.1, &members("two"))?;
    let second = next_record(&mut w).await?;
    assert_eq!((second.seq, first_name(&second)), (2, "two"));
    assert!(w.problem().is_none());
    assert!(!w.is_stale(Duration::from_secs(60)) && w.age().is_some());
    Ok(())
}

#[tokio::test]
async fn record_watcher_waits_for_directory_and_record() -> TestResult {
    let dir = tempfile::tempdir()?;
    let state = StateDir::new(dir.path().join("not-yet"));
    let mut w = RecordWatcher::<Members>::new(&state, MEMBERS.0, MEMBERS.1, fast());
    assert!(w.latest().is_none() && !w.uses_inotify());
    assert!(w.is_stale(Duration::from_secs(3600)));
    assert!(w.problem().is_some_and(|p| p.contains("missing")));

    state.write(MEMBERS.0, MEMBERS.1, &members("late"))?;
    assert_eq!(first_name(&*next_record(&mut w).await?), "late");
    // The directory exists now: the watcher switched to inotify.
    let deadline = Instant::now() + PATIENCE;
    while !w.uses_inotify() && Instant::now() < deadline {
        let _ = timeout(Duration::from_millis(20), w.changed()).await;
    }
    assert!(w.uses_inotify());
    state.write(MEMBERS.0, MEMBERS.1, &members("later"))?;
    assert_eq!(first_name(&*next_record(&mut w).await?), "later");
    Ok(())
}

#[tokio::test]
async fn record_watcher_poll_fallback() -> TestResult {
    let dir = tempfile::tempdir()?;
    let state = StateDir::new(dir.path());
    let mut w = RecordWatcher::<Members>::new(&state, MEMBERS.0, MEMBERS.1, fast().poll_only(true));
    assert!(!w.uses_inotify());
    for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
        state.write(MEMBERS.0, MEMBERS.1, &members(name))?;
        let record = next_record(&mut w).await?;
        assert_eq!((record.seq, first_name(&record)), (i as u64 + 1, name));
    }
    assert!(!w.uses_inotify());
    Ok(())
}

#[tokio::test]
async fn record_staleness_follows_the_write_time() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("meshd/members.json");
    fs::create_dir_all(dir.path().join("meshd"))?;
    fs::write(
        &path,
        br#"{"schema":1,"writer":"meshd","pid":1,"seq":5,"updatedAtMs":1000,"data":{}}"#,
    )?;
    let w = RecordWatcher::<Members>::at_path(&path, fast());
    assert_eq!(w.latest().map(|r| r.seq), Some(5));
    assert!(w.is_stale(Duration::from_secs(3600)));
    assert!(w.age().is_some_and(|age| age > Duration::from_secs(3600)));
    Ok(())
}

#[tokio::test]
async fn file_watcher_create_rename_write_remove() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("config.yaml");
    let mut w = FileWatcher::with_options(&path, fast());
    assert!(!w.exists() && w.uses_inotify());

    fs::write(&path, "a: 1\n")?;
    assert_eq!(next_change(&mut w).await?, FileChange::Created);
    assert!(w.exists());

    // Rename over it, as editors and atomic writers do.
    let tmp = dir.path().join("config.yaml.swp");
    fs::write(&tmp, "a: 2\n")?;
    fs::rename(&tmp, &path)?;
    assert_eq!(next_change(&mut w).await?, FileChange::Modified);

    // Write in place.
    {
        use std::io::Write;
        let mut file = fs::OpenOptions::new().append(true).open(&path)?;
        file.write_all(b"b: 3\n")?;
    }
    assert_eq!(next_change(&mut w).await?, FileChange::Modified);

    fs::remove_file(&path)?;
    assert_eq!(next_change(&mut w).await?, FileChange::Removed);
    assert!(!w.exists());
    Ok(())
}

#[tokio::test]
async fn file_watcher_debounces_a_burst() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("config.yaml");
    let opts = WatchOptions::default()
        .debounce(Duration::from_millis(100))
        .poll_interval(Duration::from_secs(60));
    let mut w = FileWatcher::with_options(&path, opts);
    for i in 0..20 {
        fs::write(&path, format!("gen: {i}\n"))?;
    }
    assert_eq!(next_change(&mut w).await?, FileChange::Created);
    // The whole burst was one change.
    assert!(
        timeout(Duration::from_millis(300), w.changed())
            .await
            .is_err()
    );
    Ok(())
}

#[tokio::test]
async fn file_watcher_follows_a_configmap_symlink_swap() -> TestResult {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    // Kubernetes' layout: config.yaml -> ..data/config.yaml, ..data -> ..v1
    fs::create_dir(d.join("..v1"))?;
    fs::write(d.join("..v1/config.yaml"), "v: 1\n")?;
    std::os::unix::fs::symlink("..v1", d.join("..data"))?;
    std::os::unix::fs::symlink("..data/config.yaml", d.join("config.yaml"))?;
    let mut w = FileWatcher::with_options(d.join("config.yaml"), fast());
    assert!(w.exists());

    fs::create_dir(d.join("..v2"))?;
    fs::write(d.join("..v2/config.yaml"), "v: 2\n")?;
    std::os::unix::fs::symlink("..v2", d.join("..data_tmp"))?;
    fs::rename(d.join("..data_tmp"), d.join("..data"))?;
    fs::remove_dir_all(d.join("..v1"))?;
    assert_eq!(next_change(&mut w).await?, FileChange::Modified);
    assert_eq!(fs::read_to_string(w.path())?, "v: 2\n");
    Ok(())
}

#[tokio::test]
async fn file_watcher_directory_appears_later() -> TestResult {
    let dir = tempfile::tempdir()?;
    let conf_dir = dir.path().join("etc/hybridnet");
    let path = conf_dir.join("config.yaml");
    let mut w = FileWatcher::with_options(&path, fast());
    assert!(!w.uses_inotify());
    fs::create_dir_all(&conf_dir)?;
    fs::write(&path, "x: 1\n")?;
    assert_eq!(next_change(&mut w).await?, FileChange::Created);
    fs::write(&path, "x: 2\n")?;
    assert_eq!(next_change(&mut w).await?, FileChange::Modified);
    assert!(w.uses_inotify());

    // The directory goes away and comes back.
    fs::remove_dir_all(&conf_dir)?;
    assert_eq!(next_change(&mut w).await?, FileChange::Removed);
    fs::create_dir_all(&conf_dir)?;
    fs::write(&path, "x: 3\n")?;
    assert_eq!(next_change(&mut w).await?, FileChange::Created);
    Ok(())
}

#[tokio::test]
async fn file_watcher_poll_fallback() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("config.yaml");
    let mut w = FileWatcher::with_options(&path, fast().poll_only(true));
    assert!(!w.uses_inotify());
    fs::write(&path, "a\n")?;
    assert_eq!(next_change(&mut w).await?, FileChange::Created);
    fs::write(&path, "bb\n")?;
    assert_eq!(next_change(&mut w).await?, FileChange::Modified);
    fs::remove_file(&path)?;
    assert_eq!(next_change(&mut w).await?, FileChange::Removed);
    Ok(())
}

#[test]
fn watchers_created_outside_a_runtime_poll_until_inside_one() {
    let w = FileWatcher::new("/nonexistent-hybridnet/config.yaml");
    assert!(!w.uses_inotify() && !w.exists());
    assert_eq!(
        WatchOptions::default().poll_interval,
        Duration::from_secs(5)
    );
}
